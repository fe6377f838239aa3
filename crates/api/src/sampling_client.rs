//! `SamplingClient`: Tinker's sampling API over an in-process engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infermux_core::backend::{WeightUpdateError, check_same_model, open_checkpoint};
use infermux_core::engine::AdapterInfo;
use infermux_core::engine::{PauseMode, PauseReport, UpdateMode, WeightUpdate, WeightUpdateReport};
use infermux_core::{
    AdapterError, BeamSearchParams, BeamSearchRequest, Engine, GenerateRequest, GenerateStream,
    ModelConfig, ModelInput, Pending, PromptLogprobs, SamplingParams,
};

use crate::BackendKind;
use crate::error::Result;
use crate::sampler::SamplerFuture;
use crate::tokenizer::Tokenizer;
use crate::types::{SampleResponse, ScoreResponse, prompt_logprobs_of};

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
    /// The served model's config: a weight update's checkpoint must match it.
    config: ModelConfig,
    /// The backend serving it (an ONNX update folder may hold only a graph).
    backend: BackendKind,
}

impl SamplingClient {
    pub(crate) fn new(
        engine: Engine,
        tokenizer: Tokenizer,
        base_model: String,
        config: ModelConfig,
        backend: BackendKind,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                tokenizer,
                base_model,
                config,
                backend,
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

    /// [`SamplingClient::compute_logprobs`] with the weight version the logprobs were computed
    /// with and the prompt tokens the prefix cache served.
    pub fn score(&self, prompt: ModelInput) -> SamplerFuture<ScoreResponse> {
        self.inner.engine.score(&prompt).map(ScoreResponse::from)
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

    /// Replaces the served weights with the Hugging Face checkpoint folder `path` (the served
    /// model's config and shapes; full or sharded safetensors) without restarting, loaded by
    /// the backend's own loader. [`UpdateMode::Drain`]: running requests finish on the old
    /// weights while new ones wait; [`UpdateMode::Abort`]: running and queued requests end at
    /// once with `EngineError::Aborted`. Resolves once the new weights serve, with the new
    /// [`SamplingClient::weight_version`]. A checkpoint of another model is a
    /// [`WeightUpdateError::Mismatch`] naming each differing field, found before any request
    /// is drained or aborted; on any error the old weights keep serving. The tokenizer is kept.
    pub fn update_weights_from_disk(
        &self,
        path: impl Into<PathBuf>,
        mode: UpdateMode,
    ) -> Pending<WeightUpdateReport, WeightUpdateError> {
        self.update_weights(WeightUpdate::new(path, mode))
    }

    /// [`SamplingClient::update_weights_from_disk`] with every option (version, keep paused).
    pub fn update_weights(
        &self,
        update: WeightUpdate,
    ) -> Pending<WeightUpdateReport, WeightUpdateError> {
        // Checked here (config and safetensors headers, no tensor data), so a wrong folder
        // fails at once: nothing drained, nothing aborted. The backend checks again as it loads.
        match self.check_checkpoint(&update.path) {
            Ok(()) => self.inner.engine.update_weights(update),
            Err(err) => Pending::ready(Err(err)),
        }
    }

    fn check_checkpoint(&self, path: &Path) -> std::result::Result<(), WeightUpdateError> {
        let graph_only = self.inner.backend == BackendKind::Onnx
            && !path.join("model.safetensors").is_file()
            && !path.join("model.safetensors.index.json").is_file();
        if graph_only {
            let (config, _) = infermux_core::model::read_config(path)?;
            check_same_model(path, &self.inner.config, &config)
        } else {
            open_checkpoint(path, &self.inner.config).map(drop)
        }
    }

    /// Pauses generation: nothing steps until [`SamplingClient::continue_generation`]; running
    /// requests keep their state and wait ([`PauseMode::InPlace`]) or end
    /// ([`PauseMode::Abort`]); new requests queue.
    pub fn pause_generation(&self, mode: PauseMode) -> SamplerFuture<PauseReport> {
        self.inner.engine.pause(mode).map(|r| r)
    }

    /// Resumes generation after [`SamplingClient::pause_generation`].
    pub fn continue_generation(&self) -> SamplerFuture<()> {
        self.inner.engine.resume().map(|r| r)
    }

    /// Drops every cached prefix (the prefix cache; see `infermux_core::engine::prefix`);
    /// resolves to how many were dropped.
    pub fn flush_prefix_cache(&self) -> SamplerFuture<usize> {
        self.inner.engine.flush_prefix_cache().map(|r| r)
    }

    /// The version of the weights served: `"0"` for those loaded at start, then each update's
    /// `weight_version`, or the number of updates so far when it named none.
    pub fn weight_version(&self) -> String {
        self.inner.engine.weight_version()
    }

    /// Loads the PEFT LoRA adapter in `path` under `name` into this client's engine (no
    /// restart, nothing drained): [`SamplingClient::with_lora`]`(name)` then samples from it,
    /// in the same batches as the base and other adapters.
    pub fn load_lora(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Pending<AdapterInfo, AdapterError> {
        self.inner.engine.load_adapter(name, path.as_ref())
    }

    /// Takes adapter `name` out of service (running requests on it finish first).
    pub fn unload_lora(&self, name: &str) -> Pending<AdapterInfo, AdapterError> {
        self.inner.engine.unload_adapter(name)
    }

    /// The loaded adapters.
    pub fn loras(&self) -> Vec<AdapterInfo> {
        self.inner.engine.adapters()
    }

    /// A client on the same engine whose requests run on the loaded adapter `name`; its
    /// responses' `policy_version` names the adapter's version.
    pub fn with_lora(&self, name: &str) -> Result<SamplingClient> {
        let engine = self.inner.engine.with_adapter(name)?;
        Ok(self.on_engine(engine))
    }

    /// Tinker's sampling client made from an adapter's `model_path`: loads the adapter in
    /// `path` (named by its path) and returns a client that samples from it.
    pub fn create_lora_client(&self, path: impl AsRef<Path>) -> Result<SamplingClient> {
        let path = path.as_ref();
        let name = path.display().to_string();
        self.load_lora(&name, path).wait()?;
        self.with_lora(&name)
    }

    /// A client on the base weights of this client's engine.
    pub fn base(&self) -> SamplingClient {
        self.on_engine(self.inner.engine.base())
    }

    /// The adapter this client's requests run on, if any.
    pub fn lora_name(&self) -> Option<&str> {
        self.inner.engine.adapter_name()
    }

    fn on_engine(&self, engine: Engine) -> SamplingClient {
        Self::new(
            engine,
            self.inner.tokenizer.clone(),
            self.inner.base_model.clone(),
            self.inner.config.clone(),
            self.inner.backend,
        )
    }

    /// The engine underneath, for stats and advanced use.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}
