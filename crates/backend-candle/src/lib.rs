//! # infermux-backend-candle
//!
//! Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) on [candle](https://docs.rs/candle-core),
//! in pure Rust: f32 and bf16 on CPU, and CUDA behind the `cuda` feature. The backend computes
//! logits and keeps the KV cache; everything after logits happens in `infermux-core`.
//!
//! ```no_run
//! use infermux_backend_candle::{CandleBackend, CandleOptions};
//! let backend = CandleBackend::load("models/SmolLM2-135M-Instruct", CandleOptions::default())?;
//! # Ok::<(), infermux_backend_candle::CandleBackendError>(())
//! ```

mod device;
mod error;
mod kv_cache;
mod model;
mod weights;

use std::path::Path;

use infermux_core::{
    Backend, BackendError, DType, Device, ForwardBatch, Logits, ModelDir, ModelInfo, SlotId,
};

pub use device::{candle_device, candle_dtype};
pub use error::CandleBackendError;

use device::runtime_error;
use kv_cache::{KvCache, KvShape};
use model::Llama;
use weights::Weights;

/// Where and in which precision to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CandleOptions {
    /// CPU or a CUDA ordinal.
    pub device: Device,
    /// Weights and activation precision.
    pub dtype: DType,
}

/// A loaded model on candle.
pub struct CandleBackend {
    info: ModelInfo,
    model: Llama,
    kv: KvCache,
    device: candle_core::Device,
}

impl CandleBackend {
    /// Loads a Hugging Face model folder.
    pub fn load(dir: impl AsRef<Path>, options: CandleOptions) -> Result<Self, CandleBackendError> {
        let dir = ModelDir::open(dir)?;
        Self::from_model_dir(&dir, options)
    }

    /// Loads an already opened model folder.
    pub fn from_model_dir(
        dir: &ModelDir,
        options: CandleOptions,
    ) -> Result<Self, CandleBackendError> {
        let device = candle_device(options.device)?;
        let dtype = candle_dtype(options.dtype);
        let weights = Weights::open(&dir.weight_files, &device, dtype)?;
        let cfg = &dir.config;
        let model = Llama::load(cfg, &weights, &device, dtype)?;
        let shape = KvShape {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let info = ModelInfo::from_config(
            cfg,
            dir.eos_token_ids.clone(),
            options.dtype,
            options.device,
        );
        Ok(Self {
            info,
            model,
            kv: KvCache::new(shape, dtype, device.clone()),
            device,
        })
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.kv.len(slot), self.info.max_context)?;
        if batch.num_tokens() == 0 {
            return Logits::new(batch, self.info.vocab_size, Vec::new());
        }
        let logits = self
            .model
            .forward(batch, &mut self.kv, &self.device)
            .map_err(runtime_error)?;
        let data = logits
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(runtime_error)?;
        Logits::new(batch, self.info.vocab_size, data)
    }

    fn release(&mut self, slot: SlotId) {
        self.kv.release(slot);
    }

    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        match self.kv.fork(src, dst).map_err(runtime_error)? {
            true => Ok(()),
            false => Err(BackendError::UnknownSlot(src)),
        }
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        self.kv.len(slot)
    }
}
