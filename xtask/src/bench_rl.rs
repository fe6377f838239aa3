//! `cargo xtask bench-rl`: what an RL loop asks of a running `infermux serve`, measured over
//! loopback HTTP on the release binary, every comparison in the same run:
//! - prefix cache: time to first token of a request sharing a 1,024-token prefix with an
//!   earlier one, against the same request cold;
//! - a GRPO-shaped step (32 prompts × 8 samples, one 512-token system prompt, 64 new tokens)
//!   on a server with the prefix cache against one without, the cache flushed before each run
//!   as a weight update flushes it;
//! - mixed adapters: 32 requests spread over 4 LoRA adapters and the base against 32 on the
//!   base alone;
//! - weight updates under concurrent load: call → first token on the new weights, and every
//!   load request's status.
//!
//! The adapters (PEFT layout, rank 8, all seven projections, seeded random A and B) and the
//! updated checkpoint (the model's weights scaled by 1.001) are written here, under
//! `target/bench-rl/allowed`. Writes `docs/bench/rl.md` by default.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::{Value, json};

use crate::serve_bench::{
    Proc, build_infermux, commit_line, cpu_model, load_average, median, request, request_as, serve,
    target_dir, today,
};
use crate::setup;

/// The name the base model is served under.
const MODEL: &str = "bench";
/// The control routes' key (loopback only, a throwaway server).
const ADMIN_KEY: &str = "bench-rl-admin";
/// LoRA adapters the mixed workload spreads over.
const ADAPTERS: usize = 4;
/// Their rank.
const RANK: usize = 8;
/// The projections they adapt.
const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Flags of `cargo xtask bench-rl`.
#[derive(Args, Debug)]
pub struct BenchRlArgs {
    /// Measured runs per scenario (tables show medians).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Measured runs of each GRPO arm (a run is a whole 32 × 8 step).
    #[arg(long, default_value_t = 2)]
    pub grpo_repeats: usize,
    /// Output file (default: docs/bench/rl.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only these scenarios (default: all), e.g. `--only mixed,updates` while tuning one.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Scenario>,
}

/// The scenarios of `cargo xtask bench-rl`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Time to first token over a shared 1,024-token prefix.
    Prefix,
    /// A GRPO step with the cache on and off.
    Grpo,
    /// 32 requests over adapters and the base against the base alone.
    Mixed,
    /// Weight updates under load.
    Updates,
}

/// What the scenarios measured (`None`: not run).
struct Results {
    prefix: Option<Vec<PrefixRun>>,
    grpo: Option<Grpo>,
    mixed: Option<Mixed>,
    updates: Option<Updates>,
}

/// Runs every scenario, then writes and prints the report.
pub fn run(root: &Path, args: &BenchRlArgs) -> Result<()> {
    ensure!(
        args.repeats > 0 && args.grpo_repeats > 0,
        "--repeats and --grpo-repeats must be positive"
    );
    let model = setup::run(root)?;
    let bin = build_infermux(root)?;
    let work = target_dir(root).join("bench-rl");
    let allowed = work.join("allowed");
    std::fs::create_dir_all(&allowed)?;
    eprintln!("writing {ADAPTERS} adapters and an updated checkpoint…");
    let adapters = write_adapters(&model, &allowed)?;
    let checkpoints = write_checkpoints(&model, &allowed)?;
    let load_before = load_average();

    let server = |label: &str, cache: bool| -> Result<(Proc, String)> {
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--model"])
            .arg(&model)
            .args([
                "--backend",
                "candle",
                "--served-model-name",
                MODEL,
                "--kv-cache-memory-bytes",
                "4GiB",
                "--enable-control-routes",
                "--admin-key",
                ADMIN_KEY,
                "--allowed-model-dir",
            ])
            .arg(&allowed)
            .arg("--lora-modules")
            .args(
                adapters
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("lora{i}={}", p.display())),
            );
        if !cache {
            cmd.arg("--no-enable-prefix-caching");
        }
        serve(cmd, &work.join(format!("{label}.log")))
    };
    let (_cached_proc, cached) = server("cache-on", true)?;
    let (_plain_proc, plain) = server("cache-off", false)?;
    complete(
        &cached,
        &json!({"model": MODEL, "prompt": "Warm up", "max_tokens": 4}),
    )?;
    complete(
        &plain,
        &json!({"model": MODEL, "prompt": "Warm up", "max_tokens": 4}),
    )?;

    let runs = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    let results = Results {
        prefix: runs(Scenario::Prefix)
            .then(|| prefix_ttft(&cached, args.repeats))
            .transpose()?,
        grpo: runs(Scenario::Grpo)
            .then(|| grpo(&cached, &plain, args.grpo_repeats))
            .transpose()?,
        mixed: runs(Scenario::Mixed)
            .then(|| mixed_adapters(&cached, args.repeats))
            .transpose()?,
        updates: runs(Scenario::Updates)
            .then(|| weight_updates(&cached, &checkpoints, args.repeats))
            .transpose()?,
    };

    let load = (load_before, load_average());
    let md = render(root, args, load, &results)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("docs/bench/rl.md"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// A seeded xorshift64* stream: the bench's token ids and adapter values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` ordinary token ids (clear of the special tokens at the start of the vocabulary).
    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| 1_000 + (self.next() % 39_000) as u32)
            .collect()
    }
}

/// A `POST /v1/completions` that must answer 200; its body.
fn complete(addr: &str, body: &Value) -> Result<Value> {
    let (status, v) = request(addr, "POST", "/v1/completions", Some(body))?;
    ensure!(status == 200, "completion answered {status}: {v}");
    Ok(v)
}

/// A control route call with the admin key that must answer 200; its body.
fn control(addr: &str, path: &str, body: &Value) -> Result<Value> {
    let (status, v) = request_as(addr, "POST", path, Some(body), Some(ADMIN_KEY))?;
    ensure!(status == 200, "{path} answered {status}: {v}");
    Ok(v)
}

/// The model's `config.json` as JSON.
fn model_config(model: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(model.join("config.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Writes `ADAPTERS` PEFT adapters for `model` under `dir`; their folders.
fn write_adapters(model: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let config = model_config(model)?;
    let dim = |k: &str| {
        config[k]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("config.json has no {k}"))
    };
    let (hidden, inter, layers) = (
        dim("hidden_size")?,
        dim("intermediate_size")?,
        dim("num_hidden_layers")?,
    );
    let heads = dim("num_attention_heads")?;
    let kv_heads = dim("num_key_value_heads")?;
    let head_dim = dim("head_dim").unwrap_or(hidden / heads);
    let shape = |module: &str| match module {
        "q_proj" => (hidden, heads * head_dim),
        "k_proj" | "v_proj" => (hidden, kv_heads * head_dim),
        "o_proj" => (heads * head_dim, hidden),
        "gate_proj" | "up_proj" => (hidden, inter),
        _ => (inter, hidden),
    };
    let mut folders = Vec::new();
    for a in 0..ADAPTERS {
        let folder = dir.join(format!("lora{a}"));
        std::fs::create_dir_all(&folder)?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (a as u64 + 1));
        let mut tensors = HashMap::new();
        for layer in 0..layers {
            for module in MODULES {
                let (fan_in, fan_out) = shape(module);
                let part = if matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                    "self_attn"
                } else {
                    "mlp"
                };
                let base = format!("base_model.model.model.layers.{layer}.{part}.{module}");
                let bound = 1.0 / (fan_in as f32).sqrt();
                let a_vals: Vec<f32> = (0..RANK * fan_in).map(|_| rng.unit() * bound).collect();
                let b_vals: Vec<f32> = (0..fan_out * RANK).map(|_| rng.unit() * 0.02).collect();
                tensors.insert(
                    format!("{base}.lora_A.weight"),
                    Tensor::from_vec(a_vals, (RANK, fan_in), &Device::Cpu)?,
                );
                tensors.insert(
                    format!("{base}.lora_B.weight"),
                    Tensor::from_vec(b_vals, (fan_out, RANK), &Device::Cpu)?,
                );
            }
        }
        candle_core::safetensors::save(&tensors, folder.join("adapter_model.safetensors"))?;
        let adapter_config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": model.display().to_string(),
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "lora_dropout": 0.0,
            "use_rslora": false,
            "bias": "none",
            "target_modules": MODULES,
        });
        std::fs::write(
            folder.join("adapter_config.json"),
            serde_json::to_string_pretty(&adapter_config)?,
        )?;
        folders.push(folder);
    }
    Ok(folders)
}

/// Two checkpoints under `dir` for the updates to alternate between: `updated` (every weight
/// scaled by 1.001) and `original` (the model's own weights, hard-linked or copied).
fn write_checkpoints(model: &Path, dir: &Path) -> Result<[PathBuf; 2]> {
    let source = model.join("model.safetensors");
    ensure!(
        source.is_file(),
        "{} is not a single-file checkpoint",
        model.display()
    );
    let updated = dir.join("updated");
    let original = dir.join("original");
    for folder in [&updated, &original] {
        std::fs::create_dir_all(folder)?;
        std::fs::copy(model.join("config.json"), folder.join("config.json"))?;
    }
    let target = original.join("model.safetensors");
    if !target.exists() && std::fs::hard_link(&source, &target).is_err() {
        std::fs::copy(&source, &target)?;
    }
    let scaled = updated.join("model.safetensors");
    if !scaled.exists() {
        let tensors = candle_core::safetensors::load(&source, &Device::Cpu)?;
        let scaled_tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let t = if t.dtype() == DType::F32 {
                    t.affine(1.001, 0.0)?
                } else {
                    t
                };
                Ok((name, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        candle_core::safetensors::save(&scaled_tensors, &scaled)?;
    }
    Ok([updated, original])
}

/// Cold and warm time to first token over a 1,024-token shared prefix.
struct PrefixRun {
    cold_s: f64,
    warm_s: f64,
    cached_tokens: u64,
}

/// `repeats` fresh 1,024-token prefixes: one request cold, then one that extends the same
/// prefix with another suffix; both `max_tokens` 1, so the latency is the time to the first
/// token.
fn prefix_ttft(addr: &str, repeats: usize) -> Result<Vec<PrefixRun>> {
    let mut runs = Vec::new();
    for r in 0..repeats {
        let mut rng = Rng(0x5eed_0000 + r as u64);
        let prefix = rng.tokens(1024);
        let ask = |suffix: Vec<u32>| -> Result<(f64, u64)> {
            let prompt: Vec<u32> = prefix.iter().copied().chain(suffix).collect();
            let t = Instant::now();
            let v = complete(
                addr,
                &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}),
            )?;
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .context("no usage.prompt_tokens_details.cached_tokens")?;
            Ok((t.elapsed().as_secs_f64(), cached))
        };
        let (cold_s, cold_cached) = ask(rng.tokens(16))?;
        ensure!(
            cold_cached == 0,
            "a fresh prefix reused {cold_cached} tokens"
        );
        let (warm_s, cached_tokens) = ask(rng.tokens(16))?;
        eprintln!(
            "prefix {}: cold {cold_s:.3} s, warm {warm_s:.3} s ({cached_tokens} cached)",
            r + 1
        );
        runs.push(PrefixRun {
            cold_s,
            warm_s,
            cached_tokens,
        });
    }
    Ok(runs)
}

/// One GRPO arm's runs: generated tokens per second and the prompt tokens served from cache.
struct GrpoArm {
    tok_s: Vec<f64>,
    cached: Vec<u64>,
}

/// Both GRPO shapes on both servers.
struct Grpo {
    /// 256 requests (each prompt sent 8 times, as OpenRLHF and SkyRL send a group).
    repeated: [GrpoArm; 2],
    /// 32 requests with `n` 8 (the engine forks one prefill into 8 samples).
    fanned: [GrpoArm; 2],
}

/// 32 prompts sharing one 512-token system prompt, each with 32 tokens of its own.
fn grpo_prompts(run: usize) -> Vec<Vec<u32>> {
    let system = Rng(0x6870_0000).tokens(512);
    let mut rng = Rng(0x6870_1000 + run as u64);
    (0..32)
        .map(|_| system.iter().copied().chain(rng.tokens(32)).collect())
        .collect()
}

/// One GRPO step on `addr`: each prompt's 8 samples as 8 requests (`repeated`) or one with
/// `n` 8; 64 tokens each (`ignore_eos`). Flushes the prefix cache first.
fn grpo_step(addr: &str, run: usize, repeated: bool) -> Result<(f64, u64)> {
    control(addr, "/flush_cache", &json!({}))?;
    let prompts = grpo_prompts(run);
    let bodies: Vec<Value> = prompts
        .iter()
        .enumerate()
        .flat_map(|(p, prompt)| {
            let copies = if repeated { 8 } else { 1 };
            (0..copies).map(move |c| {
                json!({
                    "model": MODEL,
                    "prompt": prompt,
                    "max_tokens": 64,
                    "n": if repeated { 1 } else { 8 },
                    "temperature": 1.0,
                    "seed": p * 8 + c,
                    "ignore_eos": true,
                })
            })
        })
        .collect();
    let (wall, replies) = concurrently(addr, bodies)?;
    let mut tokens = 0;
    let mut cached = 0;
    for v in &replies {
        tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        cached += v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
    }
    ensure!(
        tokens == 32 * 8 * 64,
        "{tokens} tokens came back, not 32 x 8 x 64"
    );
    Ok((tokens as f64 / wall, cached))
}

/// Both GRPO shapes, alternating the cached and uncached servers run by run.
fn grpo(cached: &str, plain: &str, repeats: usize) -> Result<Grpo> {
    let arm = || GrpoArm {
        tok_s: Vec::new(),
        cached: Vec::new(),
    };
    let mut out = Grpo {
        repeated: [arm(), arm()],
        fanned: [arm(), arm()],
    };
    for run in 0..repeats {
        for repeated in [true, false] {
            for (i, addr) in [cached, plain].into_iter().enumerate() {
                let (tok_s, hit) = grpo_step(addr, run, repeated)?;
                eprintln!(
                    "grpo {} run {}, cache {}: {tok_s:.1} tok/s, {hit} prompt tokens cached",
                    if repeated { "256 x n=1" } else { "32 x n=8" },
                    run + 1,
                    if i == 0 { "on" } else { "off" },
                );
                let arms = if repeated {
                    &mut out.repeated
                } else {
                    &mut out.fanned
                };
                arms[i].tok_s.push(tok_s);
                arms[i].cached.push(hit);
            }
        }
    }
    Ok(out)
}

/// Posts every body to `/v1/completions` at once; the wall time and the replies in order.
fn concurrently(addr: &str, bodies: Vec<Value>) -> Result<(f64, Vec<Value>)> {
    let start = Instant::now();
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let addr = addr.to_string();
            std::thread::spawn(move || complete(&addr, &body))
        })
        .collect();
    let mut replies = Vec::new();
    for h in handles {
        replies.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    Ok((start.elapsed().as_secs_f64(), replies))
}

/// Decode throughput of 32 concurrent requests, base-only and spread over base + adapters.
struct Mixed {
    base_tok_s: Vec<f64>,
    mixed_tok_s: Vec<f64>,
}

/// 32 requests of 64 tokens: all on the base, then round-robin over the base and each
/// adapter; alternating, `repeats` times.
fn mixed_adapters(addr: &str, repeats: usize) -> Result<Mixed> {
    let workload = |mixed: bool, run: usize| -> Result<f64> {
        let bodies: Vec<Value> = (0..32)
            .map(|i| {
                let model = match i % (ADAPTERS + 1) {
                    0 => MODEL.to_string(),
                    _ if !mixed => MODEL.to_string(),
                    a => format!("lora{}", a - 1),
                };
                json!({
                    "model": model,
                    "prompt": format!("Run {run}, request {i}. Write a short story about a lighthouse keeper and"),
                    "max_tokens": 64,
                    "temperature": 0.7,
                    "seed": i,
                    "ignore_eos": true,
                })
            })
            .collect();
        let (wall, replies) = concurrently(addr, bodies)?;
        let tokens: u64 = replies
            .iter()
            .map(|v| v["usage"]["completion_tokens"].as_u64().unwrap_or(0))
            .sum();
        ensure!(tokens == 32 * 64, "{tokens} tokens came back, not 32 x 64");
        Ok(tokens as f64 / wall)
    };
    workload(true, usize::MAX)?; // warm-up: every adapter once
    let mut out = Mixed {
        base_tok_s: Vec::new(),
        mixed_tok_s: Vec::new(),
    };
    for run in 0..repeats {
        let base = workload(false, run)?;
        let mixed = workload(true, run)?;
        eprintln!(
            "adapters run {}: base {base:.1} tok/s, mixed {mixed:.1} tok/s",
            run + 1
        );
        out.base_tok_s.push(base);
        out.mixed_tok_s.push(mixed);
    }
    Ok(out)
}

/// One weight update under load.
struct UpdateRun {
    /// The update call's own latency (drain, load, swap).
    call_s: f64,
    /// From the call to the first token of a request answered on the new weights.
    first_token_s: f64,
    /// The backend's load time as the reply reports it.
    load_s: f64,
    /// Requests that finished on the old weights before the swap.
    drained: u64,
}

/// What the updates under load measured.
struct Updates {
    runs: Vec<UpdateRun>,
    load_requests: usize,
    load_failures: Vec<String>,
}

/// Concurrent load (8 clients completing 16 tokens in a loop) while `repeats` drain-mode
/// updates alternate between the checkpoints; after each, a 1-token request must report the
/// new version.
fn weight_updates(addr: &str, checkpoints: &[PathBuf; 2], repeats: usize) -> Result<Updates> {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let addr = addr.to_string();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({
                        "model": MODEL,
                        "prompt": format!("Client {c}, request {done}: once upon a time"),
                        "max_tokens": 16,
                        "temperature": 0.7,
                        "seed": done,
                        "ignore_eos": true,
                    });
                    match request(&addr, "POST", "/v1/completions", Some(&body)) {
                        Ok((200, _)) => {}
                        Ok((status, v)) => failures.push(format!("{status}: {v}")),
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                    done += 1;
                }
                (done, failures)
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut runs = Vec::new();
    let result = (|| -> Result<()> {
        for r in 0..repeats {
            let version = format!("bench-rl-{}", r + 1);
            let path = &checkpoints[r % 2];
            let t = Instant::now();
            let reply = control(
                addr,
                "/update_weights_from_disk",
                &json!({"model_path": path.display().to_string(), "weight_version": version}),
            )?;
            let call_s = t.elapsed().as_secs_f64();
            let probe = complete(
                addr,
                &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0.0}),
            )?;
            let first_token_s = t.elapsed().as_secs_f64();
            if probe["weight_version"] != version.as_str() {
                bail!(
                    "after the update to {version} a request reported weight_version {}",
                    probe["weight_version"]
                );
            }
            let run = UpdateRun {
                call_s,
                first_token_s,
                load_s: reply["load_seconds"].as_f64().unwrap_or(f64::NAN),
                drained: reply["drained_requests"].as_u64().unwrap_or(0),
            };
            eprintln!(
                "update {}: call {:.3} s (load {:.3} s, {} drained), first token on {version} at {first_token_s:.3} s",
                r + 1,
                run.call_s,
                run.load_s,
                run.drained
            );
            runs.push(run);
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let mut load_requests = 0;
    let mut load_failures = Vec::new();
    for c in clients {
        let (done, failures) = c
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        load_requests += done;
        load_failures.extend(failures);
    }
    result?;
    Ok(Updates {
        runs,
        load_requests,
        load_failures,
    })
}

/// The Markdown report.
fn render(
    root: &Path,
    args: &BenchRlArgs,
    load: (String, String),
    results: &Results,
) -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::new();
    writeln!(
        md,
        "# The RL loop: prefix cache, GRPO, mixed adapters, weight updates\n"
    )?;
    writeln!(
        md,
        "`cargo xtask bench-rl` on {date}, {commit}: {cpu}, {cores} cores (`lscpu`, `nproc`). \
         Release `infermux serve`, candle backend, SmolLM2-135M-Instruct f32, \
         `--kv-cache-memory-bytes 4GiB`, every other flag default; clients on 127.0.0.1 \
         (`/v1/completions`, token-id prompts). Medians of {r} runs ({g} per GRPO arm). \
         1-minute load average before / after: {l0} / {l1}.\n",
        date = today(),
        commit = commit_line(root),
        cpu = cpu_model(),
        r = args.repeats,
        g = args.grpo_repeats,
        l0 = load.0,
        l1 = load.1,
    )?;

    if let Some(prefix) = &results.prefix {
        let cold: Vec<f64> = prefix.iter().map(|p| p.cold_s).collect();
        let warm: Vec<f64> = prefix.iter().map(|p| p.warm_s).collect();
        let ratios: Vec<f64> = prefix.iter().map(|p| p.cold_s / p.warm_s).collect();
        let ttft = median(&ratios);
        writeln!(
            md,
            "## Prefix cache: time to first token over a shared 1,024-token prefix\n"
        )?;
        writeln!(
            md,
            "A fresh 1,024-token prefix + 16 tokens, then the same prefix + 16 other tokens; \
             `max_tokens` 1, so a request's latency is its time to first token.\n"
        )?;
        writeln!(
            md,
            "| cold | warm (prefix cached) | cached prompt tokens | cold ÷ warm | goal |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|")?;
        writeln!(
            md,
            "| {:.3} s | {:.3} s | {} | **{ttft:.1}×** | ≥ 5× {} |\n",
            median(&cold),
            median(&warm),
            prefix.iter().map(|p| p.cached_tokens).min().unwrap_or(0),
            if ttft >= 5.0 { "✓" } else { "✗" },
        )?;
    }
    if let Some(grpo) = &results.grpo {
        writeln!(
            md,
            "## GRPO step: 32 prompts × 8 samples, 512-token system prompt, 64 new tokens\n"
        )?;
        writeln!(
            md,
            "Every prompt is the same 512-token system prompt and 32 tokens of its own; 64 tokens \
             per sample (`ignore_eos`, temperature 1). The cache is flushed before each run, as \
             the weight update between two RL steps flushes it. Throughput: generated tokens ÷ \
             the step's wall time.\n"
        )?;
        writeln!(
            md,
            "| shape | cache off | cache on | prompt tokens from cache | on ÷ off | goal |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
        for (label, arms) in [
            ("256 requests (each prompt sent 8×)", &grpo.repeated),
            ("32 requests, `n` 8", &grpo.fanned),
        ] {
            let on = median(&arms[0].tok_s);
            let off = median(&arms[1].tok_s);
            writeln!(
                md,
                "| {label} | {off:.1} tok/s | {on:.1} tok/s | {} | **{:.2}×** | ≥ 1.5× {} |",
                arms[0].cached.iter().min().unwrap_or(&0),
                on / off,
                if on / off >= 1.5 { "✓" } else { "✗" },
            )?;
        }
        writeln!(
            md,
            "\nWith `n` 8 the engine already prefills each prompt once and forks its KV into the 8 \
             samples (cache or not), so there the cache saves only the shared system prompt.\n"
        )?;
    }
    if let Some(mixed) = &results.mixed {
        let base = median(&mixed.base_tok_s);
        let mix = median(&mixed.mixed_tok_s);
        writeln!(
            md,
            "## Mixed adapters: 32 requests over {ADAPTERS} adapters + base\n"
        )?;
        writeln!(
            md,
            "32 concurrent requests of 64 tokens, round-robin over the base and {ADAPTERS} LoRA \
             adapters (rank {RANK}, all seven projections, loaded with `--lora-modules`), one \
             batch; against the same 32 on the base alone, alternating.\n"
        )?;
        writeln!(md, "| base only | mixed | mixed ÷ base | goal |")?;
        writeln!(md, "|---:|---:|---:|---:|")?;
        writeln!(
            md,
            "| {base:.1} tok/s | {mix:.1} tok/s | **{:.0} %** | ≥ 70 % {} |\n",
            100.0 * mix / base,
            if mix / base >= 0.7 { "✓" } else { "✗" },
        )?;
    }
    if let Some(updates) = &results.updates {
        writeln!(md, "## Weight updates under load\n")?;
        writeln!(
            md,
            "8 clients complete 16-token requests in a loop while `POST /update_weights_from_disk` \
             (drain mode: running requests finish on the old weights) alternates between a \
             scaled copy of the weights and the originals; after each call returns, a 1-token \
             request must report the new `weight_version`.\n"
        )?;
        let first: Vec<f64> = updates.runs.iter().map(|u| u.first_token_s).collect();
        let calls: Vec<f64> = updates.runs.iter().map(|u| u.call_s).collect();
        let loads: Vec<f64> = updates.runs.iter().map(|u| u.load_s).collect();
        let worst = first.iter().copied().fold(0.0, f64::max);
        writeln!(
            md,
            "| call → first token on new weights (median / worst) | update call | arrival → swap (read, then swap) | requests drained | load requests | failed | goal |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
        writeln!(
            md,
            "| **{:.3} s** / {worst:.3} s | {:.3} s | {:.3} s | {} | {} | {} | < 1.5 s, 0 failed {} |",
            median(&first),
            median(&calls),
            median(&loads),
            updates.runs.iter().map(|u| u.drained).sum::<u64>(),
            updates.load_requests,
            updates.load_failures.len(),
            if median(&first) < 1.5 && updates.load_failures.is_empty() {
                "✓"
            } else {
                "✗"
            },
        )?;
        for failure in updates.load_failures.iter().take(5) {
            writeln!(md, "\n- failed: {failure}")?;
        }
    }
    Ok(md)
}
