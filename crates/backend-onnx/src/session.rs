//! Loading ONNX Runtime, finding the graph of a model folder, and running one group of chunks
//! as a (left-padded) batch.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use infermux_core::{BackendError, Device, LogitsWanted, SeqChunk};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::OnnxOptions;
use crate::error::{OnnxBackendError, runtime_error};
use crate::io::{GraphIo, KvType};
use crate::kv_cache::KvCache;

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
    let ep = ort::ep::CUDA::default()
        .with_device_id(ordinal as i32)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([ep])
        .map_err(|e| OnnxBackendError::Runtime(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _builder: ort::session::builder::SessionBuilder,
    _ordinal: usize,
) -> Result<ort::session::builder::SessionBuilder, OnnxBackendError> {
    Err(OnnxBackendError::Runtime(
        "this build has no CUDA support: rebuild with the `cuda` feature".into(),
    ))
}

/// Runs `chunks` (equal token counts) as one batch, appending their KV to `kv`; returns the
/// logits rows each chunk asked for, in chunk order.
pub(crate) fn run_group(
    session: &mut Session,
    io: &GraphIo,
    kv: &mut KvCache,
    vocab: usize,
    chunks: &[&SeqChunk],
) -> Result<Vec<Vec<f32>>, BackendError> {
    let b = chunks.len();
    let t = chunks[0].tokens.len();
    let past = chunks.iter().map(|c| c.start_pos).max().unwrap_or(0);
    let total = past + t;
    let shape = kv.shape();
    let (nkv, hd) = (shape.num_kv_heads, shape.head_dim);
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
    let mut inputs: Vec<(String, DynValue)> = vec![
        ("input_ids".into(), tensor_i64(vec![b, t], ids)?),
        ("attention_mask".into(), tensor_i64(vec![b, total], mask)?),
    ];
    if io.has_position_ids {
        inputs.push(("position_ids".into(), tensor_i64(vec![b, t], positions)?));
    }
    let block = nkv * past * hd;
    for layer in 0..io.num_layers {
        for (values, name) in [(false, &io.past_key[layer]), (true, &io.past_value[layer])] {
            let mut data = vec![0f32; b * block];
            for (i, c) in chunks.iter().enumerate() {
                kv.write_past(
                    c.slot,
                    layer,
                    values,
                    past,
                    &mut data[i * block..(i + 1) * block],
                );
            }
            inputs.push((
                name.clone(),
                tensor_float(io.kv_type, vec![b, nkv, past, hd], data)?,
            ));
        }
    }
    let outputs = session.run(inputs).map_err(runtime_error)?;
    for layer in 0..io.num_layers {
        for (values, name) in [
            (false, &io.present_key[layer]),
            (true, &io.present_value[layer]),
        ] {
            let present = extract_f32(&outputs[name.as_str()], io.kv_type)?;
            let row = nkv * total * hd;
            for (i, c) in chunks.iter().enumerate() {
                kv.append(
                    c.slot,
                    layer,
                    values,
                    &present[i * row..(i + 1) * row],
                    total,
                    t,
                );
            }
        }
    }
    for c in chunks {
        kv.advance(c.slot, t);
    }
    let logits = extract_f32(&outputs["logits"], io.logits_type)?;
    Ok(chunks
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
        .collect())
}

fn tensor_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<DynValue, BackendError> {
    Ok(Tensor::from_array((shape, data))
        .map_err(runtime_error)?
        .into_dyn())
}

fn tensor_float(ty: KvType, shape: Vec<usize>, data: Vec<f32>) -> Result<DynValue, BackendError> {
    match ty {
        KvType::F32 => Ok(Tensor::from_array((shape, data))
            .map_err(runtime_error)?
            .into_dyn()),
        KvType::F16 => {
            let data: Vec<half::f16> = data.into_iter().map(half::f16::from_f32).collect();
            Ok(Tensor::from_array((shape, data))
                .map_err(runtime_error)?
                .into_dyn())
        }
    }
}

/// The tensor's values as f32: borrowed for f32 graphs (no copy), converted for f16 ones.
fn extract_f32(value: &DynValue, ty: KvType) -> Result<std::borrow::Cow<'_, [f32]>, BackendError> {
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
