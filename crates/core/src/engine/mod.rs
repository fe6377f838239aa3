//! The engine: a thread that owns a [`Backend`] and serves requests with continuous batching.
//!
//! [`Engine`] is a cheap, cloneable handle (an actor handle, as in TGI's queue): requests are
//! validated on the caller's thread, then sent to the engine thread, which interleaves decode
//! steps and prefill chunks of all running requests into shared forward passes.
//!
//! A request is admitted when its KV slots are free and its KV reservation fits the byte budget
//! ([`budget`]); what it does with its logits (sample, beam search, score) is its group kind
//! (`group.rs`), which the scheduler's loop is generic over.
//!
//! Control commands — replacing the weights from disk, pausing and resuming — are processed
//! between steps (`control.rs`); a weight update swaps only while no request runs.

mod adapters;
mod beam;
pub mod budget;
mod control;
mod group;
mod job;
mod pending;
pub mod prefix;
mod request;
mod scheduler;
mod sequence;
mod shared;
mod stream;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

pub use adapters::{AdapterInfo, MAX_ADAPTER_NAME_BYTES};
pub use control::{PauseMode, PauseReport, UpdateMode, WeightUpdate, WeightUpdateReport};
pub use pending::Pending;
pub use request::{
    BeamSearchRequest, FinishReason, GenerateOutput, GenerateRequest, GeneratedSequence,
    PromptLogprobs, SequenceUpdate, StopReason, StreamUpdate, TopLogprobs,
};
pub use scheduler::EngineStats;
pub use stream::GenerateStream;

use crate::TokenId;
use crate::backend::{Backend, ModelInfo, WeightUpdateError};
use crate::error::{EngineError, ValidationError};
use crate::guided::GuidedDecoder;
use crate::input::ModelInput;
use crate::model::lora::{AdapterError, LoraAdapter};
use crate::model::plan::WeightPlan;
use crate::params::{MAX_TOP_LOGPROBS, SamplingParams};
use crate::sampling::Processors;
use crate::sampling::batch::panic_message;
use crate::sampling::rng::fresh_seed;
use crate::text::{StopMatcher, TextCodec};
use adapters::{AdapterRef, Registry};
use job::{Job, JobKind, Replier};
use scheduler::Scheduler;
use shared::{ExitGuard, Shared};

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences (KV slots) decoding at once; a request needs one per sample
    /// (`2 × beam_width` for beam search).
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks.
    pub max_num_batched_tokens: usize,
    /// Bytes the KV cache of all sequences may take (vLLM's `kv_cache_memory_bytes`). Each
    /// request reserves its sequences' KV at their full length (`prompt + max_tokens`, rounded
    /// up to the KV granule) while it runs; requests that do not fit yet wait in the queue, and
    /// one that could never fit is rejected at submit. `None`: a share of the memory available
    /// when the engine starts ([`budget::default_kv_budget_bytes`]).
    pub kv_budget_bytes: Option<u64>,
    /// Keep finished sequences' KV for later requests that extend them (vLLM's
    /// `enable_prefix_caching`, on by default): see [`prefix`].
    pub prefix_caching: bool,
    /// Most LoRA adapters loaded at once (vLLM's `max_loras`).
    pub max_loras: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            kv_budget_bytes: None,
            prefix_caching: true,
            max_loras: 8,
        }
    }
}

/// Optional services an engine uses beyond the backend: a tokenizer for text (stop strings,
/// bad words, detokenized output) and a grammar engine for guided decoding.
#[derive(Clone, Default)]
pub struct EngineTools {
    /// Turns tokens into text and words into tokens.
    pub codec: Option<Arc<dyn TextCodec>>,
    /// Compiles `guided_decoding` parameters.
    pub guided: Option<Arc<dyn GuidedDecoder>>,
}

/// What a handle sends the engine thread.
enum Command {
    Submit(Box<Job>),
    UpdateWeights {
        request: WeightUpdate,
        reply: flume::Sender<Result<WeightUpdateReport, WeightUpdateError>>,
    },
    Pause {
        mode: PauseMode,
        reply: flume::Sender<Result<PauseReport, EngineError>>,
    },
    Resume {
        reply: flume::Sender<Result<(), EngineError>>,
    },
    FlushPrefixCache {
        reply: flume::Sender<Result<usize, EngineError>>,
    },
    LoadAdapter {
        name: String,
        adapter: Box<LoraAdapter>,
        reply: flume::Sender<Result<AdapterInfo, AdapterError>>,
    },
    UnloadAdapter {
        name: String,
        reply: flume::Sender<Result<AdapterInfo, AdapterError>>,
    },
    /// Wakes the engine thread (a weight update's new weights are read).
    Wake,
}

/// How often a paused engine thread wakes to drop cancelled requests and publish its stats
/// (a paused engine is alive: readiness probes read the publish time).
const PAUSED_TICK: Duration = Duration::from_millis(500);

/// A handle to a running engine; clone it freely, use it from any thread.
#[derive(Clone)]
pub struct Engine {
    tx: flume::Sender<Command>,
    /// What the engine thread publishes (stats, queue depth, liveness).
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    config: EngineConfig,
    tools: EngineTools,
    /// The model's tensors, to read adapters against (`None`: the backend runs none).
    plan: Option<Arc<WeightPlan>>,
    /// The live adapters, as the engine thread publishes them.
    registry: Arc<Registry>,
    /// The adapter this handle's requests run on (`None`: the base weights).
    adapter: Option<AdapterRef>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.info)
            .field("config", &self.config)
            .field("has_codec", &self.tools.codec.is_some())
            .field("has_guided", &self.tools.guided.is_some())
            .field("adapter", &self.adapter.as_ref().map(|a| &a.name))
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread around `backend`, without text services.
    pub fn start<B: Backend + 'static>(
        backend: B,
        config: EngineConfig,
    ) -> Result<Self, ValidationError> {
        Self::start_with(backend, config, EngineTools::default())
    }

    /// Starts the engine thread around `backend` with a tokenizer and/or grammar engine.
    /// The thread ends when the last handle drops.
    ///
    /// Resolves the KV budget (reading available memory when none is configured) and sets it
    /// on the backend, so no KV allocation passes it.
    pub fn start_with<B: Backend + 'static>(
        mut backend: B,
        mut config: EngineConfig,
        tools: EngineTools,
    ) -> Result<Self, ValidationError> {
        if config.max_num_seqs == 0 {
            return Err(ValidationError::field("max_num_seqs", "must be at least 1"));
        }
        if config.max_num_batched_tokens == 0 {
            return Err(ValidationError::field(
                "max_num_batched_tokens",
                "must be at least 1",
            ));
        }
        if config.kv_budget_bytes == Some(0) {
            return Err(ValidationError::field(
                "kv_budget_bytes",
                "must be at least 1 byte",
            ));
        }
        let kv_budget = config
            .kv_budget_bytes
            .unwrap_or_else(budget::default_kv_budget_bytes);
        config.kv_budget_bytes = Some(kv_budget);
        backend.set_kv_budget(Some(kv_budget));
        let info = Arc::new(backend.info().clone());
        let plan = backend.weight_plan().cloned().map(Arc::new);
        let (tx, rx) = flume::unbounded();
        let wake = tx.downgrade();
        let shared = Arc::new(Shared::default());
        let registry = Arc::new(Registry::default());
        let scheduler = Scheduler::new(
            config,
            (*info).clone(),
            tools.codec.clone(),
            kv_budget,
            shared.clone(),
            registry.clone(),
        );
        shared.publish(scheduler.stats(backend.kv_usage()));
        let guard = ExitGuard(shared.clone());
        std::thread::Builder::new()
            .name("infermux-engine".into())
            .spawn(move || run(backend, scheduler, rx, wake, guard))
            .map_err(|e| {
                ValidationError::field("engine", format!("cannot spawn the engine thread: {e}"))
            })?;
        Ok(Self {
            tx,
            shared,
            info,
            config,
            tools,
            plan,
            registry,
            adapter: None,
        })
    }

    /// The served model's facts.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The scheduler limits this engine runs with (`kv_budget_bytes` resolved: always `Some`).
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// The KV byte budget this engine admits requests against (configured, or the default
    /// share of the memory that was available at start).
    pub fn kv_budget_bytes(&self) -> u64 {
        self.config.kv_budget_bytes.unwrap_or(u64::MAX)
    }

    /// The tokenizer the engine detokenizes with, if any.
    pub fn codec(&self) -> Option<&Arc<dyn TextCodec>> {
        self.tools.codec.as_ref()
    }

    /// Samples continuations of a prompt; resolves once all are done. Invalid requests resolve
    /// at once to a typed error.
    pub fn generate(&self, request: GenerateRequest) -> Pending<GenerateOutput> {
        let (tx, rx) = flume::bounded(1);
        match self
            .prepare(request, Replier::Final(tx))
            .and_then(|job| self.check_kv(job))
        {
            Ok(job) => self.submit(job, Pending::from_channel(rx)),
            Err(err) => Pending::ready(Err(err.into())),
        }
    }

    /// Samples continuations of a prompt as a stream of updates (`output_kind` decides what
    /// each carries). Dropping the stream cancels the request and frees its KV slots.
    pub fn generate_stream(&self, request: GenerateRequest) -> GenerateStream {
        let (tx, rx) = flume::unbounded();
        let params = &request.params;
        if params.samples_drawn() > params.n {
            return GenerateStream::failed(
                ValidationError::field("best_of", "streaming needs best_of == n").into(),
            );
        }
        match self
            .prepare(request, Replier::Stream(tx))
            .and_then(|job| self.check_kv(job))
        {
            Ok(job) => self.submit(job, GenerateStream::new(rx)),
            Err(err) => GenerateStream::failed(err.into()),
        }
    }

    /// Beam search: the `beam_width` best sequences, best first.
    pub fn beam_search(&self, request: BeamSearchRequest) -> Pending<GenerateOutput> {
        let (tx, rx) = flume::bounded(1);
        let job = request.params.validate().and_then(|()| {
            // Checked before `n = beam_width` is: its error names the beam field.
            let slots = request.params.beam_width.checked_mul(2);
            if slots.is_none_or(|slots| slots > self.config.max_num_seqs) {
                return Err(ValidationError::field(
                    "beam_width",
                    format!(
                        "needs 2 × beam_width KV slots, at most max_num_seqs ({}), got a width of {}",
                        self.config.max_num_seqs, request.params.beam_width
                    ),
                ));
            }
            let params = SamplingParams {
                n: request.params.beam_width,
                temperature: 0.0,
                max_tokens: Some(request.params.max_tokens),
                ignore_eos: request.params.ignore_eos,
                ..SamplingParams::default()
            };
            let mut job = self.prepare(
                GenerateRequest::new(request.prompt, params),
                Replier::Final(tx),
            )?;
            job.kind = JobKind::Beam(request.params);
            self.check_kv(job)
        });
        match job {
            Ok(job) => self.submit(job, Pending::from_channel(rx)),
            Err(err) => Pending::ready(Err(err.into())),
        }
    }

    /// Scores a prompt: the output's `prompt_logprobs` has one entry per token, the first `None`.
    pub fn score(&self, prompt: &ModelInput) -> Pending<GenerateOutput> {
        let (tx, rx) = flume::bounded(1);
        let job = self.validate_prompt(prompt).and_then(|tokens| {
            if tokens.len() > self.info.max_context {
                return Err(ValidationError::ContextOverflow {
                    prompt_len: tokens.len(),
                    max_tokens: 0,
                    max_context: self.info.max_context,
                });
            }
            self.check_kv(Job {
                prompt: tokens,
                params: SamplingParams::greedy(1),
                kind: JobKind::Score,
                prompt_logprobs: PromptLogprobs {
                    include: true,
                    top_k: 0,
                },
                max_new_tokens: 0,
                seed: 0,
                processors: Arc::default(),
                stop: None,
                constraint: None,
                adapter: self.adapter.clone(),
                reply: Replier::Final(tx),
            })
        });
        match job {
            Ok(job) => self.submit(job, Pending::from_channel(rx)),
            Err(err) => Pending::ready(Err(err.into())),
        }
    }

    /// Queue depth, running sequences, free KV slots and KV bytes: the snapshot the engine
    /// thread published after its last command drain, admission or step, with the queue depth
    /// counted live (a submission is waiting from the moment it is sent). Never waits on the
    /// engine thread; `Err(Shutdown)` once that thread has exited.
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        self.shared.read()
    }

    /// Time since the engine thread last made progress (it publishes its stats before every
    /// step; an idle engine does not, so read this together with [`Engine::stats`]'s queue
    /// and running counts). Readiness probes use it to spot an engine stuck in a step.
    pub fn since_progress(&self) -> Option<std::time::Duration> {
        self.shared.since_publish()
    }

    /// Replaces the weights with the checkpoint folder `update.path` (the served model's
    /// config and shapes), through the backend's own loader, without restarting: in drain mode
    /// running requests finish on the old weights while queued and new ones wait; in abort
    /// mode running and queued requests end at once with [`EngineError::Aborted`]. Resolves
    /// once the new weights serve, or to a typed error with the old weights still serving (a
    /// checkpoint of another model: [`WeightUpdateError::Mismatch`] naming each differing
    /// field). Dropping the reply does not cancel the update.
    pub fn update_weights(
        &self,
        update: WeightUpdate,
    ) -> Pending<WeightUpdateReport, WeightUpdateError> {
        let (tx, rx) = flume::bounded(1);
        let command = Command::UpdateWeights {
            request: update,
            reply: tx,
        };
        if self.tx.send(command).is_err() {
            return Pending::ready(Err(WeightUpdateError::Shutdown));
        }
        Pending::new(async move {
            rx.recv_async()
                .await
                .unwrap_or(Err(WeightUpdateError::Shutdown))
        })
    }

    /// Pauses generation: no step runs until [`Engine::resume`]; running requests keep their
    /// KV state and wait ([`PauseMode::InPlace`]) or end with [`EngineError::Aborted`]
    /// ([`PauseMode::Abort`]); new requests queue. Resolves once paused.
    pub fn pause(&self, mode: PauseMode) -> Pending<PauseReport> {
        let (tx, rx) = flume::bounded(1);
        match self.tx.send(Command::Pause { mode, reply: tx }) {
            Ok(()) => Pending::from_channel(rx),
            Err(_) => Pending::ready(Err(EngineError::Shutdown)),
        }
    }

    /// Resumes a paused engine (a no-op when it is not paused). Resolves once resumed.
    pub fn resume(&self) -> Pending<()> {
        let (tx, rx) = flume::bounded(1);
        match self.tx.send(Command::Resume { reply: tx }) {
            Ok(()) => Pending::from_channel(rx),
            Err(_) => Pending::ready(Err(EngineError::Shutdown)),
        }
    }

    /// Drops every cached prefix (SGLang's `flush_cache`); resolves to how many were dropped.
    /// Running requests keep theirs.
    pub fn flush_prefix_cache(&self) -> Pending<usize> {
        let (tx, rx) = flume::bounded(1);
        match self.tx.send(Command::FlushPrefixCache { reply: tx }) {
            Ok(()) => Pending::from_channel(rx),
            Err(_) => Pending::ready(Err(EngineError::Shutdown)),
        }
    }

    /// Whether generation is paused (as of the engine thread's last command).
    pub fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }

    /// The version of the weights served: `"0"` for those loaded at start, then each update's
    /// `weight_version`, or the number of updates so far when it gave none.
    pub fn weight_version(&self) -> String {
        self.shared.weight_version()
    }

    /// Successful weight updates since start.
    pub fn weight_updates(&self) -> u64 {
        self.shared.weight_updates()
    }

    /// Reads the PEFT adapter in `path` (on this thread) and loads it under `name`: requests
    /// through [`Engine::with_adapter`]`(name)` then run on it, batched with everything else.
    /// Typed errors for a bad or mismatched adapter, a taken name, or `max_loras` reached.
    pub fn load_adapter(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Pending<AdapterInfo, AdapterError> {
        let read = adapters::check_name(name).and_then(|()| {
            let plan = self.plan.as_ref().ok_or(AdapterError::BackendUnsupported)?;
            LoraAdapter::read(path, plan)
        });
        let adapter = match read {
            Ok(adapter) => Box::new(adapter),
            Err(err) => return Pending::ready(Err(err)),
        };
        let (tx, rx) = flume::bounded(1);
        let command = Command::LoadAdapter {
            name: name.to_string(),
            adapter,
            reply: tx,
        };
        if self.tx.send(command).is_err() {
            return Pending::ready(Err(AdapterError::Shutdown));
        }
        Pending::new(async move { rx.recv_async().await.unwrap_or(Err(AdapterError::Shutdown)) })
    }

    /// Takes adapter `name` out of service: new requests on it fail, running ones finish on
    /// it, then the backend drops it and its cached prefixes.
    pub fn unload_adapter(&self, name: &str) -> Pending<AdapterInfo, AdapterError> {
        let (tx, rx) = flume::bounded(1);
        let command = Command::UnloadAdapter {
            name: name.to_string(),
            reply: tx,
        };
        if self.tx.send(command).is_err() {
            return Pending::ready(Err(AdapterError::Shutdown));
        }
        Pending::new(async move { rx.recv_async().await.unwrap_or(Err(AdapterError::Shutdown)) })
    }

    /// The loaded adapters, by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.registry.list()
    }

    /// A handle whose requests run on adapter `name` (loaded: [`AdapterError::NotFound`]
    /// otherwise). If it is unloaded later, requests through the handle fail with a typed error.
    pub fn with_adapter(&self, name: &str) -> Result<Engine, AdapterError> {
        let info = self
            .registry
            .get(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        Ok(Self {
            adapter: Some(AdapterRef {
                id: info.id,
                name: info.name.into(),
            }),
            ..self.clone()
        })
    }

    /// A handle on the base weights (this one without its adapter).
    pub fn base(&self) -> Engine {
        Self {
            adapter: None,
            ..self.clone()
        }
    }

    /// The name of the adapter this handle's requests run on.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter.as_ref().map(|a| &*a.name)
    }

    fn submit<R: Failed>(&self, job: Job, reply: R) -> R {
        self.shared.submitted();
        match self.tx.send(Command::Submit(Box::new(job))) {
            Ok(()) => reply,
            Err(_) => {
                self.shared.left_queue();
                R::failed(EngineError::Shutdown)
            }
        }
    }

    /// Rejects a job whose KV reservation exceeds the whole budget (it could never run).
    fn check_kv(&self, job: Job) -> Result<Job, ValidationError> {
        budget::KvReservation::of(&job, &self.info).check_fits(self.kv_budget_bytes())?;
        Ok(job)
    }

    fn validate_prompt(&self, prompt: &ModelInput) -> Result<Vec<TokenId>, ValidationError> {
        let tokens = prompt.to_text_tokens()?;
        if tokens.is_empty() {
            return Err(ValidationError::EmptyPrompt);
        }
        let vocab_size = self.info.vocab_size;
        if let Some((position, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab_size)
        {
            return Err(ValidationError::TokenOutOfRange {
                token,
                position,
                vocab_size,
            });
        }
        Ok(tokens)
    }

    /// Validates a request on the caller's thread and compiles what it needs (stops, bad
    /// words, guided-decoding constraint), so the engine thread only schedules.
    fn prepare(&self, request: GenerateRequest, reply: Replier) -> Result<Job, ValidationError> {
        let GenerateRequest {
            prompt,
            params,
            prompt_logprobs,
        } = request;
        params.validate()?;
        params.validate_for_vocab(self.info.vocab_size)?;
        let samples = params.samples_drawn();
        if samples > self.config.max_num_seqs {
            return Err(ValidationError::field(
                if params.best_of.is_some() {
                    "best_of"
                } else {
                    "n"
                },
                format!(
                    "at most {} sequences (max_num_seqs), got {samples}",
                    self.config.max_num_seqs
                ),
            ));
        }
        let prompt_logprobs = prompt_logprobs.merged_with(&params);
        if prompt_logprobs.top_k > MAX_TOP_LOGPROBS {
            return Err(ValidationError::field(
                "topk_prompt_logprobs",
                format!("at most {MAX_TOP_LOGPROBS}, got {}", prompt_logprobs.top_k),
            ));
        }
        let mut tokens = self.validate_prompt(&prompt)?;
        if let Some(keep) = params.truncate_prompt_tokens
            && tokens.len() > keep
        {
            tokens.drain(..tokens.len() - keep);
        }
        let max_context = self.info.max_context;
        let room = max_context.saturating_sub(tokens.len());
        let wanted = params.max_tokens.unwrap_or(room.max(1));
        // `max_tokens` is the client's: near usize::MAX the sum overflows.
        if tokens
            .len()
            .checked_add(wanted)
            .is_none_or(|total| total > max_context)
        {
            return Err(ValidationError::ContextOverflow {
                prompt_len: tokens.len(),
                max_tokens: wanted,
                max_context,
            });
        }
        let codec = self.tools.codec.as_deref();
        let needs_codec = |field: &'static str| {
            codec.ok_or_else(|| {
                ValidationError::field(field, "needs a tokenizer, and this engine has none")
            })
        };
        let stop = StopMatcher::new(&params)?;
        if stop.is_some() {
            needs_codec(if params.stop.is_empty() {
                "stop_pattern"
            } else {
                "stop"
            })?;
        }
        let bad_words = if params.bad_words.is_empty() {
            Vec::new()
        } else {
            tokenize_bad_words(needs_codec("bad_words")?, &params.bad_words)?
        };
        let constraint = match &params.guided_decoding {
            None => None,
            Some(guided) => {
                let engine = self.tools.guided.as_deref().ok_or_else(|| {
                    ValidationError::field(
                        "guided_decoding",
                        "this engine has no guided-decoding backend",
                    )
                })?;
                Some(
                    engine
                        .compile(guided, self.info.vocab_size)
                        .map_err(|e| ValidationError::field("guided_decoding", e.to_string()))?,
                )
            }
        };
        let processors = Processors::new(
            &params,
            bad_words,
            &self.info.eos_token_ids,
            self.info.vocab_size,
        );
        Ok(Job {
            prompt: tokens,
            seed: params.seed.unwrap_or_else(fresh_seed),
            kind: JobKind::Sample { samples },
            params,
            prompt_logprobs,
            max_new_tokens: wanted,
            processors: Arc::new(processors),
            stop,
            constraint,
            adapter: self.adapter.clone(),
            reply,
        })
    }
}

/// Token sequences of `words`, each also with a leading space (as vLLM does).
fn tokenize_bad_words(
    codec: &dyn TextCodec,
    words: &[String],
) -> Result<Vec<Vec<TokenId>>, ValidationError> {
    let mut out: Vec<Vec<TokenId>> = Vec::new();
    for word in words {
        for variant in [word.clone(), format!(" {}", word.trim_start())] {
            let ids = codec
                .encode(&variant)
                .map_err(|e| ValidationError::field("bad_words", e.to_string()))?;
            if !ids.is_empty() && !out.contains(&ids) {
                out.push(ids);
            }
        }
    }
    Ok(out)
}

/// A reply handle that can carry an error instead of a result.
trait Failed {
    fn failed(err: EngineError) -> Self;
}

impl Failed for Pending<GenerateOutput> {
    fn failed(err: EngineError) -> Self {
        Pending::ready(Err(err))
    }
}

impl Failed for GenerateStream {
    fn failed(err: EngineError) -> Self {
        GenerateStream::failed(err)
    }
}

impl Command {
    /// Carries out the command on the engine thread.
    fn handle(
        self,
        scheduler: &mut Scheduler,
        backend: &mut dyn Backend,
        wake: &flume::WeakSender<Command>,
    ) {
        match self {
            Self::Submit(job) => scheduler.enqueue(*job),
            Self::UpdateWeights { request, reply } => {
                scheduler.begin_update(backend, request, reply, wake);
            }
            Self::Wake => {}
            Self::Pause { mode, reply } => {
                let report = scheduler.pause(backend, mode);
                drop(reply.send(Ok(report)));
            }
            Self::Resume { reply } => {
                scheduler.resume();
                drop(reply.send(Ok(())));
            }
            Self::FlushPrefixCache { reply } => {
                let dropped = scheduler.flush_prefix_cache(backend);
                scheduler.publish(&*backend);
                drop(reply.send(Ok(dropped)));
            }
            Self::LoadAdapter {
                name,
                adapter,
                reply,
            } => {
                drop(reply.send(scheduler.load_adapter(backend, name, &adapter)));
            }
            Self::UnloadAdapter { name, reply } => {
                let result = scheduler.unload_adapter(backend, &name);
                scheduler.publish(&*backend);
                drop(reply.send(result));
            }
        }
    }
}

/// The engine thread: block while there is nothing to step (idle, or paused: then waking every
/// [`PAUSED_TICK`] to drop cancelled requests and publish), otherwise drain commands, swap in a
/// waiting weight update once nothing runs, publish stats and step.
///
/// A step is guarded as a whole: the scheduler guards the backend's forward, guided masks,
/// sampling and each group's logits handling itself (failing only the requests involved); a
/// panic anywhere else in a step fails the running requests and resets the slots
/// ([`Scheduler::recover`]), and the engine keeps serving. `_exit` marks the thread exited for
/// [`Engine::stats`] when it returns or unwinds.
fn run<B: Backend>(
    mut backend: B,
    mut scheduler: Scheduler,
    rx: flume::Receiver<Command>,
    wake: flume::WeakSender<Command>,
    _exit: ExitGuard,
) {
    loop {
        if !scheduler.has_work() {
            let paused = scheduler.control.is_paused();
            let cmd = if paused || !scheduler.is_idle() {
                match rx.recv_timeout(PAUSED_TICK) {
                    Ok(cmd) => Some(cmd),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => return,
                }
            };
            if let Some(cmd) = cmd {
                cmd.handle(&mut scheduler, &mut backend, &wake);
            }
            scheduler.drop_cancelled(&mut backend);
        }
        while let Ok(cmd) = rx.try_recv() {
            cmd.handle(&mut scheduler, &mut backend, &wake);
        }
        scheduler.apply_update(&mut backend);
        scheduler.publish(&backend);
        if !scheduler.has_work() {
            continue;
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| scheduler.step(&mut backend))) {
            scheduler.recover(&mut backend, panic_message(panic));
        }
        scheduler.apply_update(&mut backend);
    }
}

#[cfg(test)]
mod tests;
