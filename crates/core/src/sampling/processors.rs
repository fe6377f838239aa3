//! Logits processors: everything that edits a logits row before temperature and the filters.
//!
//! Order (vLLM's): allowed ids → guided mask → bad words → min-tokens suppression → logit
//! bias → repetition, frequency and presence penalties.

use std::collections::HashMap;

use crate::TokenId;
use crate::guided::TokenMask;
use crate::params::SamplingParams;

/// What a sequence has produced so far, as the penalties see it.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Distinct prompt tokens (for the repetition penalty).
    prompt: Vec<TokenId>,
    /// Generated tokens in order.
    output: Vec<TokenId>,
    /// How often each generated token occurred.
    counts: HashMap<TokenId, u32>,
}

impl History {
    /// The history of a sequence about to generate after `prompt`.
    pub fn new(prompt: &[TokenId]) -> Self {
        let mut distinct = prompt.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        Self {
            prompt: distinct,
            ..Self::default()
        }
    }

    /// Records a generated token.
    pub fn push(&mut self, token: TokenId) {
        self.output.push(token);
        *self.counts.entry(token).or_default() += 1;
    }

    /// Tokens generated so far.
    pub fn output(&self) -> &[TokenId] {
        &self.output
    }
}

/// A request's processors, compiled once at admission.
#[derive(Debug, Clone, Default)]
pub struct Processors {
    allowed: Option<TokenMask>,
    bad_words: Vec<Vec<TokenId>>,
    /// Ids suppressed while fewer than `min_tokens` tokens exist (EOS and stop tokens).
    min_tokens_suppress: Vec<TokenId>,
    min_tokens: usize,
    bias: Vec<(TokenId, f32)>,
    presence: f32,
    frequency: f32,
    repetition: f32,
}

impl Processors {
    /// Compiles `params`' processors. `bad_words` arrive tokenized; `eos` are the model's EOS ids.
    pub fn new(
        params: &SamplingParams,
        bad_words: Vec<Vec<TokenId>>,
        eos: &[TokenId],
        vocab_size: usize,
    ) -> Self {
        let allowed = params.allowed_token_ids.as_ref().map(|ids| {
            let mut mask = TokenMask::none(vocab_size);
            ids.iter().for_each(|&id| mask.allow(id));
            mask
        });
        let mut suppress: Vec<TokenId> = eos.to_vec();
        suppress.extend(&params.stop_token_ids);
        Self {
            allowed,
            bad_words,
            min_tokens_suppress: suppress,
            min_tokens: params.min_tokens,
            bias: params
                .logit_bias
                .iter()
                .flatten()
                .map(|(&id, &b)| (id, b))
                .collect(),
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
            repetition: params.repetition_penalty,
        }
    }

    /// Whether applying these processors could change a row.
    pub fn is_active(&self) -> bool {
        self.allowed.is_some()
            || !self.bad_words.is_empty()
            || self.min_tokens > 0
            || !self.bias.is_empty()
            || self.presence != 0.0
            || self.frequency != 0.0
            || self.repetition != 1.0
    }

    /// Edits `row` in place for a sequence with `history`, under an optional guided `mask`.
    /// Soft suppressions (bad words, min_tokens) never leave a row with no finite logit.
    pub fn apply(&self, row: &mut [f32], history: &History, mask: Option<&TokenMask>) {
        for m in self.allowed.iter().chain(mask) {
            for (id, x) in row.iter_mut().enumerate() {
                if !m.allows(id as TokenId) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // Bad words and min_tokens are soft: they never remove the last token the hard
        // constraints (allowed_token_ids, guided decoding) leave, so a grammar that must end now
        // ends (EOS) even under min_tokens, instead of a draw from a row with no finite logit.
        let out = history.output();
        let mut soft: Vec<usize> = self
            .bad_words
            .iter()
            .filter_map(|word| {
                let (last, prefix) = word.split_last()?;
                out.ends_with(prefix).then_some(*last as usize)
            })
            .collect();
        if out.len() < self.min_tokens {
            soft.extend(self.min_tokens_suppress.iter().map(|&id| id as usize));
        }
        soft.retain(|&id| id < row.len());
        if !soft.is_empty() {
            let kept: Vec<f32> = soft.iter().map(|&id| row[id]).collect();
            for &id in &soft {
                row[id] = f32::NEG_INFINITY;
            }
            if !row.iter().any(|x| x.is_finite()) {
                for (&id, &x) in soft.iter().zip(&kept) {
                    row[id] = x;
                }
            }
        }
        for &(id, b) in &self.bias {
            if let Some(x) = row.get_mut(id as usize) {
                *x += b;
            }
        }
        if self.repetition != 1.0 {
            let r = self.repetition;
            let seen = history.prompt.iter().chain(
                history
                    .counts
                    .keys()
                    .filter(|t| history.prompt.binary_search(t).is_err()),
            );
            for &id in seen {
                if let Some(x) = row.get_mut(id as usize) {
                    *x = if *x > 0.0 { *x / r } else { *x * r };
                }
            }
        }
        if self.frequency != 0.0 || self.presence != 0.0 {
            for (&id, &count) in &history.counts {
                if let Some(x) = row.get_mut(id as usize) {
                    *x -= self.frequency * count as f32 + self.presence;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(params: SamplingParams, bad: Vec<Vec<TokenId>>, history: &History) -> Vec<f32> {
        let mut row = vec![1.0, -1.0, 2.0, 0.5, 3.0];
        Processors::new(&params, bad, &[4], 5).apply(&mut row, history, None);
        row
    }

    fn history(prompt: &[TokenId], out: &[TokenId]) -> History {
        let mut h = History::new(prompt);
        out.iter().for_each(|&t| h.push(t));
        h
    }

    #[test]
    fn penalties_follow_their_formulas() {
        let h = history(&[0, 1], &[2, 2, 3]);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        assert_eq!(apply(p, vec![], &h), vec![0.5, -2.0, 1.0, 0.25, 3.0]);
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::default()
        };
        // token 2: 2 - 0.5*2 - 0.25; token 3: 0.5 - 0.5 - 0.25; prompt tokens untouched.
        assert_eq!(apply(p, vec![], &h), vec![1.0, -1.0, 0.75, -0.25, 3.0]);
    }

    #[test]
    fn masks_bias_and_min_tokens() {
        let h = history(&[0], &[1]);
        let p = SamplingParams {
            allowed_token_ids: Some(vec![2, 4]),
            ..SamplingParams::default()
        };
        let row = apply(p, vec![], &h);
        assert!(row[0].is_infinite() && row[1].is_infinite() && row[3].is_infinite());
        let p = SamplingParams {
            logit_bias: Some([(1, 5.0)].into()),
            min_tokens: 2,
            stop_token_ids: vec![0],
            ..SamplingParams::default()
        };
        let row = apply(p, vec![], &h);
        assert_eq!(row[1], 4.0);
        assert!(
            row[4].is_infinite() && row[0].is_infinite(),
            "EOS and stop id held back"
        );
    }

    #[test]
    fn soft_suppression_never_removes_the_last_allowed_token() {
        // Guided decoding allows only EOS (4) now; min_tokens would hold it back.
        let mut mask = TokenMask::none(5);
        mask.allow(4);
        let p = SamplingParams {
            min_tokens: 8,
            ..SamplingParams::default()
        };
        let mut row = vec![1.0, -1.0, 2.0, 0.5, 3.0];
        Processors::new(&p, vec![], &[4], 5).apply(&mut row, &history(&[0], &[1]), Some(&mask));
        assert_eq!(row[4], 3.0, "the grammar's end beats min_tokens");
        assert!(row[..4].iter().all(|x| x.is_infinite()));
        // With another token left, min_tokens holds EOS back as usual.
        mask.allow(2);
        let mut row = vec![1.0, -1.0, 2.0, 0.5, 3.0];
        Processors::new(&p, vec![], &[4], 5).apply(&mut row, &history(&[0], &[1]), Some(&mask));
        assert!(row[4].is_infinite() && row[2] == 2.0);
    }

    #[test]
    fn bad_words_block_their_last_token_after_the_prefix() {
        let p = SamplingParams::default;
        let row = apply(p(), vec![vec![1, 2]], &history(&[], &[0, 1]));
        assert!(row[2].is_infinite());
        let row = apply(p(), vec![vec![1, 2]], &history(&[], &[0]));
        assert_eq!(row[2], 2.0);
        let row = apply(p(), vec![vec![3]], &history(&[], &[]));
        assert!(row[3].is_infinite());
    }
}
