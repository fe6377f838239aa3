//! What callers submit to the engine and what they get back.

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::input::ModelInput;
use crate::params::SamplingParams;

/// Which prompt log-probabilities a request wants.
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
}

/// Sample `num_samples` continuations of one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: ModelInput,
    /// Independent continuations to draw; they share the prompt's prefill.
    pub num_samples: usize,
    /// How to sample.
    pub params: SamplingParams,
    /// Which prompt logprobs to return.
    pub prompt_logprobs: PromptLogprobs,
}

impl GenerateRequest {
    /// One sample of `prompt` under `params`, no prompt logprobs.
    pub fn new(prompt: impl Into<ModelInput>, params: SamplingParams) -> Self {
        Self {
            prompt: prompt.into(),
            num_samples: 1,
            params,
            prompt_logprobs: PromptLogprobs::default(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced one of its EOS tokens.
    Eos,
    /// A token from `stop_token_ids` was produced.
    StopToken,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI/Tinker spelling: `"stop"` or `"length"`.
    pub fn as_openai_str(self) -> &'static str {
        match self {
            Self::Eos | Self::StopToken => "stop",
            Self::Length => "length",
        }
    }
}

/// Top alternatives at one position: `(token, logprob)`, best first.
pub type TopLogprobs = Vec<(TokenId, f32)>;

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSequence {
    /// Generated ids (a final EOS or stop token included).
    pub tokens: Vec<TokenId>,
    /// Raw model logprob of each generated token.
    pub logprobs: Vec<f32>,
    /// Logprob of each token under the processed distribution (`LogprobsMode::RawAndProcessed`).
    pub processed_logprobs: Option<Vec<f32>>,
    /// Top alternatives per generated token, when `SamplingParams::logprobs` asked for them.
    pub top_logprobs: Option<Vec<TopLogprobs>>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// The result of a [`GenerateRequest`] or a scoring request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// Number of prompt tokens.
    pub prompt_len: usize,
    /// The continuations, in sample order (empty for scoring).
    pub sequences: Vec<GeneratedSequence>,
    /// Per prompt token logprob (first `None`), when asked for.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Per prompt position top alternatives (first `None`), when asked for.
    pub topk_prompt_logprobs: Option<Vec<Option<TopLogprobs>>>,
}
