//! `SamplingClient`: Tinker's sampling API over an in-process engine.

use std::sync::Arc;

use infermux_core::{
    BeamSearchParams, BeamSearchRequest, Engine, GenerateRequest, GenerateStream, ModelInput,
    PromptLogprobs, SamplingParams,
};

use crate::error::Result;
use crate::sampler::SamplerFuture;
use crate::tokenizer::Tokenizer;
use crate::types::{SampleResponse, prompt_logprobs_of};

/// Samples from and scores with one loaded model. Cheap to clone; safe to share across threads
/// and async tasks, which all feed the same continuously batched engine.
#[derive(Clone, Debug)]
pub struct SamplingClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    tokenizer: Tokenizer,
    base_model: String,
}

impl SamplingClient {
    pub(crate) fn new(engine: Engine, tokenizer: Tokenizer, base_model: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                tokenizer,
                base_model,
            }),
        }
    }

    /// Draws `num_samples` continuations of `prompt` (sharing one prefill), optionally with the
    /// prompt's logprobs and its top-k alternatives per position. Await the result or `.wait()`.
    pub fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> SamplerFuture<SampleResponse> {
        let request = GenerateRequest {
            prompt,
            params: SamplingParams {
                n: num_samples,
                ..sampling_params
            },
            prompt_logprobs: PromptLogprobs {
                include: include_prompt_logprobs,
                top_k: topk_prompt_logprobs,
            },
        };
        self.inner
            .engine
            .generate(request)
            .map(SampleResponse::from)
    }

    /// Streams the continuations of `prompt` as they are generated: each item carries what
    /// `sampling_params.output_kind` asks for (`Delta`: only what is new). Iterate it, or use it
    /// as a `futures::Stream`; dropping it cancels the request and frees its KV slots.
    pub fn sample_stream(
        &self,
        prompt: ModelInput,
        sampling_params: SamplingParams,
    ) -> GenerateStream {
        self.inner
            .engine
            .generate_stream(GenerateRequest::new(prompt, sampling_params))
    }

    /// Beam search: the `beam_width` most likely continuations, best first.
    pub fn beam_search(
        &self,
        prompt: ModelInput,
        params: BeamSearchParams,
    ) -> SamplerFuture<SampleResponse> {
        let request = BeamSearchRequest { prompt, params };
        self.inner
            .engine
            .beam_search(request)
            .map(SampleResponse::from)
    }

    /// Async form of [`SamplingClient::sample`].
    pub async fn sample_async(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse> {
        self.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
        )
        .await
    }

    /// Logprob of each prompt token given the ones before it; the first entry is `None`.
    pub fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        self.inner.engine.score(&prompt).map(prompt_logprobs_of)
    }

    /// Async form of [`SamplingClient::compute_logprobs`].
    pub async fn compute_logprobs_async(&self, prompt: ModelInput) -> Result<Vec<Option<f32>>> {
        self.compute_logprobs(prompt).await
    }

    /// The model's tokenizer.
    pub fn get_tokenizer(&self) -> Tokenizer {
        self.inner.tokenizer.clone()
    }

    /// The name of the served model (its folder name, or the registry name it was opened by).
    pub fn get_base_model(&self) -> String {
        self.inner.base_model.clone()
    }

    /// Async form of [`SamplingClient::get_base_model`].
    pub async fn get_base_model_async(&self) -> String {
        self.get_base_model()
    }

    /// The engine underneath, for stats and advanced use.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}
