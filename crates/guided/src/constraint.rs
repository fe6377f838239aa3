//! [`LlgConstraint`]: one sequence's live llguidance matcher behind core's [`TokenConstraint`].

use std::sync::Arc;

use infermux_core::{GuidedError, GuidedMode, TokenConstraint, TokenId, TokenMask};
use llguidance::Matcher;

/// Words in llguidance's messages for a grammar that ran past a limit (lexer fuel, DFA states,
/// Earley items, grammar size, the compile watchdog): the request's fault, not the server's.
const LIMIT_MARKERS: &[&str] = &[
    "too many",
    "too big",
    "too large",
    "fuel",
    "limit",
    "exceeded",
    "max is",
    "cancelled",
];

/// Classifies an llguidance failure of `mode`'s constraint: a grammar that exceeds the engine's
/// limits (or is otherwise unusable) is [`GuidedError::Invalid`], a client error; anything else is
/// [`GuidedError::Runtime`], a fault of the server.
pub(crate) fn classify(mode: GuidedMode, message: String) -> GuidedError {
    let lower = message.to_ascii_lowercase();
    if LIMIT_MARKERS.iter().any(|m| lower.contains(m)) {
        GuidedError::Invalid {
            mode,
            reason: format!("the constraint exceeds the grammar engine's limits: {message}"),
        }
    } else {
        GuidedError::Runtime(message)
    }
}

/// One sequence's constraint: an llguidance [`Matcher`] that is advanced token by token.
///
/// Built by [`LlgDecoder::constraint`](crate::LlgDecoder::constraint) (or through
/// [`GuidedDecoder::compile`](infermux_core::GuidedDecoder::compile)).
pub struct LlgConstraint {
    matcher: Matcher,
    /// The constraint kind (errors name it).
    mode: GuidedMode,
    eos: Arc<[TokenId]>,
    /// Ids the token trie knows (the model's vocabulary, padded past the tokenizer's).
    trie_vocab: usize,
    /// The words of the last mask computed and not yet committed past: tells a token the
    /// grammar engine offered and then refused from one it never offered.
    offered: Vec<u32>,
}

impl LlgConstraint {
    pub(crate) fn new(
        matcher: Matcher,
        mode: GuidedMode,
        eos: Arc<[TokenId]>,
        trie_vocab: usize,
    ) -> Self {
        Self {
            matcher,
            mode,
            eos,
            trie_vocab,
            offered: Vec::new(),
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

    /// A matcher failure, classified: limit errors are the request's, others the server's.
    fn failure(&self, e: impl std::fmt::Display) -> GuidedError {
        classify(self.mode, e.to_string())
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
        let vob = match self.matcher.compute_mask_or_eos() {
            Ok(vob) => vob,
            Err(e) => return Err(self.failure(e)),
        };
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
        self.offered.clear();
        self.offered.extend_from_slice(words);
        if words.iter().all(|&w| w == 0) {
            // The grammar cannot be continued with this tokenizer's tokens: the request's fault.
            return Err(GuidedError::Invalid {
                mode: self.mode,
                reason: "the constraint allows no token of this vocabulary".into(),
            });
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
        let consumed = match self.matcher.try_consume_tokens(&[token]) {
            Ok(consumed) => consumed,
            Err(e) => return Err(self.failure(e)),
        };
        let was_offered = self
            .offered
            .get(token as usize / 32)
            .is_some_and(|w| w & (1 << (token % 32)) != 0);
        self.offered.clear();
        if consumed == 0 && !was_offered {
            return Err(GuidedError::Runtime(format!(
                "token {token} is not allowed by the constraint here"
            )));
        }
        if consumed == 0 {
            // llguidance refuses a token its own mask offered when the grammar needs bytes no
            // token of the vocabulary spells (SmolLM2 has no token for some bytes, e.g. 0xF1):
            // the request's grammar cannot be followed with this tokenizer.
            return Err(GuidedError::Invalid {
                mode: self.mode,
                reason: format!(
                    "the constraint needs bytes that no token of this vocabulary spells (token \
                     {token}, offered by the grammar engine, was refused)"
                ),
            });
        }
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    fn fork(&self) -> Box<dyn TokenConstraint> {
        Box::new(Self {
            matcher: self.matcher.deep_clone(),
            mode: self.mode,
            eos: self.eos.clone(),
            trie_vocab: self.trie_vocab,
            offered: self.offered.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_failures_are_request_errors_and_others_server_faults() {
        for message in [
            "Too many items (limit 2000; mask); try avoiding single-byte/short lexemes",
            "too many states: 250000 >= 250000",
            "lexer precomputation failed; either increase limits.initial_lexer_fuel",
            "grammar size (number of symbols) too big (limit for this grammar: 10)",
            "Schema intersection stack level exceeded",
            "Parser Error: Current row has 20001 items; max is 2000",
        ] {
            match classify(GuidedMode::Regex, message.into()) {
                GuidedError::Invalid { mode, reason } => {
                    assert_eq!(mode, GuidedMode::Regex);
                    assert!(reason.contains(message), "{reason}");
                }
                other => panic!("{message:?} classified as {other:?}"),
            }
        }
        assert!(matches!(
            classify(GuidedMode::Choice, "unexpected backtracking".into()),
            GuidedError::Runtime(_)
        ));
    }
}
