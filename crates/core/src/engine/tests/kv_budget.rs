//! KV byte budget admission: requests reserve their sequences' full-length KV while they run;
//! what never fits is an error at submit, what fits later waits in order, and neither the
//! reservations nor the backend's live KV storage ever pass the budget.

use super::*;
use crate::kv::{KV_GRANULE, kv_capacity_for};

/// Bytes of one slot that may reach `len` positions.
fn slot_bytes(len: usize) -> u64 {
    kv_capacity_for(len) as u64 * KV_BYTES_PER_TOKEN
}

/// Room for one growth copy of a slot that may reach `len` positions.
fn headroom(len: usize) -> u64 {
    (kv_capacity_for(len) - KV_GRANULE) as u64 * KV_BYTES_PER_TOKEN
}

fn config(budget: u64) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
        kv_budget_bytes: Some(budget),
        // These tests count reservations exactly; the cache's own budget use is tested apart.
        prefix_caching: false,
        max_loras: 8,
    }
}

fn budget_engine(max_context: usize, budget: u64) -> (Engine, Arc<Counters>) {
    let (backend, counters) = FakeBackend::new(max_context);
    (Engine::start(backend, config(budget)).unwrap(), counters)
}

/// An engine whose backend waits in each forward pass for a permit (see [`FakeBackend::gated`]).
fn gated_engine(max_context: usize, budget: u64) -> (Engine, Arc<Counters>, flume::Sender<()>) {
    let (backend, counters, gate) = FakeBackend::gated(max_context);
    (
        Engine::start(backend, config(budget)).unwrap(),
        counters,
        gate,
    )
}

#[test]
fn a_request_that_can_never_fit_is_rejected_at_submit_naming_the_budget() {
    // Two samples of 10 + 100 tokens: 2 × 128 positions, plus one growth copy of 64.
    let needed = 2 * slot_bytes(110) + headroom(110);
    let budget = needed - 1;
    let (e, counters) = budget_engine(256, budget);
    let two = SamplingParams {
        n: 2,
        ..sampled(1.0, 1, 100)
    };
    let err = e
        .generate(GenerateRequest::new(vec![1; 10], two.clone()))
        .wait()
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::Invalid(ValidationError::KvBudgetExceeded {
            needed_bytes: needed,
            budget_bytes: budget,
            sequences: 2,
            positions: 128,
        })
    );
    assert!(err.to_string().contains("kv budget"), "{err}");
    assert!(err.to_string().contains(&budget.to_string()), "{err}");
    let streamed: Vec<_> = e
        .generate_stream(GenerateRequest::new(vec![1; 10], two))
        .collect();
    assert!(
        matches!(
            streamed.as_slice(),
            [Err(EngineError::Invalid(
                ValidationError::KvBudgetExceeded { .. }
            ))]
        ),
        "{streamed:?}"
    );
    // Beam search holds 2 × beam_width slots.
    let beams = e
        .beam_search(BeamSearchRequest {
            prompt: vec![1; 10].into(),
            params: crate::BeamSearchParams::new(1, 100),
        })
        .wait()
        .unwrap_err();
    assert!(
        matches!(
            beams,
            EngineError::Invalid(ValidationError::KvBudgetExceeded { sequences: 2, .. })
        ),
        "{beams}"
    );
    // Scoring reserves the prompt: 200 positions round up to 256.
    let score = e.score(&vec![1; 200].into()).wait().unwrap_err();
    assert_eq!(
        score,
        EngineError::Invalid(ValidationError::KvBudgetExceeded {
            needed_bytes: slot_bytes(200) + headroom(200),
            budget_bytes: budget,
            sequences: 1,
            positions: 256,
        })
    );
    // Nothing reached the backend, and what fits alone is served.
    assert_eq!(counters.tokens.load(Ordering::Relaxed), 0);
    let one = e
        .generate(GenerateRequest::new(vec![1; 10], sampled(1.0, 1, 100)))
        .wait()
        .unwrap();
    assert_eq!(one.sequences[0].tokens.len(), 100);
    e.score(&vec![1; 100].into()).wait().unwrap();
}

#[test]
fn requests_wait_for_the_kv_budget_and_memory_never_passes_it() {
    // Each request may reach 8 + 120 = 128 positions; the budget holds three and one growth copy.
    let (prompt, max_tokens) = (8, 120);
    let budget = 3 * slot_bytes(prompt + max_tokens) + headroom(prompt + max_tokens);
    let (e, counters, gate) = gated_engine(256, budget);
    let pending: Vec<_> = (0..8)
        .map(|i| {
            e.generate(GenerateRequest::new(
                vec![i + 1; prompt],
                sampled(1.0, i as u64, max_tokens),
            ))
        })
        .collect();
    // All eight are queued before the first step ends.
    drop(gate);
    for p in pending {
        let out = p.wait().expect("queued requests complete, none fails");
        assert_eq!(out.sequences[0].tokens.len(), max_tokens);
    }
    // Never more than three sequences held KV at once: the others waited.
    assert_eq!(counters.peak_slots.load(Ordering::Relaxed), 3);
    // The backend's live storage, growth copies included, stayed within the budget.
    let peak = counters.peak_positions.load(Ordering::Relaxed) as u64 * KV_BYTES_PER_TOKEN;
    assert!(
        peak <= budget,
        "peak KV {peak} B over the budget {budget} B"
    );
    let stats = e.stats().unwrap();
    assert_eq!(stats.kv_reserved_peak_bytes, budget);
    assert_eq!(
        (
            stats.kv_reserved_bytes,
            stats.kv_allocated_bytes,
            stats.waiting_requests,
            stats.finished_requests_total
        ),
        (0, 0, 0, 8)
    );
}

#[test]
fn admission_leaves_room_for_a_growth_copy_so_no_admitted_request_fails() {
    // Exactly three full slots: a third sequence would leave no room for the old storage of a
    // slot growing to its last granule, and the backend would refuse that allocation.
    let (prompt, max_tokens) = (8, 120);
    let budget = 3 * slot_bytes(prompt + max_tokens);
    let (e, counters, gate) = gated_engine(256, budget);
    let pending: Vec<_> = (0..6)
        .map(|i| {
            e.generate(GenerateRequest::new(
                vec![i + 1; prompt],
                sampled(1.0, i as u64, max_tokens),
            ))
        })
        .collect();
    drop(gate);
    for p in pending {
        assert_eq!(p.wait().unwrap().sequences[0].tokens.len(), max_tokens);
    }
    assert_eq!(counters.peak_slots.load(Ordering::Relaxed), 2);
    let peak = counters.peak_positions.load(Ordering::Relaxed) as u64 * KV_BYTES_PER_TOKEN;
    assert!(
        peak <= budget,
        "peak KV {peak} B over the budget {budget} B"
    );
}

#[test]
fn a_big_request_at_the_head_is_not_overtaken_by_long_ones() {
    // Three slots of 4 + 200 positions fit; the big request (n = 3) needs all three.
    let (prompt, max_tokens) = (4, 200);
    let len = prompt + max_tokens;
    let budget = 3 * slot_bytes(len) + headroom(len);
    let (e, counters, gate) = gated_engine(256, budget);
    let request = |first: TokenId, n: usize| {
        let params = SamplingParams {
            n,
            ..sampled(1.0, first as u64, max_tokens)
        };
        e.generate(GenerateRequest::new(vec![first; prompt], params))
    };
    let small = request(1, 1);
    let big = request(2, 3);
    let later: Vec<_> = (3..6).map(|t| request(t, 1)).collect();
    // Everything is queued while the first request's first step runs.
    drop(gate);
    small.wait().unwrap();
    assert_eq!(big.wait().unwrap().sequences.len(), 3);
    for p in later {
        p.wait().unwrap();
    }
    // The ones behind the big request fit beside the first, yet started after the big one:
    // each may run 200 steps, longer than the big one's bypass window.
    assert!(max_tokens > crate::engine::budget::FAIR_BYPASS_WINDOW_STEPS);
    let order = counters.prefill_order.lock().unwrap().clone();
    assert_eq!(order, vec![1, 2, 3, 4, 5]);
}

/// The step at which the sequence whose prompt starts with `first` was prefilled (the `nth`
/// such sequence).
fn prefill_step(counters: &Counters, first: TokenId, nth: usize) -> usize {
    let steps = counters.prefill_steps.lock().unwrap();
    steps
        .iter()
        .filter(|(t, _)| *t == first)
        .nth(nth)
        .unwrap_or_else(|| panic!("no prefill {nth} of {first}: {steps:?}"))
        .1
}

#[test]
fn a_short_request_passes_a_big_one_blocked_on_the_budget() {
    // The budget holds three slots of 4 + 200 positions: the first request holds one, so the
    // big one (n = 3) waits for it to finish, 200 steps.
    let (prompt, max_tokens) = (4, 200);
    let len = prompt + max_tokens;
    let budget = 3 * slot_bytes(len) + headroom(len);
    let (e, counters, gate) = gated_engine(256, budget);
    let request = |first: TokenId, n: usize, max_tokens: usize| {
        let params = SamplingParams {
            n,
            ..sampled(1.0, first as u64, max_tokens)
        };
        e.generate(GenerateRequest::new(vec![first; prompt], params))
    };
    let running = request(1, 1, max_tokens);
    let big = request(2, 3, max_tokens);
    let short = request(3, 1, 2);
    let long = request(4, 1, max_tokens);
    drop(gate);
    // The short request fits beside the first and ends within the bypass window: it passes
    // the blocked big one and is done long before the first request ends.
    assert_eq!(short.wait().unwrap().sequences[0].tokens.len(), 2);
    assert!(prefill_step(&counters, 3, 0) <= 1);
    running.wait().unwrap();
    assert_eq!(big.wait().unwrap().sequences.len(), 3);
    long.wait().unwrap();
    // The long one may not pass; the big one started as soon as the first request was done
    // (its prefill, then 199 decode steps), not a step later for the short one.
    let order = counters.prefill_order.lock().unwrap().clone();
    assert_eq!(order, vec![1, 3, 2, 4]);
    assert_eq!(
        prefill_step(&counters, 2, 0),
        prefill_step(&counters, 1, 0) + max_tokens
    );
    let stats = e.stats().unwrap();
    assert_eq!(
        (stats.kv_reserved_bytes, stats.finished_requests_total),
        (0, 4)
    );
}

#[test]
fn short_requests_pass_a_blocked_one_only_within_its_bypass_window() {
    use crate::engine::budget::FAIR_BYPASS_WINDOW_STEPS as WINDOW;
    // Slots are the limit: three in all. The first request holds one for 200 steps and the big
    // one needs all three; a stream of short requests (8 tokens each) would keep two slots busy
    // forever if they could always pass it.
    let (backend, counters, gate) = FakeBackend::gated(256);
    let config = EngineConfig {
        max_num_seqs: 3,
        max_num_batched_tokens: 64,
        kv_budget_bytes: Some(1 << 30),
        prefix_caching: false,
        max_loras: 8,
    };
    let e = Engine::start(backend, config).unwrap();
    let request = |first: TokenId, n: usize, max_tokens: usize, seed: u64| {
        let params = SamplingParams {
            n,
            ..sampled(1.0, seed, max_tokens)
        };
        e.generate(GenerateRequest::new(vec![first; 4], params))
    };
    let max_tokens = 200;
    let running = request(1, 1, max_tokens, 1);
    let big = request(2, 3, max_tokens, 2);
    let shorts: Vec<_> = (0..60).map(|i| request(5, 1, 8, 10 + i)).collect();
    drop(gate);
    running.wait().unwrap();
    assert_eq!(big.wait().unwrap().sequences.len(), 3);
    for s in shorts {
        assert_eq!(s.wait().unwrap().sequences[0].tokens.len(), 8);
    }
    let steps = counters.prefill_steps.lock().unwrap().clone();
    let big_step = prefill_step(&counters, 2, 0);
    let passed: Vec<usize> = steps
        .iter()
        .filter(|&&(t, step)| t == 5 && step < big_step)
        .map(|&(_, step)| step)
        .collect();
    // Short ones passed, each admitted early enough to end (prefill + 8 steps) within the
    // window; after it, none did, though slots were free until the first request ended.
    assert!(passed.len() >= 2, "{steps:?}");
    assert!(
        passed.iter().all(|&step| step + 9 <= WINDOW + 1),
        "{passed:?}"
    );
    assert!(passed.len() < 60, "some waited for the big one: {steps:?}");
    // The big one started the step after the first request ended: nothing delayed it.
    assert_eq!(big_step, prefill_step(&counters, 1, 0) + max_tokens);
    assert_eq!(e.stats().unwrap().finished_requests_total, 62);
}

#[test]
fn stats_report_budget_reservations_and_allocation() {
    let budget = 1 << 20;
    let (e, counters, gate) = gated_engine(256, budget);
    assert_eq!(e.kv_budget_bytes(), budget);
    assert_eq!(e.config().kv_budget_bytes, Some(budget));
    let stats = e.stats().unwrap();
    assert_eq!(
        (
            stats.kv_budget_bytes,
            stats.kv_reserved_bytes,
            stats.kv_reserved_peak_bytes
        ),
        (budget, 0, 0)
    );
    // A running request holds its reservation; the backend has allocated part of it.
    let params = SamplingParams {
        n: 2,
        ..sampled(1.0, 5, 100)
    };
    let reservation = 2 * slot_bytes(110) + headroom(110);
    let mut stream = e.generate_stream(GenerateRequest::new(vec![1; 10], params));
    // One step: the prefill and the first tokens.
    gate.send(()).unwrap();
    stream.next().unwrap().unwrap();
    let asked = std::thread::spawn({
        let e = e.clone();
        move || e.stats().unwrap()
    });
    // Stats are answered between steps: let steps run one by one until they are.
    for _ in 0..50 {
        if asked.is_finished() {
            break;
        }
        gate.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let held = asked.join().unwrap();
    assert_eq!(held.kv_reserved_bytes, reservation, "{held:?}");
    assert!(
        held.kv_allocated_bytes > 0 && held.kv_allocated_bytes <= reservation,
        "{held:?}"
    );
    drop(stream);
    drop(gate);
    // The next request is served once the dropped stream's slots (and reservation) are freed.
    e.generate(GenerateRequest::new(vec![1], sampled(1.0, 6, 2)))
        .wait()
        .unwrap();
    let after = e.stats().unwrap();
    assert_eq!(
        (
            after.kv_reserved_bytes,
            after.kv_allocated_bytes,
            after.kv_reserved_peak_bytes
        ),
        (0, 0, reservation)
    );
    let peak = counters.peak_positions.load(Ordering::Relaxed) as u64 * KV_BYTES_PER_TOKEN;
    assert!(peak > 0 && peak <= reservation, "peak {peak}");
    // Unset, the budget is a share of available memory, resolved at start.
    let (default, _) = engine(EngineConfig::default());
    let resolved = default.kv_budget_bytes();
    assert!(resolved > 0);
    assert_eq!(default.stats().unwrap().kv_budget_bytes, resolved);
    let zero = EngineConfig {
        kv_budget_bytes: Some(0),
        ..EngineConfig::default()
    };
    let err = Engine::start(FakeBackend::new(64).0, zero).unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::InvalidField {
                field: "kv_budget_bytes",
                ..
            }
        ),
        "{err}"
    );
}
