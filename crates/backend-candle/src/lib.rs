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
mod lora;
mod ops;
mod weights;

use std::path::Path;

use infermux_core::backend::{StagedWeights, WeightStager, WeightUpdateError, open_checkpoint};
use infermux_core::kv::{KvTable, KvUsage};
use infermux_core::model::{
    AdapterError, AdapterSet, Llama, LlamaWeights, LoraAdapter, ModelConfig, WeightPlan,
};
use infermux_core::{
    AdapterId, Backend, BackendError, DType, Device, ForwardBatch, Logits, ModelDir, ModelInfo,
    SlotId,
};

pub use cpu::Isa;
pub use device::{candle_device, candle_dtype};
pub use error::CandleBackendError;

use device::runtime_error;
use kv::{KvStore, SlotKv};
use lora::CandleLora;
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
    weights: CandleWeights,
    rt: Runtime,
    kv: KvTable<SlotKv>,
    store: KvStore,
    /// Loaded LoRA adapters.
    adapters: AdapterSet<CandleLora>,
}

/// A model's weights in candle's handles.
type CandleWeights = LlamaWeights<CandleLinear, candle_core::Tensor, CandleEmbedding>;

/// Reads the weights of `dir` for the model of `cfg` into `rt`'s device and dtype: the one
/// loader of a start and of a weight update.
fn load_weights(
    dir: &ModelDir,
    cfg: &ModelConfig,
    rt: &Runtime,
) -> Result<(Llama, CandleWeights), CandleBackendError> {
    let weights = Weights::open(dir, &rt.device, rt.dtype)?;
    let llama = Llama::new(cfg.clone(), |name| weights.contains(name));
    let loaded = llama.load(&mut Loader {
        weights: &weights,
        rt,
    })?;
    Ok((llama, loaded))
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
        // Our CPU kernels compute in f32 whatever the dtype; bf16 or f16 is the weights' type.
        let cpu = (options.device == Device::Cpu && options.cpu_kernels == CpuKernels::Custom)
            .then_some(isa);
        let cpu_weights = match options.dtype {
            DType::Bf16 => cpu::ElemKind::Bf16,
            DType::F16 => cpu::ElemKind::F16,
            _ => cpu::ElemKind::F32,
        };
        let dtype = if cpu.is_some() {
            candle_core::DType::F32
        } else {
            dtype
        };
        let cfg = &dir.config;
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
            cpu_weights,
        };
        let (llama, loaded) = load_weights(dir, cfg, &rt)?;
        let mut info = ModelInfo::from_config(
            cfg,
            dir.eos_token_ids.clone(),
            options.dtype,
            options.device,
        );
        if cpu.is_some() {
            // Our kernels keep the cache in f32 whatever the weights' type.
            info.kv_bytes_per_token = cfg.kv_bytes_per_token(DType::F32);
        }
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
            adapters: AdapterSet::default(),
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
        batch.check_adapters(|id| self.adapters.contains(id))?;
        if batch.num_tokens() == 0 {
            return Logits::new(batch, vocab, Vec::new());
        }
        for c in &batch.chunks {
            self.kv.reserve(&mut self.store, c.slot, c.tokens.len())?;
        }
        let ids: Vec<SlotId> = batch.chunks.iter().map(|c| c.slot).collect();
        let mut slots = self.kv.get_many_mut(&ids)?;
        let adapter_rows =
            lora::rows(&mut self.adapters, batch, &self.rt).map_err(runtime_error)?;
        let mut step =
            Step::new(&self.rt, adapter_rows, batch, &mut slots).map_err(runtime_error)?;
        let data = self
            .llama
            .forward(&mut step, &self.weights)
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

    fn fork_prefix(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<(), BackendError> {
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
        Some(&self.llama.plan)
    }

    fn load_adapter(&mut self, id: AdapterId, adapter: &LoraAdapter) -> Result<(), AdapterError> {
        let lora = CandleLora::upload(adapter, &self.rt).map_err(|e| AdapterError::Load {
            name: adapter.path.display().to_string(),
            message: e.to_string(),
        })?;
        self.adapters.insert(id, adapter, lora);
        Ok(())
    }

    fn unload_adapter(&mut self, id: AdapterId) {
        self.adapters.remove(id);
    }

    fn weight_stager(&self) -> Option<WeightStager> {
        let (config, rt) = (self.llama.config.clone(), self.rt.clone());
        Some(Box::new(move |dir: &Path| {
            let checkpoint = open_checkpoint(dir, &config)?;
            let loaded =
                load_weights(&checkpoint, &config, &rt).map_err(|e| WeightUpdateError::Load {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                })?;
            Ok(Box::new(loaded) as StagedWeights)
        }))
    }

    fn install_weights(&mut self, staged: StagedWeights) -> Result<(), WeightUpdateError> {
        // Loaded in full by the stager: only now do the new weights replace the old.
        let (llama, weights) = *staged
            .downcast::<(Llama, CandleWeights)>()
            .map_err(|_| WeightUpdateError::ForeignStage)?;
        self.llama = llama;
        self.weights = weights;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use infermux_core::{LogitsWanted, SeqChunk};

    use super::*;

    /// The random-weight variants made by `tests/data/make_goldens.py` (Qwen2 with q/k/v
    /// biases, Qwen3 with q/k norms, Mistral, an untied Llama with llama3 RoPE scaling).
    const TINY: [&str; 4] = ["qwen2", "qwen3", "mistral", "llama3"];

    fn tiny(name: &str) -> ModelDir {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/tiny")
            .join(name);
        ModelDir::open(&dir).unwrap()
    }

    fn chunk(slot: u32, start_pos: usize, tokens: &[u32], logits: LogitsWanted) -> SeqChunk {
        SeqChunk {
            slot: SlotId(slot),
            start_pos,
            tokens: tokens.to_vec(),
            logits,
            adapter: None,
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
        for name in TINY {
            let md = tiny(name);
            for isa in Isa::supported() {
                let mut custom = load(&md, CpuKernels::Custom, Some(isa));
                let mut builtin = load(&md, CpuKernels::Builtin, None);
                assert!(custom.rt.cpu.is_some() && builtin.rt.cpu.is_none());
                compare(name, isa, &mut custom, &mut builtin);
            }
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

    /// A PEFT adapter (rank 2 on q, v, o, gate and down of both layers) and the same
    /// weights merged into a copy of the model (`W + (alpha / r) B A`): the adapter's rows
    /// equal the merged model's, and base rows in the same batch equal the base model's.
    #[test]
    fn adapter_rows_equal_merged_weights_and_base_rows_stay_base() {
        use candle_core::Tensor;
        use infermux_core::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
        let md = tiny("qwen2");
        let root =
            std::env::temp_dir().join(format!("infermux-candle-lora-{}", std::process::id()));
        let (adapter_dir, merged_dir) = (root.join("adapter"), root.join("merged"));
        std::fs::create_dir_all(&adapter_dir).unwrap();
        std::fs::create_dir_all(&merged_dir).unwrap();
        let src = md.weight_files[0].parent().unwrap().to_path_buf();
        for f in ["config.json", "generation_config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), merged_dir.join(f)).unwrap();
        }
        let dev = candle_core::Device::Cpu;
        let mut weights = candle_core::safetensors::load(&md.weight_files[0], &dev).unwrap();
        let (r, alpha) = (2usize, 6.0f64);
        let mut adapter = std::collections::HashMap::new();
        let mut salt = 0.0f32;
        for layer in 0..2 {
            for module in [
                "self_attn.q_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
            ] {
                let name = format!("model.layers.{layer}.{module}");
                let w = weights[&format!("{name}.weight")].clone();
                let (out, inp) = w.dims2().unwrap();
                let values = |n: usize, salt: f32| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((i as f32 * 0.731 + salt).sin()) * 0.2)
                        .collect()
                };
                let a = Tensor::from_vec(values(r * inp, salt), (r, inp), &dev).unwrap();
                let b = Tensor::from_vec(values(out * r, salt + 0.5), (out, r), &dev).unwrap();
                salt += 1.0;
                let delta = (b.matmul(&a).unwrap() * (alpha / r as f64)).unwrap();
                weights.insert(format!("{name}.weight"), (w + delta).unwrap());
                adapter.insert(format!("base_model.model.{name}.lora_A.weight"), a);
                adapter.insert(format!("base_model.model.{name}.lora_B.weight"), b);
            }
        }
        candle_core::safetensors::save(&weights, merged_dir.join("model.safetensors")).unwrap();
        candle_core::safetensors::save(&adapter, adapter_dir.join(ADAPTER_WEIGHTS)).unwrap();
        let config = format!(
            r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": {alpha}, "target_modules":
            ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}}"#
        );
        std::fs::write(adapter_dir.join(ADAPTER_CONFIG), config).unwrap();
        let merged_md = ModelDir::open(&merged_dir).unwrap();
        let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 97).collect();
        for kernels in [CpuKernels::Custom, CpuKernels::Builtin] {
            let mut served = load(&md, kernels, None);
            let lora = LoraAdapter::read(&adapter_dir, served.weight_plan().unwrap()).unwrap();
            served.load_adapter(AdapterId(4), &lora).unwrap();
            let mut merged = load(&merged_md, kernels, None);
            let mut base = load(&md, kernels, None);
            let on = |slot, start, tokens: &[u32], adapter| SeqChunk {
                adapter,
                ..chunk(slot, start, tokens, LogitsWanted::All)
            };
            // Prefill, then a decode step: adapter and base rows interleaved in each batch.
            let batches = [
                vec![
                    on(0, 0, &prompt, Some(AdapterId(4))),
                    on(1, 0, &prompt[..9], None),
                    on(2, 0, &prompt[..5], Some(AdapterId(4))),
                ],
                vec![
                    on(1, 9, &[5], None),
                    on(0, 20, &[8], Some(AdapterId(4))),
                    on(2, 5, &[1, 2], Some(AdapterId(4))),
                ],
            ];
            for chunks in batches {
                let got = served
                    .forward(&ForwardBatch {
                        chunks: chunks.clone(),
                    })
                    .unwrap();
                let plain: Vec<SeqChunk> = chunks
                    .iter()
                    .map(|c| SeqChunk {
                        adapter: None,
                        ..c.clone()
                    })
                    .collect();
                let want_adapter = merged
                    .forward(&ForwardBatch {
                        chunks: plain.clone(),
                    })
                    .unwrap();
                let want_base = base.forward(&ForwardBatch { chunks: plain }).unwrap();
                for (i, c) in chunks.iter().enumerate() {
                    let want = if c.adapter.is_some() {
                        &want_adapter
                    } else {
                        &want_base
                    };
                    let mut moved = 0f32;
                    for ((g, w), b) in got.chunk(i).zip(want.chunk(i)).zip(want_base.chunk(i)) {
                        for ((x, y), z) in g.iter().zip(w).zip(b) {
                            assert!(
                                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "{kernels:?} chunk {i}: {x} vs {y}"
                            );
                            moved = moved.max((y - z).abs());
                        }
                    }
                    // The adapter changes the logits (the check above is not vacuous).
                    assert_eq!(
                        c.adapter.is_some(),
                        moved > 1e-3,
                        "{kernels:?} chunk {i}: {moved}"
                    );
                }
            }
            // A chunk naming an adapter the backend lacks is a typed error.
            served.unload_adapter(AdapterId(4));
            let err = served
                .forward(&ForwardBatch {
                    chunks: vec![on(5, 0, &prompt[..3], Some(AdapterId(4)))],
                })
                .unwrap_err();
            assert!(
                matches!(err, BackendError::UnknownAdapter(AdapterId(4))),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&root).ok();
    }

    /// Writes a PEFT adapter of rank `r` on `modules` of both layers of `md` into `dir`.
    fn write_adapter(md: &ModelDir, dir: &Path, r: usize, modules: &[&str], salt: f32) {
        use candle_core::Tensor;
        use infermux_core::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
        let dev = candle_core::Device::Cpu;
        let weights = candle_core::safetensors::load(&md.weight_files[0], &dev).unwrap();
        let mut adapter = std::collections::HashMap::new();
        for (m, module) in modules.iter().enumerate() {
            for layer in 0..2 {
                let name = weights
                    .keys()
                    .find(|k| {
                        k.starts_with(&format!("model.layers.{layer}."))
                            && k.ends_with(&format!("{module}.weight"))
                    })
                    .unwrap()
                    .trim_end_matches(".weight")
                    .to_string();
                let (out, inp) = weights[&format!("{name}.weight")].dims2().unwrap();
                let s = salt + (m * 2 + layer) as f32;
                let values = |n: usize, s: f32| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((i as f32 * 0.913 + s).sin()) * 0.2)
                        .collect()
                };
                let a = Tensor::from_vec(values(r * inp, s), (r, inp), &dev).unwrap();
                let b = Tensor::from_vec(values(out * r, s + 0.5), (out, r), &dev).unwrap();
                adapter.insert(format!("base_model.model.{name}.lora_A.weight"), a);
                adapter.insert(format!("base_model.model.{name}.lora_B.weight"), b);
            }
        }
        std::fs::create_dir_all(dir).unwrap();
        candle_core::safetensors::save(&adapter, dir.join(ADAPTER_WEIGHTS)).unwrap();
        let targets: Vec<String> = modules.iter().map(|m| format!("{m:?}")).collect();
        let config = format!(
            r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": {}, "target_modules": [{}]}}"#,
            2 * r,
            targets.join(", ")
        );
        std::fs::write(dir.join(ADAPTER_CONFIG), config).unwrap();
    }

    /// Adapters of different ranks and sites (one skips sites the other updates) and base rows
    /// in one batch, through the stack: each chunk equals the same chunk run alone (on its
    /// adapter alone, or the base), bitwise on our kernels, also after the set of adapters in
    /// the batch changes.
    #[test]
    fn a_batch_mixing_adapters_equals_each_chunk_alone() {
        let md = tiny("qwen2");
        let root = std::env::temp_dir().join(format!("infermux-candle-mix-{}", std::process::id()));
        let (x_dir, y_dir) = (root.join("x"), root.join("y"));
        write_adapter(
            &md,
            &x_dir,
            2,
            &["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            0.0,
        );
        write_adapter(&md, &y_dir, 3, &["q_proj", "up_proj"], 7.0);
        let (x, y) = (Some(AdapterId(1)), Some(AdapterId(2)));
        let prompt: Vec<u32> = (0..14).map(|i| (i * 5 + 2) % 97).collect();
        let on = |slot, start, tokens: &[u32], adapter| SeqChunk {
            adapter,
            ..chunk(slot, start, tokens, LogitsWanted::All)
        };
        for kernels in [CpuKernels::Custom, CpuKernels::Builtin] {
            let mut served = load(&md, kernels, None);
            let mut alone = load(&md, kernels, None);
            for (id, dir) in [(1, &x_dir), (2, &y_dir)] {
                let lora = LoraAdapter::read(dir, served.weight_plan().unwrap()).unwrap();
                served.load_adapter(AdapterId(id), &lora).unwrap();
                alone.load_adapter(AdapterId(id), &lora).unwrap();
            }
            let batches = [
                vec![
                    on(0, 0, &prompt, x),
                    on(1, 0, &prompt[..9], None),
                    on(2, 0, &prompt[..7], y),
                    on(3, 0, &prompt[..5], x),
                ],
                vec![
                    on(0, 14, &[8], x),
                    on(1, 9, &[5], None),
                    on(3, 5, &[1, 2], x),
                ],
                vec![
                    on(2, 7, &[4], y),
                    on(0, 15, &[3], x),
                    on(1, 10, &[6, 6], None),
                ],
            ];
            let mut base = load(&md, kernels, None);
            for chunks in batches {
                let got = served
                    .forward(&ForwardBatch {
                        chunks: chunks.clone(),
                    })
                    .unwrap();
                for (i, c) in chunks.iter().enumerate() {
                    // The same chunk alone, on a slot of its own that holds the same prefix
                    // (every chunk before it ran alone there too), and on the base.
                    let slot = SlotId(10 + c.slot.0);
                    let alone_chunk = SeqChunk { slot, ..c.clone() };
                    let base_chunk = SeqChunk {
                        adapter: None,
                        ..alone_chunk.clone()
                    };
                    let want = alone
                        .forward(&ForwardBatch {
                            chunks: vec![alone_chunk],
                        })
                        .unwrap();
                    let plain = base
                        .forward(&ForwardBatch {
                            chunks: vec![base_chunk],
                        })
                        .unwrap();
                    let (mut worst, mut moved) = (0f32, 0f32);
                    for ((g, w), b) in got.chunk(i).zip(want.chunk(0)).zip(plain.chunk(0)) {
                        for ((a, e), z) in g.iter().zip(w).zip(b) {
                            worst = worst.max((a - e).abs() / (1.0 + e.abs()));
                            moved = moved.max((e - z).abs());
                        }
                    }
                    // Our kernels chain each output's multiply-adds in order, so other
                    // adapters' zero columns add exactly nothing: bitwise the chunk alone.
                    let bound = if kernels == CpuKernels::Custom {
                        0.0
                    } else {
                        1e-5
                    };
                    assert!(worst <= bound, "{kernels:?} chunk {i}: {worst}");
                    assert_eq!(
                        c.adapter.is_some(),
                        moved > 1e-3,
                        "{kernels:?} chunk {i}: {moved}"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&root).ok();
    }
}
