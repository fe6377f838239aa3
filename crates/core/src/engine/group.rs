//! The seam between the scheduler and the kinds of work a request does with its logits.
//!
//! The scheduler owns every group's common state (the job, its slots, prefill progress, prompt
//! logprobs, sequences, stream cursor, KV reservation) and batches all groups' prefill chunks
//! and decode steps into shared forward passes. What happens with the logits is the group's
//! [`GroupKind`]: [`SampleKind`] draws `n` (or `best_of`) continuations that share one prefill,
//! [`ScoreKind`] only scores the prompt, and [`BeamKind`](crate::engine::beam::BeamKind)
//! runs beam search. A kind sees the group through [`GroupParts`] and the engine through
//! [`KindCtx`]; it never touches the scheduler.
//!
//! Sampling is batched across groups: a kind does not sample itself but returns [`Draw`]s, rows
//! the scheduler samples in one parallel call and hands to the sequences they belong to.

use crate::backend::{Backend, ModelInfo, SlotId};
use crate::engine::beam::BeamKind;
use crate::engine::job::{Job, JobKind};
use crate::engine::sequence::{Seq, SeqCtx};
use crate::error::EngineError;
use crate::guided::TokenMask;
use crate::sampling::{History, Knobs, SamplingBatch, SeqRng, SlotSampling};
use crate::text::TextCodec;

/// What a kind may use of the engine while it handles a group's logits.
pub(crate) struct KindCtx<'a> {
    /// Forks KV state between the group's slots.
    pub backend: &'a mut dyn Backend,
    /// The served model's facts (EOS ids, vocabulary size).
    pub info: &'a ModelInfo,
    /// The tokenizer, if the engine has one.
    pub codec: Option<&'a dyn TextCodec>,
    /// Per-slot sampling state: a kind that draws tokens installs its slots' state here.
    pub sampling: &'a mut SamplingBatch,
}

/// The parts of a group a kind reads and writes.
pub(crate) struct GroupParts<'g> {
    /// The validated request.
    pub job: &'g Job,
    /// The group's KV slots; `slots[0]` holds the prompt's prefill.
    pub slots: &'g [SlotId],
    /// The group's sequences (empty until the kind creates them after prefill).
    pub seqs: &'g mut Vec<Seq>,
    /// The guided mask for the first sampled token, when constrained and already computed.
    pub first_mask: Option<&'g TokenMask>,
}

/// A logits row to sample for sequence `seq` of the group (its index in `seqs`).
#[derive(Clone, Copy)]
pub(crate) struct Draw<'r> {
    /// Index of the sequence in the group's `seqs`.
    pub seq: usize,
    /// The row to sample from.
    pub row: &'r [f32],
}

/// What a group does after its prefill, with each step's rows, and before its final reply.
pub(crate) trait GroupKind: Send {
    /// The prompt is in `slots[0]` and `last_row` is its last position's logits: create the
    /// sequences (forking the KV as needed). Returns the rows to sample for them. Called once,
    /// and only for requests that generate (`max_new_tokens > 0`).
    fn after_prefill<'r>(
        &mut self,
        group: GroupParts<'_>,
        last_row: &'r [f32],
        cx: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError>;

    /// This step's logits: one row per live (not done) sequence, `(seq index, row)` in sequence
    /// order. Returns the rows to sample.
    fn on_step_rows<'r>(
        &mut self,
        group: GroupParts<'_>,
        rows: &[(usize, &'r [f32])],
        cx: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError>;

    /// Every sequence is done: put the ones to return in `seqs`, in reply order.
    fn finish(&mut self, job: &Job, seqs: &mut Vec<Seq>);
}

/// The kind a job's groups are.
pub(crate) fn kind_of(job: &Job) -> Box<dyn GroupKind> {
    match &job.kind {
        JobKind::Sample { .. } => Box::new(SampleKind),
        JobKind::Score => Box::new(ScoreKind),
        JobKind::Beam(params) => Box::new(BeamKind::new(params.clone())),
    }
}

/// `n` sampled continuations (`best_of` drawn, the likeliest `n` returned) sharing one prefill.
pub(crate) struct SampleKind;

impl GroupKind for SampleKind {
    /// Forks the prompt's KV to every sample's slot and draws each sample's first token from
    /// the one prefill row.
    fn after_prefill<'r>(
        &mut self,
        g: GroupParts<'_>,
        last_row: &'r [f32],
        cx: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        for &dst in &g.slots[1..] {
            cx.backend.fork(g.slots[0], dst)?;
        }
        let job = g.job;
        let ctx = SeqCtx {
            job,
            info: cx.info,
            codec: cx.codec,
        };
        let mut seqs: Vec<Seq> = g
            .slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                cx.sampling.insert(
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
                seq.mask = g.first_mask.cloned();
                seq
            })
            .collect();
        if job.constraint.is_some() && g.first_mask.is_none() {
            // The prompt fit in one step that also computed nothing: compute the mask now.
            let mut mask = TokenMask::none(cx.info.vocab_size);
            seqs[0]
                .constraint
                .as_mut()
                .expect("constrained")
                .compute_mask(&mut mask)?;
            seqs.iter_mut().for_each(|s| s.mask = Some(mask.clone()));
        }
        *g.seqs = seqs;
        Ok((0..g.seqs.len())
            .map(|seq| Draw { seq, row: last_row })
            .collect())
    }

    /// Every row is sampled.
    fn on_step_rows<'r>(
        &mut self,
        _: GroupParts<'_>,
        rows: &[(usize, &'r [f32])],
        _: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        Ok(rows.iter().map(|&(seq, row)| Draw { seq, row }).collect())
    }

    /// Keeps the best `n` of the draws (by cumulative logprob), renumbered.
    fn finish(&mut self, job: &Job, seqs: &mut Vec<Seq>) {
        let n = job.params.n;
        if seqs.len() <= n {
            return;
        }
        seqs.sort_by(|a, b| {
            b.out
                .cumulative_logprob
                .total_cmp(&a.out.cumulative_logprob)
        });
        seqs.truncate(n);
        for (i, s) in seqs.iter_mut().enumerate() {
            s.out.index = i;
        }
    }
}

/// Scoring: the prompt's logprobs only; nothing is generated.
pub(crate) struct ScoreKind;

impl GroupKind for ScoreKind {
    fn after_prefill<'r>(
        &mut self,
        _: GroupParts<'_>,
        _: &'r [f32],
        _: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        Ok(Vec::new())
    }

    fn on_step_rows<'r>(
        &mut self,
        _: GroupParts<'_>,
        _: &[(usize, &'r [f32])],
        _: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        Ok(Vec::new())
    }

    fn finish(&mut self, _: &Job, _: &mut Vec<Seq>) {}
}
