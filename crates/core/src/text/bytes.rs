//! The raw bytes behind a vocabulary piece, for the two common byte spellings: GPT-2's
//! byte-level alphabet (SmolLM, Llama 3, Qwen) and SentencePiece's `<0xNN>` byte fallback with
//! `▁` for spaces (Llama 2, Mistral). A token's bytes need not be valid UTF-8 on their own.

/// How a vocabulary spells bytes in its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteSpelling {
    /// GPT-2's byte-to-unicode mapping: every byte is one printable character.
    ByteLevel,
    /// SentencePiece pieces: text with `space` standing for ' ', raw bytes as `<0xNN>`.
    ByteFallback {
        /// The character that spells a space (usually `▁`).
        space: char,
    },
}

impl ByteSpelling {
    /// The bytes `piece` stands for, or `None` when it is not in this spelling (a byte-level
    /// piece with a character outside the alphabet).
    pub fn piece_bytes(self, piece: &str) -> Option<Vec<u8>> {
        match self {
            ByteSpelling::ByteLevel => piece.chars().map(byte_level_byte).collect(),
            ByteSpelling::ByteFallback { space } => Some(match fallback_byte(piece) {
                Some(byte) => vec![byte],
                None => piece.replace(space, " ").into_bytes(),
            }),
        }
    }
}

/// The byte a character of GPT-2's byte-level alphabet stands for: printable Latin-1 bytes
/// stand for themselves, the other 68 bytes for U+0100 onwards in byte order.
pub fn byte_level_byte(c: char) -> Option<u8> {
    const fn self_mapped(b: u8) -> bool {
        matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
    }
    const SHIFTED: [u8; 68] = {
        let mut table = [0u8; 68];
        let (mut byte, mut next) = (0usize, 0usize);
        while byte < 256 {
            if !self_mapped(byte as u8) {
                table[next] = byte as u8;
                next += 1;
            }
            byte += 1;
        }
        table
    };
    let code = c as u32;
    if code < 256 && self_mapped(code as u8) {
        Some(code as u8)
    } else {
        code.checked_sub(256)
            .and_then(|i| SHIFTED.get(i as usize))
            .copied()
    }
}

/// `<0xNN>` → the byte NN.
pub fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        assert_eq!(byte_level_byte('A'), Some(b'A'));
        assert_eq!(byte_level_byte('Ġ'), Some(b' ')); // U+0120
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n')); // U+010A
        assert_eq!(byte_level_byte('\u{0100}'), Some(0));
        assert_eq!(byte_level_byte(' '), None);
        assert_eq!(byte_level_byte('\u{0144}'), None);
        let covered: std::collections::HashSet<u8> = (0..0x200u32)
            .filter_map(char::from_u32)
            .filter_map(byte_level_byte)
            .collect();
        assert_eq!(covered.len(), 256);
    }

    #[test]
    fn pieces_spell_bytes() {
        // "é" is C3 A9: byte-level spells it "Ã©"; the first byte alone is "Ã".
        assert_eq!(
            ByteSpelling::ByteLevel.piece_bytes("ĠcafÃ©"),
            Some(b" caf\xC3\xA9".to_vec())
        );
        assert_eq!(ByteSpelling::ByteLevel.piece_bytes("Ã"), Some(vec![0xC3]));
        assert_eq!(ByteSpelling::ByteLevel.piece_bytes("a b"), None);
        let sp = ByteSpelling::ByteFallback { space: '▁' };
        assert_eq!(sp.piece_bytes("▁hello"), Some(b" hello".to_vec()));
        assert_eq!(sp.piece_bytes("<0x0A>"), Some(vec![b'\n']));
        assert_eq!(fallback_byte("<0xFF>"), Some(0xFF));
        assert_eq!(fallback_byte("<0x0>"), None);
        assert_eq!(fallback_byte("<0xZZ>"), None);
    }
}
