//! [`LlgConstraint`]: one sequence's live llguidance matcher behind core's [`TokenConstraint`].

use std::sync::Arc;

use infermux_core::{GuidedError, TokenConstraint, TokenId, TokenMask};
use llguidance::Matcher;

/// One sequence's constraint: an llguidance [`Matcher`] that is advanced token by token.
///
/// Built by [`LlgDecoder::constraint`](crate::LlgDecoder::constraint) (or through
/// [`GuidedDecoder::compile`](infermux_core::GuidedDecoder::compile)).
pub struct LlgConstraint {
    matcher: Matcher,
    eos: Arc<[TokenId]>,
    /// Ids the token trie knows (the model's vocabulary, padded past the tokenizer's).
    trie_vocab: usize,
}

impl LlgConstraint {
    pub(crate) fn new(matcher: Matcher, eos: Arc<[TokenId]>, trie_vocab: usize) -> Self {
        Self {
            matcher,
            eos,
            trie_vocab,
        }
    }

    /// Whether the output so far is a complete match (EOS would be accepted now).
    pub fn is_accepting(&mut self) -> bool {
        self.is_finished() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// The bytes the grammar forces next whatever is sampled (e.g. `{"name":"` at the start of
    /// an object schema); callers may use it for fast-forwarding or diagnostics.
    pub fn forced_bytes(&mut self) -> Vec<u8> {
        self.matcher.compute_ff_bytes()
    }

    fn runtime(e: impl std::fmt::Display) -> GuidedError {
        GuidedError::Runtime(e.to_string())
    }
}

impl std::fmt::Debug for LlgConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlgConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .field("eos", &self.eos)
            .finish()
    }
}

impl TokenConstraint for LlgConstraint {
    fn compute_mask(&mut self, mask: &mut TokenMask) -> Result<(), GuidedError> {
        // After the grammar is complete this is the EOS set; an error state is an error.
        let vob = self.matcher.compute_mask_or_eos().map_err(Self::runtime)?;
        let src = vob.as_slice();
        let len = mask.len();
        let words = mask.words_mut();
        let n = words.len().min(src.len());
        words[..n].copy_from_slice(&src[..n]);
        words[n..].fill(0);
        // Ids past the mask's length (a mask narrower than the trie) stay unset.
        if !len.is_multiple_of(32) && n == words.len() {
            words[len / 32] &= (1u32 << (len % 32)) - 1;
        }
        if words.iter().all(|&w| w == 0) {
            return Err(GuidedError::Runtime(
                "the constraint allows no token of this vocabulary".into(),
            ));
        }
        Ok(())
    }

    fn commit(&mut self, token: TokenId) -> Result<(), GuidedError> {
        if self.is_finished() {
            // Only EOS may follow a complete match; committing it changes nothing.
            return if self.eos.contains(&token) {
                Ok(())
            } else {
                Err(GuidedError::Runtime(format!(
                    "token {token} committed after the constraint finished (only EOS may follow)"
                )))
            };
        }
        if token as usize >= self.trie_vocab {
            return Err(GuidedError::Runtime(format!(
                "token {token} is outside the vocabulary ({} ids)",
                self.trie_vocab
            )));
        }
        let consumed = self
            .matcher
            .try_consume_tokens(&[token])
            .map_err(Self::runtime)?;
        if consumed == 0 {
            return Err(GuidedError::Runtime(format!(
                "token {token} is not allowed by the constraint here"
            )));
        }
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    fn fork(&self) -> Box<dyn TokenConstraint> {
        Box::new(Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
            trie_vocab: self.trie_vocab,
        })
    }
}
