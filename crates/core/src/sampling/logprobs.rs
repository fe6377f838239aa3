//! Reference log-softmax helpers over one logits row.

use crate::TokenId;

/// Lanes the reductions below keep independent, so the compiler vectorizes them.
const LANES: usize = 8;
/// Terms summed in f32 before the partial sum moves to the f64 total.
const BLOCK: usize = 1024;

/// `e^x` for `x <= 0` to ~1e-7 relative error, in plain arithmetic that vectorizes (std's
/// `exp` is a libm call per element). Below -87 it returns ~0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// The largest value of `row` (`-inf` for an empty row; NaNs ignored).
pub fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `sum(exp((row - shift) * scale))` for `shift >= max(row)`, `scale > 0`: f32 lanes per block,
/// blocks summed in f64.
pub fn sum_exp(row: &[f32], shift: f32, scale: f32) -> f64 {
    let mut total = 0.0f64;
    for block in row.chunks(BLOCK) {
        let mut lanes = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                lanes[i] += exp_nonpositive((c[i] - shift) * scale);
            }
        }
        let tail_sum: f32 = tail
            .iter()
            .map(|&x| exp_nonpositive((x - shift) * scale))
            .sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail_sum as f64;
    }
    total
}

/// `log(sum(exp(row)))`, computed stably.
pub fn logsumexp(row: &[f32]) -> f32 {
    let max = max_of(row);
    if !max.is_finite() {
        return max;
    }
    max + sum_exp(row, max, 1.0).ln() as f32
}

/// Log-probability of `token` under `softmax(row)`.
pub fn token_logprob(row: &[f32], token: TokenId) -> f32 {
    row[token as usize] - logsumexp(row)
}

/// The `k` most likely tokens of `row` with their log-probabilities, best first
/// (ties broken by lower id).
pub fn top_logprobs(row: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let lse = logsumexp(row);
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let better = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, better);
        ids.truncate(k);
    }
    ids.sort_unstable_by(better);
    ids.into_iter()
        .map(|id| (id, row[id as usize] - lse))
        .collect()
}

/// The index of the largest value (lowest index on ties).
pub fn argmax(row: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for i in 0..=17_400 {
            let x = -(i as f32) * 0.005;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 5e-7 * want + 1e-38,
                "exp({x}) = {got} vs {want}"
            );
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        let row: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        let exact = {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
        };
        assert!((logsumexp(&row) as f64 - exact).abs() < 1e-5);
    }

    #[test]
    fn logprobs_normalize() {
        let row = [1.0f32, 2.0, 3.0, -1e4];
        let total: f64 = (0..4).map(|t| (token_logprob(&row, t) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(
            (token_logprob(&row, 2) - (3.0 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln())).abs()
                < 1e-6
        );
    }

    #[test]
    fn top_logprobs_are_sorted_and_tie_broken() {
        let row = [0.5f32, 2.0, 2.0, -3.0, 1.0];
        let top = top_logprobs(&row, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        assert!((top[0].1 - token_logprob(&row, 1)).abs() < 1e-7);
        assert_eq!(top_logprobs(&row, 10).len(), 5);
        assert_eq!(argmax(&row), 1);
    }
}
