//! A validated request as the scheduler keeps it, and the channel its results go back on.

use std::sync::Arc;

use crate::TokenId;
use crate::engine::adapters::AdapterRef;
use crate::engine::request::{GenerateOutput, PromptLogprobs, StreamUpdate};
use crate::error::EngineError;
use crate::guided::TokenConstraint;
use crate::params::{BeamSearchParams, SamplingParams};
use crate::sampling::Processors;
use crate::text::StopMatcher;

/// Where a request's results go: one final reply, or a stream of updates.
#[derive(Clone)]
pub(crate) enum Replier {
    Final(flume::Sender<Result<GenerateOutput, EngineError>>),
    Stream(flume::Sender<Result<StreamUpdate, EngineError>>),
}

impl Replier {
    /// Whether the caller dropped its end (the request is cancelled).
    pub fn is_disconnected(&self) -> bool {
        match self {
            Self::Final(tx) => tx.is_disconnected(),
            Self::Stream(tx) => tx.is_disconnected(),
        }
    }
}

/// What kind of work a job is.
pub(crate) enum JobKind {
    /// Sample `samples` continuations (best `n` returned).
    Sample { samples: usize },
    /// Score the prompt only.
    Score,
    /// Beam search.
    Beam(BeamSearchParams),
}

/// A validated request, as the scheduler keeps it until it finishes.
pub(crate) struct Job {
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    pub kind: JobKind,
    pub prompt_logprobs: PromptLogprobs,
    /// Tokens to generate per sample; 0 for scoring.
    pub max_new_tokens: usize,
    pub seed: u64,
    pub processors: Arc<Processors>,
    pub stop: Option<StopMatcher>,
    /// The compiled guided-decoding constraint, in its initial state.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// The LoRA adapter it runs on (`None`: the base weights).
    pub adapter: Option<AdapterRef>,
    pub reply: Replier,
}

impl Job {
    /// KV slots the job holds while running.
    pub fn slots_needed(&self) -> usize {
        match &self.kind {
            JobKind::Sample { samples } => *samples,
            JobKind::Score => 1,
            // The width is checked at submit; saturate rather than trust it here.
            JobKind::Beam(b) => b.beam_width.saturating_mul(2),
        }
    }
}
