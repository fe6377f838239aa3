//! JSON shapes of `infermux serve`'s native endpoints (`/v1/sample`, `/v1/compute_logprobs`),
//! shared by the server and the remote client so both sides agree by construction.

use infermux_core::{ModelInput, SamplingParams};
use serde::{Deserialize, Serialize};

/// Body of `POST /v1/sample` (Tinker's `sample` arguments). The reply is a
/// [`SampleResponse`](crate::SampleResponse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    /// The prompt, as token chunks.
    pub prompt: ModelInput,
    /// Continuations to draw.
    #[serde(default = "one")]
    pub num_samples: usize,
    /// How to sample.
    #[serde(default)]
    pub sampling_params: SamplingParams,
    /// Return each prompt token's logprob.
    #[serde(default)]
    pub include_prompt_logprobs: bool,
    /// Return this many alternatives per prompt position.
    #[serde(default)]
    pub topk_prompt_logprobs: usize,
}

fn one() -> usize {
    1
}

/// Body of `POST /v1/compute_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeLogprobsRequest {
    /// The sequence to score.
    pub prompt: ModelInput,
}

/// Reply of `POST /v1/compute_logprobs`: one entry per prompt token, the first `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeLogprobsResponse {
    /// Logprob of each token given the ones before it.
    pub logprobs: Vec<Option<f32>>,
}

/// Every error reply's body (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The fields of an error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable message, naming the field at fault where there is one.
    pub message: String,
    /// `invalid_request_error`, `overloaded_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A machine-readable code, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}
