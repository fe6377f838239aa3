//! The prefix cache against the fake backend, whose logits depend on a slot's whole cached
//! history: a wrongly reused prefix would change the numbers. Every test compares an engine
//! with the cache to one without, exactly.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::{UpdateMode, WeightUpdate};

/// `n` ordinary prompt tokens (never POISON, BYE or EOS), varied by `salt`.
fn prompt(n: usize, salt: u32) -> Vec<TokenId> {
    (0..n as u32).map(|i| (i * 7 + salt * 3) % 28).collect()
}

fn pair() -> ((Engine, Arc<Counters>), (Engine, Arc<Counters>)) {
    let cached = engine(EngineConfig::default());
    let plain = engine(EngineConfig {
        prefix_caching: false,
        ..EngineConfig::default()
    });
    (cached, plain)
}

fn request(
    tokens: Vec<TokenId>,
    seed: u64,
    max_tokens: usize,
    prompt_lps: bool,
) -> GenerateRequest {
    GenerateRequest {
        prompt_logprobs: PromptLogprobs {
            include: prompt_lps,
            top_k: 0,
        },
        ..GenerateRequest::new(tokens, sampled(0.8, seed, max_tokens))
    }
}

/// Runs `req` on both engines: the outputs must be equal but for the cache count.
fn both(cached: &Engine, plain: &Engine, req: GenerateRequest) -> GenerateOutput {
    let a = cached.generate(req.clone()).wait().unwrap();
    let b = plain.generate(req).wait().unwrap();
    assert_eq!(b.cached_prompt_tokens, 0);
    assert_eq!(
        GenerateOutput {
            cached_prompt_tokens: 0,
            ..a.clone()
        },
        b
    );
    a
}

#[test]
fn a_shared_prefix_is_reused_in_whole_blocks_and_changes_nothing() {
    let ((cached, counters), (plain, _)) = pair();
    let base = prompt(40, 1);
    let first = both(&cached, &plain, request(base.clone(), 1, 4, false));
    assert_eq!(first.cached_prompt_tokens, 0);
    // 40 shared tokens then another ending: 2 whole blocks reused.
    let mut next = base.clone();
    next.extend([5, 6, 7]);
    let before = counters.tokens.load(Ordering::Relaxed);
    let second = both(&cached, &plain, request(next, 2, 4, false));
    assert_eq!(second.cached_prompt_tokens, 32);
    // 11 prompt tokens prefilled, then 3 decode steps.
    assert_eq!(counters.tokens.load(Ordering::Relaxed) - before, 11 + 3);
    let stats = cached.stats().unwrap();
    assert_eq!(stats.prefix_cache_hit_tokens_total, 32);
    assert_eq!(stats.prefix_cache_queried_tokens_total, 40 + 43);
}

#[test]
fn a_multi_turn_rollout_reuses_the_generated_tokens_and_their_logprobs() {
    let ((cached, _), (plain, _)) = pair();
    let base = prompt(45, 2);
    // Prompt logprobs asked for, so every reused position's logprob is known.
    let first = both(&cached, &plain, request(base.clone(), 3, 4, true));
    let mut turn = base.clone();
    turn.extend(&first.sequences[0].tokens);
    turn.extend([8, 9]);
    // 45 + 3 fed-back tokens cached: 3 blocks, less the last position, which runs again to
    // give the next token's prompt logprob; the others come from the cache.
    let second = both(&cached, &plain, request(turn.clone(), 4, 3, true));
    assert_eq!(second.cached_prompt_tokens, 47);
    // Scoring the whole rollout reuses the longer prefix the second turn left.
    let scored = cached.score(&turn.clone().into()).wait().unwrap();
    let fresh = plain.score(&turn.into()).wait().unwrap();
    assert_eq!(scored.prompt_logprobs, fresh.prompt_logprobs);
    assert_eq!(scored.cached_prompt_tokens, 47);
}

#[test]
fn prompt_logprobs_reuse_only_what_the_donor_knows() {
    let ((cached, _), (plain, _)) = pair();
    let base = prompt(40, 3);
    // No prompt logprobs: the cached prompt's are unknown.
    both(&cached, &plain, request(base.clone(), 5, 2, false));
    let mut next = base.clone();
    next.push(4);
    assert_eq!(
        both(&cached, &plain, request(next.clone(), 6, 2, true)).cached_prompt_tokens,
        0
    );
    // That request knew them: the next one reuses.
    next.push(5);
    assert_eq!(
        both(&cached, &plain, request(next.clone(), 7, 2, true)).cached_prompt_tokens,
        31
    );
    // Top-k prompt alternatives are never cached.
    let top = GenerateRequest {
        prompt_logprobs: PromptLogprobs {
            include: true,
            top_k: 3,
        },
        ..request(next, 8, 2, true)
    };
    assert_eq!(both(&cached, &plain, top).cached_prompt_tokens, 0);
}

#[test]
fn a_group_arriving_together_prefills_the_shared_prefix_once() {
    let ((cached, counters), (plain, _)) = pair();
    let system = prompt(48, 4);
    let requests: Vec<GenerateRequest> = (0..6u32)
        .map(|i| {
            let mut p = system.clone();
            p.extend([i, i + 1, i + 2]);
            request(p, u64::from(i), 3, false)
        })
        .collect();
    let pending: Vec<_> = requests
        .iter()
        .map(|r| cached.generate(r.clone()))
        .collect();
    let outs: Vec<GenerateOutput> = pending.into_iter().map(|p| p.wait().unwrap()).collect();
    for (r, out) in requests.into_iter().zip(&outs) {
        let fresh = plain.generate(r).wait().unwrap();
        assert_eq!(fresh.sequences, out.sequences);
    }
    let hits: Vec<usize> = outs.iter().map(|o| o.cached_prompt_tokens).collect();
    assert_eq!(hits.iter().filter(|&&h| h == 48).count(), 5, "{hits:?}");
    // The 48 shared tokens once, 3 own tokens each, 2 decode steps each.
    assert_eq!(counters.tokens.load(Ordering::Relaxed), 48 + 6 * 3 + 6 * 2);
}

#[test]
fn a_weight_update_flushes_the_cache() {
    let (cached, counters) = engine(EngineConfig::default());
    let base = prompt(40, 5);
    cached
        .generate(request(base.clone(), 1, 2, false))
        .wait()
        .unwrap();
    assert_eq!(cached.stats().unwrap().prefix_cache_entries, 1);
    let update = WeightUpdate::new("weights-1", UpdateMode::Drain);
    cached.update_weights(update).wait().unwrap();
    // No slot held KV when the weights changed.
    assert_eq!(*counters.slots_at_update.lock().unwrap(), vec![0]);
    let stats = cached.stats().unwrap();
    assert_eq!(
        (stats.prefix_cache_entries, stats.kv_allocated_bytes),
        (0, 0)
    );
    let again = cached.generate(request(base, 1, 2, false)).wait().unwrap();
    assert_eq!(
        (again.cached_prompt_tokens, again.weight_version.as_str()),
        (0, "1")
    );
}

#[test]
fn cached_prefixes_are_evicted_for_admission_within_the_budget() {
    // Room for one running request of 64 positions, its growth headroom and one cached
    // prefix, not two requests.
    let budget = 3 * 64 * KV_BYTES_PER_TOKEN;
    let config = EngineConfig {
        max_num_seqs: 4,
        kv_budget_bytes: Some(budget),
        ..EngineConfig::default()
    };
    let (cached, _) = engine(config);
    let (plain, _) = engine(EngineConfig {
        prefix_caching: false,
        ..config
    });
    for salt in 0..8 {
        let out = both(&cached, &plain, request(prompt(40, salt), 1, 20, false));
        assert_eq!(out.cached_prompt_tokens, 0);
        let stats = cached.stats().unwrap();
        assert!(
            stats.prefix_cache_bytes <= budget && stats.kv_allocated_bytes <= budget,
            "{stats:?}"
        );
        assert!(stats.prefix_cache_entries >= 1, "{stats:?}");
    }
    // The most recent prefix is still there.
    let mut again = prompt(40, 7);
    again.push(3);
    assert_eq!(
        both(&cached, &plain, request(again, 2, 2, false)).cached_prompt_tokens,
        32
    );
    // Eight prefixes of 64 positions went through a budget that holds three.
    let kept = cached.stats().unwrap().prefix_cache_entries;
    assert!((1..=3).contains(&kept), "{kept}");
    assert_eq!(cached.flush_prefix_cache().wait().unwrap(), kept);
    assert_eq!(cached.stats().unwrap().kv_allocated_bytes, 0);
}
