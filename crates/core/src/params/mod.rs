//! Sampling parameters (the EasyDeL/vLLM field set), their validation and model defaults.
//!
//! Fields follow EasyDeL's `SamplingParams` names and defaults; `top_k <= 0` disables top-k as
//! in vLLM. [`SamplingParams::validate`] names the first bad field; token-id fields are checked
//! against the vocabulary when the engine admits a request.

mod beam;
mod generation_config;
pub(crate) mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::guided::GuidedDecodingParams;

pub use beam::BeamSearchParams;
pub use generation_config::GenerationConfig;
pub use validate::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS};

/// Which log-probabilities a sampled token carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobsMode {
    /// The model's raw `log_softmax(logits)`: what `compute_logprobs` returns for the token.
    #[default]
    Raw,
    /// Raw logprobs, plus the logprob under the distribution actually sampled from (after
    /// biases, penalties, temperature and top-k/top-p/min-p, renormalized over the kept tokens).
    RawAndProcessed,
}

/// What a streamed request yields as it progresses (EasyDeL's `RequestOutputKind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutputKind {
    /// Each update carries everything generated so far.
    #[default]
    Cumulative,
    /// Each update carries only what is new since the previous one.
    Delta,
    /// Only the final output is yielded.
    FinalOnly,
}

/// Controls one generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Sequences to return.
    pub n: usize,
    /// Sequences to sample, of which the `n` with the highest cumulative logprob are returned
    /// (`None`: `n`).
    pub best_of: Option<usize>,
    /// Subtracted once from the logit of every token already generated, in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated, in [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens in the prompt or output; `1` off.
    pub repetition_penalty: f32,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's, in [0, 1].
    pub min_p: f32,
    /// Keep the `top_k` most likely tokens; `0` or negative disables.
    pub top_k: i32,
    /// Seed of this request's random stream; `None` draws one.
    pub seed: Option<u64>,
    /// Strings that end a sequence when they appear in its detokenized text (matched across
    /// token boundaries); the text is cut before the match unless `include_stop_str_in_output`.
    pub stop: Vec<String>,
    /// Token ids that end a sequence (kept in the output tokens, like EOS).
    pub stop_token_ids: Vec<TokenId>,
    /// A regular expression that ends a sequence when its text matches it.
    pub stop_pattern: Option<String>,
    /// Words (possibly several tokens long) that are never generated.
    pub bad_words: Vec<String>,
    /// Keep generating past the model's EOS tokens.
    pub ignore_eos: bool,
    /// Maximum tokens to generate; `None` runs to the end of the context window.
    pub max_tokens: Option<usize>,
    /// EOS, stop tokens and stop strings are suppressed until this many tokens are generated.
    pub min_tokens: usize,
    /// Number of top alternatives to return per generated token (the sampled token's logprob is
    /// always returned).
    pub logprobs: Option<usize>,
    /// Number of top alternatives per prompt token; `Some` also returns each prompt token's own
    /// logprob.
    pub prompt_logprobs: Option<usize>,
    /// Return the generated text, not only token ids.
    pub detokenize: bool,
    /// Leave special tokens (e.g. `<|im_end|>`) out of the text.
    pub skip_special_tokens: bool,
    /// Put a space between special tokens and their neighbours in the text.
    pub spaces_between_special_tokens: bool,
    /// Keep the matched stop string at the end of the text.
    pub include_stop_str_in_output: bool,
    /// What streamed updates carry.
    pub output_kind: OutputKind,
    /// Keep only the last this-many prompt tokens (left truncation, as vLLM).
    pub truncate_prompt_tokens: Option<usize>,
    /// Constrain the output to a JSON schema, regex, choice or grammar.
    pub guided_decoding: Option<GuidedDecodingParams>,
    /// Added to the logits of these token ids before any other processing.
    pub logit_bias: Option<BTreeMap<TokenId, f32>>,
    /// Only these token ids may be generated.
    pub allowed_token_ids: Option<Vec<TokenId>>,
    /// Free-form extra arguments, carried through untouched for custom extensions.
    pub extra_args: BTreeMap<String, serde_json::Value>,
    /// Which logprob(s) each sampled token carries (infermux extension, RL users).
    pub logprobs_mode: LogprobsMode,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            best_of: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            stop_pattern: None,
            bad_words: Vec::new(),
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            detokenize: true,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            include_stop_str_in_output: false,
            output_kind: OutputKind::Cumulative,
            truncate_prompt_tokens: None,
            guided_decoding: None,
            logit_bias: None,
            allowed_token_ids: None,
            extra_args: BTreeMap::new(),
            logprobs_mode: LogprobsMode::Raw,
        }
    }
}

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

    /// Sequences sampled before the best `n` are kept.
    pub fn samples_drawn(&self) -> usize {
        self.best_of.unwrap_or(self.n).max(self.n)
    }

    /// Whether any penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Whether the request needs the detokenized text while decoding (stops, or text output).
    pub fn needs_text(&self) -> bool {
        self.detokenize || !self.stop.is_empty() || self.stop_pattern.is_some()
    }

    /// Parses parameters from JSON, rejecting unknown fields.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Serializes to JSON (round-trips through [`SamplingParams::from_json`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("sampling params always serialize")
    }
}

#[cfg(test)]
mod tests;
