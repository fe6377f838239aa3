//! Response types with Tinker's shapes (`SampleResponse`, `SampledSequence`, `StopReason`).

use infermux_core::{FinishReason, GenerateOutput, GeneratedSequence, TokenId, TopLogprobs};
use serde::{Deserialize, Serialize};

/// Why a sequence stopped, as Tinker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// An EOS or stop token ended it.
    Stop,
    /// `max_tokens` or the context window ended it.
    Length,
}

impl From<FinishReason> for StopReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Eos | FinishReason::StopToken | FinishReason::StopString => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledSequence {
    /// Generated token ids (a final EOS/stop token included).
    pub tokens: Vec<TokenId>,
    /// Raw model logprob of each token: equal to `compute_logprobs` of the same sequence.
    pub logprobs: Option<Vec<f32>>,
    /// Tinker's stop reason.
    pub stop_reason: StopReason,
    /// The precise reason (EOS, stop token, stop string, length).
    pub finish_reason: FinishReason,
    /// The token id or text that stopped it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<infermux_core::StopReason>,
    /// The detokenized text (cut before a stop string unless `include_stop_str_in_output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Logprobs under the processed sampling distribution, if `LogprobsMode::RawAndProcessed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_logprobs: Option<Vec<f32>>,
    /// Top alternatives per generated token, if `SamplingParams::logprobs` asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TopLogprobs>>,
}

impl From<GeneratedSequence> for SampledSequence {
    fn from(s: GeneratedSequence) -> Self {
        Self {
            tokens: s.tokens,
            logprobs: Some(s.logprobs),
            stop_reason: s.finish_reason.into(),
            finish_reason: s.finish_reason,
            stopped_by: s.stop_reason,
            text: s.text,
            processed_logprobs: s.processed_logprobs,
            top_logprobs: s.top_logprobs,
        }
    }
}

/// The result of `SamplingClient::sample`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleResponse {
    /// One entry per requested sample.
    pub sequences: Vec<SampledSequence>,
    /// Per prompt token logprob (first `None`), when `include_prompt_logprobs`.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Per prompt position top-k alternatives (first `None`), when `topk_prompt_logprobs > 0`.
    pub topk_prompt_logprobs: Option<Vec<Option<TopLogprobs>>>,
    /// The version of the weights every sequence here was sampled from (Tinker's
    /// `policy_version`; `"0"` for the weights loaded at start, then each update's
    /// `weight_version`).
    #[serde(default)]
    pub policy_version: String,
    /// Prompt tokens served from the prefix cache (Tinker's `prompt_cache_hit_tokens`).
    #[serde(default)]
    pub prompt_cache_hit_tokens: usize,
}

impl From<GenerateOutput> for SampleResponse {
    fn from(o: GenerateOutput) -> Self {
        Self {
            sequences: o.sequences.into_iter().map(Into::into).collect(),
            prompt_logprobs: o.prompt_logprobs,
            topk_prompt_logprobs: o.topk_prompt_logprobs,
            policy_version: o.weight_version,
            prompt_cache_hit_tokens: o.cached_prompt_tokens,
        }
    }
}

/// The result of `SamplingClient::score`: `compute_logprobs`' list with the weight version it
/// was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreResponse {
    /// Logprob of each prompt token given the ones before it; the first is `None`.
    pub logprobs: Vec<Option<f32>>,
    /// The weights' version (see [`SampleResponse::policy_version`]).
    pub policy_version: String,
    /// Prompt tokens served from the prefix cache.
    pub prompt_cache_hit_tokens: usize,
}

impl From<GenerateOutput> for ScoreResponse {
    fn from(o: GenerateOutput) -> Self {
        Self {
            logprobs: o.prompt_logprobs.unwrap_or_default(),
            policy_version: o.weight_version,
            prompt_cache_hit_tokens: o.cached_prompt_tokens,
        }
    }
}

/// The prompt logprobs of a scoring request: one entry per token, the first `None`.
pub(crate) fn prompt_logprobs_of(o: GenerateOutput) -> Vec<Option<f32>> {
    o.prompt_logprobs.unwrap_or_default()
}
