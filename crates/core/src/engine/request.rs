//! What callers submit to the engine and what they get back.

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::input::ModelInput;
use crate::params::{BeamSearchParams, SamplingParams};

/// Which prompt log-probabilities a request wants (Tinker's two switches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptLogprobs {
    /// Return the logprob of each prompt token (the first is `None`).
    pub include: bool,
    /// Also return the `top_k` most likely tokens at each prompt position (0: none).
    pub top_k: usize,
}

impl PromptLogprobs {
    /// Whether any prompt logits are needed at all.
    pub fn wanted(&self) -> bool {
        self.include || self.top_k > 0
    }

    /// These switches merged with `SamplingParams::prompt_logprobs` (vLLM's single knob).
    pub fn merged_with(self, params: &SamplingParams) -> Self {
        match params.prompt_logprobs {
            Some(k) => Self {
                include: true,
                top_k: self.top_k.max(k),
            },
            None => self,
        }
    }
}

/// Sample `params.n` continuations of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: ModelInput,
    /// How to sample (`n` continuations share the prompt's prefill).
    pub params: SamplingParams,
    /// Which prompt logprobs to return (merged with `params.prompt_logprobs`).
    pub prompt_logprobs: PromptLogprobs,
}

impl GenerateRequest {
    /// A request for `prompt` under `params`, no extra prompt logprobs.
    pub fn new(prompt: impl Into<ModelInput>, params: SamplingParams) -> Self {
        Self {
            prompt: prompt.into(),
            params,
            prompt_logprobs: PromptLogprobs::default(),
        }
    }
}

/// Beam search over one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamSearchRequest {
    /// The prompt.
    pub prompt: ModelInput,
    /// Beam width, length and scoring.
    pub params: BeamSearchParams,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced one of its EOS tokens.
    Eos,
    /// A token from `stop_token_ids` was produced.
    StopToken,
    /// A stop string or the stop pattern matched the text.
    StopString,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI/Tinker spelling: `"stop"` or `"length"`.
    pub fn as_openai_str(self) -> &'static str {
        match self {
            Self::Eos | Self::StopToken | Self::StopString => "stop",
            Self::Length => "length",
        }
    }
}

/// What exactly stopped a sequence (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopReason {
    /// The stop token id (EOS or one of `stop_token_ids`).
    Token(TokenId),
    /// The text that matched a stop string or the stop pattern.
    String(String),
}

/// Top alternatives at one position: `(token, logprob)`, best first.
pub type TopLogprobs = Vec<(TokenId, f32)>;

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSequence {
    /// Its index among the request's samples.
    pub index: usize,
    /// Generated ids (a final EOS or stop token included).
    pub tokens: Vec<TokenId>,
    /// Raw model logprob of each generated token.
    pub logprobs: Vec<f32>,
    /// Logprob of each token under the processed distribution (`LogprobsMode::RawAndProcessed`).
    pub processed_logprobs: Option<Vec<f32>>,
    /// Top alternatives per generated token, when `SamplingParams::logprobs` asked for them.
    pub top_logprobs: Option<Vec<TopLogprobs>>,
    /// Sum of the raw logprobs (beam search: the beam's score before the length penalty).
    pub cumulative_logprob: f64,
    /// The detokenized text (cut at a stop string), when the engine has a tokenizer and
    /// `detokenize` is on.
    pub text: Option<String>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// The token or text that stopped it, if any.
    pub stop_reason: Option<StopReason>,
}

impl GeneratedSequence {
    pub(crate) fn empty(index: usize) -> Self {
        Self {
            index,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            processed_logprobs: None,
            top_logprobs: None,
            cumulative_logprob: 0.0,
            text: None,
            finish_reason: FinishReason::Length,
            stop_reason: None,
        }
    }
}

/// The result of a [`GenerateRequest`] or a scoring request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// Number of prompt tokens (after `truncate_prompt_tokens`).
    pub prompt_len: usize,
    /// The continuations, in sample order (empty for scoring).
    pub sequences: Vec<GeneratedSequence>,
    /// Per prompt token logprob (first `None`), when asked for.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Per prompt position top alternatives (first `None`), when asked for.
    pub topk_prompt_logprobs: Option<Vec<Option<TopLogprobs>>>,
    /// The version of the weights every token and logprob here was computed with
    /// ([`crate::Engine::weight_version`] when the request was admitted: weights change only
    /// while nothing runs, so one request never mixes versions).
    #[serde(default)]
    pub weight_version: String,
    /// Prompt tokens whose KV came from the prefix cache instead of a prefill.
    #[serde(default)]
    pub cached_prompt_tokens: usize,
}

/// One streamed update of a sequence: what is new (`DELTA`) or everything so far
/// (`CUMULATIVE`), per the request's `output_kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceUpdate {
    /// The sample's index.
    pub index: usize,
    /// Token ids.
    pub tokens: Vec<TokenId>,
    /// Raw logprobs of `tokens`.
    pub logprobs: Vec<f32>,
    /// Processed logprobs of `tokens`, in `RawAndProcessed` mode.
    pub processed_logprobs: Option<Vec<f32>>,
    /// Top alternatives of `tokens`, when asked for.
    pub top_logprobs: Option<Vec<TopLogprobs>>,
    /// Text (never a split character; a tail that may become a stop string is held back).
    pub text: String,
    /// Set on the sequence's last update.
    pub finish_reason: Option<FinishReason>,
    /// What stopped it, on the last update.
    pub stop_reason: Option<StopReason>,
}

/// One item of a request's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamUpdate {
    /// Number of prompt tokens.
    pub prompt_len: usize,
    /// Sequences with news in this update.
    pub sequences: Vec<SequenceUpdate>,
    /// Whether this is the request's last update.
    pub finished: bool,
    /// Prompt logprobs, on the first update, when asked for.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Top prompt alternatives, on the first update, when asked for.
    pub topk_prompt_logprobs: Option<Vec<Option<TopLogprobs>>>,
    /// The version of the weights this update was computed with (the same in every update
    /// of a request; see [`GenerateOutput::weight_version`]).
    #[serde(default)]
    pub weight_version: String,
    /// Prompt tokens whose KV came from the prefix cache instead of a prefill.
    #[serde(default)]
    pub cached_prompt_tokens: usize,
}
