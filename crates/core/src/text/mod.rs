//! Text on top of token ids: the tokenizer contract the engine needs ([`TextCodec`]),
//! incremental detokenization ([`IncrementalDetokenizer`]) and stop-string matching
//! ([`StopMatcher`]). The core stays tokenizer-agnostic; `infermux` implements the trait with
//! Hugging Face `tokenizers`.

mod bytes;
mod detok;
mod stop;

pub use bytes::{ByteSpelling, byte_level_byte, fallback_byte};
pub use detok::{DecodeOptions, IncrementalDetokenizer};
pub use stop::{StopHit, StopMatcher};

use crate::TokenId;

/// Why a tokenizer call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tokenizer error: {0}")]
pub struct TextError(pub String);

/// What the engine needs from a tokenizer. Implementations must be cheap to call per token.
pub trait TextCodec: Send + Sync {
    /// Token ids of `text`, without special tokens added (used for `bad_words`).
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, TextError>;
    /// Text of `ids`, special tokens included, with no cleanup between them.
    fn decode(&self, ids: &[TokenId]) -> Result<String, TextError>;
    /// Whether `id` is a special token (skipped by `skip_special_tokens`).
    fn is_special(&self, id: TokenId) -> bool;
}
