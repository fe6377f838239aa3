//! Decode throughput of the backend alone, in wall time and in CPU time of the calling thread
//! (ONNX Runtime on one intra-op thread runs on it, so CPU time is little affected by other load).
//!
//! `cargo run -p infermux-backend-onnx --example kv_bench -- MODEL_DIR [PROMPT_LEN] [STEPS]`

use std::time::Instant;

use infermux_backend_onnx::{OnnxBackend, OnnxOptions};
use infermux_core::{Backend, LogitsWanted, SlotId};

/// Nanoseconds this thread has been on a CPU (Linux; 0 elsewhere).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .map_or("models/SmolLM2-135M-Instruct", String::as_str);
    let prompt_len: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let options = OnnxOptions {
        intra_threads: Some(1),
        ..OnnxOptions::default()
    };
    let mut backend = OnnxBackend::load(dir, options)?;
    for batch in [1usize, 32] {
        let slots: Vec<SlotId> = (0..batch as u32).map(SlotId).collect();
        for (i, &slot) in slots.iter().enumerate() {
            // Different lengths: the batch is left-padded.
            let len = prompt_len + i % 7;
            let prompt: Vec<u32> = (0..len).map(|p| (100 + p * 37 + i * 101) as u32).collect();
            backend.prefill(slot, 0, &prompt, LogitsWanted::Last)?;
        }
        let (wall, cpu) = (Instant::now(), thread_cpu_ns());
        for step in 0..steps {
            let tokens: Vec<(SlotId, u32)> =
                slots.iter().map(|&s| (s, 200 + step as u32)).collect();
            backend.decode(&tokens)?;
        }
        let wall = wall.elapsed().as_secs_f64();
        let cpu = (thread_cpu_ns() - cpu) as f64 * 1e-9;
        let tokens = (batch * steps) as f64;
        println!(
            "batch {batch}: {:.1} tok/s wall, {:.1} tok/s per CPU-second",
            tokens / wall,
            tokens / cpu
        );
        for &slot in &slots {
            backend.release(slot);
        }
    }
    Ok(())
}
