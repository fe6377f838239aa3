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
        let tensor_ops = std::env::var_os("INFERMUX_CANDLE_OPS").is_some_and(|v| v != "0");
        Self::with_engine(dir, options, tensor_ops)
    }

    /// Loads with the host kernels where they apply (CPU f32), unless `tensor_ops`.
    fn with_engine(
        dir: &ModelDir,
        options: CandleOptions,
        tensor_ops: bool,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Tensor;
    use infermux_core::{LogitsWanted, SeqChunk};

    use super::*;

    /// A random model folder of architecture `arch` with GQA (4 heads over 2 KV heads).
    fn tiny_model(dir: &Path, arch: &str, tied: bool) {
        let (h, inter, vocab, heads, kv_heads, hd, layers) = (32, 48, 97, 4, 2, 8, 2);
        let config = format!(
            r#"{{"architectures": ["{arch}"], "hidden_size": {h}, "intermediate_size": {inter},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "num_key_value_heads": {kv_heads}, "head_dim": {hd}, "vocab_size": {vocab},
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": {tied}, "eos_token_id": 2}}"#
        );
        std::fs::write(dir.join("config.json"), config).unwrap();
        let dev = candle_core::Device::Cpu;
        let mut t = HashMap::new();
        let mut put = |name: String, shape: &[usize], scale: f64| {
            let v = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap();
            t.insert(name, v);
        };
        put("model.embed_tokens.weight".into(), &[vocab, h], 1.0);
        put("model.norm.weight".into(), &[h], 1.0);
        if !tied {
            put("lm_head.weight".into(), &[vocab, h], 0.3);
        }
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            let s = 0.3;
            put(format!("{p}.input_layernorm.weight"), &[h], 1.0);
            put(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0);
            put(format!("{p}.self_attn.q_proj.weight"), &[heads * hd, h], s);
            put(
                format!("{p}.self_attn.k_proj.weight"),
                &[kv_heads * hd, h],
                s,
            );
            put(
                format!("{p}.self_attn.v_proj.weight"),
                &[kv_heads * hd, h],
                s,
            );
            put(format!("{p}.self_attn.o_proj.weight"), &[h, heads * hd], s);
            put(format!("{p}.mlp.gate_proj.weight"), &[inter, h], s);
            put(format!("{p}.mlp.up_proj.weight"), &[inter, h], s);
            put(format!("{p}.mlp.down_proj.weight"), &[h, inter], s);
            if arch.starts_with("Qwen2") {
                put(format!("{p}.self_attn.q_proj.bias"), &[heads * hd], s);
                put(format!("{p}.self_attn.k_proj.bias"), &[kv_heads * hd], s);
                put(format!("{p}.self_attn.v_proj.bias"), &[kv_heads * hd], s);
            }
            if arch.starts_with("Qwen3") {
                put(format!("{p}.self_attn.q_norm.weight"), &[hd], 1.0);
                put(format!("{p}.self_attn.k_norm.weight"), &[hd], 1.0);
            }
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    }

    fn chunk(slot: u32, start_pos: usize, tokens: &[u32], logits: LogitsWanted) -> SeqChunk {
        SeqChunk {
            slot: SlotId(slot),
            start_pos,
            tokens: tokens.to_vec(),
            logits,
        }
    }

    #[test]
    fn host_kernels_match_tensor_ops() {
        for (arch, tied) in [
            ("LlamaForCausalLM", true),
            ("Qwen2ForCausalLM", false),
            ("Qwen3ForCausalLM", false),
        ] {
            let dir = std::env::temp_dir().join(format!(
                "infermux-candle-host-{arch}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            tiny_model(&dir, arch, tied);
            let md = ModelDir::open(&dir).unwrap();
            let opts = CandleOptions::default();
            let mut host = CandleBackend::with_engine(&md, opts, false).unwrap();
            let mut ops = CandleBackend::with_engine(&md, opts, true).unwrap();
            assert!(matches!(host.engine, Engine::Host { .. }));
            assert!(matches!(ops.engine, Engine::Tensors { .. }));
            let prompt: Vec<u32> = (0..70).map(|i| (i * 13 + 5) % 97).collect();
            let steps = [
                // A long prefill (crosses the 64-slot initial capacity) and a short one.
                ForwardBatch {
                    chunks: vec![
                        chunk(0, 0, &prompt, LogitsWanted::All),
                        chunk(1, 0, &prompt[..5], LogitsWanted::Last),
                    ],
                },
                // Decode steps mixed with a prefill continuation.
                ForwardBatch {
                    chunks: vec![
                        chunk(1, 5, &prompt[5..9], LogitsWanted::All),
                        chunk(0, 70, &[7], LogitsWanted::Last),
                        chunk(2, 0, &[3], LogitsWanted::Last),
                    ],
                },
            ];
            for b in [&mut host, &mut ops] {
                b.forward(&steps[0]).unwrap();
                b.fork(SlotId(0), SlotId(3)).unwrap();
            }
            let fork_step = ForwardBatch {
                chunks: vec![chunk(3, 70, &[11, 12], LogitsWanted::All)],
            };
            for batch in [&steps[0], &steps[1], &fork_step] {
                let batch = if std::ptr::eq(batch, &steps[0]) {
                    // Re-run the first batch on fresh slots.
                    for b in [&mut host, &mut ops] {
                        b.release(SlotId(0));
                        b.release(SlotId(1));
                    }
                    batch
                } else {
                    batch
                };
                let (a, b) = (host.forward(batch).unwrap(), ops.forward(batch).unwrap());
                for c in 0..batch.chunks.len() {
                    for (ra, rb) in a.chunk(c).zip(b.chunk(c)) {
                        let worst = ra
                            .iter()
                            .zip(rb)
                            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                            .fold(0f32, f32::max);
                        assert!(worst < 1e-4, "{arch}: chunk {c} differs by {worst}");
                    }
                }
            }
            for s in 0..4 {
                assert_eq!(host.cached_len(SlotId(s)), ops.cached_len(SlotId(s)));
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
