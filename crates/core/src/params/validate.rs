//! Field-by-field validation of [`SamplingParams`]: every error names the field at fault.

use super::SamplingParams;
use crate::TokenId;
use crate::error::ValidationError;

/// Largest top-logprobs count a request may ask for, per token.
pub const MAX_TOP_LOGPROBS: usize = 1024;

/// Most stop strings (and, separately, bad words) a request may list: each is matched against
/// every token's text, so the list is per-token work.
pub const MAX_STOP_STRINGS: usize = 1024;

/// Longest stop string or bad word, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 4096;

/// Largest compiled size of a `stop_pattern` regex, in bytes.
const STOP_PATTERN_SIZE_LIMIT: usize = 1 << 20;

fn bad(field: &'static str, reason: impl Into<String>) -> Result<(), ValidationError> {
    Err(ValidationError::field(field, reason))
}

fn in_range(field: &'static str, v: f32, lo: f32, hi: f32) -> Result<(), ValidationError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        bad(field, format!("must be in [{lo}, {hi}], got {v}"))
    }
}

impl SamplingParams {
    /// Checks every field against its documented domain, naming the first bad one.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.n == 0 {
            return bad("n", "must be at least 1");
        }
        if let Some(best_of) = self.best_of {
            if best_of < self.n {
                return bad(
                    "best_of",
                    format!("must be >= n ({}), got {best_of}", self.n),
                );
            }
            if best_of > 1 && !self.is_random() {
                return bad("best_of", "must be 1 with greedy sampling (temperature 0)");
            }
        }
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        in_range("min_p", self.min_p, 0.0, 1.0)?;
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty");
        }
        for (field, list) in [("stop", &self.stop), ("bad_words", &self.bad_words)] {
            if list.len() > MAX_STOP_STRINGS {
                return bad(
                    field,
                    format!("at most {MAX_STOP_STRINGS} entries, got {}", list.len()),
                );
            }
            if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
                return bad(
                    field,
                    format!(
                        "entries are at most {MAX_STOP_STRING_BYTES} bytes, got one of {}",
                        long.len()
                    ),
                );
            }
        }
        if let Some(pattern) = &self.stop_pattern {
            compile_stop_pattern(pattern)?;
        }
        if self.bad_words.iter().any(|w| w.trim().is_empty()) {
            return bad("bad_words", "bad words must not be empty");
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "must be at least 1");
        }
        if let Some(max) = self.max_tokens
            && self.min_tokens > max
        {
            return bad(
                "min_tokens",
                format!("must be <= max_tokens ({max}), got {}", self.min_tokens),
            );
        }
        for (field, k) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(k) = k
                && k > MAX_TOP_LOGPROBS
            {
                return bad(
                    field,
                    format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {k}"),
                );
            }
        }
        if self.truncate_prompt_tokens == Some(0) {
            return bad("truncate_prompt_tokens", "must be at least 1");
        }
        if let Some(guided) = &self.guided_decoding {
            guided.validate()?;
        }
        if let Some(bias) = &self.logit_bias
            && let Some((id, b)) = bias
                .iter()
                .find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(*b)))
        {
            return bad(
                "logit_bias",
                format!("bias for token {id} must be in [-100, 100], got {b}"),
            );
        }
        if let Some(allowed) = &self.allowed_token_ids
            && allowed.is_empty()
        {
            return bad("allowed_token_ids", "must list at least one token");
        }
        Ok(())
    }

    /// Checks the token-id fields against a vocabulary size.
    pub fn validate_for_vocab(&self, vocab_size: usize) -> Result<(), ValidationError> {
        fn first_out_of<'a>(
            ids: impl IntoIterator<Item = &'a TokenId>,
            vocab_size: usize,
        ) -> Option<TokenId> {
            ids.into_iter().copied().find(|&t| t as usize >= vocab_size)
        }
        let fields: [(&'static str, Option<TokenId>); 3] = [
            (
                "stop_token_ids",
                first_out_of(&self.stop_token_ids, vocab_size),
            ),
            (
                "logit_bias",
                first_out_of(self.logit_bias.iter().flat_map(|b| b.keys()), vocab_size),
            ),
            (
                "allowed_token_ids",
                first_out_of(self.allowed_token_ids.iter().flatten(), vocab_size),
            ),
        ];
        for (field, found) in fields {
            if let Some(bad_id) = found {
                return bad(
                    field,
                    format!("token {bad_id} is out of range (vocabulary size {vocab_size})"),
                );
            }
        }
        Ok(())
    }
}

/// Compiles a `stop_pattern`, bounded in size so a hostile pattern cannot blow up.
pub(crate) fn compile_stop_pattern(pattern: &str) -> Result<regex::Regex, ValidationError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(STOP_PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| ValidationError::field("stop_pattern", e.to_string()))
}
