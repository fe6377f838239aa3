//! The only numerics a backend owns: a forward pass over a flattened multi-sequence batch that
//! returns logits, and the per-sequence KV state that pass reads and extends.
//!
//! Everything after logits (log-softmax, sampling, stops) lives in the core, once for all
//! backends. A backend addresses its KV state by [`SlotId`]; the engine decides which slot holds
//! which sequence.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::error::{BackendError, ModelError};
use crate::kv::KvUsage;
use crate::model::{AdapterError, LoraAdapter, ModelConfig, ModelDir, WeightPlan};

/// Names one sequence's KV state inside a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotId(pub u32);

/// Element type of a backend's weights and activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float: the reference precision.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// Where a backend computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// What the engine needs to know about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Rows of the output head: valid token ids are `0..vocab_size`.
    pub vocab_size: usize,
    /// Tokens that end generation unless `ignore_eos`.
    pub eos_token_ids: Vec<TokenId>,
    /// Maximum positions (prompt + completion) a sequence may occupy.
    pub max_context: usize,
    /// Precision the backend runs in.
    pub dtype: DType,
    /// Where it runs.
    pub device: Device,
    /// Bytes one cached position takes across all layers (keys and values).
    pub kv_bytes_per_token: u64,
}

impl ModelInfo {
    /// The facts of a model with `config`, served in `dtype` on `device`.
    pub fn from_config(
        config: &crate::model::ModelConfig,
        eos_token_ids: Vec<TokenId>,
        dtype: DType,
        device: Device,
    ) -> Self {
        Self {
            vocab_size: config.vocab_size,
            eos_token_ids,
            max_context: config.max_position_embeddings,
            dtype,
            device,
            kv_bytes_per_token: config.kv_bytes_per_token(dtype),
        }
    }
}

/// Which logits rows a chunk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None: an intermediate prefill chunk.
    None,
    /// Only the row of the chunk's last token (to sample the next token).
    Last,
    /// One row per token of the chunk (prompt logprobs, scoring).
    All,
}

impl LogitsWanted {
    /// Number of rows this request yields for a chunk of `len` tokens.
    pub fn rows(self, len: usize) -> usize {
        match self {
            Self::None => 0,
            Self::Last => usize::from(len > 0),
            Self::All => len,
        }
    }
}

/// A LoRA adapter loaded into a backend ([`Backend::load_adapter`]); the engine never reuses an
/// id, so a stale one can only be unknown, never another adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub u32);

/// A run of consecutive tokens of one sequence inside a [`ForwardBatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct SeqChunk {
    /// The sequence's KV slot. A slot is created when first addressed at position 0.
    pub slot: SlotId,
    /// Position of `tokens[0]`; must equal the number of tokens the slot already caches.
    pub start_pos: usize,
    /// Tokens to append to the slot and run through the model.
    pub tokens: Vec<TokenId>,
    /// Which logits rows to return for this chunk.
    pub logits: LogitsWanted,
    /// The LoRA adapter the sequence runs (`None`: the base weights alone).
    pub adapter: Option<AdapterId>,
}

/// One forward pass: prefill chunks and decode steps of several sequences, flattened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// The chunks, each for a distinct slot.
    pub chunks: Vec<SeqChunk>,
}

impl ForwardBatch {
    /// The token rows (indices into the batch's flattened tokens) of each adapter its chunks
    /// run, adapters in order of first use; rows on the base weights are in none. What a
    /// backend's [`crate::model::LlamaOps::lora`] gathers by.
    pub fn adapter_rows(&self) -> Vec<(AdapterId, Vec<u32>)> {
        let mut out: Vec<(AdapterId, Vec<u32>)> = Vec::new();
        let mut row = 0u32;
        for c in &self.chunks {
            let n = c.tokens.len() as u32;
            if let Some(id) = c.adapter {
                let rows = row..row + n;
                match out.iter_mut().find(|(a, _)| *a == id) {
                    Some((_, list)) => list.extend(rows),
                    None => out.push((id, rows.collect())),
                }
            }
            row += n;
        }
        out
    }

    /// `Err(UnknownAdapter)` for the first chunk naming an adapter `loaded` denies (a backend
    /// checks before computing anything).
    pub fn check_adapters(&self, loaded: impl Fn(AdapterId) -> bool) -> Result<(), BackendError> {
        match self
            .chunks
            .iter()
            .filter_map(|c| c.adapter)
            .find(|&id| !loaded(id))
        {
            Some(id) => Err(BackendError::UnknownAdapter(id)),
            None => Ok(()),
        }
    }

    /// Total tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }

    /// Total logits rows the batch asks for.
    pub fn num_logit_rows(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.logits.rows(c.tokens.len()))
            .sum()
    }

    /// Checks what every backend relies on: each chunk is for a distinct slot, starts where its
    /// slot's cache ends (`cached_len`) and stays within `max_context`.
    pub fn check_positions(
        &self,
        cached_len: impl Fn(SlotId) -> usize,
        max_context: usize,
    ) -> Result<(), BackendError> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        if let Some(c) = self.chunks.iter().find(|c| !seen.insert(c.slot)) {
            return Err(BackendError::Runtime {
                runtime: "batch",
                message: format!("slot {:?} appears in more than one chunk", c.slot),
            });
        }
        for c in &self.chunks {
            let cached = cached_len(c.slot);
            if cached != c.start_pos {
                return Err(BackendError::PositionMismatch {
                    slot: c.slot,
                    start_pos: c.start_pos,
                    cached,
                });
            }
            let needed = c.start_pos + c.tokens.len();
            if needed > max_context {
                return Err(BackendError::ContextExceeded {
                    slot: c.slot,
                    needed,
                    max_context,
                });
            }
        }
        Ok(())
    }

    /// Flat positions of the tokens whose logits are wanted, in batch order.
    pub fn logit_row_indices(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.num_logit_rows());
        let mut offset = 0;
        for c in &self.chunks {
            let len = c.tokens.len();
            match c.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if len > 0 => out.push(offset + len - 1),
                LogitsWanted::Last => {}
                LogitsWanted::All => out.extend(offset..offset + len),
            }
            offset += len;
        }
        out
    }
}

/// Logits returned by a forward pass: host f32 rows, grouped by chunk in batch order.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    vocab_size: usize,
    data: Vec<f32>,
    chunk_rows: Vec<Range<usize>>,
}

impl Logits {
    /// Wraps `data` (rows × `vocab_size`, row-major) laid out as `batch` asked.
    ///
    /// Fails if the number of rows does not match what the batch asked for.
    pub fn new(
        batch: &ForwardBatch,
        vocab_size: usize,
        data: Vec<f32>,
    ) -> Result<Self, BackendError> {
        let expected = batch.num_logit_rows() * vocab_size;
        if data.len() != expected {
            return Err(BackendError::Runtime {
                runtime: "backend",
                message: format!("returned {} logits, expected {expected}", data.len()),
            });
        }
        let mut chunk_rows = Vec::with_capacity(batch.chunks.len());
        let mut row = 0;
        for c in &batch.chunks {
            let n = c.logits.rows(c.tokens.len());
            chunk_rows.push(row..row + n);
            row += n;
        }
        Ok(Self {
            vocab_size,
            data,
            chunk_rows,
        })
    }

    /// Vocabulary size (row length).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The rows of chunk `chunk`, each `vocab_size` long.
    pub fn chunk(&self, chunk: usize) -> impl ExactSizeIterator<Item = &[f32]> + '_ {
        let rows = self.chunk_rows[chunk].clone();
        rows.map(move |r| &self.data[r * self.vocab_size..(r + 1) * self.vocab_size])
    }

    /// The last row of chunk `chunk`, if it asked for any.
    pub fn last_row(&self, chunk: usize) -> Option<&[f32]> {
        self.chunk(chunk).last()
    }
}

/// A model that turns token batches into logits over KV state it owns.
///
/// Implementations run on the engine thread only, so methods take `&mut self`.
pub trait Backend: Send {
    /// Static facts about the loaded model.
    fn info(&self) -> &ModelInfo;

    /// Runs the model over `batch`, appending each chunk's tokens to its slot's KV state, and
    /// returns the logits rows each chunk asked for.
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError>;

    /// Frees a slot's KV state; releasing an empty slot is a no-op.
    fn release(&mut self, slot: SlotId);

    /// Makes `dst` a copy of the first `len` positions of `src`'s KV state (`len` at most
    /// `cached_len(src)`): the prefix cache's reuse of a cached prefix. `dst`'s previous
    /// state, if any, is dropped.
    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError>;

    /// Makes `dst` a copy of all of `src`'s KV state (for sampling several continuations of
    /// one prefilled prompt).
    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        let len = self.cached_len(src);
        self.fork_prefix(src, dst, len)
    }

    /// Number of tokens cached in `slot` (0 if it holds nothing).
    fn cached_len(&self, slot: SlotId) -> usize;

    /// KV memory allocated and its budget.
    fn kv_usage(&self) -> KvUsage {
        KvUsage {
            bytes_per_token: self.info().kv_bytes_per_token,
            ..KvUsage::default()
        }
    }

    /// Limits the KV memory all slots may allocate (`None`: unlimited); an allocation past it
    /// fails with [`BackendError::KvBudgetExceeded`].
    fn set_kv_budget(&mut self, _bytes: Option<u64>) {}

    /// Replaces the model's weights with those of the Hugging Face folder `dir` (a checkpoint
    /// of the served model: same config and shapes, e.g. a training step's), through the loader
    /// the backend used at start. The new weights are loaded in full before they replace the
    /// old ones, so on error the old weights keep serving. The engine calls it only while no
    /// slot holds KV state (KV computed with the old weights would be stale). The default
    /// stages with [`Backend::weight_stager`] and installs.
    fn update_weights(&mut self, dir: &Path) -> Result<(), WeightUpdateError> {
        let stage = self.weight_stager().ok_or(WeightUpdateError::Unsupported)?;
        let staged = stage(dir)?;
        self.install_weights(staged)
    }

    /// A reader of checkpoints into this backend's weights that runs on another thread while
    /// the old weights keep serving, so an update costs the engine only the swap; `None` (the
    /// default): the backend loads in [`Backend::update_weights`] on the engine thread.
    fn weight_stager(&self) -> Option<WeightStager> {
        None
    }

    /// Swaps in weights a [`WeightStager`] of this backend read (while no slot holds KV state,
    /// as for [`Backend::update_weights`]).
    fn install_weights(&mut self, _staged: StagedWeights) -> Result<(), WeightUpdateError> {
        Err(WeightUpdateError::Unsupported)
    }

    /// The model's tensors, which adapters are read against; `None` (the default) for a
    /// backend that runs no adapters.
    fn weight_plan(&self) -> Option<&WeightPlan> {
        None
    }

    /// Makes `adapter` available to chunks that name `id`. Adapters apply per chunk, so
    /// sequences on different adapters and on the base share one forward.
    fn load_adapter(&mut self, _id: AdapterId, _adapter: &LoraAdapter) -> Result<(), AdapterError> {
        Err(AdapterError::BackendUnsupported)
    }

    /// Drops adapter `id` (no chunk names it any more).
    fn unload_adapter(&mut self, _id: AdapterId) {}

    /// Prefills (a chunk of) one sequence: shorthand for a one-chunk [`Backend::forward`].
    fn prefill(
        &mut self,
        slot: SlotId,
        start_pos: usize,
        tokens: &[TokenId],
        logits: LogitsWanted,
    ) -> Result<Logits, BackendError> {
        let chunk = SeqChunk {
            slot,
            start_pos,
            tokens: tokens.to_vec(),
            logits,
            adapter: None,
        };
        self.forward(&ForwardBatch {
            chunks: vec![chunk],
        })
    }

    /// One decode step for several sequences: `(slot, next token)` pairs, one logits row each.
    fn decode(&mut self, steps: &[(SlotId, TokenId)]) -> Result<Logits, BackendError> {
        let chunks = steps
            .iter()
            .map(|&(slot, token)| SeqChunk {
                slot,
                start_pos: self.cached_len(slot),
                tokens: vec![token],
                logits: LogitsWanted::Last,
                adapter: None,
            })
            .collect();
        self.forward(&ForwardBatch { chunks })
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn info(&self) -> &ModelInfo {
        (**self).info()
    }
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        (**self).forward(batch)
    }
    fn release(&mut self, slot: SlotId) {
        (**self).release(slot)
    }
    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError> {
        (**self).fork_prefix(src, dst, len)
    }
    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        (**self).fork(src, dst)
    }
    fn cached_len(&self, slot: SlotId) -> usize {
        (**self).cached_len(slot)
    }
    fn kv_usage(&self) -> KvUsage {
        (**self).kv_usage()
    }
    fn set_kv_budget(&mut self, bytes: Option<u64>) {
        (**self).set_kv_budget(bytes)
    }
    fn update_weights(&mut self, dir: &Path) -> Result<(), WeightUpdateError> {
        (**self).update_weights(dir)
    }
    fn weight_stager(&self) -> Option<WeightStager> {
        (**self).weight_stager()
    }
    fn install_weights(&mut self, staged: StagedWeights) -> Result<(), WeightUpdateError> {
        (**self).install_weights(staged)
    }
    fn weight_plan(&self) -> Option<&WeightPlan> {
        (**self).weight_plan()
    }
    fn load_adapter(&mut self, id: AdapterId, adapter: &LoraAdapter) -> Result<(), AdapterError> {
        (**self).load_adapter(id, adapter)
    }
    fn unload_adapter(&mut self, id: AdapterId) {
        (**self).unload_adapter(id)
    }
}

/// A checkpoint read by a backend's [`WeightStager`], waiting for
/// [`Backend::install_weights`] (what is inside is the backend's own).
pub type StagedWeights = Box<dyn std::any::Any + Send>;

/// Reads the checkpoint folder it is given into new weights, touching nothing that serves.
pub type WeightStager =
    Box<dyn FnOnce(&Path) -> Result<StagedWeights, WeightUpdateError> + Send + 'static>;

/// Why new weights were not swapped in; whatever the reason, the old weights keep serving.
#[derive(Debug, thiserror::Error)]
pub enum WeightUpdateError {
    /// The backend cannot replace its weights in place.
    #[error("this backend cannot replace its weights in place")]
    Unsupported,
    /// The folder is not a usable model folder (missing, unreadable config or weights, headers
    /// that contradict the config).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The checkpoint is of another model: its config differs from the served one.
    #[error(
        "the checkpoint at {} does not match the served model: {}",
        path.display(),
        differences.join("; ")
    )]
    Mismatch {
        /// The checkpoint folder.
        path: PathBuf,
        /// Each differing config field, as `field: served X, checkpoint Y`.
        differences: Vec<String>,
    },
    /// Reading or converting the new tensors failed.
    #[error("loading the weights of {}: {message}", path.display())]
    Load {
        /// The checkpoint folder.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Another weight update is waiting for running requests to finish (a drain-mode update
    /// waits for it; an abort-mode one replaces it).
    #[error("another weight update is in progress")]
    InProgress,
    /// A later abort-mode update replaced this one while it waited for requests to drain.
    #[error("replaced by a later weight update with abort_all_requests")]
    Superseded,
    /// The backend panicked while loading; the panic was caught and the old weights kept.
    #[error("the backend panicked while loading new weights: {0}")]
    Panicked(String),
    /// [`Backend::install_weights`] was given weights another backend's stager read.
    #[error("the staged weights were read by another backend's stager")]
    ForeignStage,
    /// The engine thread is gone.
    #[error("the engine has shut down")]
    Shutdown,
}

/// Checks that the checkpoint config `found` (read from `path`) is the served model's `served`:
/// every field a backend builds the model from must be equal (EOS ids may differ: the served
/// ones are kept). The error names each differing field with both values.
pub fn check_same_model(
    path: &Path,
    served: &ModelConfig,
    found: &ModelConfig,
) -> Result<(), WeightUpdateError> {
    // Destructured, so a new config field cannot be forgotten here.
    let ModelConfig {
        architecture,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        attention_out_bias,
        mlp_bias,
        qk_norm,
        eos_token_ids: _,
    } = found;
    let mut differences = Vec::new();
    let mut differ = |field: &str, served: &dyn std::fmt::Debug, found: &dyn std::fmt::Debug| {
        let (served, found) = (format!("{served:?}"), format!("{found:?}"));
        if served != found {
            differences.push(format!("{field}: served {served}, checkpoint {found}"));
        }
    };
    differ("architecture", &served.architecture, architecture);
    differ("hidden_size", &served.hidden_size, hidden_size);
    differ(
        "intermediate_size",
        &served.intermediate_size,
        intermediate_size,
    );
    differ("num_hidden_layers", &served.num_layers, num_layers);
    differ("num_attention_heads", &served.num_heads, num_heads);
    differ("num_key_value_heads", &served.num_kv_heads, num_kv_heads);
    differ("head_dim", &served.head_dim, head_dim);
    differ("vocab_size", &served.vocab_size, vocab_size);
    differ("rms_norm_eps", &served.rms_norm_eps, rms_norm_eps);
    differ("rope_theta", &served.rope_theta, rope_theta);
    differ("rope_scaling", &served.rope_scaling, rope_scaling);
    differ(
        "max_position_embeddings",
        &served.max_position_embeddings,
        max_position_embeddings,
    );
    differ(
        "tie_word_embeddings",
        &served.tie_word_embeddings,
        tie_word_embeddings,
    );
    differ("attention_bias", &served.attention_bias, attention_bias);
    differ(
        "attention_out_bias",
        &served.attention_out_bias,
        attention_out_bias,
    );
    differ("mlp_bias", &served.mlp_bias, mlp_bias);
    differ("qk_norm", &served.qk_norm, qk_norm);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(WeightUpdateError::Mismatch {
            path: path.to_path_buf(),
            differences,
        })
    }
}

/// Opens `dir` as new weights for the model `served`: a complete model folder
/// ([`ModelDir::open`]: config ranges, safetensors headers against the config) whose config is
/// the served one ([`check_same_model`]), so the tensors a backend reads have the served
/// shapes. Reads headers only, never tensor data.
pub fn open_checkpoint(dir: &Path, served: &ModelConfig) -> Result<ModelDir, WeightUpdateError> {
    // The config alone first: a checkpoint of another model is named as a mismatch rather
    // than by the first tensor whose shape differs.
    let (config, _) = crate::model::read_config(dir)?;
    check_same_model(dir, served, &config)?;
    Ok(ModelDir::open(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(slot: u32, len: usize, logits: LogitsWanted) -> SeqChunk {
        SeqChunk {
            slot: SlotId(slot),
            start_pos: 0,
            tokens: vec![0; len],
            logits,
            adapter: None,
        }
    }

    #[test]
    fn logits_rows_follow_chunk_requests() {
        let batch = ForwardBatch {
            chunks: vec![
                chunk(0, 3, LogitsWanted::All),
                chunk(1, 4, LogitsWanted::None),
                chunk(2, 2, LogitsWanted::Last),
            ],
        };
        assert_eq!(batch.num_tokens(), 9);
        assert_eq!(batch.logit_row_indices(), vec![0, 1, 2, 8]);
        let data: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let logits = Logits::new(&batch, 2, data).unwrap();
        assert_eq!(logits.chunk(0).len(), 3);
        assert_eq!(logits.chunk(1).len(), 0);
        assert_eq!(logits.last_row(2), Some(&[6.0, 7.0][..]));
        assert!(Logits::new(&batch, 2, vec![0.0; 6]).is_err());
    }
}

impl std::str::FromStr for DType {
    type Err = String;

    /// Parses `f32`, `bf16` or `f16`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            other => Err(format!(
                "unknown dtype {other:?} (expected f32, bf16 or f16)"
            )),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    /// Parses `cpu`, `cuda` (ordinal 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_and_print() {
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert_eq!("CPU".parse::<Device>().unwrap().to_string(), "cpu");
        assert!("tpu".parse::<Device>().is_err());
        assert_eq!("bf16".parse::<DType>().unwrap(), DType::Bf16);
        assert!("f8".parse::<DType>().is_err());
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn positions_must_continue_the_cache_and_fit_the_context() {
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                slot: SlotId(1),
                start_pos: 3,
                tokens: vec![0; 2],
                logits: LogitsWanted::Last,
                adapter: None,
            }],
        };
        batch.check_positions(|_| 3, 5).unwrap();
        let twice = ForwardBatch {
            chunks: vec![batch.chunks[0].clone(), batch.chunks[0].clone()],
        };
        assert!(twice.check_positions(|_| 3, 5).is_err());
        assert!(matches!(
            batch.check_positions(|_| 2, 5),
            Err(BackendError::PositionMismatch { cached: 2, .. })
        ));
        assert!(matches!(
            batch.check_positions(|_| 3, 4),
            Err(BackendError::ContextExceeded { needed: 5, .. })
        ));
    }
}
