//! The KV byte budget on the real model (candle, CPU): a budget that holds about three long
//! sequences, eight long requests at once. They queue instead of failing, all complete, the
//! engine's reservations and the backend's allocations never pass the budget, and the process's
//! peak memory while they run stays within what was resident before plus the budget plus a
//! stated margin.
//!
//! One test in this file on purpose: peak RSS is process-wide, so nothing else may run beside it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermux::{EngineConfig, LoadOptions, ModelInput, SamplingParams, ServiceClient};
use infermux_core::kv::{KV_GRANULE, kv_capacity_for};
use infermux_core::{DType, EngineStats, ModelDir};
use infermux_tests::model_dir;

/// Prompt tokens per request: long, so the KV dominates what the requests add to memory.
const PROMPT_TOKENS: usize = 1000;
/// Tokens generated per request.
const MAX_TOKENS: usize = 8;
/// Requests submitted at once.
const REQUESTS: usize = 8;
/// Sequences the budget holds at once.
const FITTING: u64 = 3;

/// What the run may add to resident memory beyond the KV budget: activations of a 512-token
/// prefill chunk (attention scores 9 heads × 512 × 1024 × 4 B = 18 MiB, QKV and MLP buffers of
/// a few MiB, a 49152-wide logits row per sequence), per-request bookkeeping (token vectors,
/// detokenizer), thread stacks, and allocator slack (freed buffers glibc keeps for reuse).
/// Well under the 4.5 × 47 MiB an unbudgeted run of all eight would add beyond the budget.
const MARGIN_BYTES: u64 = 96 << 20;

/// `VmRSS` or `VmHWM` of this process, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    let kib: u64 = line
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0), so the peak measured next is the run's,
/// not the model load's (packing weights briefly holds two copies).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[test]
fn long_requests_queue_for_the_kv_budget_and_memory_stays_within_it() {
    let bytes_per_token = ModelDir::open(model_dir())
        .expect("the reference model folder opens")
        .config
        .kv_bytes_per_token(DType::F32);
    assert!(bytes_per_token > 0);
    let seq_len = PROMPT_TOKENS + MAX_TOKENS;
    let seq_bytes = kv_capacity_for(seq_len) as u64 * bytes_per_token;
    let growth_copy = (kv_capacity_for(seq_len) - KV_GRANULE) as u64 * bytes_per_token;
    // Three sequences and room for one slot's growth copy (what admission holds back).
    let budget = FITTING * seq_bytes + growth_copy;
    let options = LoadOptions {
        engine: EngineConfig {
            max_num_seqs: 16,
            max_num_batched_tokens: 512,
            kv_budget_bytes: Some(budget),
            // Counts reservations exactly: no prefixes kept after the requests.
            prefix_caching: false,
            max_loras: 8,
        },
        ..LoadOptions::default()
    };
    let client = ServiceClient::with_options(options)
        .create_sampling_client(model_dir())
        .expect("the reference model loads on candle");
    let engine = client.engine().clone();
    assert_eq!(engine.info().kv_bytes_per_token, bytes_per_token);
    assert_eq!(engine.kv_budget_bytes(), budget);
    assert_eq!(engine.stats().unwrap().kv_budget_bytes, budget);
    let tokenizer = client.get_tokenizer();
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. ";
    let unit = tokenizer.encode(text, false).unwrap();
    let prompt = |i: usize| {
        let mut tokens: Vec<u32> = vec![unit[i % unit.len()]];
        while tokens.len() < PROMPT_TOKENS {
            tokens.extend(&unit);
        }
        tokens.truncate(PROMPT_TOKENS);
        ModelInput::from_ints(tokens)
    };
    let params = SamplingParams {
        max_tokens: Some(MAX_TOKENS),
        ignore_eos: true,
        ..SamplingParams::greedy(MAX_TOKENS)
    };
    // Warm up (thread pools, first-use buffers), then measure the run's peak from here.
    client
        .sample(prompt(0), 1, params.clone(), false, 0)
        .wait()
        .unwrap();
    let base_rss = status_bytes("VmRSS").expect("/proc/self/status has VmRSS");
    let peak_reset = reset_peak_rss();

    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<EngineStats>::new()));
    let watcher = std::thread::spawn({
        let (engine, done, seen) = (engine.clone(), done.clone(), seen.clone());
        move || {
            while !done.load(Ordering::Relaxed) {
                seen.lock().unwrap().push(engine.stats().unwrap());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let started = Instant::now();
    let pending: Vec<_> = (0..REQUESTS)
        .map(|i| client.sample(prompt(i), 1, params.clone(), false, 0))
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let out = p
            .wait()
            .unwrap_or_else(|e| panic!("request {i} failed instead of queueing: {e}"));
        assert_eq!(out.sequences[0].tokens.len(), MAX_TOKENS, "request {i}");
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let peak_rss = status_bytes("VmHWM").expect("/proc/self/status has VmHWM");

    let seen = seen.lock().unwrap();
    let max_of = |f: fn(&EngineStats) -> u64| seen.iter().map(f).max().unwrap_or(0);
    let max_waiting = max_of(|s| s.waiting_requests as u64);
    let max_running = max_of(|s| s.running_requests as u64);
    let max_allocated = max_of(|s| s.kv_allocated_bytes);
    let end = engine.stats().unwrap();
    eprintln!(
        "kv budget {budget} B ({seq_bytes} B per sequence), {REQUESTS} requests in {elapsed:?}: \
         peak reserved {} B, peak allocated seen {max_allocated} B, running ≤ {max_running}, \
         waiting ≤ {max_waiting}; RSS {base_rss} B before, peak {peak_rss} B (reset: {peak_reset})",
        end.kv_reserved_peak_bytes
    );
    // Queued, not failed: never more than three ran, the others waited.
    assert!(max_waiting >= 1, "no request was seen waiting");
    assert!(max_running <= FITTING, "{max_running} requests ran at once");
    assert_eq!(end.failed_requests_total, 0);
    // The engine filled the budget and never passed it; so did the backend.
    assert_eq!(end.kv_reserved_peak_bytes, budget);
    assert!(
        max_allocated <= budget,
        "backend allocated {max_allocated} B"
    );
    assert!(
        max_allocated > seq_bytes,
        "the backend reports its KV allocation (kv_usage): saw {max_allocated} B"
    );
    assert_eq!((end.kv_reserved_bytes, end.kv_allocated_bytes), (0, 0));
    // Peak memory: what was resident (weights, runtime) plus the budget plus the margin. If the
    // peak could not be reset, it includes the model load's, and the bound is the weights' twice.
    let bound = base_rss + budget + MARGIN_BYTES;
    if peak_reset {
        assert!(
            peak_rss <= bound,
            "peak RSS {peak_rss} B over {base_rss} B resident + {budget} B budget + {MARGIN_BYTES} B margin"
        );
    } else {
        eprintln!("VmHWM could not be reset: the peak includes the model load");
    }
}
