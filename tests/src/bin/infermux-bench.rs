//! One backend's end-to-end workload through the public API, for `cargo xtask bench`: decode
//! tokens/s at several concurrency levels, prefill tokens/s, time to score a batch of sequences,
//! and the process's peak resident memory (run one backend per process so it is that backend's).
//!
//! The token ids come from a workload file that `cargo xtask bench` writes, so the Python peer
//! (`xtask/peer_bench.py`) runs exactly the same prompts. Prints one JSON object on stdout.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use infermux::{
    BackendKind, DType, Device, LoadOptions, ModelInput, SamplingClient, SamplingParams,
    ServiceClient,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Parser)]
#[command(about = "infermux end-to-end benchmark of one backend")]
struct Args {
    /// The backend to measure.
    #[arg(long)]
    backend: BackendKind,
    /// `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// The model folder (default: the reference model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The workload file written by `cargo xtask bench`.
    #[arg(long)]
    workload: PathBuf,
}

/// What to run; shared with the Python peer.
#[derive(Deserialize)]
struct Workload {
    /// Tokens generated per request in the decode runs (EOS ignored).
    decode_tokens: usize,
    /// Concurrent requests of each decode run.
    decode_batches: Vec<usize>,
    /// One prompt per concurrent request (at least the largest batch).
    decode_prompts: Vec<Vec<u32>>,
    /// The prefill prompt (scored: all logits).
    prefill_prompt: Vec<u32>,
    /// Sequences scored together with `compute_logprobs`.
    scoring_prompts: Vec<Vec<u32>>,
    /// Repetitions of each measurement; the best is reported.
    repeats: usize,
}

fn best_of(repeats: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..repeats.max(1))
        .map(|_| f())
        .fold(f64::INFINITY, f64::min)
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn decode_run(client: &SamplingClient, prompts: &[Vec<u32>], tokens: usize) -> f64 {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(tokens)
    };
    timed(|| {
        let pending: Vec<_> = prompts
            .iter()
            .map(|p| {
                client.sample(
                    ModelInput::from_ints(p.clone()),
                    1,
                    params.clone(),
                    false,
                    0,
                )
            })
            .collect();
        for p in pending {
            let out = p.wait().expect("decode request");
            assert_eq!(out.sequences[0].tokens.len(), tokens);
        }
    })
}

fn score_run(client: &SamplingClient, prompts: &[Vec<u32>]) -> f64 {
    timed(|| {
        let pending: Vec<_> = prompts
            .iter()
            .map(|p| client.compute_logprobs(ModelInput::from_ints(p.clone())))
            .collect();
        for p in pending {
            p.wait().expect("scoring request");
        }
    })
}

/// `VmHWM` (peak resident set) of this process in MiB, from /proc/self/status.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.workload)?;
    let w: Workload = serde_json::from_str(&text)?;
    let model = args.model.unwrap_or_else(infermux_tests::model_dir);
    let options = LoadOptions {
        backend: args.backend,
        device: args.device,
        dtype: args.dtype,
        // Every repeat computes its prompt: a prefix-cache hit would time a lookup, not a
        // prefill (llama.cpp's peer is reset between repeats too).
        engine: infermux::EngineConfig {
            prefix_caching: false,
            ..infermux::EngineConfig::default()
        },
    };
    let start = Instant::now();
    let client = ServiceClient::with_options(options).create_sampling_client(&model)?;
    let load_s = start.elapsed().as_secs_f64();
    // Warm-up: first calls allocate caches and pick kernels.
    decode_run(&client, &w.decode_prompts[..1], 2);
    score_run(&client, &w.scoring_prompts[..1]);

    let mut report = json!({
        "name": args.backend.as_str(),
        "dtype": args.dtype.to_string(),
        "device": args.device.to_string(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_s": load_s,
    });
    for &batch in &w.decode_batches {
        let prompts = &w.decode_prompts[..batch.min(w.decode_prompts.len())];
        let secs = best_of(w.repeats, || decode_run(&client, prompts, w.decode_tokens));
        report[format!("decode_b{batch}_tok_s")] =
            ((prompts.len() * w.decode_tokens) as f64 / secs).into();
        eprintln!("{}: decode b{batch}: {secs:.2} s", args.backend);
    }
    let prefill = best_of(w.repeats, || {
        score_run(&client, std::slice::from_ref(&w.prefill_prompt))
    });
    report["prefill_tok_s"] = (w.prefill_prompt.len() as f64 / prefill).into();
    let scoring = best_of(w.repeats, || score_run(&client, &w.scoring_prompts));
    report["scoring_s"] = scoring.into();
    report["peak_rss_mib"] = peak_rss_mib().into();
    println!("{report}");
    Ok(())
}
