//! A group's bookkeeping: its parts for its kind, the checks on the rows it receives, prompt
//! logprobs, finishing, failing and its final reply.

use super::*;

/// A backend returned logits without the row a chunk asked for.
pub(super) fn missing_row(chunk: &SeqChunk) -> BackendError {
    BackendError::Runtime {
        runtime: "backend",
        message: format!(
            "slot {:?}: no logits row for the chunk at position {}",
            chunk.slot, chunk.start_pos
        ),
    }
}

/// What is wrong with a logits row the engine would use: `NaN`, `+inf`, or no finite value
/// (`-inf` entries alone are a probability of 0, which a model may use to mask ids).
pub(super) fn non_finite(row: &[f32]) -> Option<&'static str> {
    let (mut nan, mut pos_inf, mut finite) = (false, false, false);
    for &x in row {
        nan |= x.is_nan();
        pos_inf |= x == f32::INFINITY;
        finite |= x.is_finite();
    }
    if nan {
        Some("NaN")
    } else if pos_inf {
        Some("+inf")
    } else if !finite {
        Some("only -inf")
    } else {
        None
    }
}

impl Group {
    /// The group's kind and the parts of the group it may see.
    pub(super) fn parts(&mut self) -> (&mut dyn GroupKind, GroupParts<'_>) {
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
    pub(super) fn needs_masks(&self) -> bool {
        if self.ended || self.job.constraint.is_none() {
            return false;
        }
        (self.seqs.is_empty() && self.first_mask.is_none())
            || self
                .seqs
                .iter()
                .any(|s| !s.done && s.constraint.is_some() && s.mask.is_none())
    }

    /// The first logits row of chunk `index` that this group would sample from or score and
    /// that is not usable ([`non_finite`]), as an error naming its slot and position. A
    /// prefill chunk's rows are used for prompt logprobs (when asked for) and, at the prompt's
    /// last position, for the first sample; a decode chunk's one row is always used.
    pub(super) fn non_finite_row(
        &self,
        chunk: &SeqChunk,
        decode: bool,
        logits: &Logits,
        index: usize,
    ) -> Option<BackendError> {
        let rows = logits.chunk(index);
        // The rows are the chunk's last positions.
        // (Saturating: a backend that returned more rows than tokens is not a reason to panic.)
        let first_pos = (chunk.start_pos + chunk.tokens.len()).saturating_sub(rows.len());
        let prompt_len = self.job.prompt.len();
        for (r, row) in rows.enumerate() {
            let position = first_pos + r;
            let used = decode
                || (position + 1 < prompt_len && self.job.prompt_logprobs.wanted())
                || (position + 1 == prompt_len && self.job.max_new_tokens > 0);
            if !used {
                continue;
            }
            if let Some(found) = non_finite(row) {
                return Some(BackendError::NonFiniteLogits {
                    slot: chunk.slot,
                    position,
                    found,
                });
            }
        }
        None
    }

    /// Fills prompt logprobs from a prefill chunk's rows: row at position p predicts p + 1.
    pub(super) fn record_prompt_logprobs(
        &mut self,
        chunk: &SeqChunk,
        logits: &Logits,
        chunk_index: usize,
    ) {
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
    pub(super) fn is_finished(&self) -> bool {
        if self.ended {
            return true;
        }
        if self.job.max_new_tokens == 0 {
            return self.prefilled == self.job.prompt.len();
        }
        !self.seqs.is_empty() && self.seqs.iter().all(|s| s.done)
    }

    /// Ends the group with `err` (the first error wins), replied when it is removed.
    pub(super) fn fail(&mut self, err: EngineError) {
        if !self.ended {
            self.failure = Some(err);
        }
        self.ended = true;
    }

    /// The final output: the sequences the kind keeps, in its order.
    pub(super) fn reply_final(mut self) -> Outgoing {
        self.kind.finish(&self.job, &mut self.seqs);
        match &self.job.reply {
            Replier::Final(tx) => Outgoing::Final(
                tx.clone(),
                Ok(GenerateOutput {
                    prompt_len: self.job.prompt.len(),
                    sequences: self.seqs.into_iter().map(|s| s.out).collect(),
                    prompt_logprobs: self.prompt_lp,
                    topk_prompt_logprobs: self.topk_prompt_lp,
                    weight_version: self.weight_version,
                    cached_prompt_tokens: self.cached_prompt_tokens,
                }),
            ),
            Replier::Stream(tx) => {
                let job = &self.job;
                let sequences = self.seqs.iter_mut().filter_map(|s| s.update(job)).collect();
                let first = !self.prompt_sent;
                Outgoing::Stream(
                    tx.clone(),
                    Ok(StreamUpdate {
                        prompt_len: job.prompt.len(),
                        sequences,
                        finished: true,
                        prompt_logprobs: if first { self.prompt_lp } else { None },
                        topk_prompt_logprobs: if first { self.topk_prompt_lp } else { None },
                        weight_version: self.weight_version,
                        cached_prompt_tokens: self.cached_prompt_tokens,
                    }),
                )
            }
        }
    }
}
