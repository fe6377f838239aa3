//! The engine's state and one step of it: admit → build a batch under the token budget →
//! forward → process logits (prompt logprobs, sampling, stops) → reply to finished requests.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::TokenId;
use crate::backend::{Backend, ForwardBatch, Logits, LogitsWanted, ModelInfo, SeqChunk, SlotId};
use crate::engine::EngineConfig;
use crate::engine::request::{
    FinishReason, GenerateOutput, GeneratedSequence, PromptLogprobs, TopLogprobs,
};
use crate::error::{BackendError, EngineError};
use crate::params::{LogprobsMode, SamplingParams};
use crate::sampling::{SeqRng, sample_token, token_logprob, top_logprobs};

pub(crate) type ReplyTx = flume::Sender<Result<GenerateOutput, EngineError>>;

/// A validated request, as the scheduler keeps it until it finishes.
pub(crate) struct Job {
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    pub num_samples: usize,
    pub prompt_logprobs: PromptLogprobs,
    /// Tokens to generate per sample; 0 for scoring.
    pub max_new_tokens: usize,
    pub seed: u64,
    pub reply: ReplyTx,
}

/// One request in flight: a shared prompt and, after prefill, its sampled continuations.
struct Group {
    job: Job,
    /// One slot per sample; `slots[0]` holds the prefill that the others fork from.
    slots: Vec<SlotId>,
    prefilled: usize,
    prompt_lp: Option<Vec<Option<f32>>>,
    topk_prompt_lp: Option<Vec<Option<TopLogprobs>>>,
    seqs: Vec<Seq>,
    /// Failed or cancelled: remove without a (further) reply.
    ended: bool,
}

/// One continuation being decoded.
struct Seq {
    slot: SlotId,
    rng: SeqRng,
    out: GeneratedSequence,
    done: bool,
}

/// What each chunk of the current batch belongs to.
#[derive(Clone, Copy)]
enum ChunkOwner {
    Prefill { group: usize },
    Decode { group: usize, seq: usize },
}

/// Waiting queue, running set and slot pool.
pub(crate) struct Scheduler {
    config: EngineConfig,
    info: ModelInfo,
    waiting: VecDeque<Job>,
    running: Vec<Group>,
    free_slots: Vec<SlotId>,
}

/// A point-in-time view of the scheduler, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Requests queued, not yet admitted.
    pub waiting_requests: usize,
    /// Requests admitted (prefilling or decoding).
    pub running_requests: usize,
    /// Sequences still decoding.
    pub running_sequences: usize,
    /// KV slots not held by any sequence.
    pub free_slots: usize,
    /// Size of the slot pool (`max_num_seqs`).
    pub total_slots: usize,
}

impl Scheduler {
    pub fn new(config: EngineConfig, info: ModelInfo) -> Self {
        let free_slots = (0..config.max_num_seqs as u32).rev().map(SlotId).collect();
        Self {
            config,
            info,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots,
        }
    }

    pub fn enqueue(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            waiting_requests: self.waiting.len(),
            running_requests: self.running.len(),
            running_sequences: self
                .running
                .iter()
                .map(|g| g.seqs.iter().filter(|s| !s.done).count())
                .sum(),
            free_slots: self.free_slots.len(),
            total_slots: self.config.max_num_seqs,
        }
    }

    /// Runs one scheduling step; does nothing when idle.
    pub fn step<B: Backend + ?Sized>(&mut self, backend: &mut B) {
        self.drop_cancelled(backend);
        self.admit();
        let (batch, owners) = self.build_batch();
        if batch.chunks.is_empty() {
            return;
        }
        let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&batch)))
            .unwrap_or_else(|panic| Err(BackendError::Panicked(panic_message(panic))));
        match result {
            Ok(logits) => self.process(backend, &batch, &owners, &logits),
            Err(err) => self.fail_batch(backend, &owners, err),
        }
        self.finish_groups(backend);
    }

    /// Strict FCFS: the head of the queue is admitted once enough slots are free.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            if job.num_samples > self.free_slots.len() {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            let slots = self
                .free_slots
                .split_off(self.free_slots.len() - job.num_samples);
            let n = job.prompt.len();
            let pl = job.prompt_logprobs;
            self.running.push(Group {
                prompt_lp: pl.include.then(|| vec![None; n]),
                topk_prompt_lp: (pl.top_k > 0).then(|| vec![None; n]),
                job,
                slots,
                prefilled: 0,
                seqs: Vec::new(),
                ended: false,
            });
        }
    }

    /// Decode steps first (one token per live sequence), then prefill chunks FCFS in the budget.
    fn build_batch(&self) -> (ForwardBatch, Vec<ChunkOwner>) {
        let mut chunks = Vec::new();
        let mut owners = Vec::new();
        for (g, group) in self.running.iter().enumerate() {
            let prompt_len = group.job.prompt.len();
            for (s, seq) in group.seqs.iter().enumerate().filter(|(_, s)| !s.done) {
                let generated = seq.out.tokens.len();
                chunks.push(SeqChunk {
                    slot: seq.slot,
                    start_pos: prompt_len + generated - 1,
                    tokens: vec![seq.out.tokens[generated - 1]],
                    logits: LogitsWanted::Last,
                });
                owners.push(ChunkOwner::Decode { group: g, seq: s });
            }
        }
        let mut budget = self
            .config
            .max_num_batched_tokens
            .saturating_sub(chunks.len());
        for (g, group) in self.running.iter().enumerate() {
            let remaining = group.job.prompt.len() - group.prefilled;
            if remaining == 0 || budget == 0 {
                continue;
            }
            let n = remaining.min(budget);
            budget -= n;
            let is_last = n == remaining;
            let logits = if group.job.prompt_logprobs.wanted() {
                LogitsWanted::All
            } else if is_last && group.job.max_new_tokens > 0 {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            chunks.push(SeqChunk {
                slot: group.slots[0],
                start_pos: group.prefilled,
                tokens: group.job.prompt[group.prefilled..group.prefilled + n].to_vec(),
                logits,
            });
            owners.push(ChunkOwner::Prefill { group: g });
        }
        (ForwardBatch { chunks }, owners)
    }

    fn process<B: Backend + ?Sized>(
        &mut self,
        backend: &mut B,
        batch: &ForwardBatch,
        owners: &[ChunkOwner],
        logits: &Logits,
    ) {
        for (i, (chunk, owner)) in batch.chunks.iter().zip(owners).enumerate() {
            match *owner {
                ChunkOwner::Prefill { group } => {
                    let g = &mut self.running[group];
                    g.record_prompt_logprobs(chunk, logits, i);
                    g.prefilled += chunk.tokens.len();
                    if g.prefilled == g.job.prompt.len() && g.job.max_new_tokens > 0 {
                        let last = logits
                            .last_row(i)
                            .expect("the last prefill chunk asks for logits");
                        if let Err(err) = g.start_sampling(backend, &self.info, last) {
                            g.fail(err.into());
                        }
                    }
                }
                ChunkOwner::Decode { group, seq } => {
                    let row = logits
                        .last_row(i)
                        .expect("decode chunks ask for their last row");
                    let g = &mut self.running[group];
                    let job = &g.job;
                    g.seqs[seq].push_sample(row, job, &self.info);
                }
            }
        }
    }

    fn fail_batch<B: Backend + ?Sized>(
        &mut self,
        backend: &mut B,
        owners: &[ChunkOwner],
        err: BackendError,
    ) {
        for owner in owners {
            let group = match *owner {
                ChunkOwner::Prefill { group } | ChunkOwner::Decode { group, .. } => group,
            };
            self.running[group].fail(EngineError::Backend(err.clone()));
        }
        // Slots of failed groups may hold partially appended state: drop it.
        self.finish_groups(backend);
    }

    fn drop_cancelled<B: Backend + ?Sized>(&mut self, backend: &mut B) {
        self.waiting.retain(|job| !job.reply.is_disconnected());
        for g in &mut self.running {
            if g.job.reply.is_disconnected() {
                g.ended = true;
            }
        }
        self.finish_groups(backend);
    }

    /// Replies to and removes groups whose sequences are all done, returning their slots.
    fn finish_groups<B: Backend + ?Sized>(&mut self, backend: &mut B) {
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].is_finished() {
                i += 1;
                continue;
            }
            let g = self.running.swap_remove(i);
            for &slot in &g.slots {
                backend.release(slot);
            }
            self.free_slots.extend(g.slots.iter().copied());
            if !g.ended {
                let _ = g.job.reply.send(Ok(GenerateOutput {
                    prompt_len: g.job.prompt.len(),
                    sequences: g.seqs.into_iter().map(|s| s.out).collect(),
                    prompt_logprobs: g.prompt_lp,
                    topk_prompt_logprobs: g.topk_prompt_lp,
                }));
            }
        }
    }
}

impl Group {
    /// Fills prompt logprobs from a prefill chunk's rows: row at position p predicts p + 1.
    fn record_prompt_logprobs(&mut self, chunk: &SeqChunk, logits: &Logits, chunk_index: usize) {
        if chunk.logits != LogitsWanted::All {
            return;
        }
        let prompt = &self.job.prompt;
        for (r, row) in logits.chunk(chunk_index).enumerate() {
            let target = chunk.start_pos + r + 1;
            if target >= prompt.len() {
                break;
            }
            if let Some(lp) = &mut self.prompt_lp {
                lp[target] = Some(token_logprob(row, prompt[target]));
            }
            if let Some(top) = &mut self.topk_prompt_lp {
                top[target] = Some(top_logprobs(row, self.job.prompt_logprobs.top_k));
            }
        }
    }

    /// After the prompt is prefilled: fork its KV to every sample's slot and draw first tokens.
    fn start_sampling<B: Backend + ?Sized>(
        &mut self,
        backend: &mut B,
        info: &ModelInfo,
        last_row: &[f32],
    ) -> Result<(), BackendError> {
        for &dst in &self.slots[1..] {
            backend.fork(self.slots[0], dst)?;
        }
        let job = &self.job;
        self.seqs = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                let mut seq = Seq::new(slot, SeqRng::new(job.seed, i as u64), &job.params);
                seq.push_sample(last_row, job, info);
                seq
            })
            .collect();
        Ok(())
    }

    /// Whether every sequence is done (or the prompt is scored), or the group ended early.
    fn is_finished(&self) -> bool {
        if self.ended {
            return true;
        }
        if self.job.max_new_tokens == 0 {
            return self.prefilled == self.job.prompt.len();
        }
        !self.seqs.is_empty() && self.seqs.iter().all(|s| s.done)
    }

    /// Replies with `err` and ends the group.
    fn fail(&mut self, err: EngineError) {
        if !self.ended {
            let _ = self.job.reply.send(Err(err));
        }
        self.ended = true;
    }
}

impl Seq {
    fn new(slot: SlotId, rng: SeqRng, params: &SamplingParams) -> Self {
        let out = GeneratedSequence {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            processed_logprobs: (params.logprobs_mode == LogprobsMode::RawAndProcessed)
                .then(Vec::new),
            top_logprobs: params.logprobs.map(|_| Vec::new()),
            finish_reason: FinishReason::Length,
        };
        Self {
            slot,
            rng,
            out,
            done: false,
        }
    }

    /// Samples the next token from `row`, records it and checks the stop conditions.
    fn push_sample(&mut self, row: &[f32], job: &Job, info: &ModelInfo) {
        let params = &job.params;
        let sampled = sample_token(row, params, &mut self.rng);
        let out = &mut self.out;
        out.tokens.push(sampled.token);
        out.logprobs.push(sampled.logprob);
        if let Some(p) = &mut out.processed_logprobs {
            p.push(sampled.processed_logprob);
        }
        if let (Some(top), Some(k)) = (&mut out.top_logprobs, params.logprobs) {
            top.push(top_logprobs(row, k));
        }
        let finish = if !params.ignore_eos && info.eos_token_ids.contains(&sampled.token) {
            Some(FinishReason::Eos)
        } else if params.stop_token_ids.contains(&sampled.token) {
            Some(FinishReason::StopToken)
        } else if out.tokens.len() >= job.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(reason) = finish {
            out.finish_reason = reason;
            self.done = true;
        }
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
