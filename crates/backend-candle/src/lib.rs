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
mod host;
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
///
/// f32 on the CPU runs on host kernels ([`host`]: multi-threaded small-batch matmuls, fused
/// attention over all chunks); other devices and precisions run as candle tensor ops. Setting
/// `INFERMUX_CANDLE_OPS=1` forces the tensor-op path everywhere (for comparisons).
pub struct CandleBackend {
    info: ModelInfo,
    engine: Engine,
}

enum Engine {
    Tensors {
        model: Llama,
        kv: KvCache,
        device: candle_core::Device,
    },
    Host {
        model: host::HostLlama,
        kv: host::HostKv,
    },
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
        let info = ModelInfo::from_config(
            cfg,
            dir.eos_token_ids.clone(),
            options.dtype,
            options.device,
        );
        let tensor_ops = std::env::var_os("INFERMUX_CANDLE_OPS").is_some_and(|v| v != "0");
        if options.device == Device::Cpu && options.dtype == DType::F32 && !tensor_ops {
            let model = host::HostLlama::load(cfg, &weights)?;
            let kv = host::HostKv::new(model.kv_shape());
            return Ok(Self {
                info,
                engine: Engine::Host { model, kv },
            });
        }
        let model = Llama::load(cfg, &weights, &device, dtype)?;
        let shape = KvShape {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        Ok(Self {
            info,
            engine: Engine::Tensors {
                model,
                kv: KvCache::new(shape, dtype, device.clone()),
                device,
            },
        })
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.cached_len(slot), self.info.max_context)?;
        if batch.num_tokens() == 0 {
            return Logits::new(batch, self.info.vocab_size, Vec::new());
        }
        let data = match &mut self.engine {
            Engine::Tensors { model, kv, device } => model
                .forward(batch, kv, device)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(runtime_error)?,
            Engine::Host { model, kv } => model.forward(batch, kv)?,
        };
        Logits::new(batch, self.info.vocab_size, data)
    }

    fn release(&mut self, slot: SlotId) {
        match &mut self.engine {
            Engine::Tensors { kv, .. } => kv.release(slot),
            Engine::Host { kv, .. } => kv.release(slot),
        }
    }

    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        let found = match &mut self.engine {
            Engine::Tensors { kv, .. } => kv.fork(src, dst).map_err(runtime_error)?,
            Engine::Host { kv, .. } => kv.fork(src, dst),
        };
        match found {
            true => Ok(()),
            false => Err(BackendError::UnknownSlot(src)),
        }
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        match &self.engine {
            Engine::Tensors { kv, .. } => kv.len(slot),
            Engine::Host { kv, .. } => kv.len(slot),
        }
    }
}
