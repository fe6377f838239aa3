//! # infermux-backend-torch
//!
//! Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) on libtorch through
//! [`tch`](https://docs.rs/tch): f32, bf16 and f16, on the CPU or a CUDA device chosen at run
//! time. The model is the core's [`Llama`] (one definition for every backend); this crate
//! supplies its ops in libtorch ([`ops`]) and the KV tensors ([`kv`]) the core's [`KvTable`]
//! keeps per slot. Everything after logits happens in `infermux-core`.
//!
//! ```no_run
//! use infermux_backend_torch::{TorchBackend, TorchOptions};
//! let backend = TorchBackend::load("models/SmolLM2-135M-Instruct", TorchOptions::default())?;
//! # Ok::<(), infermux_backend_torch::TorchBackendError>(())
//! ```

mod device;
mod error;
mod kv;
mod lora;
mod ops;
mod weights;

use std::collections::HashSet;
use std::path::Path;

use infermux_core::backend::{StagedWeights, WeightStager, WeightUpdateError, open_checkpoint};
use infermux_core::model::{AdapterError, AdapterSet, LoraAdapter, WeightPlan};
use infermux_core::{
    AdapterId, Backend, BackendError, DType, Device, ForwardBatch, KvTable, KvUsage, Llama, Logits,
    ModelConfig, ModelDir, ModelInfo, SlotId,
};

pub use device::{tch_device, tch_kind};
pub use error::TorchBackendError;

use device::runtime_error;
use kv::{SlotKv, TorchKvStore};
use lora::TorchLora;
use ops::{RopeTables, TorchForward, TorchLoader, TorchWeights};
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
    weights: TorchWeights,
    rope: RopeTables,
    kv: KvTable<SlotKv>,
    store: TorchKvStore,
    device: tch::Device,
    /// Loaded LoRA adapters.
    adapters: AdapterSet<TorchLora>,
}

/// Reads the weights of `dir` for the model of `cfg` onto `device` as `kind`: the one loader of
/// a start and of a weight update. The checkpoint's host copies are dropped once loaded.
fn load_weights(
    dir: &ModelDir,
    cfg: &ModelConfig,
    device: tch::Device,
    kind: tch::Kind,
) -> Result<(Llama, TorchWeights), TorchBackendError> {
    let _guard = tch::no_grad_guard();
    let checkpoint = Weights::open(&dir.weight_files, device, kind)?;
    let model = Llama::new(cfg.clone(), |name| checkpoint.contains(name));
    let weights = model.load(&mut TorchLoader::new(&checkpoint))?;
    Ok((model, weights))
}

/// Where a GGUF file runs instead.
const GGUF_HINT: &str = "GGUF files run on --backend candle (convert to a Hugging Face folder for \
    torch and onnx)";

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
        if dir.checkpoint.format == infermux_core::model::WeightFormat::Gguf {
            return Err(BackendError::UnsupportedWeights {
                runtime: "libtorch",
                what: format!("GGUF files ({})", dir.path.display()),
                hint: GGUF_HINT,
            }
            .into());
        }
        let device = tch_device(options.device)?;
        let kind = tch_kind(options.dtype);
        let _guard = tch::no_grad_guard();
        let cfg = &dir.config;
        let (model, weights) = load_weights(dir, cfg, device, kind)?;
        let rope = RopeTables::new(cfg, device, kind).map_err(runtime_error)?;
        let info = ModelInfo::from_config(
            cfg,
            dir.eos_token_ids.clone(),
            options.dtype,
            options.device,
        );
        let store = TorchKvStore::new(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kind, device);
        Ok(Self {
            kv: KvTable::new(info.kv_bytes_per_token),
            info,
            model,
            weights,
            rope,
            store,
            device,
            adapters: AdapterSet::default(),
        })
    }
}

impl Backend for TorchBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.kv.len(slot), self.info.max_context)?;
        let mut seen = HashSet::with_capacity(batch.chunks.len());
        if let Some(c) = batch.chunks.iter().find(|c| !seen.insert(c.slot)) {
            return Err(BackendError::Runtime {
                runtime: "libtorch",
                message: format!("a batch addresses slot {:?} twice", c.slot),
            });
        }
        batch.check_adapters(|id| self.adapters.contains(id))?;
        if batch.num_tokens() == 0 {
            return Logits::new(batch, self.info.vocab_size, Vec::new());
        }
        let _guard = tch::no_grad_guard();
        for c in batch.chunks.iter().filter(|c| !c.tokens.is_empty()) {
            self.kv.reserve(&mut self.store, c.slot, c.tokens.len())?;
        }
        let logits = {
            let kind = tch_kind(self.info.dtype);
            let adapter_rows =
                lora::rows(&mut self.adapters, batch, self.device, kind).map_err(runtime_error)?;
            let mut ops = TorchForward::new(batch, &self.rope, &self.kv, adapter_rows, self.device)
                .map_err(runtime_error)?;
            self.model.forward(&mut ops, &self.weights)?
        };
        for c in &batch.chunks {
            self.kv.advance(c.slot, c.tokens.len());
        }
        let data = logits
            .f_to_kind(tch::Kind::Float)
            .and_then(|t| t.f_to_device(tch::Device::Cpu))
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_view([-1]))
            .and_then(|t| Vec::<f32>::try_from(&t))
            .map_err(runtime_error)?;
        Logits::new(batch, self.info.vocab_size, data)
    }

    fn release(&mut self, slot: SlotId) {
        self.kv.release(slot);
    }

    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError> {
        let _guard = tch::no_grad_guard();
        self.kv.fork_prefix(&mut self.store, src, dst, len)
    }

    fn cached_len(&self, slot: SlotId) -> usize {
        self.kv.len(slot)
    }

    fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    fn set_kv_budget(&mut self, bytes: Option<u64>) {
        self.kv.set_budget(bytes);
    }

    fn weight_plan(&self) -> Option<&WeightPlan> {
        Some(&self.model.plan)
    }

    fn load_adapter(&mut self, id: AdapterId, adapter: &LoraAdapter) -> Result<(), AdapterError> {
        let lora =
            TorchLora::upload(adapter, self.device, tch_kind(self.info.dtype)).map_err(|e| {
                AdapterError::Load {
                    name: adapter.path.display().to_string(),
                    message: e.to_string(),
                }
            })?;
        self.adapters.insert(id, adapter, lora);
        Ok(())
    }

    fn unload_adapter(&mut self, id: AdapterId) {
        self.adapters.remove(id);
    }

    fn weight_stager(&self) -> Option<WeightStager> {
        let (config, device) = (self.model.config.clone(), self.device);
        let kind = tch_kind(self.info.dtype);
        Some(Box::new(move |dir: &Path| {
            let checkpoint = open_checkpoint(dir, &config)?;
            let loaded = load_weights(&checkpoint, &config, device, kind).map_err(|e| {
                WeightUpdateError::Load {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
            Ok(Box::new(loaded) as StagedWeights)
        }))
    }

    fn install_weights(&mut self, staged: StagedWeights) -> Result<(), WeightUpdateError> {
        // Loaded in full by the stager: only now do the new weights replace the old.
        let (model, weights) = *staged
            .downcast::<(Llama, TorchWeights)>()
            .map_err(|_| WeightUpdateError::ForeignStage)?;
        self.model = model;
        self.weights = weights;
        Ok(())
    }
}
