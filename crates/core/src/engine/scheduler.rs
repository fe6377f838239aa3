//! The engine's state and one step of it: admit (slots and KV budget) → build a batch under the
//! token budget → forward (guided masks computed alongside) → hand logits to each group's kind
//! (prompt logprobs here; sampling, beams or nothing there) → sample every drawn row in one
//! batched call → stream updates → reply to finished requests.
//!
//! Kinds ([`GroupKind`]) decide what a group does with its logits; the scheduler only batches.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::backend::{Backend, ForwardBatch, Logits, LogitsWanted, ModelInfo, SeqChunk, SlotId};
use crate::engine::EngineConfig;
use crate::engine::budget::KvReservation;
use crate::engine::group::{Draw, GroupKind, GroupParts, KindCtx, kind_of};
use crate::engine::job::{Job, Replier};
use crate::engine::request::{GenerateOutput, StreamUpdate, TopLogprobs};
use crate::engine::sequence::{Seq, SeqCtx};
use crate::error::{BackendError, EngineError};
use crate::guided::TokenMask;
use crate::kv::KvUsage;
use crate::params::OutputKind;
use crate::sampling::batch::BatchRow;
use crate::sampling::{SamplingBatch, token_logprob, top_logprobs};
use crate::text::TextCodec;

/// One request in flight: a shared prompt and, after prefill, its continuations.
pub(super) struct Group {
    job: Job,
    /// What the group does with its logits.
    kind: Box<dyn GroupKind>,
    /// The request's slots; `slots[0]` holds the prefill that the others fork from.
    slots: Vec<SlotId>,
    /// What the group holds against the KV budget until its slots are released.
    kv: KvReservation,
    prefilled: usize,
    prompt_lp: Option<Vec<Option<f32>>>,
    topk_prompt_lp: Option<Vec<Option<TopLogprobs>>>,
    seqs: Vec<Seq>,
    /// The guided mask for the first sampled token.
    first_mask: Option<TokenMask>,
    /// Prompt logprobs were streamed already.
    prompt_sent: bool,
    /// Failed or cancelled: remove without a (further) reply.
    ended: bool,
}

/// What each chunk of the current batch belongs to.
#[derive(Clone, Copy)]
enum ChunkOwner {
    Prefill { group: usize },
    Decode { group: usize, seq: usize },
}

/// Waiting queue, running set, slot pool, KV budget and per-slot sampling state.
pub(crate) struct Scheduler {
    config: EngineConfig,
    info: ModelInfo,
    codec: Option<Arc<dyn TextCodec>>,
    waiting: VecDeque<Job>,
    running: Vec<Group>,
    free_slots: Vec<SlotId>,
    sampling: SamplingBatch,
    /// The KV byte budget admission holds requests to.
    kv_budget: u64,
    /// Sum of the running groups' reservations.
    kv_reserved: u64,
    /// The most [`Scheduler::kv_held`] has been since start.
    kv_held_peak: u64,
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
    /// The KV byte budget (configured, or the default share of available memory).
    pub kv_budget_bytes: u64,
    /// Bytes of KV cache running requests hold against the budget: every sequence's
    /// reservation at its full length, plus room for one slot's growth copy. Never above
    /// `kv_budget_bytes`.
    pub kv_reserved_bytes: u64,
    /// The most `kv_reserved_bytes` has been since start.
    pub kv_reserved_peak_bytes: u64,
    /// Bytes of KV cache the backend has allocated now (0 for backends that do not count).
    pub kv_allocated_bytes: u64,
}

impl Scheduler {
    /// An idle scheduler; `kv_budget` is the resolved KV byte budget.
    pub fn new(
        config: EngineConfig,
        info: ModelInfo,
        codec: Option<Arc<dyn TextCodec>>,
        kv_budget: u64,
    ) -> Self {
        let free_slots = (0..config.max_num_seqs as u32).rev().map(SlotId).collect();
        Self {
            sampling: SamplingBatch::new(config.max_num_seqs),
            config,
            info,
            codec,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots,
            kv_budget,
            kv_reserved: 0,
            kv_held_peak: 0,
            totals: Totals::default(),
        }
    }

    pub fn enqueue(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// The scheduler's numbers now; `kv` is the backend's KV usage.
    pub fn stats(&self, kv: KvUsage) -> EngineStats {
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
            kv_budget_bytes: self.kv_budget,
            kv_reserved_bytes: self.kv_held(),
            kv_reserved_peak_bytes: self.kv_held_peak,
            kv_allocated_bytes: kv.allocated_bytes,
        }
    }

    /// Room for one slot's growth copy among the running groups and `extra`.
    fn kv_headroom(&self, extra: Option<&KvReservation>) -> u64 {
        self.running
            .iter()
            .map(|g| &g.kv)
            .chain(extra)
            .map(KvReservation::growth_headroom_bytes)
            .max()
            .unwrap_or(0)
    }

    /// What the running groups hold against the budget: reservations plus growth headroom.
    fn kv_held(&self) -> u64 {
        self.kv_reserved.saturating_add(self.kv_headroom(None))
    }

    /// Runs one scheduling step; does nothing when idle.
    pub fn step(&mut self, backend: &mut dyn Backend) {
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

    /// Strict FCFS: the head of the queue is admitted once enough slots are free and its KV
    /// reservation fits in the budget beside the running groups' (with room for one growth
    /// copy); requests behind it wait, so a large request is never starved by small ones.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            let kv = KvReservation::of(job, &self.info);
            if let Err(err) = kv.check_fits(self.kv_budget) {
                // Checked at submit, so not reached; never wait on what cannot fit.
                let job = self.waiting.pop_front().expect("front exists");
                job.reply.fail(err.into());
                self.totals.failed_requests += 1;
                continue;
            }
            let held = self
                .kv_reserved
                .saturating_add(kv.bytes())
                .saturating_add(self.kv_headroom(Some(&kv)));
            if job.slots_needed() > self.free_slots.len() || held > self.kv_budget {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            let slots = self
                .free_slots
                .split_off(self.free_slots.len() - job.slots_needed());
            let n = job.prompt.len();
            let pl = job.prompt_logprobs;
            self.kv_reserved += kv.bytes();
            self.kv_held_peak = self.kv_held_peak.max(held);
            self.running.push(Group {
                prompt_lp: pl.include.then(|| vec![None; n]),
                topk_prompt_lp: (pl.top_k > 0).then(|| vec![None; n]),
                kind: kind_of(&job),
                job,
                slots,
                kv,
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

    /// Hands the batch's logits to the groups: prompt logprobs and prefill progress here, the
    /// rest to each group's kind; then samples every row the kinds asked for in one call.
    fn process(
        &mut self,
        backend: &mut dyn Backend,
        batch: &ForwardBatch,
        owners: &[ChunkOwner],
        logits: &Logits,
    ) {
        let Self {
            running,
            info,
            codec,
            sampling,
            totals,
            ..
        } = self;
        let mut cx = KindCtx {
            backend,
            info,
            codec: codec.as_deref(),
            sampling,
        };
        let mut draws: Vec<(usize, Draw<'_>)> = Vec::new();
        let mut step_rows: Vec<Vec<(usize, &[f32])>> = vec![Vec::new(); running.len()];
        for (i, (chunk, owner)) in batch.chunks.iter().zip(owners).enumerate() {
            match *owner {
                ChunkOwner::Prefill { group } => {
                    totals.prompt_tokens += chunk.tokens.len() as u64;
                    let g = &mut running[group];
                    g.record_prompt_logprobs(chunk, logits, i);
                    g.prefilled += chunk.tokens.len();
                    if g.prefilled == g.job.prompt.len() && g.job.max_new_tokens > 0 {
                        let last = logits
                            .last_row(i)
                            .expect("the last prefill chunk asks for logits");
                        let (kind, parts) = g.parts();
                        match kind.after_prefill(parts, last, &mut cx) {
                            Ok(d) => draws.extend(d.into_iter().map(|d| (group, d))),
                            Err(err) => g.fail(err),
                        }
                    }
                }
                ChunkOwner::Decode { group, seq } => {
                    let row = logits
                        .last_row(i)
                        .expect("decode chunks ask for their last row");
                    step_rows[group].push((seq, row));
                }
            }
        }
        for (group, rows) in step_rows.iter().enumerate() {
            let g = &mut running[group];
            if rows.is_empty() || g.ended {
                continue;
            }
            let (kind, parts) = g.parts();
            match kind.on_step_rows(parts, rows, &mut cx) {
                Ok(d) => draws.extend(d.into_iter().map(|d| (group, d))),
                Err(err) => g.fail(err),
            }
        }
        self.sample_draws(&draws);
    }

    /// Samples each `(group, draw)` row in one batched call; each token is accepted by its
    /// sequence (stops checked).
    fn sample_draws(&mut self, draws: &[(usize, Draw<'_>)]) {
        let batch_rows: Vec<BatchRow<'_>> = draws
            .iter()
            .map(|&(g, d)| {
                let seq = &self.running[g].seqs[d.seq];
                BatchRow {
                    slot: seq.slot.0 as usize,
                    logits: d.row,
                    mask: seq.mask.as_ref(),
                }
            })
            .collect();
        let sampled = self.sampling.sample(&batch_rows);
        self.totals.generated_tokens += sampled.len() as u64;
        let codec = self.codec.as_deref();
        for (&(g, d), token) in draws.iter().zip(sampled) {
            let group = &mut self.running[g];
            let top = group.job.params.logprobs.map(|k| top_logprobs(d.row, k));
            let ctx = SeqCtx {
                job: &group.job,
                info: &self.info,
                codec,
            };
            let seq = &mut group.seqs[d.seq];
            seq.mask = None;
            if let Err(err) = seq.accept(token, top, &ctx) {
                group.fail(err);
            }
        }
    }

    fn fail_batch(&mut self, backend: &mut dyn Backend, owners: &[ChunkOwner], err: BackendError) {
        for owner in owners {
            let group = match *owner {
                ChunkOwner::Prefill { group } | ChunkOwner::Decode { group, .. } => group,
            };
            self.running[group].fail(EngineError::Backend(err.clone()));
        }
        // Slots of failed groups may hold partially appended state: drop it.
        self.finish_groups(backend);
    }

    fn drop_cancelled(&mut self, backend: &mut dyn Backend) {
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

    /// Replies to and removes groups whose sequences are all done, returning their slots and
    /// their KV reservation.
    fn finish_groups(&mut self, backend: &mut dyn Backend) {
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
            self.kv_reserved -= g.kv.bytes();
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
    /// The group's kind and the parts of the group it may see.
    fn parts(&mut self) -> (&mut dyn GroupKind, GroupParts<'_>) {
        (
            &mut *self.kind,
            GroupParts {
                job: &self.job,
                slots: &self.slots,
                seqs: &mut self.seqs,
                first_mask: self.first_mask.as_ref(),
            },
        )
    }

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
            self.job.reply.fail(err);
        }
        self.ended = true;
    }

    /// Sends the final output: the sequences the kind keeps, in its order.
    fn reply_final(mut self) {
        self.kind.finish(&self.job, &mut self.seqs);
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
