//! Decode and prefill throughput straight through the `Backend` trait, in wall-clock and process
//! CPU time (robust to other processes on a shared machine: CPU time only counts while this
//! process runs, wall time includes waiting for a core).
//!
//! ```text
//! cargo run --release -p infermux-backend-candle --example decode_bench -- [model_dir] [steps]
//! ```
//!
//! Prints `tok/s` per case as the best of several rounds (by wall time) and the CPU time that
//! round used; `INFERMUX_BENCH_DTYPE` picks the precision (`f32` by default).

use std::time::Instant;

use infermux_backend_candle::{CandleBackend, CandleOptions};
use infermux_core::{Backend, DType, ForwardBatch, LogitsWanted, SeqChunk, SlotId};

fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn tokens(len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (i * 37 + salt * 101) % 40000) as u32)
        .collect()
}

/// Runs `f` `rounds` times; returns (best wall seconds, CPU seconds of that round).
fn best(rounds: usize, mut f: impl FnMut() -> (f64, f64)) -> (f64, f64) {
    (0..rounds)
        .map(|_| f())
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct".into());
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let dtype: DType = std::env::var("INFERMUX_BENCH_DTYPE")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(DType::F32);
    let cases: Vec<String> = std::env::var("INFERMUX_BENCH_CASES")
        .unwrap_or_else(|_| "d1,d8,d32,p512".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let mut b = CandleBackend::load(
        &dir,
        CandleOptions {
            dtype,
            ..Default::default()
        },
    )
    .expect("load");
    let rounds = 3;
    for case in &cases {
        if let Some(len) = case.strip_prefix('p') {
            let len: usize = len.parse().unwrap();
            let (wall, cpu) = best(rounds, || {
                b.release(SlotId(0));
                let chunk = SeqChunk {
                    slot: SlotId(0),
                    start_pos: 0,
                    tokens: tokens(len, 3),
                    logits: LogitsWanted::Last,
                    adapter: None,
                };
                let (t0, c0) = (Instant::now(), cpu_time());
                b.forward(&ForwardBatch {
                    chunks: vec![chunk],
                })
                .unwrap();
                (t0.elapsed().as_secs_f64(), cpu_time() - c0)
            });
            println!(
                "prefill {len:4}: {:8.1} tok/s wall  ({:.3} s, cpu {:.3} s)",
                len as f64 / wall,
                wall,
                cpu
            );
        } else if let Some(batch) = case.strip_prefix('d') {
            let batch: usize = batch.parse().unwrap();
            let (wall, cpu) = best(rounds, || {
                let chunks = (0..batch)
                    .map(|s| {
                        b.release(SlotId(s as u32));
                        SeqChunk {
                            slot: SlotId(s as u32),
                            start_pos: 0,
                            tokens: tokens(16, s),
                            logits: LogitsWanted::Last,
                            adapter: None,
                        }
                    })
                    .collect();
                b.forward(&ForwardBatch { chunks }).unwrap();
                let (t0, c0) = (Instant::now(), cpu_time());
                for i in 0..steps {
                    let chunks = (0..batch)
                        .map(|s| {
                            let slot = SlotId(s as u32);
                            SeqChunk {
                                slot,
                                start_pos: b.cached_len(slot),
                                tokens: vec![100 + (i as u32 * 7 + s as u32) % 40000],
                                logits: LogitsWanted::Last,
                                adapter: None,
                            }
                        })
                        .collect();
                    b.forward(&ForwardBatch { chunks }).unwrap();
                }
                (t0.elapsed().as_secs_f64(), cpu_time() - c0)
            });
            let toks = (batch * steps) as f64;
            println!(
                "decode b{batch:<3}: {:8.1} tok/s wall  ({:.2} ms/step, cpu {:.2} ms/step)",
                toks / wall,
                wall * 1e3 / steps as f64,
                cpu * 1e3 / steps as f64
            );
            for s in 0..batch {
                b.release(SlotId(s as u32));
            }
        }
    }
}
