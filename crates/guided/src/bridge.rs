//! The bridge from a Hugging Face [`Tokenizer`] to llguidance's byte-level token trie.
//!
//! llguidance sees every token as the bytes it decodes to. Byte-level BPE vocabularies (GPT-2,
//! SmolLM, Llama 3, Qwen) spell bytes as printable characters; SentencePiece-style ones (Llama 2,
//! Mistral) spell spaces as `▁` and raw bytes as `<0xNN>`. Special tokens are marked with
//! [`TokTrie::SPECIAL_TOKEN_MARKER`] so no grammar can produce them from text.
//!
//! Ported from `toktrie_hf_tokenizers` 1.9.1 (MIT, guidance-ai/llguidance) so that the tree keeps
//! the one `tokenizers` version candle uses; that crate pins an older `tokenizers`.

use std::collections::HashSet;
use std::sync::Arc;

use infermux_core::text::ByteSpelling;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use tokenizers::{
    DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer, normalizers, pre_tokenizers,
};

use crate::decoder::LlgBuildError;

/// Builds llguidance's token environment for `tokenizer`: one byte string per id up to
/// `vocab_size` (the model's logits width; ids past the tokenizer's vocabulary become unreachable
/// special tokens), ending generation at `eos_ids` (non-empty, all within the vocabulary).
pub(crate) fn tok_env(
    mut tokenizer: Tokenizer,
    eos_ids: &[TokenId],
    vocab_size: usize,
) -> Result<TokEnv, LlgBuildError> {
    strip_prepended_space(&mut tokenizer)?;
    let spelling = byte_spelling(&tokenizer)?;
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    let mut info = TokRxInfo::new(vocab_size as u32, eos_ids[0]);
    let mut token_bytes = vec![Vec::new(); vocab_size];

    let mut specials = HashSet::new();
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        // Added tokens of the form <...> are special even when not flagged so, as in llguidance.
        let content = added.content.as_str();
        if added.special || (content.starts_with('<') && content.ends_with('>')) {
            match content {
                "<|end|>" | "<|eot_id|>" | "<|im_end|>" => info.tok_end_of_turn = Some(id),
                "<unk>" | "<|unk|>" => info.tok_unk = Some(id),
                "<pad>" | "<|pad|>" => info.tok_pad = Some(id),
                _ => {}
            }
            specials.insert(id);
        } else if let Some(slot) = token_bytes.get_mut(id as usize) {
            *slot = content.as_bytes().to_vec();
        }
    }

    for id in 0..tokenizer_vocab.min(vocab_size) as u32 {
        let Some(name) = tokenizer.id_to_token(id) else {
            continue;
        };
        let bytes = if specials.contains(&id) {
            let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            bytes.extend_from_slice(name.as_bytes());
            bytes
        } else {
            // A piece outside the byte alphabet cannot be produced from text: leave it as it
            // is (empty, never allowed, unless an added token's content), as llguidance does.
            match spelling.piece_bytes(&name) {
                Some(bytes) => bytes,
                None => continue,
            }
        };
        token_bytes[id as usize] = bytes;
    }
    for (id, bytes) in token_bytes.iter_mut().enumerate().skip(tokenizer_vocab) {
        *bytes = [
            &[TokTrie::SPECIAL_TOKEN_MARKER],
            format!("<[{id}]>").as_bytes(),
        ]
        .concat();
    }

    let mut trie = TokTrie::from(&info, &token_bytes);
    if eos_ids.len() > 1 {
        trie = trie.with_eos_tokens(eos_ids);
    }
    Ok(Arc::new(HfTokEnv { tokenizer, trie }))
}

/// A tokenizer and its trie, as llguidance's [`TokenizerEnv`].
struct HfTokEnv {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl HfTokEnv {
    fn encode(&self, text: &str) -> Vec<TokenId> {
        // Text the trie could not split greedily; the tokenizer has no failure mode on plain
        // text, and the trie's greedy split is the fallback should it ever fail.
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
    }
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.encode(text))
    }

    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.trie
                .tokenize_with_special(text, |text| self.encode(text))
        })
    }
}

/// Removes what makes the tokenizer prepend a space to every text it encodes (a `Prepend`
/// normalizer, a Metaspace pre-tokenizer's prepend scheme): llguidance tokenizes fragments in
/// the middle of a generation, where no space belongs.
fn strip_prepended_space(tokenizer: &mut Tokenizer) -> Result<(), LlgBuildError> {
    fn normalizer(n: NormalizerWrapper) -> Option<NormalizerWrapper> {
        match n {
            NormalizerWrapper::Prepend(_) => None,
            NormalizerWrapper::Sequence(seq) => {
                let kept: Vec<_> = seq
                    .as_ref()
                    .iter()
                    .filter_map(|n| normalizer(n.clone()))
                    .collect();
                (!kept.is_empty())
                    .then(|| NormalizerWrapper::Sequence(normalizers::Sequence::new(kept)))
            }
            n => Some(n),
        }
    }
    fn pre_tokenizer(pt: PreTokenizerWrapper) -> PreTokenizerWrapper {
        match pt {
            PreTokenizerWrapper::Metaspace(mut ms) => {
                ms.prepend_scheme = pre_tokenizers::metaspace::PrependScheme::Never;
                PreTokenizerWrapper::Metaspace(ms)
            }
            PreTokenizerWrapper::Sequence(seq) => {
                PreTokenizerWrapper::Sequence(pre_tokenizers::sequence::Sequence::new(
                    seq.as_ref()
                        .iter()
                        .map(|pt| pre_tokenizer(pt.clone()))
                        .collect(),
                ))
            }
            pt => pt,
        }
    }
    if let Some(n) = tokenizer.get_normalizer().cloned() {
        tokenizer
            .with_normalizer(normalizer(n))
            .map_err(|e| LlgBuildError::Tokenizer(e.to_string()))?;
    }
    if let Some(pt) = tokenizer.get_pre_tokenizer().cloned() {
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pt)));
    }
    Ok(())
}

/// Reads the byte spelling from the decoder: `ByteLevel`, or `ByteFallback` with an optional
/// `Replace(▁ → " ")` naming the space character.
fn byte_spelling(tokenizer: &Tokenizer) -> Result<ByteSpelling, LlgBuildError> {
    #[derive(Default)]
    struct Found {
        byte_level: bool,
        byte_fallback: bool,
        space: Option<char>,
    }
    fn visit(d: &DecoderWrapper, found: &mut Found) {
        match d {
            DecoderWrapper::ByteLevel(_) => found.byte_level = true,
            DecoderWrapper::ByteFallback(_) => found.byte_fallback = true,
            DecoderWrapper::Replace(r) if r.content == " " => {
                // The pattern is private; its serialized form is {"pattern":{"String":"▁"},..}.
                let json = serde_json::to_value(r).unwrap_or_default();
                let mut chars = json["pattern"]["String"].as_str().unwrap_or("").chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    found.space = Some(c);
                }
            }
            DecoderWrapper::Sequence(seq) => {
                seq.get_decoders().iter().for_each(|d| visit(d, found))
            }
            _ => {}
        }
    }
    let mut found = Found::default();
    if let Some(d) = tokenizer.get_decoder() {
        visit(d, &mut found);
    }
    if found.byte_fallback {
        Ok(ByteSpelling::ByteFallback {
            space: found.space.unwrap_or(' '),
        })
    } else if found.byte_level {
        Ok(ByteSpelling::ByteLevel)
    } else {
        Err(LlgBuildError::Tokenizer(format!(
            "cannot tell how the vocabulary spells bytes: the decoder is neither ByteLevel nor \
             ByteFallback ({:?})",
            tokenizer.get_decoder()
        )))
    }
}
