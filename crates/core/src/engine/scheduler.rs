//! The engine's state and one step of it: admit (slots and KV budget) → build a batch under the
//! token budget → forward (guided masks computed alongside) → hand logits to each group's kind
//! (prompt logprobs here; sampling, beams or nothing there) → sample every drawn row in one
//! batched call → stream updates → reply to finished requests.
//!
//! Kinds ([`GroupKind`]) decide what a group does with its logits; the scheduler only batches.
//!
//! Nothing a request sends may take the engine down: the forward, the guided masks (each
//! group's on its own), each sampled row, each group's logits handling and each token's
//! acceptance are guarded; a panic in one of them fails only the request it belongs to, with
//! a typed error, and its slots are released. Logits rows the engine would sample from or score
//! are checked for NaN/+inf first ([`BackendError::NonFiniteLogits`]). Replies are queued and
//! sent after the step's stats are published, so a caller that got a reply sees stats at least
//! as fresh as it.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::TokenId;
use crate::backend::{
    AdapterId, Backend, ForwardBatch, Logits, LogitsWanted, ModelInfo, SeqChunk, SlotId,
};
use crate::engine::EngineConfig;
use crate::engine::adapters::{AdapterInfo, Adapters, Registry};
use crate::engine::budget::{FAIR_BYPASS_WINDOW_STEPS, KvReservation, worst_case_steps};
use crate::engine::control::ControlState;
use crate::engine::group::{Draw, GroupKind, GroupParts, KindCtx, kind_of};
use crate::engine::job::{Job, JobKind, Replier};
use crate::engine::prefix::{Donor, PREFIX_BLOCK, PrefixCache, Wanted, block_hashes};
use crate::engine::request::{GenerateOutput, StreamUpdate, TopLogprobs};
use crate::engine::sequence::{Seq, SeqCtx};
use crate::engine::shared::Shared;
use crate::error::{BackendError, EngineError, ValidationError};
use crate::guided::TokenMask;
use crate::kv::{KV_GRANULE, KvUsage, kv_capacity_for};
use crate::params::OutputKind;
use crate::sampling::batch::{BatchRow, panic_message};
use crate::sampling::{SamplingBatch, token_logprob, top_logprobs};
use crate::text::TextCodec;

mod group_state;
mod masks;
mod reuse;

use group_state::missing_row;

use masks::compute_masks;

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
    /// Why it failed, sent when it is removed (`None` when cancelled).
    failure: Option<EngineError>,
    /// The weight version at admission: the one every step of the group runs with.
    weight_version: String,
    /// Prompt tokens whose KV came from the prefix cache.
    cached_prompt_tokens: usize,
    /// Chained block hashes of the prompt (empty without the prefix cache).
    prompt_hashes: Vec<u64>,
    /// Where the group is in looking for a cached prefix.
    prefix: PrefixState,
}

/// A group's search for a reusable prefix, before its first prefill chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefixState {
    /// Not looked yet.
    Unchecked,
    /// Another running request is prefilling a longer shared prefix: wait a step for it.
    Waiting,
    /// Looked (or nothing to look for): prefill from `prefilled`.
    Done,
}

/// A job waiting for admission.
struct Waiting {
    job: Job,
    /// Steps it has spent blocked at the head of the queue (see [`crate::engine::budget`]).
    blocked_steps: usize,
}

/// A reply queued during a step, sent once the step's stats are published.
enum Outgoing {
    Final(
        flume::Sender<Result<GenerateOutput, EngineError>>,
        Result<GenerateOutput, EngineError>,
    ),
    Stream(
        flume::Sender<Result<StreamUpdate, EngineError>>,
        Result<StreamUpdate, EngineError>,
    ),
}

impl Outgoing {
    /// `err` for whoever waits on `reply`.
    fn error(reply: &Replier, err: EngineError) -> Self {
        match reply {
            Replier::Final(tx) => Self::Final(tx.clone(), Err(err)),
            Replier::Stream(tx) => Self::Stream(tx.clone(), Err(err)),
        }
    }

    /// Sends it; a caller that has gone away is ignored.
    fn send(self) {
        match self {
            Self::Final(tx, msg) => drop(tx.send(msg)),
            Self::Stream(tx, msg) => drop(tx.send(msg)),
        }
    }
}

/// What the engine was doing when a caught panic happened (see [`EngineError::Panicked`]).
const MASK_STAGE: &str = "computing a guided-decoding mask";
const LOGITS_STAGE: &str = "handling a request's logits";
const SAMPLE_STAGE: &str = "sampling a token";
const ACCEPT_STAGE: &str = "accepting a sampled token (stops, guided commit, detokenizing)";
const STEP_STAGE: &str = "running a scheduling step";

/// Runs `f`, turning a panic into [`EngineError::Panicked`] at `stage`.
fn guarded<T>(
    stage: &'static str,
    f: impl FnOnce() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(EngineError::Panicked {
            stage,
            message: panic_message(panic),
        })
    })
}

/// Where a reused prefix comes from.
#[derive(Clone, Copy)]
enum Source {
    /// A finished prefix in the cache, by its slot.
    Cache(SlotId),
    /// The prefilled prompt of the running group at this index.
    Running(usize),
}

/// What each chunk of the current batch belongs to.
#[derive(Clone, Copy)]
enum ChunkOwner {
    Prefill { group: usize },
    Decode { group: usize, seq: usize },
}

impl ChunkOwner {
    fn group(self) -> usize {
        match self {
            Self::Prefill { group } | Self::Decode { group, .. } => group,
        }
    }
}

/// Waiting queue, running set, slot pool, KV budget and per-slot sampling state.
pub(crate) struct Scheduler {
    config: EngineConfig,
    info: ModelInfo,
    codec: Option<Arc<dyn TextCodec>>,
    waiting: VecDeque<Waiting>,
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
    /// Published stats and the live queue depth, read by the handles.
    shared: Arc<Shared>,
    /// Replies of this step, sent after its stats are published.
    outbox: Vec<Outgoing>,
    /// Pause and weight-update state (`control.rs`).
    pub(super) control: ControlState,
    /// Finished prefixes kept for reuse (`prefix.rs`).
    prefix_cache: PrefixCache,
    /// The LoRA adapters loaded (`adapters.rs`).
    adapters: Adapters,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    prompt_tokens: u64,
    generated_tokens: u64,
    finished_requests: u64,
    failed_requests: u64,
    prefix_queried_tokens: u64,
    prefix_hit_tokens: u64,
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
    /// Prompt tokens processed since start: prefilled, or reused from the prefix cache.
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
    /// Finished prefixes the prefix cache keeps (their slots count as free: they are evicted
    /// when admission needs them).
    pub prefix_cache_entries: usize,
    /// KV bytes those prefixes hold (beside `kv_reserved_bytes`; both within the budget).
    pub prefix_cache_bytes: u64,
    /// Prompt tokens of requests that looked in the prefix cache, since start.
    pub prefix_cache_queried_tokens_total: u64,
    /// Of those, tokens whose KV was reused instead of prefilled (vLLM's prefix cache hits).
    pub prefix_cache_hit_tokens_total: u64,
}

impl Scheduler {
    /// An idle scheduler; `kv_budget` is the resolved KV byte budget, `shared` what it
    /// publishes to the handles.
    pub fn new(
        config: EngineConfig,
        info: ModelInfo,
        codec: Option<Arc<dyn TextCodec>>,
        kv_budget: u64,
        shared: Arc<Shared>,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            adapters: Adapters::new(config.max_loras, registry),
            free_slots: all_slots(config.max_num_seqs),
            sampling: SamplingBatch::new(config.max_num_seqs),
            config,
            info,
            codec,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_budget,
            kv_reserved: 0,
            kv_held_peak: 0,
            totals: Totals::default(),
            shared,
            outbox: Vec::new(),
            control: ControlState::default(),
            prefix_cache: PrefixCache::default(),
        }
    }

    /// Queues a submitted job (the handle counted it as waiting when it sent it).
    pub fn enqueue(&mut self, job: Job) {
        self.waiting.push_back(Waiting {
            job,
            blocked_steps: 0,
        });
    }

    /// Publishes the scheduler's numbers for [`crate::Engine::stats`].
    pub fn publish(&self, backend: &dyn Backend) {
        self.shared.publish(self.stats(backend.kv_usage()));
    }

    /// Sends the replies queued so far.
    fn flush(&mut self) {
        for msg in self.outbox.drain(..) {
            msg.send();
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Whether a step would do anything: running requests that may step (not paused, or
    /// draining for a weight update) or queued ones that may be admitted.
    pub fn has_work(&self) -> bool {
        let steps = !self.running.is_empty() && self.control.may_step();
        let admits = !self.waiting.is_empty() && self.control.admitting();
        steps || admits
    }

    /// Requests admitted and not yet removed.
    pub(super) fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for admission.
    pub(super) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// What the engine thread publishes to the handles.
    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Ends every running and queued request with [`EngineError::Aborted`] (`by` names the
    /// command), releases their slots and sends the replies; returns how many ended.
    pub(super) fn abort_all(&mut self, backend: &mut dyn Backend, by: &'static str) -> usize {
        let mut aborted = 0;
        for g in self.running.iter_mut().filter(|g| !g.ended) {
            g.fail(EngineError::Aborted { by });
            aborted += 1;
        }
        for w in std::mem::take(&mut self.waiting) {
            self.shared.left_queue();
            self.totals.failed_requests += 1;
            self.outbox
                .push(Outgoing::error(&w.job.reply, EngineError::Aborted { by }));
            aborted += 1;
        }
        self.finish_groups(backend);
        self.publish(&*backend);
        self.flush();
        aborted
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
            free_slots: self.free_slots.len() + self.prefix_cache.len(),
            total_slots: self.config.max_num_seqs,
            prompt_tokens_total: self.totals.prompt_tokens,
            generated_tokens_total: self.totals.generated_tokens,
            finished_requests_total: self.totals.finished_requests,
            failed_requests_total: self.totals.failed_requests,
            kv_budget_bytes: self.kv_budget,
            kv_reserved_bytes: self.kv_held(),
            kv_reserved_peak_bytes: self.kv_held_peak,
            kv_allocated_bytes: kv.allocated_bytes,
            prefix_cache_entries: self.prefix_cache.len(),
            prefix_cache_bytes: self.prefix_cache.bytes(),
            prefix_cache_queried_tokens_total: self.totals.prefix_queried_tokens,
            prefix_cache_hit_tokens_total: self.totals.prefix_hit_tokens,
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
        self.admit(backend);
        self.attach_prefixes(backend);
        self.publish(&*backend);
        let (batch, owners) = self.build_batch();
        if !batch.chunks.is_empty() {
            match self.forward(backend, &batch) {
                Ok(logits) => self.process(backend, &batch, &owners, &logits),
                Err(err) => self.fail_batch(&owners, err),
            }
            self.stream_updates();
        }
        self.finish_groups(backend);
        self.publish(&*backend);
        self.flush();
    }

    /// After a panic escaped [`Scheduler::step`] (none of its finer guards caught it): sends
    /// what was queued, fails every running request with [`EngineError::Panicked`], releases
    /// every slot and resets the slot pool, sampling state and KV reservations, so the engine
    /// serves the waiting and later requests from a clean state.
    pub fn recover(&mut self, backend: &mut dyn Backend, message: String) {
        self.flush();
        for mut g in std::mem::take(&mut self.running) {
            self.totals.failed_requests += 1;
            let err = if g.ended {
                g.failure.take()
            } else {
                Some(EngineError::Panicked {
                    stage: STEP_STAGE,
                    message: message.clone(),
                })
            };
            if let Some(err) = err {
                Outgoing::error(&g.job.reply, err).send();
            }
        }
        for slot in all_slots(self.config.max_num_seqs) {
            // Releasing an empty slot is a no-op; a backend that panics here again is ignored.
            let _ = catch_unwind(AssertUnwindSafe(|| backend.release(slot)));
        }
        self.free_slots = all_slots(self.config.max_num_seqs);
        self.sampling = SamplingBatch::new(self.config.max_num_seqs);
        self.kv_reserved = 0;
        // Every slot was released above.
        self.prefix_cache.flush();
        self.publish(&*backend);
    }

    /// The backend's forward over `batch`, guided masks computed alongside; a panic in either
    /// becomes an error (the forward's fails the batch, a mask's its request).
    fn forward(
        &mut self,
        backend: &mut dyn Backend,
        batch: &ForwardBatch,
    ) -> Result<Logits, BackendError> {
        let vocab = self.info.vocab_size;
        let running = &mut self.running;
        let (result, masks) = std::thread::scope(|scope| {
            // Guided masks only depend on committed tokens: compute them while the forward runs.
            let masks = running
                .iter()
                .any(Group::needs_masks)
                .then(|| scope.spawn(move || compute_masks(running, vocab)));
            let result = catch_unwind(AssertUnwindSafe(|| backend.forward(batch)))
                .unwrap_or_else(|panic| Err(BackendError::Panicked(panic_message(panic))));
            let masks = masks.map_or(Ok(()), |handle| handle.join().map_err(panic_message));
            (result, masks)
        });
        if let Err(message) = masks {
            // Each group's masks are guarded, so this is outside them: fail every constrained
            // request rather than sample one without its mask.
            for g in self
                .running
                .iter_mut()
                .filter(|g| g.job.constraint.is_some())
            {
                g.fail(EngineError::Panicked {
                    stage: MASK_STAGE,
                    message: message.clone(),
                });
            }
        }
        result
    }

    /// Whether a job needing `slots` slots and `kv` can start now: enough free slots, and its
    /// reservation fits in the budget beside the running groups' (with room for one growth
    /// copy) and the cached prefixes.
    fn fits(&self, slots: usize, kv: &KvReservation) -> bool {
        self.fits_beside(slots, kv, self.prefix_cache.bytes(), 0)
    }

    /// [`Scheduler::fits`] with the cache holding `cache_bytes` and `cache_slots` more free.
    fn fits_beside(
        &self,
        slots: usize,
        kv: &KvReservation,
        cache_bytes: u64,
        cache_slots: usize,
    ) -> bool {
        let held = self
            .kv_reserved
            .saturating_add(cache_bytes)
            .saturating_add(kv.bytes())
            .saturating_add(self.kv_headroom(Some(kv)));
        slots <= self.free_slots.len() + cache_slots && held <= self.kv_budget
    }

    /// Evicts least recently used prefixes until a job needing `slots` and `kv` fits, when
    /// evicting them all would make it fit (otherwise it waits for running requests, and the
    /// cache is kept).
    fn make_room(&mut self, backend: &mut dyn Backend, slots: usize, kv: &KvReservation) {
        if !self.fits_beside(slots, kv, 0, self.prefix_cache.len()) {
            return;
        }
        while !self.fits(slots, kv) {
            let Some(slot) = self.prefix_cache.evict_lru() else {
                return;
            };
            self.release_cached(backend, slot);
        }
    }

    /// Admission, in queue order, under the rule documented in [`crate::engine::budget`]: the
    /// head starts once it fits; while it is blocked, a later job that fits now may start if
    /// its worst-case run ends within the head's bypass window; once the window is spent,
    /// nothing passes the head.
    fn admit(&mut self, backend: &mut dyn Backend) {
        if !self.control.admitting() {
            return;
        }
        // Steps a job admitted past a blocked head may run without delaying it.
        let mut room = usize::MAX;
        let mut i = 0;
        while let Some(waiting) = self.waiting.get(i) {
            if let Some(a) = waiting
                .job
                .adapter
                .as_ref()
                .filter(|a| !self.adapters.is_live(a.id))
            {
                // Unloaded since the handle bound it.
                let err = ValidationError::field(
                    "model",
                    format!("the LoRA adapter {:?} was unloaded", a.name),
                );
                self.reject_waiting(i, err);
                continue;
            }
            let kv = KvReservation::of(&waiting.job, &self.info);
            if let Err(err) = kv.check_fits(self.kv_budget) {
                // Checked at submit, so not reached; never wait on what cannot fit.
                self.reject_waiting(i, err);
                continue;
            }
            let may_pass = i == 0
                || worst_case_steps(&waiting.job, self.config.max_num_batched_tokens) <= room;
            let slots = waiting.job.slots_needed();
            if may_pass && !self.fits(slots, &kv) {
                self.make_room(backend, slots, &kv);
            }
            if may_pass && self.fits(slots, &kv) {
                if let Some(w) = self.waiting.remove(i) {
                    self.shared.left_queue();
                    self.start(w.job, kv);
                }
                continue;
            }
            if i == 0 {
                let head = &mut self.waiting[0];
                head.blocked_steps = head.blocked_steps.saturating_add(1);
                room = FAIR_BYPASS_WINDOW_STEPS.saturating_sub(head.blocked_steps);
                if room == 0 {
                    break;
                }
            }
            i += 1;
        }
    }

    /// Removes waiting job `i` and fails it with `err`.
    fn reject_waiting(&mut self, i: usize, err: ValidationError) {
        if let Some(w) = self.waiting.remove(i) {
            self.shared.left_queue();
            self.outbox
                .push(Outgoing::error(&w.job.reply, EngineError::Invalid(err)));
            self.totals.failed_requests += 1;
        }
    }

    /// Moves an admitted job into the running set with its slots and reservation.
    fn start(&mut self, job: Job, kv: KvReservation) {
        let held = self
            .kv_reserved
            .saturating_add(kv.bytes())
            .saturating_add(self.kv_headroom(Some(&kv)));
        let slots = self
            .free_slots
            .split_off(self.free_slots.len() - job.slots_needed());
        let n = job.prompt.len();
        let pl = job.prompt_logprobs;
        self.kv_reserved = self.kv_reserved.saturating_add(kv.bytes());
        self.kv_held_peak = self.kv_held_peak.max(held);
        // Top-k prompt alternatives are not kept with a prefix: such requests prefill it all.
        let looks = self.config.prefix_caching && pl.top_k == 0 && n > PREFIX_BLOCK;
        let base_version = self.shared.weight_version();
        let weight_version = match job
            .adapter
            .as_ref()
            .and_then(|a| self.adapters.version(a.id))
        {
            Some(adapter) => format!("{base_version}+{adapter}"),
            None => base_version,
        };
        self.running.push(Group {
            prompt_hashes: if looks {
                block_hashes(&job.prompt, job.adapter.as_ref().map(|a| a.id))
            } else {
                Vec::new()
            },
            prefix: if looks {
                PrefixState::Unchecked
            } else {
                PrefixState::Done
            },
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
            failure: None,
            weight_version,
            cached_prompt_tokens: 0,
        });
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
                    adapter: group.adapter(),
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
            if remaining == 0 || budget == 0 || group.prefix == PrefixState::Waiting {
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
                adapter: group.adapter(),
            });
            owners.push(ChunkOwner::Prefill { group: g });
        }
        (ForwardBatch { chunks }, owners)
    }

    /// Hands the batch's logits to the groups: prompt logprobs and prefill progress here, the
    /// rest to each group's kind; then samples every row the kinds asked for in one call.
    /// Groups with a non-finite row the engine would use fail first and are skipped.
    fn process(
        &mut self,
        backend: &mut dyn Backend,
        batch: &ForwardBatch,
        owners: &[ChunkOwner],
        logits: &Logits,
    ) {
        for (i, (chunk, owner)) in batch.chunks.iter().zip(owners).enumerate() {
            let g = &mut self.running[owner.group()];
            if g.ended {
                continue;
            }
            let decode = matches!(owner, ChunkOwner::Decode { .. });
            if let Some(err) = g.non_finite_row(chunk, decode, logits, i) {
                g.fail(EngineError::Backend(err));
            }
        }
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
                    if g.ended {
                        continue;
                    }
                    g.record_prompt_logprobs(chunk, logits, i);
                    g.prefilled += chunk.tokens.len();
                    if g.prefilled == g.job.prompt.len() && g.job.max_new_tokens > 0 {
                        let Some(last) = logits.last_row(i) else {
                            g.fail(missing_row(chunk).into());
                            continue;
                        };
                        let (kind, parts) = g.parts();
                        match guarded(LOGITS_STAGE, || kind.after_prefill(parts, last, &mut cx)) {
                            Ok(d) => draws.extend(d.into_iter().map(|d| (group, d))),
                            Err(err) => g.fail(err),
                        }
                    }
                }
                ChunkOwner::Decode { group, seq } => {
                    let g = &mut running[group];
                    if g.ended {
                        continue;
                    }
                    match logits.last_row(i) {
                        Some(row) => step_rows[group].push((seq, row)),
                        None => g.fail(missing_row(chunk).into()),
                    }
                }
            }
        }
        for (group, rows) in step_rows.iter().enumerate() {
            let g = &mut running[group];
            if rows.is_empty() || g.ended {
                continue;
            }
            let (kind, parts) = g.parts();
            match guarded(LOGITS_STAGE, || kind.on_step_rows(parts, rows, &mut cx)) {
                Ok(d) => draws.extend(d.into_iter().map(|d| (group, d))),
                Err(err) => g.fail(err),
            }
        }
        self.sample_draws(&draws);
    }

    /// Samples each `(group, draw)` row in one batched call; each token is accepted by its
    /// sequence (stops checked). A row whose sampling or acceptance panics fails its group.
    fn sample_draws(&mut self, draws: &[(usize, Draw<'_>)]) {
        let draws: Vec<(usize, Draw<'_>)> = draws
            .iter()
            .filter(|(g, _)| !self.running[*g].ended)
            .copied()
            .collect();
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
        let sampled = self.sampling.try_sample(&batch_rows);
        let codec = self.codec.as_deref();
        for (&(g, d), token) in draws.iter().zip(sampled) {
            let group = &mut self.running[g];
            if group.ended {
                // An earlier row of the same request failed.
                continue;
            }
            let token = match token {
                Ok(token) => token,
                Err(message) => {
                    group.fail(EngineError::Panicked {
                        stage: SAMPLE_STAGE,
                        message,
                    });
                    continue;
                }
            };
            self.totals.generated_tokens += 1;
            let top = group.job.params.logprobs.map(|k| top_logprobs(d.row, k));
            let ctx = SeqCtx {
                job: &group.job,
                info: &self.info,
                codec,
            };
            let seq = &mut group.seqs[d.seq];
            seq.mask = None;
            if let Err(err) = guarded(ACCEPT_STAGE, || seq.accept(token, top, &ctx)) {
                group.fail(err);
            }
        }
    }

    /// The forward failed: every request in the batch fails with its error (their slots,
    /// which may hold partially appended state, are released by [`Scheduler::finish_groups`]).
    fn fail_batch(&mut self, owners: &[ChunkOwner], err: BackendError) {
        for owner in owners {
            self.running[owner.group()].fail(EngineError::Backend(err.clone()));
        }
    }

    /// Removes requests whose caller went away, freeing their slots (also while paused).
    pub fn drop_cancelled(&mut self, backend: &mut dyn Backend) {
        let shared = &self.shared;
        self.waiting.retain(|w| {
            let keep = !w.job.reply.is_disconnected();
            if !keep {
                shared.left_queue();
            }
            keep
        });
        for g in &mut self.running {
            if g.job.reply.is_disconnected() {
                g.ended = true;
            }
        }
        self.finish_groups(backend);
    }

    /// Queues what is new for streaming requests (not `FINAL_ONLY`).
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
            self.outbox.push(Outgoing::Stream(
                tx.clone(),
                Ok(StreamUpdate {
                    prompt_len: job.prompt.len(),
                    sequences,
                    finished: false,
                    prompt_logprobs: if first { g.prompt_lp.clone() } else { None },
                    topk_prompt_logprobs: if first {
                        g.topk_prompt_lp.clone()
                    } else {
                        None
                    },
                    weight_version: g.weight_version.clone(),
                    cached_prompt_tokens: g.cached_prompt_tokens,
                }),
            ));
        }
    }

    /// Removes groups whose sequences are all done (or that failed or were cancelled),
    /// returning their slots and their KV reservation, and queues their replies.
    fn finish_groups(&mut self, backend: &mut dyn Backend) {
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].is_finished() {
                i += 1;
                continue;
            }
            let kept = self.prefixes_to_keep(&self.running[i], &*backend);
            // Released while the group is still running, so a backend that panics here
            // leaves it to `recover`, which fails it, rather than dropping its reply.
            for &slot in &self.running[i].slots {
                if !kept.iter().any(|k| k.0 == slot) {
                    backend.release(slot);
                }
                self.sampling.remove(slot.0 as usize);
            }
            let mut g = self.running.swap_remove(i);
            self.free_slots.extend(
                g.slots
                    .iter()
                    .copied()
                    .filter(|s| !kept.iter().any(|k| k.0 == *s)),
            );
            self.kv_reserved = self.kv_reserved.saturating_sub(g.kv.bytes());
            let adapter = g.adapter();
            self.keep_prefixes(backend, kept, adapter);
            if g.ended {
                self.totals.failed_requests += 1;
                if let Some(err) = g.failure.take() {
                    self.outbox.push(Outgoing::error(&g.job.reply, err));
                }
                continue;
            }
            self.totals.finished_requests += 1;
            self.outbox.push(g.reply_final());
        }
        let running = &self.running;
        self.adapters.settle(backend, |id| {
            running.iter().any(|g| g.adapter() == Some(id))
        });
    }
}

/// Every slot of a pool of `n`, in the order they are handed out.
fn all_slots(n: usize) -> Vec<SlotId> {
    (0..n as u32).rev().map(SlotId).collect()
}
