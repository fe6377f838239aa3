//! # infermux-backend-torch
//!
//! Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) on libtorch through
//! [`tch`](https://docs.rs/tch): f32, bf16 and f16, on the CPU or a CUDA device chosen at run
//! time. The backend computes logits and keeps the KV cache; everything after logits happens in
//! `infermux-core`.
//!
//! ```no_run
//! use infermux_backend_torch::{TorchBackend, TorchOptions};
//! let backend = TorchBackend::load("models/SmolLM2-135M-Instruct", TorchOptions::default())?;
//! # Ok::<(), infermux_backend_torch::TorchBackendError>(())
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

pub use device::{tch_device, tch_kind};
pub use error::TorchBackendError;

use device::runtime_error;
use kv_cache::{KvCache, KvShape};
use model::Llama;
use weights::Weights;

/// Where and in which precision to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TorchOptions {
    /// CPU or a CUDA ordinal.
    pub device: Device,
    /// Weights and activation precision.
    pub dtype: DType,
}

/// A loaded model on libtorch.
pub struct TorchBackend {
    info: ModelInfo,
    model: Llama,
    kv: KvCache,
}

impl TorchBackend {
    /// Loads a Hugging Face model folder.
    pub fn load(dir: impl AsRef<Path>, options: TorchOptions) -> Result<Self, TorchBackendError> {
        let dir = ModelDir::open(dir)?;
        Self::from_model_dir(&dir, options)
    }

    /// Loads an already opened model folder.
    pub fn from_model_dir(
        dir: &ModelDir,
        options: TorchOptions,
    ) -> Result<Self, TorchBackendError> {
        let device = tch_device(options.device)?;
        let kind = tch_kind(options.dtype);
        let _guard = tch::no_grad_guard();
        let weights = Weights::open(&dir.weight_files, device, kind)?;
        let cfg = &dir.config;
        let model = Llama::load(cfg, &weights, device, kind)?;
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
            kv: KvCache::new(shape, kind, device),
        })
    }
}

impl Backend for TorchBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.kv.len(slot), self.info.max_context)?;
        if batch.num_tokens() == 0 {
            return Logits::new(batch, self.info.vocab_size, Vec::new());
        }
        let _guard = tch::no_grad_guard();
        let logits = self
            .model
            .forward(batch, &mut self.kv)
            .map_err(runtime_error)?;
        let data = logits
            .f_contiguous()
            .and_then(|t| t.f_view([-1]))
            .and_then(|t| Vec::<f32>::try_from(&t))
            .map_err(runtime_error)?;
        Logits::new(batch, self.info.vocab_size, data)
    }

    fn release(&mut self, slot: SlotId) {
        self.kv.release(slot);
    }

    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        let _guard = tch::no_grad_guard();
        match self.kv.fork(src, dst).map_err(runtime_error)? {
            true => Ok(()),
            false => Err(BackendError::UnknownSlot(src)),
        }
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        self.kv.len(slot)
    }
}
