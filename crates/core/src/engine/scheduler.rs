//! The engine's state and one step of it: admit → build a batch under the token budget →
//! forward (guided masks computed alongside) → process logits (prompt logprobs, sampling,
//! stops) → stream updates → reply to finished requests.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::backend::{Backend, ForwardBatch, Logits, LogitsWanted, ModelInfo, SeqChunk, SlotId};
use crate::engine::EngineConfig;
use crate::engine::beam::BeamState;
use crate::engine::job::{Job, JobKind, Replier};
use crate::engine::request::{GenerateOutput, StreamUpdate, TopLogprobs};
use crate::engine::sequence::{Seq, SeqCtx};
use crate::error::{BackendError, EngineError};
use crate::guided::TokenMask;
use crate::params::OutputKind;
use crate::sampling::batch::BatchRow;
use crate::sampling::{
    History, Knobs, SamplingBatch, SeqRng, SlotSampling, token_logprob, top_logprobs,
};
use crate::text::TextCodec;

/// One request in flight: a shared prompt and, after prefill, its continuations.
pub(super) struct Group {
    pub job: Job,
    /// One slot per sample; `slots[0]` holds the prefill that the others fork from.
    pub slots: Vec<SlotId>,
    pub prefilled: usize,
    prompt_lp: Option<Vec<Option<f32>>>,
    topk_prompt_lp: Option<Vec<Option<TopLogprobs>>>,
    pub seqs: Vec<Seq>,
    /// The guided mask for the first sampled token.
    first_mask: Option<TokenMask>,
    pub beam: Option<BeamState>,
    /// Prompt logprobs were streamed already.
    prompt_sent: bool,
    /// Failed or cancelled: remove without a (further) reply.
    pub ended: bool,
}

/// What each chunk of the current batch belongs to.
#[derive(Clone, Copy)]
enum ChunkOwner {
    Prefill { group: usize },
    Decode { group: usize, seq: usize },
}

/// Waiting queue, running set, slot pool and per-slot sampling state.
pub(crate) struct Scheduler {
    config: EngineConfig,
    pub(super) info: ModelInfo,
    pub(super) codec: Option<Arc<dyn TextCodec>>,
    waiting: VecDeque<Job>,
    pub(super) running: Vec<Group>,
    free_slots: Vec<SlotId>,
    pub(super) sampling: SamplingBatch,
    totals: Totals,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    prompt_tokens: u64,
    generated_tokens: u64,
    finished_requests: u64,
    failed_requests: u64,
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
    /// Prompt tokens prefilled since start.
    pub prompt_tokens_total: u64,
    /// Tokens generated since start.
    pub generated_tokens_total: u64,
    /// Requests that completed since start.
    pub finished_requests_total: u64,
    /// Requests that failed (backend or guided-decoding errors) since start.
    pub failed_requests_total: u64,
}

impl Scheduler {
    pub fn new(config: EngineConfig, info: ModelInfo, codec: Option<Arc<dyn TextCodec>>) -> Self {
        let free_slots = (0..config.max_num_seqs as u32).rev().map(SlotId).collect();
        Self {
            sampling: SamplingBatch::new(config.max_num_seqs),
            config,
            info,
            codec,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots,
            totals: Totals::default(),
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
            prompt_tokens_total: self.totals.prompt_tokens,
            generated_tokens_total: self.totals.generated_tokens,
            finished_requests_total: self.totals.finished_requests,
            failed_requests_total: self.totals.failed_requests,
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
        let vocab = self.info.vocab_size;
        let running = &mut self.running;
        let result = std::thread::scope(|scope| {
            // Guided masks only depend on committed tokens: compute them while the forward runs.
            let masks = running
                .iter()
                .any(Group::needs_masks)
                .then(|| scope.spawn(move || compute_masks(running, vocab)));
            let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&batch)))
                .unwrap_or_else(|panic| Err(BackendError::Panicked(panic_message(panic))));
            if let Some(handle) = masks {
                handle.join().expect("mask computation does not panic");
            }
            result
        });
        match result {
            Ok(logits) => self.process(backend, &batch, &owners, &logits),
            Err(err) => self.fail_batch(backend, &owners, err),
        }
        self.stream_updates();
        self.finish_groups(backend);
    }

    /// Strict FCFS: the head of the queue is admitted once enough slots are free.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            if job.slots_needed() > self.free_slots.len() {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            let slots = self
                .free_slots
                .split_off(self.free_slots.len() - job.slots_needed());
            let n = job.prompt.len();
            let pl = job.prompt_logprobs;
            self.running.push(Group {
                prompt_lp: pl.include.then(|| vec![None; n]),
                topk_prompt_lp: (pl.top_k > 0).then(|| vec![None; n]),
                beam: None,
                job,
                slots,
                prefilled: 0,
                seqs: Vec::new(),
                first_mask: None,
                prompt_sent: false,
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
                chunks.push(SeqChunk {
                    slot: seq.slot,
                    start_pos: prompt_len + seq.out.tokens.len() - 1,
                    tokens: vec![seq.last_token()],
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
        let mut decode_rows = Vec::new();
        for (i, (chunk, owner)) in batch.chunks.iter().zip(owners).enumerate() {
            match *owner {
                ChunkOwner::Prefill { group } => {
                    self.totals.prompt_tokens += chunk.tokens.len() as u64;
                    let g = &mut self.running[group];
                    g.record_prompt_logprobs(chunk, logits, i);
                    g.prefilled += chunk.tokens.len();
                    if g.prefilled == g.job.prompt.len() && g.job.max_new_tokens > 0 {
                        let last = logits
                            .last_row(i)
                            .expect("the last prefill chunk asks for logits");
                        if let Err(err) = self.start_decoding(backend, group, last) {
                            self.running[group].fail(err);
                        }
                    }
                }
                ChunkOwner::Decode { group, seq } => {
                    let row = logits
                        .last_row(i)
                        .expect("decode chunks ask for their last row");
                    decode_rows.push((group, seq, row));
                }
            }
        }
        // Beam groups consume all their rows at once; the rest sample in one batched call.
        let (beam_rows, sample_rows): (Vec<_>, Vec<_>) = decode_rows
            .into_iter()
            .filter(|&(g, _, _)| !self.running[g].ended)
            .partition(|&(g, _, _)| self.running[g].beam.is_some());
        self.sample_rows(&sample_rows);
        self.advance_beams(backend, &beam_rows);
    }

    /// Samples the next token of each `(group, seq, row)` and records it.
    fn sample_rows(&mut self, rows: &[(usize, usize, &[f32])]) {
        let batch_rows: Vec<BatchRow<'_>> = rows
            .iter()
            .map(|&(g, s, row)| {
                let seq = &self.running[g].seqs[s];
                BatchRow {
                    slot: seq.slot.0 as usize,
                    logits: row,
                    mask: seq.mask.as_ref(),
                }
            })
            .collect();
        let sampled = self.sampling.sample(&batch_rows);
        self.totals.generated_tokens += sampled.len() as u64;
        let codec = self.codec.as_deref();
        for (&(g, s, row), token) in rows.iter().zip(sampled) {
            let group = &mut self.running[g];
            let top = group.job.params.logprobs.map(|k| top_logprobs(row, k));
            let ctx = SeqCtx {
                job: &group.job,
                info: &self.info,
                codec,
            };
            let seq = &mut group.seqs[s];
            seq.mask = None;
            if let Err(err) = seq.accept(token, top, &ctx) {
                group.fail(err);
            }
        }
    }

    /// After the prompt is prefilled: fork its KV to every sample's slot and draw first tokens.
    fn start_decoding<B: Backend + ?Sized>(
        &mut self,
        backend: &mut B,
        group: usize,
        last_row: &[f32],
    ) -> Result<(), EngineError> {
        if matches!(self.running[group].job.kind, JobKind::Beam(_)) {
            return self.start_beams(backend, group, last_row);
        }
        let g = &mut self.running[group];
        for &dst in &g.slots[1..] {
            backend.fork(g.slots[0], dst)?;
        }
        let job = &g.job;
        let codec = self.codec.as_deref();
        let ctx = SeqCtx {
            job,
            info: &self.info,
            codec,
        };
        let mut seqs: Vec<Seq> = g
            .slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                self.sampling.insert(
                    slot.0 as usize,
                    SlotSampling {
                        knobs: Knobs::of(&job.params),
                        processors: job.processors.clone(),
                        history: History::new(&job.prompt),
                        rng: SeqRng::new(job.seed, i as u64),
                    },
                );
                let mut seq = Seq::new(i, slot, &ctx);
                seq.constraint = job.constraint.as_ref().map(|c| c.fork());
                seq.mask = g.first_mask.clone();
                seq
            })
            .collect();
        if job.constraint.is_some() && g.first_mask.is_none() {
            // The prompt fit in one step that also computed nothing: compute the mask now.
            let mut mask = TokenMask::none(self.info.vocab_size);
            seqs[0]
                .constraint
                .as_mut()
                .expect("constrained")
                .compute_mask(&mut mask)?;
            seqs.iter_mut().for_each(|s| s.mask = Some(mask.clone()));
        }
        g.seqs = seqs;
        let rows: Vec<(usize, usize, &[f32])> =
            (0..g.seqs.len()).map(|s| (group, s, last_row)).collect();
        self.sample_rows(&rows);
        Ok(())
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

    /// Sends what is new to streaming requests (not `FINAL_ONLY`).
    fn stream_updates(&mut self) {
        for g in &mut self.running {
            let Replier::Stream(tx) = &g.job.reply else {
                continue;
            };
            if g.ended || g.job.params.output_kind == OutputKind::FinalOnly || g.is_finished() {
                continue;
            }
            let job = &g.job;
            let sequences: Vec<_> = g.seqs.iter_mut().filter_map(|s| s.update(job)).collect();
            if sequences.is_empty() {
                continue;
            }
            let first = !std::mem::replace(&mut g.prompt_sent, true);
            let _ = tx.send(Ok(StreamUpdate {
                prompt_len: job.prompt.len(),
                sequences,
                finished: false,
                prompt_logprobs: if first { g.prompt_lp.clone() } else { None },
                topk_prompt_logprobs: if first {
                    g.topk_prompt_lp.clone()
                } else {
                    None
                },
            }));
        }
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
                self.sampling.remove(slot.0 as usize);
            }
            self.free_slots.extend(g.slots.iter().copied());
            if g.ended {
                self.totals.failed_requests += 1;
                continue;
            }
            self.totals.finished_requests += 1;
            g.reply_final();
        }
    }
}

impl Group {
    /// Whether a mask must be computed during this step's forward.
    fn needs_masks(&self) -> bool {
        if self.ended || self.job.constraint.is_none() {
            return false;
        }
        (self.seqs.is_empty() && self.first_mask.is_none())
            || self
                .seqs
                .iter()
                .any(|s| !s.done && s.constraint.is_some() && s.mask.is_none())
    }

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

    /// Whether every sequence is done (or the prompt is scored), or the group ended early.
    pub fn is_finished(&self) -> bool {
        if self.ended {
            return true;
        }
        if self.job.max_new_tokens == 0 {
            return self.prefilled == self.job.prompt.len();
        }
        !self.seqs.is_empty() && self.seqs.iter().all(|s| s.done)
    }

    /// Replies with `err` and ends the group.
    pub fn fail(&mut self, err: EngineError) {
        if !self.ended {
            self.job.reply.fail(err);
        }
        self.ended = true;
    }

    /// Sends the final output: the best `n` sequences (by cumulative logprob) of those drawn.
    fn reply_final(mut self) {
        let n = self.job.params.n;
        if self.seqs.len() > n && self.beam.is_none() {
            self.seqs.sort_by(|a, b| {
                b.out
                    .cumulative_logprob
                    .total_cmp(&a.out.cumulative_logprob)
            });
            self.seqs.truncate(n);
            for (i, s) in self.seqs.iter_mut().enumerate() {
                s.out.index = i;
            }
        }
        match &self.job.reply {
            Replier::Final(tx) => {
                let _ = tx.send(Ok(GenerateOutput {
                    prompt_len: self.job.prompt.len(),
                    sequences: self.seqs.into_iter().map(|s| s.out).collect(),
                    prompt_logprobs: self.prompt_lp,
                    topk_prompt_logprobs: self.topk_prompt_lp,
                }));
            }
            Replier::Stream(tx) => {
                let job = &self.job;
                let sequences = self.seqs.iter_mut().filter_map(|s| s.update(job)).collect();
                let first = !self.prompt_sent;
                let _ = tx.send(Ok(StreamUpdate {
                    prompt_len: job.prompt.len(),
                    sequences,
                    finished: true,
                    prompt_logprobs: if first { self.prompt_lp } else { None },
                    topk_prompt_logprobs: if first { self.topk_prompt_lp } else { None },
                }));
            }
        }
    }
}

/// Computes every pending guided mask; a failure ends only its own request.
fn compute_masks(running: &mut [Group], vocab: usize) {
    for g in running.iter_mut().filter(|g| g.needs_masks()) {
        let result = if g.seqs.is_empty() {
            let mut mask = TokenMask::none(vocab);
            let r = g
                .job
                .constraint
                .as_mut()
                .expect("needs_masks checked")
                .compute_mask(&mut mask);
            g.first_mask = Some(mask);
            r
        } else {
            g.seqs
                .iter_mut()
                .filter(|s| !s.done && s.mask.is_none())
                .filter_map(|s| {
                    let c = s.constraint.as_mut()?;
                    let mut mask = TokenMask::none(vocab);
                    let r = c.compute_mask(&mut mask);
                    s.mask = Some(mask);
                    Some(r)
                })
                .collect()
        };
        if let Err(err) = result {
            g.fail(EngineError::Guided(err));
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
