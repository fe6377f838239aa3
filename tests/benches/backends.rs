//! Per-backend micro-benchmarks (criterion): prefill of a 512-token prompt, one decode step at
//! batch 1, 8 and 32 (straight through the `Backend` trait: logits only), and
//! `compute_logprobs` of 32 × 256 tokens through the public API (engine included).
//!
//! ```text
//! cargo bench -p infermux-tests --bench backends [--features torch,onnx] [-- decode]
//! ```
//!
//! `INFERMUX_BENCH_DEVICE` (`cpu`, `cuda:N`) and `INFERMUX_BENCH_DTYPE` (`f32`, `bf16`) choose
//! where and in which precision; the model is the reference one (`INFERMUX_MODEL_DIR`).
//! End-to-end numbers next to transformers come from `cargo xtask bench`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use infermux::{BackendKind, DType, Device, LoadOptions, ModelInput, ServiceClient};
use infermux_core::{Backend, ForwardBatch, LogitsWanted, SeqChunk, SlotId};
use infermux_tests::model_dir;

/// Decode batches measured.
const BATCHES: [usize; 3] = [1, 8, 32];
/// Tokens of each decoding sequence's prompt.
const DECODE_PROMPT: usize = 16;
/// A decode benchmark restarts its sequences when they reach this length.
const DECODE_MAX_LEN: usize = DECODE_PROMPT + 256;

fn device() -> Device {
    std::env::var("INFERMUX_BENCH_DEVICE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(Device::Cpu)
}

fn dtype() -> DType {
    std::env::var("INFERMUX_BENCH_DTYPE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(DType::F32)
}

/// Deterministic token ids in the ordinary range of the vocabulary.
fn tokens(len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (i * 37 + salt * 101) % 40000) as u32)
        .collect()
}

fn load_backend(kind: BackendKind) -> Option<Box<dyn Backend>> {
    let dir = model_dir();
    let (device, dtype) = (device(), dtype());
    let loaded: Result<Box<dyn Backend>, String> = match kind {
        BackendKind::Candle => {
            let opts = infermux_backend_candle::CandleOptions {
                device,
                dtype,
                ..Default::default()
            };
            infermux_backend_candle::CandleBackend::load(&dir, opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "torch")]
        BackendKind::Torch => {
            let opts = infermux_backend_torch::TorchOptions { device, dtype };
            infermux_backend_torch::TorchBackend::load(&dir, opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "onnx")]
        BackendKind::Onnx => {
            let opts = infermux_backend_onnx::OnnxOptions {
                device,
                ..Default::default()
            };
            infermux_backend_onnx::OnnxBackend::load(&dir, opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| e.to_string())
        }
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    match loaded {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("{kind}: skipped ({e})");
            None
        }
    }
}

fn run(backend: &mut dyn Backend, chunks: Vec<SeqChunk>) {
    backend
        .forward(&ForwardBatch { chunks })
        .expect("forward pass");
}

/// Fresh sequences in slots `0..batch`, each with a `DECODE_PROMPT`-token prompt.
fn start_sequences(backend: &mut dyn Backend, batch: usize) {
    for s in 0..batch {
        backend.release(SlotId(s as u32));
    }
    let chunks = (0..batch)
        .map(|s| SeqChunk {
            slot: SlotId(s as u32),
            start_pos: 0,
            tokens: tokens(DECODE_PROMPT, s),
            logits: LogitsWanted::Last,
            adapter: None,
        })
        .collect();
    run(backend, chunks);
}

fn backend_benches(c: &mut Criterion, kind: BackendKind) {
    let Some(mut backend) = load_backend(kind) else {
        return;
    };
    let backend = backend.as_mut();

    let mut group = c.benchmark_group(format!("{kind}/prefill"));
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(512));
    group.bench_function("512", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                backend.release(SlotId(0));
                let chunk = SeqChunk {
                    slot: SlotId(0),
                    start_pos: 0,
                    tokens: tokens(512, i as usize),
                    logits: LogitsWanted::Last,
                    adapter: None,
                };
                let start = Instant::now();
                run(backend, vec![chunk]);
                total += start.elapsed();
            }
            backend.release(SlotId(0));
            total
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("{kind}/decode_step"));
    group.sample_size(20).warm_up_time(Duration::from_secs(1));
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            start_sequences(backend, batch);
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    if backend.cached_len(SlotId(0)) >= DECODE_MAX_LEN {
                        start_sequences(backend, batch);
                    }
                    let chunks = (0..batch)
                        .map(|s| {
                            let slot = SlotId(s as u32);
                            SeqChunk {
                                slot,
                                start_pos: backend.cached_len(slot),
                                tokens: vec![100 + (i as u32 * 7 + s as u32) % 40000],
                                logits: LogitsWanted::Last,
                                adapter: None,
                            }
                        })
                        .collect();
                    let start = Instant::now();
                    run(backend, chunks);
                    total += start.elapsed();
                }
                total
            });
            for s in 0..batch {
                backend.release(SlotId(s as u32));
            }
        });
    }
    group.finish();
}

fn scoring_bench(c: &mut Criterion, kind: BackendKind) {
    let options = LoadOptions {
        backend: kind,
        device: device(),
        dtype: dtype(),
        ..LoadOptions::default()
    };
    let client = match ServiceClient::with_options(options).create_sampling_client(model_dir()) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("{kind}: skipped ({e})");
            return;
        }
    };
    let prompts: Vec<ModelInput> = (0..32)
        .map(|i| ModelInput::from_ints(tokens(256, i)))
        .collect();
    let mut group = c.benchmark_group(format!("{kind}/compute_logprobs"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(32 * 256));
    group.bench_function("32x256", |b| {
        b.iter(|| {
            let pending: Vec<_> = prompts
                .iter()
                .map(|p| client.compute_logprobs(p.clone()))
                .collect();
            for p in pending {
                p.wait().expect("scoring");
            }
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        if kind.is_available() {
            backend_benches(c, kind);
            scoring_bench(c, kind);
        }
    }
}

criterion_group!(backends, benches);
criterion_main!(backends);
