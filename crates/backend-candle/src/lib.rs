//! # infermux-backend-candle
//!
//! Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) on [candle](https://docs.rs/candle-core),
//! in pure Rust: f32 and bf16 on CPU, and CUDA behind the `cuda` feature. The model is core's one
//! definition (`infermux_core::model`) over candle tensors; on the CPU in f32 our kernels run as
//! candle custom ops. KV bookkeeping is core's `KvTable`; everything after logits happens in
//! `infermux-core`.
//!
//! ```no_run
//! use infermux_backend_candle::{CandleBackend, CandleOptions};
//! let backend = CandleBackend::load("models/SmolLM2-135M-Instruct", CandleOptions::default())?;
//! # Ok::<(), infermux_backend_candle::CandleBackendError>(())
//! ```

mod cpu;
mod device;
mod error;
mod kv;
mod ops;
mod weights;

use std::path::Path;

use infermux_core::kv::{KvTable, KvUsage};
use infermux_core::model::{Llama, LlamaWeights};
use infermux_core::{
    Backend, BackendError, DType, Device, ForwardBatch, Logits, ModelDir, ModelInfo, SlotId,
};

pub use cpu::Isa;
pub use device::{candle_device, candle_dtype};
pub use error::CandleBackendError;

use device::runtime_error;
use kv::{KvStore, SlotKv};
use ops::{CandleEmbedding, CandleLinear, Loader, Runtime, Step};
use weights::Weights;

/// Which ops run a CPU f32 model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CpuKernels {
    /// Our kernels as candle custom ops (packed matmuls, batched attention, norms, RoPE,
    /// SwiGLU): the fast path for small batches.
    #[default]
    Custom,
    /// candle's built-in tensor ops only (the path every other device and dtype takes).
    Builtin,
}

/// Where and in which precision to run, and with which CPU kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CandleOptions {
    /// CPU or a CUDA ordinal.
    pub device: Device,
    /// Weights and activation precision.
    pub dtype: DType,
    /// The ops of a CPU f32 model.
    pub cpu_kernels: CpuKernels,
    /// The instruction set of our CPU kernels (`None`: the best this CPU has); asking for one
    /// the CPU lacks is an error.
    pub isa: Option<Isa>,
}

/// A loaded model on candle: the one Llama-family definition ([`Llama`]) over candle tensors,
/// with our CPU kernels as custom ops where they apply (CPU, f32, [`CpuKernels::Custom`]).
pub struct CandleBackend {
    info: ModelInfo,
    llama: Llama,
    weights: LlamaWeights<CandleLinear, candle_core::Tensor, CandleEmbedding>,
    rt: Runtime,
    kv: KvTable<SlotKv>,
    store: KvStore,
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
        let isa = resolve_isa(options.isa, Isa::detect())?;
        let cpu = (options.device == Device::Cpu
            && options.dtype == DType::F32
            && options.cpu_kernels == CpuKernels::Custom)
            .then_some(isa);
        let weights = Weights::open(&dir.weight_files, &device, dtype)?;
        let cfg = &dir.config;
        let llama = Llama::new(cfg.clone(), |name| weights.contains(name));
        let (cos, sin) = cfg.rope_tables(cfg.max_position_embeddings);
        let table = |v: &[f32]| {
            candle_core::Tensor::from_slice(
                v,
                (cfg.max_position_embeddings, cfg.head_dim / 2),
                &device,
            )
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| CandleBackendError::Weights(e.to_string()))
        };
        let rt = Runtime {
            cos_t: table(&cos)?,
            sin_t: table(&sin)?,
            cos,
            sin,
            device: device.clone(),
            dtype,
            cpu,
        };
        let loaded = llama.load(&mut Loader {
            weights: &weights,
            rt: &rt,
        })?;
        let info = ModelInfo::from_config(
            cfg,
            dir.eos_token_ids.clone(),
            options.dtype,
            options.device,
        );
        let store = KvStore {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            tensors: cpu.is_none().then_some((dtype, device)),
        };
        Ok(Self {
            kv: KvTable::new(info.kv_bytes_per_token),
            info,
            llama,
            weights: loaded,
            rt,
            store,
        })
    }
}

/// The ISA to run: the requested one if the CPU (whose best is `best`) has it.
fn resolve_isa(requested: Option<Isa>, best: Isa) -> Result<Isa, CandleBackendError> {
    match requested {
        Some(isa) if isa > best => Err(CandleBackendError::UnsupportedIsa {
            requested: isa,
            available: best,
        }),
        Some(isa) => Ok(isa),
        None => Ok(best),
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Logits, BackendError> {
        batch.check_positions(|slot| self.kv.len(slot), self.info.max_context)?;
        let vocab = self.info.vocab_size;
        if let Some(&t) = batch
            .chunks
            .iter()
            .flat_map(|c| &c.tokens)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(BackendError::Runtime {
                runtime: "candle",
                message: format!("token id {t} is outside the vocabulary ({vocab})"),
            });
        }
        if batch.num_tokens() == 0 {
            return Logits::new(batch, vocab, Vec::new());
        }
        for c in &batch.chunks {
            self.kv.reserve(&mut self.store, c.slot, c.tokens.len())?;
        }
        let ids: Vec<SlotId> = batch.chunks.iter().map(|c| c.slot).collect();
        let mut slots = self.kv.get_many_mut(&ids)?;
        let mut step = Step::new(&self.rt, batch, &mut slots);
        let data = self
            .llama
            .forward(&mut step, &self.weights)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(runtime_error)?;
        drop(step);
        drop(slots);
        for c in &batch.chunks {
            self.kv.advance(c.slot, c.tokens.len());
        }
        Logits::new(batch, vocab, data)
    }

    fn release(&mut self, slot: SlotId) {
        self.kv.release(slot);
    }

    fn fork(&mut self, src: SlotId, dst: SlotId) -> Result<(), BackendError> {
        self.kv.fork(&mut self.store, src, dst)
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

    fn load(md: &ModelDir, cpu_kernels: CpuKernels, isa: Option<Isa>) -> CandleBackend {
        let opts = CandleOptions {
            cpu_kernels,
            isa,
            ..CandleOptions::default()
        };
        CandleBackend::from_model_dir(md, opts).unwrap()
    }

    #[test]
    fn custom_kernels_match_builtin_ops_on_every_isa() {
        for (arch, tied) in [
            ("LlamaForCausalLM", true),
            ("Qwen2ForCausalLM", false),
            ("Qwen3ForCausalLM", false),
        ] {
            let dir = std::env::temp_dir()
                .join(format!("infermux-candle-ops-{arch}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            tiny_model(&dir, arch, tied);
            let md = ModelDir::open(&dir).unwrap();
            for isa in Isa::supported() {
                let mut custom = load(&md, CpuKernels::Custom, Some(isa));
                let mut builtin = load(&md, CpuKernels::Builtin, None);
                assert!(custom.rt.cpu.is_some() && builtin.rt.cpu.is_none());
                compare(arch, isa, &mut custom, &mut builtin);
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    #[test]
    fn an_unsupported_isa_is_a_typed_error() {
        assert_eq!(resolve_isa(None, Isa::Avx2).unwrap(), Isa::Avx2);
        assert_eq!(
            resolve_isa(Some(Isa::Portable), Isa::Avx2).unwrap(),
            Isa::Portable
        );
        let err = resolve_isa(Some(Isa::Avx512), Isa::Avx2).unwrap_err();
        assert!(
            matches!(err, CandleBackendError::UnsupportedIsa { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Avx512"), "{err}");
    }

    /// Mixed prefill/decode batches, growth past the first KV granule, fork and release give
    /// the same logits (to 1e-4) and cache lengths on both backends.
    fn compare(arch: &str, isa: Isa, host: &mut CandleBackend, ops: &mut CandleBackend) {
        let prompt: Vec<u32> = (0..70).map(|i| (i * 13 + 5) % 97).collect();
        let steps = [
            // A long prefill (crosses the 64-position KV granule) and a short one.
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
        for b in [&mut *host, &mut *ops] {
            b.forward(&steps[0]).unwrap();
            b.fork(SlotId(0), SlotId(3)).unwrap();
            // Re-run the first batch on fresh slots.
            b.release(SlotId(0));
            b.release(SlotId(1));
        }
        let fork_step = ForwardBatch {
            chunks: vec![chunk(3, 70, &[11, 12], LogitsWanted::All)],
        };
        for batch in [&steps[0], &steps[1], &fork_step] {
            let (a, b) = (host.forward(batch).unwrap(), ops.forward(batch).unwrap());
            for c in 0..batch.chunks.len() {
                for (ra, rb) in a.chunk(c).zip(b.chunk(c)) {
                    let worst = ra
                        .iter()
                        .zip(rb)
                        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-4, "{arch} {isa:?}: chunk {c} differs by {worst}");
                }
            }
        }
        for s in 0..4 {
            assert_eq!(host.cached_len(SlotId(s)), ops.cached_len(SlotId(s)));
        }
    }
}
