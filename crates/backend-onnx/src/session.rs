//! Loading ONNX Runtime, finding the graph of a model folder, and running one group of chunks
//! as a (left-padded) batch through an IO binding that keeps the KV cache where it is computed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use infermux_core::{BackendError, Device, LogitsWanted, SeqChunk, SlotId};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor};

use crate::OnnxOptions;
use crate::error::{OnnxBackendError, runtime_error};
use crate::io::{GraphIo, KvType};
use crate::kv_cache::{KvBlock, KvCache};

/// Where the runtime library is looked for when no path is configured.
const DEFAULT_DYLIB: &str = "runtimes/onnxruntime/lib/libonnxruntime.so.1.31.1";

/// The process-wide ONNX Runtime environment, created on first use.
fn environment(
    dylib: Option<&Path>,
) -> Result<&'static ort::environment::Environment, OnnxBackendError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let path = find_dylib(dylib).ok_or_else(|| {
            "libonnxruntime not found: run `cargo xtask setup`, or set ORT_DYLIB_PATH to \
             libonnxruntime.so (1.31)"
                .to_string()
        })?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        builder
            .with_name("infermux")
            .build()
            .map_err(|e| e.to_string())
    });
    env.as_ref()
        .map_err(|e| OnnxBackendError::Runtime(e.clone()))
}

/// The configured path, `ORT_DYLIB_PATH`, or the repo-relative install next to the executable.
fn find_dylib(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(5)
        .map(|dir| dir.join(DEFAULT_DYLIB))
        .find(|p| p.is_file())
}

/// The decoder graph of a model folder: `DIR/onnx/model.onnx` (infermux's export) or
/// `DIR/model.onnx` (an Optimum export folder).
pub(crate) fn find_graph(dir: &Path) -> Result<PathBuf, OnnxBackendError> {
    let candidates = [dir.join("onnx/model.onnx"), dir.join("model.onnx")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OnnxBackendError::Graph {
            path: candidates[0].clone(),
            reason: "no decoder graph found (export one with `cargo xtask export-onnx`)".into(),
        })
}

/// Opens `graph` on the device of `options`.
pub(crate) fn open(
    graph: &Path,
    options: &OnnxOptions,
) -> Result<(Session, GraphIo), OnnxBackendError> {
    let env = environment(options.dylib.as_deref())?;
    let runtime = |e: String| OnnxBackendError::Runtime(e);
    let mut builder = Session::builder(env).map_err(|e| runtime(e.to_string()))?;
    if let Device::Cuda(ordinal) = options.device {
        builder = with_cuda(builder, ordinal)?;
    }
    if let Some(n) = options.intra_threads {
        builder = builder
            .with_intra_threads(n)
            .map_err(|e| runtime(e.to_string()))?;
    }
    let session = builder
        .commit_from_file(graph)
        .map_err(|e| runtime(format!("{}: {e}", graph.display())))?;
    let io = GraphIo::discover(&session, graph)?;
    Ok((session, io))
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    ordinal: usize,
) -> Result<ort::session::builder::SessionBuilder, OnnxBackendError> {
    use infermux_core::DeviceMissing;
    let unavailable = |missing| BackendError::DeviceUnavailable {
        runtime: "onnxruntime",
        device: Device::Cuda(ordinal),
        missing,
    };
    infermux_core::cuda::check_driver(ordinal).map_err(unavailable)?;
    let ep = ort::ep::CUDA::default()
        .with_device_id(ordinal as i32)
        .build()
        .error_on_failure();
    // Fails when the ONNX Runtime library has no CUDA execution provider (the CPU wheel) or
    // the provider's CUDA libraries cannot be loaded.
    builder.with_execution_providers([ep]).map_err(|e| {
        unavailable(DeviceMissing::Runtime(format!(
            "the CUDA execution provider: {e}"
        )))
        .into()
    })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _builder: ort::session::builder::SessionBuilder,
    ordinal: usize,
) -> Result<ort::session::builder::SessionBuilder, OnnxBackendError> {
    Err(BackendError::DeviceUnavailable {
        runtime: "onnxruntime",
        device: Device::Cuda(ordinal),
        missing: infermux_core::DeviceMissing::NotCompiled,
    }
    .into())
}

/// Where a run's outputs go: `present.*` stay where the execution provider computes (so that
/// the next run can take them as its past), logits come to the host.
pub(crate) struct OutputPlacement {
    kv: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
}

impl OutputPlacement {
    pub fn new(device: Device) -> Result<Self, OnnxBackendError> {
        let info = |device, id| {
            MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| OnnxBackendError::Runtime(e.to_string()))
        };
        let host = info(AllocationDevice::CPU, 0)?;
        let kv = match device {
            Device::Cpu => info(AllocationDevice::CPU, 0)?,
            Device::Cuda(ordinal) => info(AllocationDevice::CUDA, ordinal as i32)?,
        };
        Ok(Self { kv, host })
    }
}

/// What one run returned: the logits rows each chunk asked for, in chunk order, and whether the
/// past was the previous run's output bound as it was.
pub(crate) struct GroupOutput {
    pub rows: Vec<Vec<f32>>,
    pub resident: bool,
}

/// Runs `chunks` (equal token counts) as one batch, appending their KV to `kv`.
///
/// When the chunks' slots are exactly the rows of the block the previous run left (the steady
/// state of continuous decoding), that block's `present.*` tensors are bound as this run's
/// `past_key_values.*` as they are, on the device. Otherwise the past is assembled on the host,
/// left-padded to the longest sequence. Either way every row's attention mask is zero over its
/// padding: each row grows by the same `t` positions per run, so a padded layout stays valid.
pub(crate) fn run_group(
    session: &mut Session,
    io: &GraphIo,
    kv: &mut KvCache,
    placement: &OutputPlacement,
    vocab: usize,
    chunks: &[&SeqChunk],
) -> Result<GroupOutput, BackendError> {
    let b = chunks.len();
    let t = chunks[0].tokens.len();
    let slots: Vec<SlotId> = chunks.iter().map(|c| c.slot).collect();
    let resident = kv.resident(&slots);
    let past = match &resident {
        Some(block) => block.total(),
        None => chunks.iter().map(|c| c.start_pos).max().unwrap_or(0),
    };
    let total = past + t;
    let ids: Vec<i64> = chunks
        .iter()
        .flat_map(|c| c.tokens.iter().map(|&x| x as i64))
        .collect();
    let positions: Vec<i64> = chunks
        .iter()
        .flat_map(|c| (c.start_pos..c.start_pos + t).map(|p| p as i64))
        .collect();
    let mask: Vec<i64> = chunks
        .iter()
        .flat_map(|c| (0..total).map(move |i| i64::from(i >= past - c.start_pos)))
        .collect();
    let mut binding = session.create_binding().map_err(runtime_error)?;
    binding
        .bind_input("input_ids", &tensor_i64(vec![b, t], ids)?)
        .map_err(runtime_error)?;
    binding
        .bind_input("attention_mask", &tensor_i64(vec![b, total], mask)?)
        .map_err(runtime_error)?;
    if io.has_position_ids {
        binding
            .bind_input("position_ids", &tensor_i64(vec![b, t], positions)?)
            .map_err(runtime_error)?;
    }
    let names = |layer: usize| [&io.past_key[layer], &io.past_value[layer]];
    match &resident {
        Some(block) => {
            for layer in 0..io.num_layers {
                for (values, name) in [false, true].into_iter().zip(names(layer)) {
                    binding
                        .bind_input(name.as_str(), block.tensor(layer, values))
                        .map_err(runtime_error)?;
                }
            }
        }
        None => {
            let assembled = kv.assemble(io.kv_type, &slots, past)?;
            for layer in 0..io.num_layers {
                for (k, name) in names(layer).into_iter().enumerate() {
                    binding
                        .bind_input(name.as_str(), &assembled[2 * layer + k])
                        .map_err(runtime_error)?;
                }
            }
        }
    }
    // Fresh output bindings each run: ONNX Runtime allocates new `present.*` tensors (a
    // previous run's, still held as some slots' past, are never written over).
    binding
        .bind_output_to_device("logits", &placement.host)
        .map_err(runtime_error)?;
    for layer in 0..io.num_layers {
        for name in [&io.present_key[layer], &io.present_value[layer]] {
            binding
                .bind_output_to_device(name.as_str(), &placement.kv)
                .map_err(runtime_error)?;
        }
    }
    let mut outputs = session.run_binding(&binding).map_err(runtime_error)?;
    let mut take = |name: &str| -> Result<DynTensor, BackendError> {
        outputs
            .remove(name)
            .ok_or_else(|| BackendError::Runtime {
                runtime: "onnxruntime",
                message: format!("run returned no `{name}`"),
            })?
            .downcast::<DynTensorValueType>()
            .map_err(runtime_error)
    };
    let logits = take("logits")?;
    let mut present = Vec::with_capacity(2 * io.num_layers);
    for layer in 0..io.num_layers {
        present.push(take(&io.present_key[layer])?);
        present.push(take(&io.present_value[layer])?);
    }
    drop(outputs);
    drop(binding);
    let lens: Vec<usize> = chunks.iter().map(|c| c.start_pos + t).collect();
    kv.store(io.kv_type, KvBlock::new(present, b, total), &slots, &lens)?;
    let logits = extract_f32(&logits, io.logits_type)?;
    let resident = resident.is_some();
    let rows = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let rows = match c.logits {
                LogitsWanted::None => 0..0,
                LogitsWanted::Last => t - 1..t,
                LogitsWanted::All => 0..t,
            };
            logits[(i * t + rows.start) * vocab..(i * t + rows.end) * vocab].to_vec()
        })
        .collect();
    Ok(GroupOutput { rows, resident })
}

fn tensor_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<DynValue, BackendError> {
    Ok(Tensor::from_array((shape, data))
        .map_err(runtime_error)?
        .into_dyn())
}

/// The tensor's values as f32: borrowed for f32 graphs (no copy), converted for f16 ones.
fn extract_f32(value: &DynTensor, ty: KvType) -> Result<std::borrow::Cow<'_, [f32]>, BackendError> {
    match ty {
        KvType::F32 => Ok(std::borrow::Cow::Borrowed(
            value.try_extract_tensor::<f32>().map_err(runtime_error)?.1,
        )),
        KvType::F16 => {
            let (_, data) = value
                .try_extract_tensor::<half::f16>()
                .map_err(runtime_error)?;
            Ok(std::borrow::Cow::Owned(
                data.iter().map(|x| x.to_f32()).collect(),
            ))
        }
    }
}
