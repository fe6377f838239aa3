//! The engine: a thread that owns a [`Backend`] and serves requests with continuous batching.
//!
//! [`Engine`] is a cheap, cloneable handle (an actor handle, as in TGI's queue): requests are
//! validated on the caller's thread, then sent to the engine thread, which interleaves decode
//! steps and prefill chunks of all running requests into shared forward passes.

mod pending;
mod request;
mod scheduler;

use std::sync::Arc;

pub use pending::Pending;
pub use request::{
    FinishReason, GenerateOutput, GenerateRequest, GeneratedSequence, PromptLogprobs, TopLogprobs,
};
pub use scheduler::EngineStats;

use crate::TokenId;
use crate::backend::{Backend, ModelInfo};
use crate::error::{EngineError, ValidationError};
use crate::input::ModelInput;
use crate::params::{MAX_TOP_LOGPROBS, SamplingParams};
use crate::sampling::rng::fresh_seed;
use scheduler::{Job, Scheduler};

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences (KV slots) decoding at once; a request needs one per sample.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks.
    pub max_num_batched_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
        }
    }
}

enum Command {
    Submit(Job),
    Stats(flume::Sender<EngineStats>),
}

/// A handle to a running engine; clone it freely, use it from any thread.
#[derive(Clone)]
pub struct Engine {
    tx: flume::Sender<Command>,
    info: Arc<ModelInfo>,
    config: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.info)
            .field("config", &self.config)
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread around `backend`. The thread ends when the last handle drops.
    pub fn start<B: Backend + 'static>(
        backend: B,
        config: EngineConfig,
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
        let info = Arc::new(backend.info().clone());
        let (tx, rx) = flume::unbounded();
        let thread_info = (*info).clone();
        std::thread::Builder::new()
            .name("infermux-engine".into())
            .spawn(move || run(backend, Scheduler::new(config, thread_info), rx))
            .map_err(|e| {
                ValidationError::field("engine", format!("cannot spawn the engine thread: {e}"))
            })?;
        Ok(Self { tx, info, config })
    }

    /// The served model's facts.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The scheduler limits this engine runs with.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Samples continuations of a prompt. Invalid requests resolve at once to a typed error.
    pub fn generate(&self, request: GenerateRequest) -> Pending<GenerateOutput> {
        match self.validate(request) {
            Ok(job) => self.submit(job),
            Err(err) => Pending::ready(Err(err.into())),
        }
    }

    /// Scores a prompt: the output's `prompt_logprobs` has one entry per token, the first `None`.
    pub fn score(&self, prompt: &ModelInput) -> Pending<GenerateOutput> {
        let job = self.validate_prompt(prompt).and_then(|tokens| {
            if tokens.len() > self.info.max_context {
                return Err(ValidationError::ContextOverflow {
                    prompt_len: tokens.len(),
                    max_tokens: 0,
                    max_context: self.info.max_context,
                });
            }
            Ok(Job {
                prompt: tokens,
                params: SamplingParams::greedy(1),
                num_samples: 1,
                prompt_logprobs: PromptLogprobs {
                    include: true,
                    top_k: 0,
                },
                max_new_tokens: 0,
                seed: 0,
                reply: flume::bounded(1).0,
            })
        });
        match job {
            Ok(job) => self.submit(job),
            Err(err) => Pending::ready(Err(err.into())),
        }
    }

    /// Queue depth, running sequences and free KV slots, as the engine thread sees them now.
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        let (tx, rx) = flume::bounded(1);
        self.tx
            .send(Command::Stats(tx))
            .map_err(|_| EngineError::Shutdown)?;
        rx.recv().map_err(|_| EngineError::Shutdown)
    }

    fn submit(&self, mut job: Job) -> Pending<GenerateOutput> {
        let (tx, rx) = flume::bounded(1);
        job.reply = tx;
        match self.tx.send(Command::Submit(job)) {
            Ok(()) => Pending::new(rx),
            Err(_) => Pending::ready(Err(EngineError::Shutdown)),
        }
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

    fn validate(&self, request: GenerateRequest) -> Result<Job, ValidationError> {
        let GenerateRequest {
            prompt,
            num_samples,
            params,
            prompt_logprobs,
        } = request;
        params.validate()?;
        params.validate_for_vocab(self.info.vocab_size)?;
        if num_samples == 0 || num_samples > self.config.max_num_seqs {
            return Err(ValidationError::field(
                "num_samples",
                format!(
                    "must be in 1..={} (max_num_seqs), got {num_samples}",
                    self.config.max_num_seqs
                ),
            ));
        }
        if prompt_logprobs.top_k > MAX_TOP_LOGPROBS {
            return Err(ValidationError::field(
                "topk_prompt_logprobs",
                format!("at most {MAX_TOP_LOGPROBS}, got {}", prompt_logprobs.top_k),
            ));
        }
        let tokens = self.validate_prompt(&prompt)?;
        let max_context = self.info.max_context;
        let room = max_context.saturating_sub(tokens.len());
        let wanted = params.max_tokens.unwrap_or(room.max(1));
        if tokens.len() + wanted > max_context {
            return Err(ValidationError::ContextOverflow {
                prompt_len: tokens.len(),
                max_tokens: wanted,
                max_context,
            });
        }
        Ok(Job {
            prompt: tokens,
            seed: params.seed.unwrap_or_else(fresh_seed),
            params,
            num_samples,
            prompt_logprobs,
            max_new_tokens: wanted,
            reply: flume::bounded(1).0,
        })
    }
}

/// The engine thread: block while idle, otherwise drain commands and step.
fn run<B: Backend>(mut backend: B, mut scheduler: Scheduler, rx: flume::Receiver<Command>) {
    let handle = |cmd: Command, scheduler: &mut Scheduler| match cmd {
        Command::Submit(job) => scheduler.enqueue(job),
        Command::Stats(reply) => {
            let _ = reply.send(scheduler.stats());
        }
    };
    loop {
        if scheduler.is_idle() {
            match rx.recv() {
                Ok(cmd) => handle(cmd, &mut scheduler),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(cmd, &mut scheduler);
        }
        scheduler.step(&mut backend);
    }
}

#[cfg(test)]
mod tests;
