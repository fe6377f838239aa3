//! Beam search over the backend's KV fork, as Hugging Face's `generate(num_beams=W)`: each step
//! scores `W × vocab` continuations, keeps the best `2W`, moves EOS-ending ones to the finished
//! set (when ranked within the first `W`) and continues the best `W` others. A group holds `2W`
//! slots so every new beam can fork its parent's KV while the parent's slot is reused.

use crate::TokenId;
use crate::backend::SlotId;
use crate::engine::group::{Draw, GroupKind, GroupParts, KindCtx};
use crate::engine::job::Job;
use crate::engine::request::{FinishReason, GeneratedSequence, StopReason};
use crate::engine::sequence::{Seq, SeqCtx};
use crate::error::EngineError;
use crate::params::BeamSearchParams;
use crate::sampling::logprobs::logsumexp;
use crate::text::{DecodeOptions, IncrementalDetokenizer, TextCodec};

/// A finished hypothesis and its length-normalized score.
struct Hypothesis {
    out: GeneratedSequence,
    score: f64,
}

/// Beam search as a group kind: the live beams' scores and the finished hypotheses.
pub(crate) struct BeamKind {
    params: BeamSearchParams,
    /// Sum of processed (tempered) logprobs per live beam, in `seqs` order.
    scores: Vec<f64>,
    finished: Vec<Hypothesis>,
}

/// One candidate continuation: parent beam, token, new score, raw logprob.
#[derive(Clone, Copy)]
struct Candidate {
    parent: usize,
    token: TokenId,
    score: f64,
    raw: f32,
}

impl BeamKind {
    fn normalized(&self, sum: f64, len: usize) -> f64 {
        sum / (len.max(1) as f64).powf(self.params.length_penalty as f64)
    }

    /// The `2W` best continuations of all live beams, best first.
    fn candidates(&self, rows: &[&[f32]]) -> Vec<Candidate> {
        let width = self.params.beam_width;
        let inv_t = if self.params.temperature > 0.0 {
            1.0 / self.params.temperature
        } else {
            1.0
        };
        let mut all = Vec::with_capacity(rows.len() * 2 * width);
        for (parent, row) in rows.iter().enumerate() {
            let scaled: Vec<f32> = row.iter().map(|x| x * inv_t).collect();
            let lse_scaled = logsumexp(&scaled);
            let lse_raw = logsumexp(row);
            let top = crate::sampling::top_logprobs(&scaled, 2 * width);
            all.extend(top.into_iter().map(|(token, _)| Candidate {
                parent,
                token,
                score: self.scores[parent] + (scaled[token as usize] - lse_scaled) as f64,
                raw: row[token as usize] - lse_raw,
            }));
        }
        all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.token.cmp(&b.token)));
        all.truncate(2 * width);
        all
    }

    /// Hugging Face's stopping rule (`early_stopping=False`): done when `W` hypotheses are
    /// finished and no live beam can still beat the worst of them.
    fn is_done(&self, best_live: f64, cur_len: usize) -> bool {
        if self.finished.len() < self.params.beam_width {
            return false;
        }
        let worst = self
            .finished
            .iter()
            .map(|h| h.score)
            .fold(f64::INFINITY, f64::min);
        self.normalized(best_live, cur_len) <= worst
    }
}

impl BeamKind {
    /// A beam search with `params`, before its prefill.
    pub fn new(params: BeamSearchParams) -> Self {
        Self {
            params,
            scores: Vec::new(),
            finished: Vec::new(),
        }
    }

    /// Selects the next beams from `rows` (one per live beam, in order) and re-forks slots.
    fn step(
        &mut self,
        g: GroupParts<'_>,
        rows: &[&[f32]],
        cx: &mut KindCtx<'_>,
    ) -> Result<(), EngineError> {
        let eos = &cx.info.eos_token_ids;
        let width = self.params.beam_width;
        let cur_len = g.seqs[0].out.tokens.len() + 1;
        let candidates = self.candidates(rows);
        let mut next: Vec<(Candidate, GeneratedSequence)> = Vec::new();
        for (rank, c) in candidates.iter().enumerate() {
            let mut out = g.seqs[c.parent].out.clone();
            out.tokens.push(c.token);
            out.logprobs.push(c.raw);
            out.cumulative_logprob += c.raw as f64;
            if !self.params.ignore_eos && eos.contains(&c.token) {
                if rank < width {
                    out.finish_reason = FinishReason::Eos;
                    out.stop_reason = Some(StopReason::Token(c.token));
                    let score = self.normalized(c.score, cur_len);
                    self.finished.push(Hypothesis { out, score });
                }
                continue;
            }
            next.push((*c, out));
            if next.len() == width {
                break;
            }
        }
        let best_live = next.first().map_or(f64::NEG_INFINITY, |n| n.0.score);
        let at_length = cur_len >= self.params.max_tokens;
        if next.is_empty() || at_length || self.is_done(best_live, cur_len) {
            if at_length {
                for (c, out) in next {
                    let score = self.normalized(c.score, cur_len);
                    self.finished.push(Hypothesis { out, score });
                }
            }
            let mut done = std::mem::take(&mut self.finished);
            done.sort_by(|a, b| b.score.total_cmp(&a.score));
            done.truncate(width);
            let options = DecodeOptions {
                skip_special_tokens: g.job.params.skip_special_tokens,
                spaces_between_special_tokens: g.job.params.spaces_between_special_tokens,
            };
            let seqs = done
                .into_iter()
                .enumerate()
                .map(|(i, h)| finished_beam(i, h.out, g.slots[0], cx.codec, options))
                .collect::<Result<Vec<_>, EngineError>>()?;
            *g.seqs = seqs;
            return Ok(());
        }
        // Re-seat beams: a child reuses its parent's slot if it is the first child, else forks
        // the parent's KV into a slot no live parent holds.
        let parent_slots: Vec<SlotId> = g.seqs.iter().map(|s| s.slot).collect();
        let mut claimed = vec![false; parent_slots.len()];
        let mut spare: Vec<SlotId> = g
            .slots
            .iter()
            .copied()
            .filter(|s| !parent_slots.contains(s))
            .collect();
        let mut seats = Vec::with_capacity(next.len());
        for (c, _) in &next {
            if !claimed[c.parent] {
                claimed[c.parent] = true;
                seats.push(parent_slots[c.parent]);
            } else {
                seats.push(spare.pop().expect("2W slots suffice"));
            }
        }
        for ((c, _), &seat) in next.iter().zip(&seats) {
            if seat != parent_slots[c.parent] {
                cx.backend.fork(parent_slots[c.parent], seat)?;
            }
        }
        self.scores = next.iter().map(|(c, _)| c.score).collect();
        let ctx = SeqCtx {
            job: g.job,
            info: cx.info,
            codec: None,
        };
        *g.seqs = next
            .into_iter()
            .zip(seats)
            .enumerate()
            .map(|(i, ((_, out), slot))| {
                let mut seq = Seq::new(i, slot, &ctx);
                seq.out = out;
                seq
            })
            .collect();
        Ok(())
    }
}

impl GroupKind for BeamKind {
    /// The first `W` beams from the prompt's last row: one live beam (the prompt) in the first
    /// slot, whose KV is the prefill.
    fn after_prefill<'r>(
        &mut self,
        g: GroupParts<'_>,
        last_row: &'r [f32],
        cx: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        let ctx = SeqCtx {
            job: g.job,
            info: cx.info,
            codec: None,
        };
        *g.seqs = vec![Seq::new(0, g.slots[0], &ctx)];
        self.scores = vec![0.0];
        self.finished.clear();
        self.step(g, &[last_row], cx)?;
        Ok(Vec::new())
    }

    /// Scores all live beams' rows together; beams pick their own tokens (nothing to sample).
    fn on_step_rows<'r>(
        &mut self,
        g: GroupParts<'_>,
        rows: &[(usize, &'r [f32])],
        cx: &mut KindCtx<'_>,
    ) -> Result<Vec<Draw<'r>>, EngineError> {
        let mut rows = rows.to_vec();
        rows.sort_by_key(|r| r.0);
        let rows: Vec<&[f32]> = rows.into_iter().map(|r| r.1).collect();
        self.step(g, &rows, cx)?;
        Ok(Vec::new())
    }

    /// The finished beams are already in `seqs`, best first.
    fn finish(&mut self, _: &Job, _: &mut Vec<Seq>) {}
}

/// A finished beam as a done sequence with its text.
fn finished_beam(
    index: usize,
    mut out: GeneratedSequence,
    slot: SlotId,
    codec: Option<&dyn TextCodec>,
    options: DecodeOptions,
) -> Result<Seq, EngineError> {
    out.index = index;
    if let Some(codec) = codec {
        let mut detok = IncrementalDetokenizer::new(codec, &[], options);
        for &t in &out.tokens {
            detok.push(codec, t)?;
        }
        detok.flush(codec)?;
        out.text = Some(detok.text().to_string());
    }
    Ok(Seq::finished(slot, out))
}
