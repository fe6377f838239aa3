//! The sampler agrees with a real PyTorch trainer (tinker-cookbook's sampler-vs-trainer check,
//! made exact): `tests/data/lora_trainer.py` (transformers + peft, f32, in `runtimes/py`) takes
//! one AdamW step of a rank-8 LoRA adapter and one of every base weight on SmolLM2-135M and saves
//! both; a running `infermux serve` loads the adapter through `/v1/load_lora_adapter`, samples
//! 16 completions from it, takes the full-weight step through `/update_weights_from_disk` and
//! samples 16 more; the trainer then scores every completion under the weights it trained. The
//! logprobs infermux reported agree within 1e-3 on candle and torch, while the trained weights
//! move them far more than that (so a sampler that ignored them would fail).

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use server_support::{Server, model_dir};

const ADMIN_KEY: &str = "adm-trainer-3c";
/// The sampler-vs-trainer tolerance (the goal).
const TOLERANCE: f64 = 1e-3;
/// Trained weights must move the sampled tokens' logprobs by at least this much.
const MIN_EFFECT: f64 = 20.0 * TOLERANCE;
const SAMPLES_PER_PROMPT: usize = 8;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let python = repo_root().join("runtimes/py/bin/python");
    assert!(
        python.is_file(),
        "run `cargo xtask setup` first ({} is missing)",
        python.display()
    );
    python
}

fn trainer(args: &[&str], paths: &[(&str, &Path)]) {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/data/lora_trainer.py"))
        .args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    let status = cmd.status().expect("starting the trainer");
    assert!(status.success(), "trainer {args:?} failed: {status}");
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One sampled completion: its prompt, tokens and the logprobs infermux reported.
struct Sampled {
    prompt: Vec<u64>,
    tokens: Vec<u64>,
    logprobs: Vec<f64>,
}

fn sample(server: &Server, model: Option<&str>, prompts: &[Vec<u64>], want: &str) -> Vec<Sampled> {
    let mut out = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut body = json!({"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": SAMPLES_PER_PROMPT,
            "sampling_params": {"max_tokens": 24, "temperature": 1.0, "seed": 11 + i}});
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        let reply = server.post("/v1/sample", &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let reply = reply.json();
        assert_eq!(reply["policy_version"], want, "{reply}");
        for seq in reply["sequences"].as_array().unwrap() {
            let tokens: Vec<u64> = seq["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            let logprobs: Vec<f64> = seq["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_f64().unwrap())
                .collect();
            assert_eq!(tokens.len(), logprobs.len());
            assert!(!tokens.is_empty());
            out.push(Sampled {
                prompt: prompt.clone(),
                tokens,
                logprobs,
            });
        }
    }
    out
}

/// Samples on `backend`: 16 from the trained adapter, then 16 from the base after the
/// full-weight step. Returns (adapter samples, full-step samples).
fn sample_on(backend: &str, scratch: &Path, prompts: &[Vec<u64>]) -> (Vec<Sampled>, Vec<Sampled>) {
    let allowed = scratch.to_str().unwrap();
    let server = Server::start_on(
        backend,
        &[
            "--enable-control-routes",
            "--admin-key",
            ADMIN_KEY,
            "--allowed-model-dir",
            allowed,
            "--enable-lora",
        ],
    );
    let adapter = scratch.join("adapter");
    let loaded = server.post_as(
        ADMIN_KEY,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "trained", "lora_path": adapter}),
    );
    assert_eq!(loaded.status, 200, "{backend}: {}", loaded.text());
    let lora = sample(&server, Some("trained"), prompts, "0+trained#0");
    let updated = server.post_as(
        ADMIN_KEY,
        "/update_weights_from_disk",
        &json!({"model_path": scratch.join("full"), "weight_version": "step1"}),
    );
    assert_eq!(updated.status, 200, "{backend}: {}", updated.text());
    let full = sample(&server, None, prompts, "step1");
    (lora, full)
}

fn job(model: &Path, adapter: Option<&Path>, samples: &[Sampled]) -> Value {
    let sequences: Vec<Value> = samples
        .iter()
        .map(|s| json!({"prompt": s.prompt, "completion": s.tokens}))
        .collect();
    json!({"model": model, "adapter": adapter, "sequences": sequences})
}

/// Max |infermux − trainer| over every token, and max |trainer − base| (the weights' effect).
fn compare(what: &str, samples: &[Sampled], trained: &Value, base: &Value) {
    let (mut worst, mut effect) = (0.0f64, 0.0f64);
    for (i, s) in samples.iter().enumerate() {
        for (j, &ours) in s.logprobs.iter().enumerate() {
            let theirs = trained[i][j].as_f64().unwrap();
            let before = base[i][j].as_f64().unwrap();
            worst = worst.max((ours - theirs).abs());
            effect = effect.max((theirs - before).abs());
        }
    }
    eprintln!(
        "{what}: max |Δ| vs trainer {worst:.2e}, trained weights moved logprobs up to {effect:.3}"
    );
    assert!(
        worst <= TOLERANCE,
        "{what}: max |Δ logprob| {worst:e} > {TOLERANCE}"
    );
    assert!(
        effect >= MIN_EFFECT,
        "{what}: the trained weights moved logprobs only {effect}"
    );
}

#[test]
fn sampled_logprobs_equal_the_trainers_after_a_lora_step_and_a_full_step() {
    let scratch =
        Scratch(std::env::temp_dir().join(format!("infermux-trainer-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();
    let model = model_dir();
    trainer(&["train"], &[("--model", &model), ("--out", &scratch.0)]);
    let prompts: Vec<Vec<u64>> =
        serde_json::from_slice(&std::fs::read(scratch.0.join("prompts.json")).unwrap()).unwrap();

    let mut backends = vec!["candle"];
    if cfg!(feature = "torch") {
        backends.push("torch");
    }
    let mut jobs = Vec::new();
    let mut runs = Vec::new();
    for backend in backends {
        let (lora, full) = sample_on(backend, &scratch.0, &prompts);
        let adapter = scratch.0.join("adapter");
        let full_dir = scratch.0.join("full");
        // Trained weights, then the base model for the effect size.
        jobs.push(job(&model, Some(&adapter), &lora));
        jobs.push(job(&model, None, &lora));
        jobs.push(job(&full_dir, None, &full));
        jobs.push(job(&model, None, &full));
        runs.push((backend, lora, full));
    }
    let jobs_path = scratch.0.join("jobs.json");
    let scores_path = scratch.0.join("scores.json");
    std::fs::write(&jobs_path, Value::Array(jobs).to_string()).unwrap();
    trainer(
        &["score"],
        &[("--jobs", &jobs_path), ("--out", &scores_path)],
    );
    let scores: Value = serde_json::from_slice(&std::fs::read(&scores_path).unwrap()).unwrap();
    for (k, (backend, lora, full)) in runs.iter().enumerate() {
        let at = |n: usize| &scores[4 * k + n];
        compare(&format!("{backend}, LoRA step"), lora, at(0), at(1));
        compare(&format!("{backend}, full-weight step"), full, at(2), at(3));
    }
}
