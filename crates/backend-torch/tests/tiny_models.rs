//! The torch backend on tiny random models of every variant the plan knows (tied/untied head,
//! q/k/v biases, q/k norms, llama3 RoPE scaling), checked against a dense reference forward
//! written here with plain libtorch ops (whole sequence, explicit causal softmax, repeated KV
//! heads), through mixed batches, chunked prefill, KV growth past a granule, and forks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use infermux_backend_torch::{TorchBackend, TorchBackendError, TorchOptions};
use infermux_core::{
    Backend, BackendError, DType, ForwardBatch, LogitsWanted, ModelConfig, ModelDir, ModelError,
    SeqChunk, SlotId,
};
use tch::{Kind, Tensor};

const VOCAB: i64 = 97;

/// A variant of the tiny model: its architecture name and the config's extra fields.
struct Variant {
    arch: &'static str,
    tied: bool,
    extra: &'static str,
}

const VARIANTS: &[Variant] = &[
    Variant {
        arch: "LlamaForCausalLM",
        tied: true,
        extra: "",
    },
    Variant {
        arch: "LlamaForCausalLM",
        tied: false,
        extra: r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}"#,
    },
    Variant {
        arch: "MistralForCausalLM",
        tied: false,
        extra: r#", "sliding_window": 4096"#,
    },
    Variant {
        arch: "Qwen2ForCausalLM",
        tied: false,
        extra: "",
    },
    Variant {
        arch: "Qwen3ForCausalLM",
        tied: true,
        extra: "",
    },
];

/// A temporary model folder, removed on drop.
struct TinyModel {
    dir: PathBuf,
}

impl Drop for TinyModel {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Random tensors of a tiny GQA model (4 query heads over 2 KV heads, head_dim 8, 2 layers).
fn tiny_tensors(v: &Variant) -> (String, Vec<(String, Tensor)>) {
    let (h, inter, heads, kv_heads, hd, layers) = (32i64, 48i64, 4i64, 2i64, 8i64, 2);
    let config = format!(
        r#"{{"architectures": ["{}"], "hidden_size": {h}, "intermediate_size": {inter},
        "num_hidden_layers": {layers}, "num_attention_heads": {heads},
        "num_key_value_heads": {kv_heads}, "head_dim": {hd}, "vocab_size": {VOCAB},
        "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
        "tie_word_embeddings": {}, "eos_token_id": 2{}}}"#,
        v.arch, v.tied, v.extra
    );
    let mut t = Vec::new();
    let mut put = |name: String, shape: &[i64], scale: f64, offset: f64| {
        let x = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * scale + offset;
        t.push((name, x));
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, h], 1.0, 0.0);
    put("model.norm.weight".into(), &[h], 0.2, 1.0);
    if !v.tied {
        put("lm_head.weight".into(), &[VOCAB, h], 0.3, 0.0);
    }
    let s = 0.3;
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.2,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[heads * hd, h],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv_heads * hd, h],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv_heads * hd, h],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, heads * hd],
            s,
            0.0,
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, h], s, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[inter, h], s, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[h, inter], s, 0.0);
        if v.arch.starts_with("Qwen2") {
            put(format!("{p}.self_attn.q_proj.bias"), &[heads * hd], s, 0.0);
            put(
                format!("{p}.self_attn.k_proj.bias"),
                &[kv_heads * hd],
                s,
                0.0,
            );
            put(
                format!("{p}.self_attn.v_proj.bias"),
                &[kv_heads * hd],
                s,
                0.0,
            );
        }
        if v.arch.starts_with("Qwen3") {
            put(format!("{p}.self_attn.q_norm.weight"), &[hd], 0.2, 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), &[hd], 0.2, 1.0);
        }
    }
    (config, t)
}

fn write_model(name: &str, config: &str, tensors: &[(String, Tensor)]) -> TinyModel {
    let dir =
        std::env::temp_dir().join(format!("infermux-torch-tiny-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    Tensor::write_safetensors(tensors, dir.join("model.safetensors")).unwrap();
    TinyModel { dir }
}

fn tiny_model(v: &Variant, name: &str) -> TinyModel {
    let (config, tensors) = tiny_tensors(v);
    write_model(name, &config, &tensors)
}

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x
        .pow_tensor_scalar(2)
        .mean_dim(Some(&[-1i64][..]), true, Kind::Float);
    x * (var + eps).rsqrt() * w
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let rot = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
    x * cos + rot * sin
}

/// Logits of every position of `tokens`, `[len, vocab]`, by the textbook forward pass.
fn reference_logits(dir: &Path, tokens: &[u32]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let cfg = ModelDir::open(dir).unwrap().config;
    let w: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let get = |n: &str| w[n].shallow_clone();
    let opt = |n: &str| w.get(n).map(Tensor::shallow_clone);
    let (nh, nkv, hd) = (
        cfg.num_heads as i64,
        cfg.num_kv_heads as i64,
        cfg.head_dim as i64,
    );
    let n = tokens.len() as i64;
    let eps = cfg.rms_norm_eps;
    let ids = Tensor::from_slice(&tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
    let inv_freq = Tensor::from_slice(&cfg.rope_inv_freq());
    let angles = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).outer(&inv_freq);
    let angles = Tensor::cat(&[&angles, &angles], -1).unsqueeze(1);
    let (cos, sin) = (angles.cos(), angles.sin());
    let causal = Tensor::ones([n, n], (Kind::Bool, tch::Device::Cpu)).triu(1);
    let mut x = get("model.embed_tokens.weight").index_select(0, &ids);
    for l in 0..cfg.num_layers {
        let p = |m: &str| format!("model.layers.{l}.{m}");
        let h = rms(&x, &get(&p("input_layernorm.weight")), eps);
        let proj = |m: &str, heads: i64| {
            h.linear(
                &get(&p(&format!("self_attn.{m}.weight"))),
                opt(&p(&format!("self_attn.{m}.bias"))).as_ref(),
            )
            .view([n, heads, hd])
        };
        let (mut q, mut k, v) = (proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv));
        if let Some(qn) = opt(&p("self_attn.q_norm.weight")) {
            q = rms(&q, &qn, eps);
        }
        if let Some(kn) = opt(&p("self_attn.k_norm.weight")) {
            k = rms(&k, &kn, eps);
        }
        let (q, k) = (rotate(&q, &cos, &sin), rotate(&k, &cos, &sin));
        let repeat = |t: &Tensor| {
            t.transpose(0, 1)
                .repeat_interleave_self_int(nh / nkv, 0, None::<i64>)
        };
        let (q, k, v) = (q.transpose(0, 1), repeat(&k), repeat(&v));
        let scores = q.matmul(&k.transpose(1, 2)) / (hd as f64).sqrt();
        let probs = scores
            .masked_fill(&causal, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float);
        let o = probs.matmul(&v).transpose(0, 1).reshape([n, nh * hd]);
        x = &x + o.linear(&get(&p("self_attn.o_proj.weight")), None::<Tensor>);
        let h = rms(&x, &get(&p("post_attention_layernorm.weight")), eps);
        let gate = h.linear(&get(&p("mlp.gate_proj.weight")), None::<Tensor>);
        let up = h.linear(&get(&p("mlp.up_proj.weight")), None::<Tensor>);
        x = &x + (gate.silu() * up).linear(&get(&p("mlp.down_proj.weight")), None::<Tensor>);
    }
    let head = opt("lm_head.weight")
        .filter(|_| !cfg.tie_word_embeddings)
        .unwrap_or_else(|| get("model.embed_tokens.weight"));
    rms(&x, &get("model.norm.weight"), eps).linear(&head, None::<Tensor>)
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

/// Runs `batch`, appends its tokens to `seqs`, and checks every returned row against the
/// reference logits of the slot's whole sequence at that position; returns the worst error.
fn run_and_check(
    b: &mut TorchBackend,
    dir: &Path,
    seqs: &mut HashMap<u32, Vec<u32>>,
    batch: &ForwardBatch,
    tol: f32,
) -> f32 {
    let logits = b.forward(batch).unwrap();
    let mut worst = 0f32;
    for (i, c) in batch.chunks.iter().enumerate() {
        let seq = seqs.entry(c.slot.0).or_default();
        seq.extend(&c.tokens);
        assert_eq!(b.cached_len(c.slot), seq.len());
        let reference = reference_logits(dir, seq);
        let first = match c.logits {
            LogitsWanted::All => c.start_pos,
            _ => seq.len() - 1,
        };
        for (r, row) in logits.chunk(i).enumerate() {
            let expected = Vec::<f32>::try_from(reference.get((first + r) as i64)).unwrap();
            for (g, e) in row.iter().zip(&expected) {
                let d = (g - e).abs() / (1.0 + e.abs());
                worst = worst.max(d);
                assert!(
                    d <= tol,
                    "slot {} position {}: {g} vs {e}",
                    c.slot.0,
                    first + r
                );
            }
        }
    }
    worst
}

fn prompt(len: usize, mul: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * mul + 5) % VOCAB as u32)
        .collect()
}

#[test]
fn every_variant_matches_the_reference_through_batches_growth_and_forks() {
    for (i, v) in VARIANTS.iter().enumerate() {
        let model = tiny_model(v, &format!("variant{i}"));
        let mut b = TorchBackend::load(&model.dir, TorchOptions::default()).unwrap();
        let bpt = b.info().kv_bytes_per_token;
        assert_eq!(bpt, 2 * 2 * 2 * 8 * 4);
        let mut seqs = HashMap::new();
        let (p0, p1) = (prompt(70, 13), prompt(9, 7));
        let batches = [
            // A long prefill (crosses the first 64-position granule) and a short one.
            ForwardBatch {
                chunks: vec![
                    chunk(0, 0, &p0, LogitsWanted::All),
                    chunk(1, 0, &p1[..5], LogitsWanted::Last),
                ],
            },
            // A prefill continuation (masked against the cache), decode steps, a new slot.
            ForwardBatch {
                chunks: vec![
                    chunk(1, 5, &p1[5..], LogitsWanted::All),
                    chunk(0, 70, &[7], LogitsWanted::Last),
                    chunk(2, 0, &[3], LogitsWanted::Last),
                ],
            },
        ];
        let mut worst = 0f32;
        for batch in &batches {
            worst = worst.max(run_and_check(&mut b, &model.dir, &mut seqs, batch, 1e-4));
        }
        assert_eq!(b.kv_usage().allocated_bytes, (128 + 64 + 64) * bpt);
        // A fork copies the filled prefix only; the two then diverge independently.
        b.fork(SlotId(0), SlotId(3)).unwrap();
        seqs.insert(3, seqs[&0].clone());
        assert_eq!(b.cached_len(SlotId(3)), 71);
        let diverge = ForwardBatch {
            chunks: vec![
                chunk(3, 71, &[11, 12], LogitsWanted::All),
                chunk(0, 71, &[40], LogitsWanted::Last),
                chunk(1, 9, &[1], LogitsWanted::None),
            ],
        };
        worst = worst.max(run_and_check(&mut b, &model.dir, &mut seqs, &diverge, 1e-4));
        eprintln!(
            "{} (tied: {}): worst relative error {worst:.1e}",
            v.arch, v.tied
        );
        for s in 0..4 {
            b.release(SlotId(s));
        }
        assert_eq!(b.kv_usage().allocated_bytes, 0);
    }
}

#[test]
fn no_allocation_passes_the_kv_budget() {
    let model = tiny_model(&VARIANTS[0], "budget");
    let mut b = TorchBackend::load(&model.dir, TorchOptions::default()).unwrap();
    let bpt = b.info().kv_bytes_per_token;
    b.set_kv_budget(Some(100 * bpt));
    assert_eq!(b.kv_usage().budget_bytes, Some(100 * bpt));
    b.prefill(SlotId(0), 0, &prompt(10, 3), LogitsWanted::Last)
        .unwrap();
    let err = b
        .prefill(SlotId(1), 0, &prompt(10, 5), LogitsWanted::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::KvBudgetExceeded {
                slot: SlotId(1),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(b.cached_len(SlotId(1)), 0);
    assert!(matches!(
        b.fork(SlotId(0), SlotId(2)),
        Err(BackendError::KvBudgetExceeded { .. })
    ));
    b.release(SlotId(0));
    b.prefill(SlotId(1), 0, &prompt(10, 5), LogitsWanted::Last)
        .unwrap();
    assert_eq!(b.kv_usage().allocated_bytes, 64 * bpt);
}

#[test]
fn bad_batches_are_refused_without_touching_state() {
    let model = tiny_model(&VARIANTS[3], "batches");
    let mut b = TorchBackend::load(&model.dir, TorchOptions::default()).unwrap();
    b.prefill(SlotId(0), 0, &[1, 2, 3], LogitsWanted::Last)
        .unwrap();
    let twice = ForwardBatch {
        chunks: vec![
            chunk(0, 3, &[4], LogitsWanted::Last),
            chunk(0, 3, &[5], LogitsWanted::Last),
        ],
    };
    assert!(b.forward(&twice).is_err());
    assert!(matches!(
        b.forward(&ForwardBatch {
            chunks: vec![chunk(0, 2, &[4], LogitsWanted::Last)]
        }),
        Err(BackendError::PositionMismatch { .. })
    ));
    assert!(matches!(
        b.fork(SlotId(9), SlotId(1)),
        Err(BackendError::UnknownSlot(SlotId(9)))
    ));
    assert_eq!(b.cached_len(SlotId(0)), 3);
    // An intermediate prefill chunk asks for no rows.
    let none = b
        .prefill(SlotId(0), 3, &[4, 5], LogitsWanted::None)
        .unwrap();
    assert_eq!(none.chunk(0).len(), 0);
    assert_eq!(b.cached_len(SlotId(0)), 5);
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let (config, mut tensors) = tiny_tensors(&VARIANTS[3]);
    let bias = "model.layers.1.self_attn.k_proj.bias";
    tensors.retain(|(n, _)| n != bias);
    let model = write_model("missing", &config, &tensors);
    let err = TorchBackend::load(&model.dir, TorchOptions::default())
        .err()
        .unwrap();
    // The core checks the checkpoint's headers against the plan before any tensor is loaded.
    assert!(
        matches!(
            &err,
            TorchBackendError::Model(ModelError::InvalidConfig { .. })
        ) && err.to_string().contains(&format!("no tensor {bias}")),
        "{err}"
    );

    let (config, mut tensors) = tiny_tensors(&VARIANTS[0]);
    let name = "model.layers.0.mlp.up_proj.weight";
    for (n, t) in &mut tensors {
        if n == name {
            *t = Tensor::zeros([48, 31], (Kind::Float, tch::Device::Cpu));
        }
    }
    let model = write_model("shape", &config, &tensors);
    let err = TorchBackend::load(&model.dir, TorchOptions::default())
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        matches!(
            &err,
            TorchBackendError::Model(ModelError::InvalidConfig { .. })
        ) && message.contains(name)
            && message.contains("[48, 31]")
            && message.contains("[48, 32]"),
        "{err}"
    );
}

#[test]
fn reduced_precision_stays_close_to_f32() {
    let v = &VARIANTS[4];
    let model = tiny_model(v, "bf16");
    let cfg: ModelConfig = ModelDir::open(&model.dir).unwrap().config;
    let tokens = prompt(20, 11);
    let reference = reference_logits(&model.dir, &tokens);
    for dtype in [DType::Bf16, DType::F16] {
        let opts = TorchOptions {
            dtype,
            ..TorchOptions::default()
        };
        let mut b = TorchBackend::load(&model.dir, opts).unwrap();
        assert_eq!(b.info().kv_bytes_per_token, cfg.kv_bytes_per_token(dtype));
        let logits = b.prefill(SlotId(0), 0, &tokens, LogitsWanted::All).unwrap();
        let got: Vec<f32> = logits.chunk(0).flatten().copied().collect();
        let expected = Vec::<f32>::try_from(reference.reshape([-1])).unwrap();
        let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&expected)
            .fold(0f32, |m, (g, e)| m.max((g - e).abs()));
        eprintln!("{dtype:?}: max |Δ| {worst:.3} over logits up to {scale:.1}");
        assert!(worst <= 0.05 * scale, "{dtype:?}: {worst} vs scale {scale}");
    }
}

/// A PEFT adapter (rank 2 on q, k, o, up and down of both layers) equals the same update
/// merged into the weights (`W + (alpha / r) B A`) on its rows, and base rows in the same
/// batch equal the base model.
#[test]
fn adapter_rows_equal_merged_weights_and_base_rows_stay_base() {
    use infermux_core::AdapterId;
    use infermux_core::model::LoraAdapter;
    let _guard = tch::no_grad_guard();
    tch::manual_seed(14);
    let (config, mut tensors) = tiny_tensors(&VARIANTS[0]);
    let base_model = write_model("lora-base", &config, &tensors);
    let (r, alpha) = (2i64, 5.0f64);
    let mut adapter = Vec::new();
    for layer in 0..2 {
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            let name = format!("model.layers.{layer}.{module}");
            let at = tensors
                .iter()
                .position(|(n, _)| *n == format!("{name}.weight"))
                .unwrap();
            let (out, inp) = (tensors[at].1.size()[0], tensors[at].1.size()[1]);
            let a = Tensor::randn([r, inp], (Kind::Float, tch::Device::Cpu)) * 0.3;
            let b = Tensor::randn([out, r], (Kind::Float, tch::Device::Cpu)) * 0.3;
            let merged = &tensors[at].1 + b.matmul(&a) * (alpha / r as f64);
            tensors[at].1 = merged;
            adapter.push((format!("base_model.model.{name}.lora_A.weight"), a));
            adapter.push((format!("base_model.model.{name}.lora_B.weight"), b));
        }
    }
    let merged_model = write_model("lora-merged", &config, &tensors);
    let adapter_dir = base_model.dir.join("adapter");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    Tensor::write_safetensors(&adapter, adapter_dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        adapter_dir.join("adapter_config.json"),
        format!(r#"{{"r": {r}, "lora_alpha": {alpha}, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]}}"#),
    )
    .unwrap();
    let mut served = TorchBackend::load(&base_model.dir, TorchOptions::default()).unwrap();
    let lora = LoraAdapter::read(&adapter_dir, served.weight_plan().unwrap()).unwrap();
    served.load_adapter(AdapterId(1), &lora).unwrap();
    let mut merged = TorchBackend::load(&merged_model.dir, TorchOptions::default()).unwrap();
    let mut base = TorchBackend::load(&base_model.dir, TorchOptions::default()).unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 97).collect();
    let on = |slot, start, tokens: &[u32], adapter| SeqChunk {
        adapter,
        ..chunk(slot, start, tokens, LogitsWanted::All)
    };
    let a = Some(AdapterId(1));
    let batches = [
        vec![
            on(0, 0, &prompt, a),
            on(1, 0, &prompt[..9], None),
            on(2, 0, &prompt[..5], a),
        ],
        vec![
            on(1, 9, &[5], None),
            on(0, 20, &[8], a),
            on(2, 5, &[1, 2], a),
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
            // `W x + s B (A x)` and `(W + s B A) x` round differently: libtorch's GEMM
            // kernel (chosen per CPU) moved one logit by 1.3e-4 on Sapphire Rapids, so
            // the bound is 1e-3 (the f32 pairwise bound of the other suites), and the
            // adapter must move logits by far more than that.
            let (mut moved, mut worst) = (0f32, 0f32);
            for ((g, w), b) in got.chunk(i).zip(want.chunk(i)).zip(want_base.chunk(i)) {
                for ((x, y), z) in g.iter().zip(w).zip(b) {
                    worst = worst.max((x - y).abs() / (1.0 + y.abs()));
                    moved = moved.max((y - z).abs());
                }
            }
            eprintln!("chunk {i}: |Δ| {worst:.2e} vs the reference, adapter moved {moved:.3}");
            assert!(worst <= 1e-3, "chunk {i}: {worst}");
            assert_eq!(c.adapter.is_some(), moved > 2e-2, "chunk {i}: {moved}");
        }
    }
    served.unload_adapter(AdapterId(1));
    let err = served
        .forward(&ForwardBatch {
            chunks: vec![on(5, 0, &prompt[..3], a)],
        })
        .unwrap_err();
    assert!(
        matches!(err, BackendError::UnknownAdapter(AdapterId(1))),
        "{err}"
    );
}
