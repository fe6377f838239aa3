//! Sampling parameters (the EasyDeL/vLLM field set) and their validation.
//!
//! Fields follow EasyDeL's `SamplingParams` names and defaults; `top_k <= 0` disables top-k as
//! in vLLM. The remaining EasyDeL fields (penalties, stop strings, guided decoding, …) extend
//! this struct without changing the ones here.

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::error::ValidationError;

/// Which log-probabilities a sampled token carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobsMode {
    /// The model's raw `log_softmax(logits)`: what `compute_logprobs` returns for the token.
    #[default]
    Raw,
    /// Raw logprobs, plus the logprob under the distribution actually sampled from
    /// (after temperature and top-k/top-p/min-p, renormalized over the kept tokens).
    RawAndProcessed,
}

/// Controls one generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` or negative disables.
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's, in [0, 1].
    pub min_p: f32,
    /// Seed of this request's random stream; `None` draws one.
    pub seed: Option<u64>,
    /// Maximum tokens to generate; `None` runs to the end of the context window.
    pub max_tokens: Option<usize>,
    /// Token ids that end a sequence (kept in the output, like EOS).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past the model's EOS tokens.
    pub ignore_eos: bool,
    /// Number of top alternatives to return per generated token (the sampled token's logprob is
    /// always returned).
    pub logprobs: Option<usize>,
    /// Which logprob(s) each sampled token carries.
    pub logprobs_mode: LogprobsMode,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            max_tokens: Some(16),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            logprobs_mode: LogprobsMode::Raw,
        }
    }
}

/// Largest top-logprobs count a request may ask for, per token.
pub const MAX_TOP_LOGPROBS: usize = 1024;

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }

    /// Whether this request samples at random (as opposed to taking the argmax).
    pub fn is_random(&self) -> bool {
        self.temperature > 0.0
    }

    /// The effective top-k: `None` when disabled.
    pub fn top_k(&self) -> Option<usize> {
        (self.top_k > 0).then_some(self.top_k as usize)
    }

    /// Checks every field against its documented domain, naming the first bad one.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ValidationError::field(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ValidationError::field(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ValidationError::field(
                "min_p",
                format!("must be in [0, 1], got {}", self.min_p),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(ValidationError::field("max_tokens", "must be at least 1"));
        }
        if let Some(k) = self.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(ValidationError::field(
                "logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives per token, got {k}"),
            ));
        }
        Ok(())
    }

    /// Checks the token-id fields against a vocabulary size.
    pub fn validate_for_vocab(&self, vocab_size: usize) -> Result<(), ValidationError> {
        if let Some(&bad) = self
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= vocab_size)
        {
            return Err(ValidationError::field(
                "stop_token_ids",
                format!("token {bad} is out of range (vocabulary size {vocab_size})"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ValidationError) -> &'static str {
        match err {
            ValidationError::InvalidField { field, .. } => field,
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_match_easydel() {
        let p = SamplingParams::default();
        p.validate().unwrap();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.max_tokens),
            (1.0, 1.0, 0, Some(16))
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            field_of(p.validate().unwrap_err())
        };
        assert_eq!(bad(|p| p.temperature = -0.1), "temperature");
        assert_eq!(bad(|p| p.temperature = f32::NAN), "temperature");
        assert_eq!(bad(|p| p.top_p = 0.0), "top_p");
        assert_eq!(bad(|p| p.top_p = 1.01), "top_p");
        assert_eq!(bad(|p| p.min_p = -0.5), "min_p");
        assert_eq!(bad(|p| p.max_tokens = Some(0)), "max_tokens");
        assert_eq!(bad(|p| p.logprobs = Some(MAX_TOP_LOGPROBS + 1)), "logprobs");
    }

    #[test]
    fn stop_token_ids_are_checked_against_vocab() {
        let p = SamplingParams {
            stop_token_ids: vec![3, 10],
            ..SamplingParams::default()
        };
        p.validate_for_vocab(11).unwrap();
        assert_eq!(
            field_of(p.validate_for_vocab(10).unwrap_err()),
            "stop_token_ids"
        );
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let p = SamplingParams {
            temperature: 0.7,
            seed: Some(7),
            top_k: 40,
            ..SamplingParams::default()
        };
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let partial: SamplingParams = serde_json::from_str(r#"{"max_tokens": 3}"#).unwrap();
        assert_eq!(partial.max_tokens, Some(3));
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature": 1}"#).is_err());
    }
}
