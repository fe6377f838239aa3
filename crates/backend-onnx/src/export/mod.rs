//! The ONNX exporter: a Hugging Face Llama-family folder → a decoder graph in Optimum's
//! "text-generation-with-past" layout, derived from the one Rust model definition
//! ([`infermux_core::model::Llama`]) rather than from a second implementation.
//!
//! [`Llama::load`] runs over a [`LoadOps`](infermux_core::model::LoadOps) that turns the plan's
//! tensors into initializers (`loader`), and [`Llama::forward`] over a
//! [`LlamaOps`](infermux_core::model::LlamaOps) whose tensors are symbolic values and whose ops
//! record nodes (`recorder`): standard ops only, opset 17, IR version 8, norms and softmax in
//! f32. The `ModelProto` is written by a small protobuf writer (`proto`); the weights go to one
//! external data file, `model.onnx_data`, converted to f32 or f16 one tensor at a time.
//!
//! The graph's interface is the one [`crate::OnnxBackend`] reads (and Optimum exports):
//!
//! | inputs | outputs |
//! |---|---|
//! | `input_ids [batch, seq]` int64 | `logits [batch, seq, vocab]` |
//! | `attention_mask [batch, past + seq]` int64 | `present.N.key/value [batch, kv_heads, past + seq, head_dim]` |
//! | `position_ids [batch, seq]` int64 | |
//! | `past_key_values.N.key/value [batch, kv_heads, past, head_dim]` | |
//!
//! An export writes `infermux_export.json` last: the graph's hash, the dtype and the weight
//! files' sizes and modification times. A second export whose graph (recorded again, which takes
//! milliseconds) and weights are unchanged is skipped, so any change to the model definition or
//! to this exporter re-exports by itself.

mod checkpoint;
mod graph;
mod loader;
mod proto;
mod recorder;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use infermux_core::ModelError;
use std::sync::Arc;

use infermux_core::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use infermux_core::model::{Llama, LoraAdapter, ModelConfig, ModelDir};

use checkpoint::Checkpoint;
use graph::{DataJob, Graph, Source};
use loader::Loader;
use proto::{Dim, ElemType, Model, ValueInfo};
use recorder::Recorder;

/// The graph file of an export.
pub const GRAPH_FILE: &str = "model.onnx";
/// The external data file of an export, next to the graph.
pub const DATA_FILE: &str = "model.onnx_data";
/// The marker written last into a complete export.
pub const MARKER_FILE: &str = "infermux_export.json";
/// ONNX opset of the default domain.
pub const OPSET: i64 = 17;
/// IR version: the lowest for opset 17 (ONNX Runtime rejects IR versions newer than it knows).
pub const IR_VERSION: i64 = 8;
/// Files a standalone export copies from the model folder (those that exist).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Element type of the exported weights, activations, KV cache and logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExportDtype {
    /// float32: the graph the conformance suite compares with transformers.
    #[default]
    F32,
    /// float16; RMSNorm and softmax still run in f32.
    F16,
}

impl ExportDtype {
    /// `"f32"` or `"f16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    fn elem(self) -> ElemType {
        match self {
            Self::F32 => ElemType::Float,
            Self::F16 => ElemType::Float16,
        }
    }
}

/// How to export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportOptions {
    /// Element type of the graph.
    pub dtype: ExportDtype,
    /// Export even when the output's marker says it is current.
    pub force: bool,
    /// Also copy the folder's config, generation config and tokenizer files into the output, so
    /// that it is a model folder of its own (Optimum's layout: `DIR/model.onnx` with
    /// `config.json` and `tokenizer.json`) that `OnnxBackend::load` and the API open directly.
    /// Not needed for the default output, `MODEL/onnx`, which the backend finds from `MODEL`.
    pub standalone: bool,
    /// A LoRA adapter (read for this model's plan) merged into the projections it updates:
    /// the graph then computes the adapted model, `W + B A`, for every request.
    pub lora: Option<Arc<LoraAdapter>>,
}

/// What an export did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// The output folder.
    pub out_dir: PathBuf,
    /// Whether the output was already current (nothing written).
    pub skipped: bool,
    /// Nodes of the graph.
    pub nodes: usize,
    /// Initializers (weights, tables and constants).
    pub initializers: usize,
    /// Size of `model.onnx`.
    pub graph_bytes: u64,
    /// Size of `model.onnx_data`.
    pub data_bytes: u64,
    /// Wall time of the export.
    pub seconds: f64,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model folder or its config is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is missing or does not fit.
    #[error("tensor {name}: {reason}")]
    Tensor {
        /// Its Hugging Face name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's ops do not fit together (a bug in the model definition or the exporter).
    #[error("graph: {0}")]
    Graph(String),
    /// The output folder would replace the model folder.
    #[error("output folder {out} would replace the model folder {model}")]
    OutputOverlapsModel {
        /// The output folder.
        out: PathBuf,
        /// The model folder.
        model: PathBuf,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default output folder: `MODEL/onnx` for f32, `MODEL/onnx-f16` for f16.
pub fn default_out_dir(model_dir: &Path, dtype: ExportDtype) -> PathBuf {
    match dtype {
        ExportDtype::F32 => model_dir.join("onnx"),
        ExportDtype::F16 => model_dir.join("onnx-f16"),
    }
}

/// A recorded graph: the encoded `ModelProto` and the plan of its external data.
struct Recorded {
    graph_bytes: Vec<u8>,
    jobs: Vec<DataJob>,
    data_len: u64,
    nodes: usize,
    initializers: usize,
}

/// Records the graph of `config` over the tensors of `checkpoint`.
fn record(
    config: &ModelConfig,
    checkpoint: &Checkpoint,
    dtype: ExportDtype,
    lora: Option<&LoraAdapter>,
) -> Result<Recorded, ExportError> {
    let llama = Llama::new(config.clone(), |name| checkpoint.contains(name));
    let mut graph = Graph::new(dtype.elem());
    let weights = llama.load(&mut Loader {
        graph: &mut graph,
        checkpoint,
        head: &llama.plan.lm_head,
        tied: llama.plan.tied,
        lora: lora.map(|a| (a, &llama.plan)),
    })?;
    let logits = llama.forward(&mut Recorder::new(&mut graph, config), &weights)?;
    if logits.head_dim.is_some() || !graph.rename_output(&logits.name, "logits") {
        return Err(ExportError::Graph(format!(
            "the forward's result {} is not a fresh row value",
            logits.name
        )));
    }
    let model = Model {
        ir_version: IR_VERSION,
        opset: OPSET,
        producer_name: "infermux-backend-onnx".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph_name: format!("infermux_{:?}", config.architecture),
        inputs: graph_inputs(config, graph.float),
        outputs: graph_outputs(config, graph.float),
        nodes: std::mem::take(&mut graph.nodes),
        initializers: std::mem::take(&mut graph.initializers),
        data_file: DATA_FILE.into(),
    };
    Ok(Recorded {
        graph_bytes: proto::encode(&model),
        nodes: model.nodes.len(),
        initializers: model.initializers.len(),
        data_len: graph.data_len(),
        jobs: graph.jobs,
    })
}

// Optimum's symbolic dimension names.
const BATCH: &str = "batch_size";
const SEQ: &str = "sequence_length";
const PAST: &str = "past_sequence_length";
const TOTAL: &str = "past_sequence_length + sequence_length";

fn value(name: String, elem: ElemType, dims: Vec<Dim>) -> ValueInfo {
    ValueInfo { name, elem, dims }
}

fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

fn kv(config: &ModelConfig, elem: ElemType, name: String, length: &str) -> ValueInfo {
    let dims = vec![
        sym(BATCH),
        Dim::Fixed(config.num_kv_heads as i64),
        sym(length),
        Dim::Fixed(config.head_dim as i64),
    ];
    value(name, elem, dims)
}

fn graph_inputs(config: &ModelConfig, elem: ElemType) -> Vec<ValueInfo> {
    let ids =
        |name: &str, len: &str| value(name.into(), ElemType::Int64, vec![sym(BATCH), sym(len)]);
    let mut inputs = vec![
        ids("input_ids", SEQ),
        ids("attention_mask", TOTAL),
        ids("position_ids", SEQ),
    ];
    for i in 0..config.num_layers {
        for part in ["key", "value"] {
            inputs.push(kv(
                config,
                elem,
                format!("past_key_values.{i}.{part}"),
                PAST,
            ));
        }
    }
    inputs
}

fn graph_outputs(config: &ModelConfig, elem: ElemType) -> Vec<ValueInfo> {
    let logits = vec![sym(BATCH), sym(SEQ), Dim::Fixed(config.vocab_size as i64)];
    let mut outputs = vec![value("logits".into(), elem, logits)];
    for i in 0..config.num_layers {
        for part in ["key", "value"] {
            outputs.push(kv(config, elem, format!("present.{i}.{part}"), TOTAL));
        }
    }
    outputs
}

/// FNV-1a 64 of `bytes` (stable across Rust releases, unlike `DefaultHasher`).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The marker of an export: what it was made from.
fn marker(
    dir: &ModelDir,
    graph: &[u8],
    options: &ExportOptions,
) -> Result<serde_json::Value, ExportError> {
    let stamps = |files: &mut dyn Iterator<Item = PathBuf>| -> Result<_, ExportError> {
        let mut map = serde_json::Map::new();
        for file in files {
            let meta = fs::metadata(&file).map_err(io_error(&file))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            map.insert(name.into_owned(), serde_json::json!([meta.len(), mtime]));
        }
        Ok(serde_json::Value::Object(map))
    };
    let weights = stamps(&mut dir.weight_files.iter().cloned())?;
    let mut marker = serde_json::json!({
        "exporter": concat!("infermux-backend-onnx ", env!("CARGO_PKG_VERSION")),
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "dtype": options.dtype.as_str(),
        "standalone": options.standalone,
        "graph_fnv1a64": format!("{:016x}", fnv1a64(graph)),
        "weights": weights,
    });
    // A merged export depends on the base folder and the adapter's files too.
    if let Some(adapter) = &options.lora {
        marker["lora"] = serde_json::json!({
            "base": absolute(&dir.path)?.display().to_string(),
            "adapter": absolute(&adapter.path)?.display().to_string(),
            "files": stamps(&mut [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
                .into_iter()
                .map(|f| adapter.path.join(f)))?,
        });
    }
    Ok(marker)
}

fn is_current(out: &Path, marker: &serde_json::Value) -> bool {
    let current = fs::read(out.join(MARKER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    current.as_ref() == Some(marker)
        && out.join(GRAPH_FILE).is_file()
        && out.join(DATA_FILE).is_file()
}

/// Exports the Hugging Face folder `model_dir` into `out_dir` (`model.onnx`,
/// `model.onnx_data`, `infermux_export.json`), unless the output is already current.
///
/// The output is written into a hidden sibling folder and renamed into place at the end, so an
/// interrupted export never leaves a half-written graph behind.
pub fn export(
    model_dir: impl AsRef<Path>,
    out_dir: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    let start = Instant::now();
    let dir = ModelDir::open(model_dir.as_ref())?;
    let out = absolute(out_dir.as_ref())?;
    let model_abs = absolute(&dir.path)?;
    if model_abs.starts_with(&out) {
        return Err(ExportError::OutputOverlapsModel {
            out,
            model: model_abs,
        });
    }
    let checkpoint = Checkpoint::open(&dir.weight_files)?;
    let recorded = record(
        &dir.config,
        &checkpoint,
        options.dtype,
        options.lora.as_deref(),
    )?;
    let marker = marker(&dir, &recorded.graph_bytes, options)?;
    let mut report = ExportReport {
        out_dir: out.clone(),
        skipped: true,
        nodes: recorded.nodes,
        initializers: recorded.initializers,
        graph_bytes: recorded.graph_bytes.len() as u64,
        data_bytes: recorded.data_len,
        seconds: 0.0,
    };
    if !options.force && is_current(&out, &marker) {
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "onnx".into());
    let parent = out.parent().unwrap_or(Path::new("/"));
    let tmp = parent.join(format!(".{name}.partial"));
    let old = parent.join(format!(".{name}.old"));
    for d in [&tmp, &old] {
        remove_dir(d)?;
    }
    fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
    let graph_path = tmp.join(GRAPH_FILE);
    fs::write(&graph_path, &recorded.graph_bytes).map_err(io_error(&graph_path))?;
    write_data(
        &tmp.join(DATA_FILE),
        &checkpoint,
        &recorded.jobs,
        options.dtype,
    )?;
    if options.standalone {
        for file in MODEL_FILES {
            let src = dir.path.join(file);
            if src.is_file() {
                fs::copy(&src, tmp.join(file)).map_err(io_error(&src))?;
            }
        }
    }
    let marker_path = tmp.join(MARKER_FILE);
    let text = serde_json::to_string_pretty(&marker).unwrap_or_default() + "\n";
    fs::write(&marker_path, text).map_err(io_error(&marker_path))?;
    if out.exists() {
        fs::rename(&out, &old).map_err(io_error(&out))?;
    }
    fs::rename(&tmp, &out).map_err(io_error(&out))?;
    remove_dir(&old)?;
    report.skipped = false;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

fn absolute(path: &Path) -> Result<PathBuf, ExportError> {
    let abs = std::path::absolute(path).map_err(io_error(path))?;
    // Resolve symlinks of the part that exists, so that the overlap check compares real paths.
    Ok(fs::canonicalize(&abs).unwrap_or(abs))
}

fn remove_dir(dir: &Path) -> Result<(), ExportError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(dir)(e)),
        _ => Ok(()),
    }
}

/// Writes the external data file: each job's values at its offset, in the graph's dtype.
fn write_data(
    path: &Path,
    checkpoint: &Checkpoint,
    jobs: &[DataJob],
    dtype: ExportDtype,
) -> Result<(), ExportError> {
    let file = File::create(path).map_err(io_error(path))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let mut written = 0u64;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for job in jobs {
        values.clear();
        let data: &[f32] = match &job.source {
            Source::Values(v) => v,
            Source::Checkpoint {
                parts,
                cols,
                transpose,
            } => {
                for part in parts {
                    checkpoint.read_f32(part, &mut values)?;
                }
                if *transpose {
                    values = transposed(&values, values.len() / cols, *cols);
                }
                &values
            }
            Source::Merged { parts, update } => {
                for part in parts {
                    checkpoint.read_f32(part, &mut values)?;
                }
                if values.len() != update.out * update.inp {
                    return Err(ExportError::Graph(format!(
                        "{}: {} values for a [{}, {}] adapter update",
                        job.name,
                        values.len(),
                        update.out,
                        update.inp
                    )));
                }
                update.merge_into(&mut values);
                values = transposed(&values, update.out, update.inp);
                &values
            }
        };
        if data.len() != job.elements {
            return Err(ExportError::Graph(format!(
                "{}: {} values for {} elements",
                job.name,
                data.len(),
                job.elements
            )));
        }
        bytes.clear();
        match dtype {
            ExportDtype::F32 => bytes.extend(data.iter().flat_map(|v| v.to_le_bytes())),
            ExportDtype::F16 => bytes.extend(
                data.iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
            ),
        }
        let padding = job.offset - written;
        w.write_all(&vec![0u8; padding as usize])
            .and_then(|()| w.write_all(&bytes))
            .map_err(io_error(path))?;
        written = job.offset + bytes.len() as u64;
    }
    w.flush().map_err(io_error(path))
}

/// `[rows, cols]` → `[cols, rows]`, in cache-sized blocks.
fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut out = vec![0.0; x.len()];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = x[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_value() {
        let x: Vec<f32> = (0..35 * 70).map(|v| v as f32).collect();
        let t = transposed(&x, 35, 70);
        for r in 0..35 {
            for c in 0..70 {
                assert_eq!(t[c * 35 + r], x[r * 70 + c]);
            }
        }
    }

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
