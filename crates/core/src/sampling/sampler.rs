//! Picks the next token from one logits row: temperature → top-k → top-p → min-p → draw.
//!
//! The order matches Hugging Face's logits warpers. The returned logprob is always the raw
//! `log_softmax(logits)` of the chosen token; the processed one is under the distribution the
//! draw actually used.

use crate::TokenId;
use crate::params::SamplingParams;
use crate::sampling::logprobs::{argmax, exp_nonpositive, logsumexp, max_of};
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
    let raw_lse = logsumexp(raw);
    let row = processed.unwrap_or(raw);
    // A temperature so small that 1 / T overflows is greedy (the limit as T -> 0), not a
    // distribution of NaN weights.
    if knobs.temperature <= 0.0 || !(1.0 / knobs.temperature).is_finite() {
        let token = argmax(row);
        let row_lse = if processed.is_some() {
            logsumexp(row)
        } else {
            raw_lse
        };
        return SampledToken {
            token,
            logprob: raw[token as usize] - raw_lse,
            processed_logprob: row[token as usize] - row_lse,
        };
    }
    let dist = Candidates::new(row, knobs);
    let token = dist.draw(rng.next_f64()).unwrap_or_else(|| argmax(row));
    SampledToken {
        token,
        logprob: raw[token as usize] - raw_lse,
        processed_logprob: dist.logprob(token),
    }
}

/// Candidates the nucleus search sorts first; more are sorted only if their mass falls short.
const NUCLEUS_HEAD: usize = 1024;

/// The tokens that survive the filters with unnormalized weights (`exp((x - max) / T)`, so the
/// top token weighs 1), either over the whole vocabulary or as a short id-sorted list.
enum Weights {
    /// One weight per id; filtered ids weigh 0.
    Dense(Vec<f32>),
    /// `(id, weight)` of the kept ids, in id order.
    Sparse(Vec<(TokenId, f32)>),
}

struct Candidates {
    weights: Weights,
    total: f64,
}

impl Candidates {
    fn new(row: &[f32], knobs: Knobs) -> Self {
        let inv_t = 1.0 / knobs.temperature;
        let max = max_of(row);
        let mut dense: Vec<f32> = row
            .iter()
            .map(|&x| exp_nonpositive((x - max) * inv_t))
            .collect();
        if knobs.top_k > 0 && knobs.top_k < row.len() {
            // Keep every token at least as likely as the k-th (ties kept, as Hugging Face).
            let mut values = row.to_vec();
            let (_, kth, _) = values.select_nth_unstable_by(knobs.top_k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            for (w, &x) in dense.iter_mut().zip(row) {
                if x < kth {
                    *w = 0.0;
                }
            }
        }
        let mut weights = Weights::Dense(dense);
        if knobs.top_p < 1.0 {
            weights = Weights::Sparse(nucleus(&weights, knobs.top_p as f64));
        }
        if knobs.min_p > 0.0 {
            // The top token weighs 1, so the threshold is min_p itself.
            let threshold = knobs.min_p;
            match &mut weights {
                Weights::Dense(w) => w.iter_mut().for_each(|w| {
                    if *w < threshold {
                        *w = 0.0
                    }
                }),
                Weights::Sparse(kept) => kept.retain(|&(_, w)| w >= threshold),
            }
        }
        let total = match &weights {
            Weights::Dense(w) => w.iter().map(|&x| x as f64).sum(),
            Weights::Sparse(kept) => kept.iter().map(|&(_, w)| w as f64).sum(),
        };
        Self { weights, total }
    }

    /// The token whose cumulative weight (in id order) first exceeds `u * total`.
    fn draw(&self, u: f64) -> Option<TokenId> {
        if !(self.total.is_finite() && self.total > 0.0) {
            return None;
        }
        let target = u * self.total;
        let mut acc = 0.0;
        let mut last = None;
        let pairs: Box<dyn Iterator<Item = (TokenId, f32)>> = match &self.weights {
            Weights::Dense(w) => Box::new(w.iter().enumerate().map(|(i, &w)| (i as TokenId, w))),
            Weights::Sparse(kept) => Box::new(kept.iter().copied()),
        };
        for (id, w) in pairs.filter(|&(_, w)| w > 0.0) {
            acc += w as f64;
            last = Some(id);
            if acc > target {
                return last;
            }
        }
        last
    }

    fn logprob(&self, token: TokenId) -> f32 {
        let w = match &self.weights {
            Weights::Dense(w) => w.get(token as usize).copied().unwrap_or(0.0),
            Weights::Sparse(kept) => kept
                .binary_search_by_key(&token, |&(id, _)| id)
                .map_or(0.0, |i| kept[i].1),
        };
        (w as f64 / self.total).ln() as f32
    }
}

/// Keeps the most likely tokens until their mass reaches `top_p` (at least one), in id order.
/// A peaked distribution's head is sorted directly; a flat one is cut by bisecting on the
/// weight threshold (linear passes, no full sort).
fn nucleus(weights: &Weights, top_p: f64) -> Vec<(TokenId, f32)> {
    let mut live: Vec<(TokenId, f32)> = match weights {
        Weights::Dense(w) => w
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0.0)
            .map(|(i, &w)| (i as TokenId, w))
            .collect(),
        Weights::Sparse(kept) => kept.clone(),
    };
    let total: f64 = live.iter().map(|&(_, w)| w as f64).sum();
    let target = top_p * total;
    let better = |a: &(TokenId, f32), b: &(TokenId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if live.len() > NUCLEUS_HEAD {
        live.select_nth_unstable_by(NUCLEUS_HEAD - 1, better);
        let head: f64 = live[..NUCLEUS_HEAD].iter().map(|&(_, w)| w as f64).sum();
        if head < target {
            let tau = mass_threshold(&live, target);
            live.retain(|&(_, w)| w >= tau);
            live.sort_unstable_by_key(|&(id, _)| id);
            return live;
        }
        live.truncate(NUCLEUS_HEAD);
    }
    live.sort_unstable_by(better);
    let mut acc = 0.0;
    let mut keep = 0;
    for &(_, w) in &live {
        keep += 1;
        acc += w as f64;
        if acc >= target {
            break;
        }
    }
    live.truncate(keep);
    live.sort_unstable_by_key(|&(id, _)| id);
    live
}

/// The weight of the token at which the descending cumulative mass first reaches `target`.
/// Weights lie in (0, 1], where the bits of an f32 order like its value: one pass fills a
/// histogram over the top bits, and only the bucket holding the crossing is sorted.
fn mass_threshold(live: &[(TokenId, f32)], target: f64) -> f32 {
    const SHIFT: u32 = 18;
    let bucket = |w: f32| (w.to_bits() >> SHIFT) as usize;
    let mut mass = vec![0.0f64; (1.0f32.to_bits() >> SHIFT) as usize + 1];
    for &(_, w) in live {
        mass[bucket(w)] += w as f64;
    }
    let mut above = 0.0;
    let mut crossing = 0;
    for (b, &m) in mass.iter().enumerate().rev() {
        if above + m >= target {
            crossing = b;
            break;
        }
        above += m;
    }
    let mut edge: Vec<f32> = live
        .iter()
        .map(|&(_, w)| w)
        .filter(|&w| bucket(w) == crossing)
        .collect();
    edge.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut tau = edge.first().copied().unwrap_or(f32::MIN_POSITIVE);
    for w in edge {
        tau = w;
        above += w as f64;
        if above >= target {
            break;
        }
    }
    tau
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
    fn a_temperature_whose_inverse_overflows_is_greedy() {
        // 1 / 1e-45 is +inf in f32: the draw would weigh every token NaN or 0.
        let p = params(|p| p.temperature = 1e-45);
        let c = draws(&ROW, &p, 50);
        assert_eq!(c, vec![0, 0, 0, 50, 0]);
        let s = sample_token(&ROW, &p, &mut SeqRng::new(0, 0));
        assert!(
            s.logprob.is_finite() && s.processed_logprob.is_finite(),
            "{s:?}"
        );
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
    fn flat_nucleus_matches_a_full_sort() {
        let mut rng = SeqRng::new(8, 0);
        let w: Vec<f32> = (0..5000).map(|_| rng.next_f64() as f32 + 1e-3).collect();
        for p in [0.3, 0.9, 0.999] {
            let got = nucleus(&Weights::Dense(w.clone()), p);
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            let (mut acc, mut want) = (0.0, Vec::new());
            for i in order {
                want.push(i as TokenId);
                acc += w[i] as f64;
                if acc >= p * total {
                    break;
                }
            }
            want.sort_unstable();
            let ids: Vec<TokenId> = got.iter().map(|&(id, _)| id).collect();
            assert_eq!(ids, want, "top_p {p}");
        }
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
