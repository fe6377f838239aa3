//! Guided-decoding masks of a step, computed while the forward runs, and the check that a
//! mask leaves a token to draw.

use super::*;

/// Computes every pending guided mask; a failure or panic ends only its own request.
pub(super) fn compute_masks(running: &mut [Group], vocab: usize) {
    for g in running.iter_mut().filter(|g| g.needs_masks()) {
        let result = guarded(MASK_STAGE, || g.compute_masks(vocab));
        if let Err(err) = result {
            g.fail(err);
        }
    }
}

impl Group {
    /// This step's guided masks: the first one (before any sequence exists), or each live
    /// constrained sequence's. A mask that leaves no token to draw (alone or with
    /// `allowed_token_ids`) ends the request with a typed error, not a draw from a row of
    /// `-inf` that the constraint then rejects.
    pub(super) fn compute_masks(&mut self, vocab: usize) -> Result<(), EngineError> {
        let allowed = self.job.params.allowed_token_ids.as_deref();
        if self.seqs.is_empty() {
            let Some(constraint) = self.job.constraint.as_mut() else {
                return Ok(());
            };
            let mut mask = TokenMask::none(vocab);
            constraint.compute_mask(&mut mask)?;
            let checked = leaves_a_token(&mask, allowed, 0);
            self.first_mask = Some(mask);
            return checked;
        }
        for s in self.seqs.iter_mut().filter(|s| !s.done && s.mask.is_none()) {
            let Some(c) = s.constraint.as_mut() else {
                continue;
            };
            let mut mask = TokenMask::none(vocab);
            let r = c.compute_mask(&mut mask);
            let checked = leaves_a_token(&mask, allowed, s.out.tokens.len());
            s.mask = Some(mask);
            r?;
            checked?;
        }
        Ok(())
    }
}

/// Whether a guided `mask` and the request's `allowed_token_ids` leave a token to draw at
/// output position `at`; the error names the field whose constraint cannot be met.
pub(super) fn leaves_a_token(
    mask: &TokenMask,
    allowed: Option<&[TokenId]>,
    at: usize,
) -> Result<(), EngineError> {
    if mask.count() == 0 {
        return Err(ValidationError::field(
            "guided_decoding",
            format!("the constraint allows no token at output position {at}"),
        )
        .into());
    }
    match allowed {
        Some(ids) if !ids.iter().any(|&id| mask.allows(id)) => Err(ValidationError::field(
            "allowed_token_ids",
            format!(
                "none of the listed tokens is allowed by the guided decoding constraint at \
                 output position {at}"
            ),
        )
        .into()),
        _ => Ok(()),
    }
}
