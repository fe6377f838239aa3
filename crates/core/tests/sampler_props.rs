//! Property tests of the sampler: the filters' masks hold for any logits, penalties follow
//! their formulas, a seed fixes the tokens, and seeded draws follow softmax(logits / T).

use std::collections::HashMap;

use infermux_core::SamplingParams;
use infermux_core::sampling::{
    History, Knobs, Processors, SeqRng, logsumexp, sample_processed, sample_token,
};
use proptest::prelude::*;

fn row_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-20.0f32..20.0, 2..120)
}

fn knobs_strategy(len: usize) -> impl Strategy<Value = Knobs> {
    (0.05f32..3.0, 0..=len, 0.01f32..=1.0, 0.0f32..0.99).prop_map(
        |(temperature, top_k, top_p, min_p)| Knobs {
            temperature,
            top_k,
            top_p,
            min_p,
        },
    )
}

/// Tempered weights relative to the best token (the best weighs 1).
fn weights(row: &[f32], t: f32) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    row.iter()
        .map(|&x| ((x as f64 - max) / t as f64).exp())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn filters_hold_for_any_logits(
        (row, knobs) in row_strategy().prop_flat_map(|r| { let n = r.len(); (Just(r), knobs_strategy(n)) }),
        seed in any::<u64>(),
    ) {
        let s = sample_processed(&row, None, knobs, &mut SeqRng::new(seed, 0));
        let t = s.token as usize;
        prop_assert!(t < row.len());
        // top-k: at least as likely as the k-th best.
        if knobs.top_k > 0 {
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            prop_assert!(row[t] >= sorted[knobs.top_k.min(row.len()) - 1]);
        }
        let w = weights(&row, knobs.temperature);
        // min-p: relative probability at least min_p (top-k/top-p only remove more).
        prop_assert!(w[t] >= knobs.min_p as f64 * (1.0 - 1e-5));
        // top-p: the mass strictly above the token (within the top-k set) is below top_p.
        let kth = {
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if knobs.top_k > 0 { sorted[knobs.top_k.min(row.len()) - 1] } else { f32::NEG_INFINITY }
        };
        let kept: f64 = (0..row.len()).filter(|&i| row[i] >= kth).map(|i| w[i]).sum();
        let above: f64 = (0..row.len()).filter(|&i| row[i] >= kth && w[i] > w[t]).map(|i| w[i]).sum();
        prop_assert!(above / kept < knobs.top_p as f64 + 1e-5, "above {} kept {}", above, kept);
        // Logprobs: raw is log_softmax; processed is a log-probability.
        prop_assert!((s.logprob - (row[t] - logsumexp(&row))).abs() < 1e-4);
        prop_assert!(s.processed_logprob <= 1e-6 && s.processed_logprob.is_finite());
    }

    #[test]
    fn allowed_ids_hold_for_any_logits(
        row in row_strategy(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 1..6),
        seed in any::<u64>(),
        temperature in 0.0f32..2.0,
    ) {
        let allowed: Vec<u32> = picks.iter().map(|i| i.index(row.len()) as u32).collect();
        let params = SamplingParams {
            allowed_token_ids: Some(allowed.clone()),
            temperature,
            ..SamplingParams::default()
        };
        let mut processed = row.clone();
        Processors::new(&params, vec![], &[], row.len()).apply(&mut processed, &History::new(&[]), None);
        let s = sample_processed(&row, Some(&processed), Knobs::of(&params), &mut SeqRng::new(seed, 0));
        prop_assert!(allowed.contains(&s.token));
    }

    #[test]
    fn penalties_follow_their_formulas(
        row in row_strategy(),
        prompt in prop::collection::vec(0u32..120, 0..20),
        output in prop::collection::vec(0u32..120, 0..30),
        rep in 0.5f32..3.0,
        freq in -2.0f32..2.0,
        pres in -2.0f32..2.0,
    ) {
        let n = row.len() as u32;
        let prompt: Vec<u32> = prompt.into_iter().map(|t| t % n).collect();
        let output: Vec<u32> = output.into_iter().map(|t| t % n).collect();
        let params = SamplingParams {
            repetition_penalty: rep,
            frequency_penalty: freq,
            presence_penalty: pres,
            ..SamplingParams::default()
        };
        let mut history = History::new(&prompt);
        output.iter().for_each(|&t| history.push(t));
        let mut got = row.clone();
        Processors::new(&params, vec![], &[], row.len()).apply(&mut got, &history, None);
        let mut counts: HashMap<u32, u32> = HashMap::new();
        output.iter().for_each(|&t| *counts.entry(t).or_default() += 1);
        for (i, &x) in row.iter().enumerate() {
            let id = i as u32;
            let c = counts.get(&id).copied().unwrap_or(0);
            let mut want = x;
            if prompt.contains(&id) || c > 0 {
                want = if want > 0.0 { want / rep } else { want * rep };
            }
            want -= freq * c as f32 + if c > 0 { pres } else { 0.0 };
            prop_assert!((got[i] - want).abs() <= 1e-4 * want.abs().max(1.0), "id {}: {} vs {}", i, got[i], want);
        }
    }

    #[test]
    fn same_seed_same_tokens(row in row_strategy(), seed in any::<u64>(), t in 0.1f32..2.0) {
        let params = SamplingParams { temperature: t, ..SamplingParams::default() };
        let draw = || {
            let mut rng = SeqRng::new(seed, 3);
            (0..20).map(|_| sample_token(&row, &params, &mut rng).token).collect::<Vec<_>>()
        };
        prop_assert_eq!(draw(), draw());
    }
}

/// Pearson's chi-square of seeded draws against softmax(logits / T), for several rows and
/// temperatures; the critical value is for p = 0.001 at 9 degrees of freedom.
#[test]
fn seeded_draws_follow_softmax_over_temperature() {
    const DRAWS: usize = 20_000;
    const CRITICAL_DF9_P001: f64 = 27.877;
    let rows: [[f32; 10]; 3] = [
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 0.2, -0.3, 1.1, 0.7],
        [3.0, 1.0, 0.0, -1.0, 2.0, 2.5, 1.5, 0.5, -0.5, 1.2],
        [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5],
    ];
    for (r, row) in rows.iter().enumerate() {
        for t in [0.5f32, 1.0, 1.7] {
            let params = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            let mut rng = SeqRng::new(1234 + r as u64, 0);
            let mut counts = [0usize; 10];
            for _ in 0..DRAWS {
                counts[sample_token(row, &params, &mut rng).token as usize] += 1;
            }
            let w = weights(row, t);
            let total: f64 = w.iter().sum();
            let chi2: f64 = counts
                .iter()
                .zip(&w)
                .map(|(&c, &wi)| {
                    let expected = DRAWS as f64 * wi / total;
                    (c as f64 - expected).powi(2) / expected
                })
                .sum();
            assert!(chi2 < CRITICAL_DF9_P001, "row {r}, T {t}: chi2 = {chi2:.2}");
        }
    }
}
