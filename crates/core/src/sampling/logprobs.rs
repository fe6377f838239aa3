//! Reference log-softmax helpers over one logits row.

use crate::TokenId;

/// `log(sum(exp(row)))`, computed stably in f64 accumulation.
pub fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
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
