//! # infermux-backend-onnx
//!
//! Llama-family decoders exported to ONNX in Hugging Face Optimum's
//! "text-generation-with-past" layout (`input_ids`, `attention_mask`, `position_ids`,
//! `past_key_values.N.key/value` → `logits`, `present.N.key/value`), run on ONNX Runtime through
//! [`ort`](https://docs.rs/ort) loaded at run time. Decode steps of several sequences share one
//! run: their pasts are left-padded and masked. The `present.*` outputs stay where ONNX Runtime
//! put them (host memory on CPU, device memory with CUDA) and are bound as the next run's past
//! as they are while the batch keeps the same sequences (in any order: the group runs in the
//! previous run's row order); only a change of composition assembles a new past (see
//! `kv_cache`); [`OnnxBackend::kv_stats`] counts both kinds of run.
//!
//! [`export`] writes such a graph from a Hugging Face folder, recorded from the one Rust model
//! definition (`infermux_core::model::Llama`); `cargo xtask export-onnx` runs it.
//!
//! ```no_run
//! use infermux_backend_onnx::{OnnxBackend, OnnxOptions};
//! let backend = OnnxBackend::load("models/SmolLM2-135M-Instruct", OnnxOptions::default())?;
//! # Ok::<(), infermux_backend_onnx::OnnxBackendError>(())
//! ```

mod error;
pub mod export;
mod io;
mod kv_cache;
mod session;

use std::path::{Path, PathBuf};

use infermux_core::backend::{WeightUpdateError, check_same_model};
use infermux_core::model::{LoraAdapter, ModelDir, WeightPlan};
use infermux_core::{
    Backend, BackendError, DType, Device, ForwardBatch, Logits, ModelConfig, ModelInfo, SeqChunk,
    SlotId,
};

pub use error::OnnxBackendError;

use io::{GraphIo, KvType};
use kv_cache::{KvCache, KvShape};

/// Where to run, and where the runtime library is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnnxOptions {
    /// CPU, or CUDA through the CUDA execution provider (feature `cuda`).
    pub device: Device,
    /// `libonnxruntime.so` to load; default: `ORT_DYLIB_PATH`, then `runtimes/onnxruntime`.
    pub dylib: Option<PathBuf>,
    /// Threads of one operator (ONNX Runtime's default: all cores).
    pub intra_threads: Option<usize>,
}

/// A decoder graph loaded into ONNX Runtime.
pub struct OnnxBackend {
    info: ModelInfo,
    /// The served model's config (a weight update must match it).
    config: ModelConfig,
    /// How the session was opened (a weight update opens the new graph the same way).
    options: OnnxOptions,
    session: ort::session::Session,
    io: GraphIo,
    kv: KvCache,
    placement: session::OutputPlacement,
    stats: KvStats,
}

/// How runs got their past, counted since load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Runs whose past was the previous run's `present.*`, bound where it was computed.
    pub resident_runs: usize,
    /// Runs whose past was assembled (left-padded) after the batch's composition changed.
    pub assembled_runs: usize,
}

/// A GGUF file is not a graph and its quantized weights are not exported: a typed error.
fn refuse_gguf(path: &Path) -> Result<(), OnnxBackendError> {
    if infermux_core::model::gguf::is_gguf(path) {
        return Err(BackendError::UnsupportedWeights {
            runtime: "onnxruntime",
            what: format!("GGUF files ({})", path.display()),
            hint: "GGUF files run on --backend candle (convert to a Hugging Face folder for \
                torch and onnx)",
        }
        .into());
    }
    Ok(())
}

impl OnnxBackend {
    /// Loads the graph of a model folder (`DIR/onnx/model.onnx` or `DIR/model.onnx`) with the
    /// folder's `config.json`.
    pub fn load(dir: impl AsRef<Path>, options: OnnxOptions) -> Result<Self, OnnxBackendError> {
        let dir = dir.as_ref();
        refuse_gguf(dir)?;
        let (config, eos) = infermux_core::model::read_config(dir)?;
        let graph = session::find_graph(dir)?;
        let (session, io) = open_graph(&graph, &config, &options)?;
        Self::new(config, eos, session, io, options)
    }

    /// Loads the model folder `dir` with the PEFT adapter in `adapter` merged into its weights
    /// (`W + B A`, exported into `ADAPTER/onnx`, skipped when that export is current): onnx's
    /// way to run an adapter, as its graph holds the weights. Every request then runs on the
    /// adapted model; adapters per request (`load_adapter`) stay unsupported here.
    pub fn load_merged(
        dir: impl AsRef<Path>,
        adapter: impl AsRef<Path>,
        options: OnnxOptions,
    ) -> Result<Self, OnnxBackendError> {
        let (dir, adapter) = (dir.as_ref(), adapter.as_ref());
        refuse_gguf(dir)?;
        let model = ModelDir::open(dir)?;
        let plan = WeightPlan::new(&model.config, |n| model.checkpoint.contains(n));
        let lora = LoraAdapter::read(adapter, &plan)?;
        let export_options = export::ExportOptions {
            lora: Some(std::sync::Arc::new(lora)),
            ..Default::default()
        };
        let out = export::default_out_dir(adapter, export::ExportDtype::F32);
        let report =
            export::export(dir, &out, &export_options).map_err(|e| OnnxBackendError::Graph {
                path: out.clone(),
                reason: format!("merging the adapter {}: {e}", adapter.display()),
            })?;
        let (config, eos) = infermux_core::model::read_config(dir)?;
        let graph = report.out_dir.join(export::GRAPH_FILE);
        let (session, io) = open_graph(&graph, &config, &options)?;
        Self::new(config, eos, session, io, options)
    }

    fn new(
        config: ModelConfig,
        eos: Vec<u32>,
        session: ort::session::Session,
        io: GraphIo,
        options: OnnxOptions,
    ) -> Result<Self, OnnxBackendError> {
        let device = options.device;
        let shape = KvShape {
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let dtype = if io.kv_type == KvType::F16 {
            DType::F16
        } else {
            DType::F32
        };
        let info = ModelInfo::from_config(&config, eos, dtype, device);
        Ok(Self {
            info,
            config,
            options,
            session,
            io,
            kv: KvCache::new(shape),
            placement: session::OutputPlacement::new(device)?,
            stats: KvStats::default(),
        })
    }

    /// How runs got their past so far: reused in place or assembled.
    pub fn kv_stats(&self) -> KvStats {
        self.stats
    }

    /// The graph of a weight update's folder, made as at start: a folder with safetensors is
    /// exported (into `DIR/onnx`, or `DIR/onnx-f16` for an f16 graph, skipped when its marker
    /// is current), a graph-only folder is used as it is.
    fn update_graph(&self, dir: &Path) -> Result<PathBuf, OnnxBackendError> {
        let has_weights = dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file();
        if !has_weights {
            return session::find_graph(dir);
        }
        let dtype = match self.io.kv_type {
            KvType::F16 => export::ExportDtype::F16,
            KvType::F32 => export::ExportDtype::F32,
        };
        let options = export::ExportOptions {
            dtype,
            ..Default::default()
        };
        let report =
            export::export(dir, export::default_out_dir(dir, dtype), &options).map_err(|e| {
                OnnxBackendError::Graph {
                    path: dir.to_path_buf(),
                    reason: format!("exporting the new weights: {e}"),
                }
            })?;
        Ok(report.out_dir.join(export::GRAPH_FILE))
    }
}

/// Opens `graph` and checks it against `config` (its layer count).
fn open_graph(
    graph: &Path,
    config: &ModelConfig,
    options: &OnnxOptions,
) -> Result<(ort::session::Session, GraphIo), OnnxBackendError> {
    let (session, io) = session::open(graph, options)?;
    if io.num_layers != config.num_layers {
        return Err(OnnxBackendError::Graph {
            path: graph.to_path_buf(),
            reason: format!(
                "{} layers in the graph, {} in config.json",
                io.num_layers, config.num_layers
            ),
        });
    }
    Ok((session, io))
}

/// Decode steps batch together; every other chunk runs alone.
fn groups(batch: &ForwardBatch) -> Vec<Vec<usize>> {
    let decode: Vec<usize> = (0..batch.chunks.len())
        .filter(|&i| batch.chunks[i].tokens.len() == 1)
        .collect();
    let mut out: Vec<Vec<usize>> = (0..batch.chunks.len())
        .filter(|&i| batch.chunks[i].tokens.len() > 1)
        .map(|i| vec![i])
        .collect();
    if !decode.is_empty() {
        out.push(decode);
    }
    out
}

impl Backend for OnnxBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.kv.len(slot), self.info.max_context)?;
        // The exported graph holds the base weights only; it loads no adapters.
        batch.check_adapters(|_| false)?;
        let vocab = self.info.vocab_size;
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); batch.chunks.len()];
        for mut group in groups(batch) {
            // A reordering of the previous run's rows runs in that run's order, so that its
            // output can be this run's past as it is.
            let slots: Vec<SlotId> = group.iter().map(|&i| batch.chunks[i].slot).collect();
            if let Some(order) = self.kv.block_order(&slots) {
                group = order.into_iter().map(|k| group[k]).collect();
            }
            let chunks: Vec<&SeqChunk> = group.iter().map(|&i| &batch.chunks[i]).collect();
            let out = session::run_group(
                &mut self.session,
                &self.io,
                &mut self.kv,
                &self.placement,
                vocab,
                &chunks,
            )?;
            if out.resident {
                self.stats.resident_runs += 1;
            } else {
                self.stats.assembled_runs += 1;
            }
            for (&i, r) in group.iter().zip(out.rows) {
                rows[i] = r;
            }
        }
        Logits::new(batch, vocab, rows.concat())
    }

    fn release(&mut self, slot: SlotId) {
        self.kv.release(slot);
    }

    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError> {
        self.kv.fork_prefix(src, dst, len)
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        self.kv.len(slot)
    }

    /// Opens the new folder's graph (exported from its safetensors as at start) in a new
    /// session; the old session serves until the new one is open and its interface matches.
    fn update_weights(&mut self, dir: &Path) -> Result<(), WeightUpdateError> {
        let (config, _) = infermux_core::model::read_config(dir)?;
        check_same_model(dir, &self.config, &config)?;
        let load = |e: OnnxBackendError| WeightUpdateError::Load {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        let graph = self.update_graph(dir).map_err(load)?;
        let (session, io) = open_graph(&graph, &self.config, &self.options).map_err(load)?;
        if (io.kv_type, io.logits_type, io.has_position_ids)
            != (
                self.io.kv_type,
                self.io.logits_type,
                self.io.has_position_ids,
            )
        {
            return Err(WeightUpdateError::Mismatch {
                path: graph,
                differences: vec![format!(
                    "graph interface: served KV {:?}, logits {:?}, position_ids {}; new KV {:?}, \
                     logits {:?}, position_ids {}",
                    self.io.kv_type,
                    self.io.logits_type,
                    self.io.has_position_ids,
                    io.kv_type,
                    io.logits_type,
                    io.has_position_ids
                )],
            });
        }
        self.session = session;
        self.io = io;
        // No slot holds state during an update; start from an empty cache of the new session.
        self.kv = KvCache::new(KvShape {
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        });
        Ok(())
    }
}
