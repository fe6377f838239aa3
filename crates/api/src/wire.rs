//! JSON shapes of `infermux serve`'s native endpoints (`/v1/sample`, `/v1/compute_logprobs`),
//! shared by the server and the remote client so both sides agree by construction.

use infermux_core::{ModelInput, SamplingParams};
use serde::{Deserialize, Serialize, Serializer};

/// Body of `POST /v1/sample` (Tinker's `sample` arguments). The reply is a
/// [`SampleResponse`](crate::SampleResponse).
///
/// `num_samples` is the sample count; `sampling_params.n` is not a second one. A body that
/// sets `sampling_params.n` explicitly to another value is refused (400 naming
/// `sampling_params.n`, see [`SampleRequest::conflicting_n`]) rather than silently ignored;
/// serializing writes `sampling_params.n = num_samples`, so this crate's own client never
/// conflicts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// A loaded LoRA adapter to sample from, by name (or a served model's name); absent: the
    /// first served model.
    #[serde(default)]
    pub model: Option<String>,
}

fn one() -> usize {
    1
}

impl SampleRequest {
    /// `sampling_params.n` when `raw` (the JSON this request was read from) sets it explicitly
    /// to a value other than `num_samples`: a conflict the server rejects. `n: 1` is the
    /// default that every serialized vLLM/EasyDeL `SamplingParams` carries (and older clients
    /// send beside `num_samples`), so it counts as unset.
    pub fn conflicting_n(&self, raw: &[u8]) -> Option<usize> {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            sampling_params: Option<Params>,
        }
        #[derive(Deserialize)]
        struct Params {
            #[serde(default)]
            n: Option<serde::de::IgnoredAny>,
        }
        let explicit = serde_json::from_slice::<Body>(raw)
            .ok()
            .and_then(|b| b.sampling_params)
            .is_some_and(|p| p.n.is_some());
        let n = self.sampling_params.n;
        (explicit && n != 1 && n != self.num_samples).then_some(n)
    }
}

impl Serialize for SampleRequest {
    /// The fields as declared, with `sampling_params.n` set to `num_samples` (the one count).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            prompt: &'a ModelInput,
            num_samples: usize,
            sampling_params: &'a SamplingParams,
            include_prompt_logprobs: bool,
            topk_prompt_logprobs: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            model: &'a Option<String>,
        }
        let params = SamplingParams {
            n: self.num_samples,
            ..self.sampling_params.clone()
        };
        Wire {
            prompt: &self.prompt,
            num_samples: self.num_samples,
            sampling_params: &params,
            include_prompt_logprobs: self.include_prompt_logprobs,
            topk_prompt_logprobs: self.topk_prompt_logprobs,
            model: &self.model,
        }
        .serialize(serializer)
    }
}

/// Body of `POST /v1/compute_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeLogprobsRequest {
    /// The sequence to score.
    pub prompt: ModelInput,
    /// A loaded LoRA adapter to score with, by name (or a served model's name); absent: the
    /// first served model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Reply of `POST /v1/compute_logprobs`: one entry per prompt token, the first `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeLogprobsResponse {
    /// Logprob of each token given the ones before it.
    pub logprobs: Vec<Option<f32>>,
    /// The weights' version they were computed with (absent from older servers).
    #[serde(default)]
    pub policy_version: String,
    /// Prompt tokens served from the prefix cache.
    #[serde(default)]
    pub prompt_cache_hit_tokens: usize,
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
    /// The request field at fault, if any (`null` otherwise: OpenAI always sends the key).
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code, if any (`null` otherwise, as OpenAI sends it).
    #[serde(default)]
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> SampleRequest {
        serde_json::from_str(raw).unwrap()
    }

    #[test]
    fn an_explicit_n_other_than_num_samples_conflicts() {
        let prompt = r#""prompt": {"chunks": []}"#;
        for (body, conflict) in [
            (format!(r#"{{{prompt}, "num_samples": 2}}"#), None),
            (
                format!(r#"{{{prompt}, "num_samples": 2, "sampling_params": {{"n": 2}}}}"#),
                None,
            ),
            (
                format!(r#"{{{prompt}, "num_samples": 2, "sampling_params": {{"n": 3}}}}"#),
                Some(3),
            ),
            (
                format!(r#"{{{prompt}, "sampling_params": {{"n": 4, "max_tokens": 1}}}}"#),
                Some(4),
            ),
            // A full SamplingParams (an older client, or vLLM's defaults) carries `n: 1`.
            (
                format!(r#"{{{prompt}, "num_samples": 4, "sampling_params": {{"n": 1}}}}"#),
                None,
            ),
            (
                format!(r#"{{{prompt}, "sampling_params": {{"n": 0}}}}"#),
                Some(0),
            ),
        ] {
            let req = parse(&body);
            assert_eq!(req.conflicting_n(body.as_bytes()), conflict, "{body}");
        }
        // What this crate sends never conflicts.
        let req = SampleRequest {
            num_samples: 5,
            ..parse(&format!("{{{prompt}}}"))
        };
        let sent = serde_json::to_vec(&req).unwrap();
        let back: SampleRequest = serde_json::from_slice(&sent).unwrap();
        assert_eq!(back.conflicting_n(&sent), None);
        assert_eq!((back.num_samples, back.sampling_params.n), (5, 5));
    }
}
