//! Picks the next token from one logits row: temperature → top-k → top-p → min-p → draw.
//!
//! The order matches Hugging Face's logits warpers. The returned logprob is always the raw
//! `log_softmax(logits)` of the chosen token; the processed one is under the distribution the
//! draw actually used.

use crate::TokenId;
use crate::params::SamplingParams;
use crate::sampling::logprobs::{argmax, logsumexp};
use crate::sampling::rng::SeqRng;

/// The token a draw chose and its log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    /// The chosen id.
    pub token: TokenId,
    /// `log_softmax(logits)[token]`: what scoring the same sequence returns.
    pub logprob: f32,
    /// Logprob under the processed (tempered, filtered, renormalized) distribution.
    pub processed_logprob: f32,
}

/// The distribution-shaping knobs of one row: temperature and the three filters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// `0` is greedy.
    pub temperature: f32,
    /// `0` disables.
    pub top_k: usize,
    /// `1` disables.
    pub top_p: f32,
    /// `0` disables.
    pub min_p: f32,
}

impl Knobs {
    /// The knobs of `params`.
    pub fn of(params: &SamplingParams) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k().unwrap_or(0),
            top_p: params.top_p,
            min_p: params.min_p,
        }
    }
}

/// Samples one token from `row` under `params`, drawing from `rng` (greedy draws nothing).
pub fn sample_token(row: &[f32], params: &SamplingParams, rng: &mut SeqRng) -> SampledToken {
    sample_processed(row, None, Knobs::of(params), rng)
}

/// Samples from `processed` (the row after logits processors; `None`: unprocessed), reporting
/// the raw logprob from `raw`. Greedy takes the processed argmax.
pub fn sample_processed(
    raw: &[f32],
    processed: Option<&[f32]>,
    knobs: Knobs,
    rng: &mut SeqRng,
) -> SampledToken {
    let row = processed.unwrap_or(raw);
    let raw_lp = |token: TokenId| raw[token as usize] - logsumexp(raw);
    if knobs.temperature <= 0.0 {
        let token = argmax(row);
        return SampledToken {
            token,
            logprob: raw_lp(token),
            processed_logprob: row[token as usize] - logsumexp(row),
        };
    }
    let dist = Candidates::new(row, knobs);
    let token = dist.draw(rng.next_f64()).unwrap_or_else(|| argmax(row));
    SampledToken {
        token,
        logprob: raw_lp(token),
        processed_logprob: dist.logprob(token),
    }
}

/// The tokens that survive the filters, with unnormalized weights, in a fixed order.
struct Candidates {
    ids: Vec<TokenId>,
    weights: Vec<f64>,
    total: f64,
}

impl Candidates {
    fn new(row: &[f32], knobs: Knobs) -> Self {
        let inv_t = 1.0 / knobs.temperature as f64;
        let mut ids: Vec<TokenId> = match knobs.top_k {
            k if k > 0 && k < row.len() => {
                let mut ids: Vec<TokenId> = (0..row.len() as TokenId).collect();
                ids.select_nth_unstable_by(k - 1, |a, b| {
                    row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b))
                });
                ids.truncate(k);
                ids.sort_unstable();
                ids
            }
            _ => (0..row.len() as TokenId)
                .filter(|&i| row[i as usize] > f32::NEG_INFINITY)
                .collect(),
        };
        let max = ids
            .iter()
            .map(|&i| row[i as usize])
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |i: TokenId| ((row[i as usize] as f64 - max) * inv_t).exp();
        if knobs.top_p < 1.0 {
            ids = nucleus(ids, knobs.top_p as f64, weight);
        }
        if knobs.min_p > 0.0 {
            // The top token has weight 1, so the threshold is min_p itself.
            let threshold = knobs.min_p as f64;
            ids.retain(|&i| weight(i) >= threshold);
        }
        let weights: Vec<f64> = ids.iter().map(|&i| weight(i)).collect();
        let total = weights.iter().sum();
        Self {
            ids,
            weights,
            total,
        }
    }

    /// The token whose cumulative weight first exceeds `u * total`.
    fn draw(&self, u: f64) -> Option<TokenId> {
        if !(self.total.is_finite() && self.total > 0.0) {
            return None;
        }
        let target = u * self.total;
        let mut acc = 0.0;
        for (&id, &w) in self.ids.iter().zip(&self.weights) {
            acc += w;
            if acc > target {
                return Some(id);
            }
        }
        self.ids.last().copied()
    }

    fn logprob(&self, token: TokenId) -> f32 {
        match self.ids.iter().position(|&i| i == token) {
            Some(p) => (self.weights[p] / self.total).ln() as f32,
            None => f32::NEG_INFINITY,
        }
    }
}

/// Keeps the most likely tokens until their mass reaches `top_p` (at least one), in id order.
fn nucleus(mut ids: Vec<TokenId>, top_p: f64, weight: impl Fn(TokenId) -> f64) -> Vec<TokenId> {
    let mut scored: Vec<(TokenId, f64)> = ids.iter().map(|&i| (i, weight(i))).collect();
    let total: f64 = scored.iter().map(|s| s.1).sum();
    scored.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut acc = 0.0;
    let mut keep = 0;
    for &(_, w) in &scored {
        keep += 1;
        acc += w / total;
        if acc >= top_p {
            break;
        }
    }
    ids.clear();
    ids.extend(scored[..keep].iter().map(|s| s.0));
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn draws(row: &[f32], p: &SamplingParams, n: usize) -> Vec<u32> {
        let mut counts = vec![0u32; row.len()];
        let mut rng = SeqRng::new(3, 0);
        for _ in 0..n {
            counts[sample_token(row, p, &mut rng).token as usize] += 1;
        }
        counts
    }

    const ROW: [f32; 5] = [2.0, 1.0, 0.5, 3.0, -1.0];

    #[test]
    fn greedy_takes_argmax_with_raw_logprob() {
        let s = sample_token(&ROW, &SamplingParams::greedy(1), &mut SeqRng::new(0, 0));
        assert_eq!(s.token, 3);
        assert!((s.logprob - crate::sampling::logprobs::token_logprob(&ROW, 3)).abs() < 1e-7);
        assert_eq!(s.processed_logprob, s.logprob);
    }

    #[test]
    fn top_k_keeps_only_k_tokens() {
        let c = draws(&ROW, &params(|p| p.top_k = 2), 2000);
        assert_eq!((c[1], c[2], c[4]), (0, 0, 0));
        assert!(c[0] > 0 && c[3] > c[0]);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // softmax(ROW): p3 ≈ 0.63, p0 ≈ 0.23; top_p 0.7 keeps exactly {3, 0}.
        let c = draws(&ROW, &params(|p| p.top_p = 0.7), 2000);
        assert_eq!((c[1], c[2], c[4]), (0, 0, 0));
        assert!(c[0] > 0);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Relative to p3: p0/p3 = e^-1 ≈ 0.37, p1/p3 = e^-2 ≈ 0.14.
        let c = draws(&ROW, &params(|p| p.min_p = 0.2), 2000);
        assert_eq!((c[1], c[2], c[4]), (0, 0, 0));
    }

    #[test]
    fn temperature_sharpens_and_processed_logprob_renormalizes() {
        let cold = draws(&ROW, &params(|p| p.temperature = 0.1), 500);
        assert_eq!(cold[3], 500);
        let p = params(|p| p.top_k = 2);
        let s = sample_token(&ROW, &p, &mut SeqRng::new(9, 0));
        let kept = [ROW[0], ROW[3]];
        let expected =
            crate::sampling::logprobs::token_logprob(&kept, if s.token == 0 { 0 } else { 1 });
        assert!((s.processed_logprob - expected).abs() < 1e-6);
    }

    #[test]
    fn greedy_follows_the_processed_row() {
        let mut processed = ROW;
        processed[3] = f32::NEG_INFINITY;
        let knobs = Knobs::of(&SamplingParams::greedy(1));
        let s = sample_processed(&ROW, Some(&processed), knobs, &mut SeqRng::new(0, 0));
        assert_eq!(s.token, 0);
        let raw = crate::sampling::logprobs::token_logprob(&ROW, 0);
        assert!((s.logprob - raw).abs() < 1e-7);
        assert!(s.processed_logprob > raw, "renormalized without token 3");
    }

    #[test]
    fn frequencies_follow_softmax() {
        let n = 20_000;
        let c = draws(&ROW, &SamplingParams::default(), n);
        let lse = logsumexp(&ROW);
        for (i, &x) in ROW.iter().enumerate() {
            let expected = ((x - lse) as f64).exp();
            let got = c[i] as f64 / n as f64;
            assert!(
                (got - expected).abs() < 0.015,
                "token {i}: {got} vs {expected}"
            );
        }
    }
}
