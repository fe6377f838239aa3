//! Incremental detokenization that never splits a UTF-8 character.
//!
//! The algorithm is vLLM's (and TGI's): decode a small window of already-emitted tokens, decode
//! the same window plus the new tokens, and emit the difference only when it does not end in
//! U+FFFD (a byte-level token that completes a character has not arrived yet). Priming the
//! window with the prompt's tail makes leading-space handling match a full decode.

use super::{TextCodec, TextError};
use crate::TokenId;

/// How special tokens appear in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Leave special tokens out.
    pub skip_special_tokens: bool,
    /// Separate (kept) special tokens from neighbouring text with a space.
    pub spaces_between_special_tokens: bool,
}

/// Tokens of prompt context kept in the decode window when priming.
const PRIME_WINDOW: usize = 5;

/// Turns a growing token sequence into text, one delta at a time.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    options: DecodeOptions,
    /// The current run of normal (non-special) tokens, with leading context.
    window: Vec<TokenId>,
    /// `window[..prefix]` is context already turned into text.
    prefix: usize,
    /// `window[..read]` has been emitted.
    read: usize,
    text: String,
}

impl IncrementalDetokenizer {
    /// A detokenizer whose window starts with the last prompt tokens (for spacing context).
    pub fn new(codec: &dyn TextCodec, prompt: &[TokenId], options: DecodeOptions) -> Self {
        let tail: Vec<TokenId> = prompt
            .iter()
            .rev()
            .take_while(|&&t| !codec.is_special(t))
            .take(PRIME_WINDOW)
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let n = tail.len();
        Self {
            options,
            window: tail,
            prefix: 0,
            read: n,
            text: String::new(),
        }
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, codec: &dyn TextCodec, token: TokenId) -> Result<&str, TextError> {
        let start = self.text.len();
        if codec.is_special(token) {
            self.flush(codec)?;
            self.window.clear();
            self.prefix = 0;
            self.read = 0;
            if !self.options.skip_special_tokens {
                let content = codec.decode(&[token])?;
                if self.options.spaces_between_special_tokens && !self.text.is_empty() {
                    self.text.push(' ');
                }
                self.text.push_str(&content);
            }
            return Ok(&self.text[start..]);
        }
        if self.window.is_empty()
            && self.options.spaces_between_special_tokens
            && !self.options.skip_special_tokens
            && !self.text.is_empty()
        {
            self.text.push(' ');
        }
        self.window.push(token);
        let before = codec.decode(&self.window[self.prefix..self.read])?;
        let after = codec.decode(&self.window[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            // A clean character boundary: `after` extends `before` unless the tokenizer rewrote
            // the context, in which case the common prefix is what was already emitted.
            let common = common_prefix(&before, &after);
            self.text.push_str(&after[common..]);
            self.prefix = self.read;
            self.read = self.window.len();
        }
        Ok(&self.text[start..])
    }

    /// Emits whatever is still held back (an incomplete character shows as U+FFFD).
    pub fn flush(&mut self, codec: &dyn TextCodec) -> Result<&str, TextError> {
        let start = self.text.len();
        if self.read < self.window.len() {
            let before = codec.decode(&self.window[self.prefix..self.read])?;
            let after = codec.decode(&self.window[self.prefix..])?;
            let common = common_prefix(&before, &after);
            self.text.push_str(&after[common..]);
            self.prefix = self.read;
            self.read = self.window.len();
        }
        Ok(&self.text[start..])
    }
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary of `b`.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !b.is_char_boundary(n) {
        n -= 1;
    }
    n
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level toy codec: id < 256 is that byte, 256 is `<s>` (special), 257 is " the".
    pub(crate) struct Bytes;

    impl TextCodec for Bytes {
        fn encode(&self, text: &str) -> Result<Vec<TokenId>, TextError> {
            Ok(text.bytes().map(TokenId::from).collect())
        }
        fn decode(&self, ids: &[TokenId]) -> Result<String, TextError> {
            let mut bytes = Vec::new();
            for &id in ids {
                match id {
                    0..=255 => bytes.push(id as u8),
                    256 => bytes.extend_from_slice(b"<s>"),
                    257 => bytes.extend_from_slice(b" the"),
                    _ => return Err(TextError(format!("unknown id {id}"))),
                }
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn is_special(&self, id: TokenId) -> bool {
            id == 256
        }
    }

    const KEEP: DecodeOptions = DecodeOptions {
        skip_special_tokens: false,
        spaces_between_special_tokens: true,
    };
    const SKIP: DecodeOptions = DecodeOptions {
        skip_special_tokens: true,
        spaces_between_special_tokens: true,
    };

    fn run(tokens: &[TokenId], options: DecodeOptions) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(&Bytes, &[b'a'.into()], options);
        tokens
            .iter()
            .map(|&t| d.push(&Bytes, t).unwrap().to_string())
            .collect()
    }

    #[test]
    fn never_splits_a_character() {
        // "é" is 0xC3 0xA9; "€" is 0xE2 0x82 0xAC.
        let deltas = run(&[b'x'.into(), 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 257], SKIP);
        assert_eq!(deltas, ["x", "", "é", "", "", "€", " the"]);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn special_tokens_are_skipped_or_spaced() {
        assert_eq!(run(&[257, 256, 257], SKIP).concat(), " the the");
        assert_eq!(run(&[257, 256, b'x'.into()], KEEP).concat(), " the <s> x");
        let tight = DecodeOptions {
            spaces_between_special_tokens: false,
            ..KEEP
        };
        assert_eq!(run(&[257, 256, b'x'.into()], tight).concat(), " the<s>x");
    }

    #[test]
    fn flush_emits_a_dangling_byte() {
        let mut d = IncrementalDetokenizer::new(&Bytes, &[], SKIP);
        assert_eq!(d.push(&Bytes, 0xC3).unwrap(), "");
        assert_eq!(d.flush(&Bytes).unwrap(), "\u{FFFD}");
    }
}
