//! End-to-end throughput through the public API on one backend: prefill of a long prompt
//! (scoring, all logits) and decode tokens/s at several concurrency levels.
//!
//! ```text
//! cargo run -p infermux --example bench [--features torch] -- \
//!     --model models/SmolLM2-135M-Instruct --backend candle --batches 1,8,32
//! ```

use std::time::Instant;

use clap::Parser;
use infermux::{
    BackendKind, DType, LoadOptions, ModelInput, SamplingClient, SamplingParams, ServiceClient,
};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, default_value = "candle")]
    backend: BackendKind,
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Tokens in the prefill prompt.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per request in the decode runs.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Concurrent requests in each decode run.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
}

fn best_of<F: FnMut() -> f64>(repeats: usize, mut f: F) -> f64 {
    (0..repeats.max(1))
        .map(|_| f())
        .fold(f64::INFINITY, f64::min)
}

fn prompt(len: usize, salt: usize) -> ModelInput {
    ModelInput::from_ints(
        (0..len)
            .map(|i| (100 + (i * 37 + salt * 101) % 40000) as u32)
            .collect::<Vec<_>>(),
    )
}

fn decode_run(client: &SamplingClient, batch: usize, tokens: usize) -> f64 {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(tokens)
    };
    let start = Instant::now();
    let pending: Vec<_> = (0..batch)
        .map(|i| client.sample(prompt(4, i), 1, params.clone(), false, 0))
        .collect();
    for p in pending {
        p.wait().expect("decode request");
    }
    start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = LoadOptions {
        backend: args.backend,
        dtype: args.dtype,
        ..LoadOptions::default()
    };
    let client = ServiceClient::with_options(options).create_sampling_client(&args.model)?;
    // Warm-up: first calls allocate caches and pick kernels.
    decode_run(&client, 1, 4);
    let prefill = best_of(args.repeats, || {
        let start = Instant::now();
        client
            .compute_logprobs(prompt(args.prompt_len, 0))
            .wait()
            .expect("prefill");
        start.elapsed().as_secs_f64()
    });
    let mut report = serde_json::json!({
        "backend": args.backend.as_str(),
        "dtype": args.dtype.to_string(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "prefill_tokens": args.prompt_len,
        "prefill_tok_per_s": args.prompt_len as f64 / prefill,
    });
    for &batch in &args.batches {
        let secs = best_of(args.repeats, || {
            decode_run(&client, batch, args.decode_tokens)
        });
        report[format!("decode_b{batch}_tok_per_s")] =
            ((batch * args.decode_tokens) as f64 / secs).into();
    }
    println!("{report}");
    Ok(())
}
