//! A GGUF file's tokenizer: its `tokenizer.*` metadata (byte-level BPE vocabulary, merges,
//! token types, special ids, llama.cpp's pre-tokenizer name, chat template) rebuilt as the
//! Hugging Face tokenizer and `tokenizer_config.json` it was converted from, so `--model
//! file.gguf` tokenizes as the original folder does.

use infermux_core::model::gguf::{GgufFile, MetaValue};
use serde_json::{Map, Value as Json, json};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// llama.cpp token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: i128 = 3;
/// llama.cpp token type of user-defined (added, not special) tokens.
const TOKEN_TYPE_USER_DEFINED: i128 = 4;
/// Pre-tokenizer split of llama.cpp's "llama-bpe" (Llama 3) vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn bad(reason: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("GGUF tokenizer: {reason}"))
}

/// The tokenizer a GGUF describes, as stored in its `tokenizer.*` metadata.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (`gpt2` for byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`, llama.cpp's pre-tokenizer name.
    pub pre: Option<String>,
    /// Token pieces by id.
    pub tokens: Vec<String>,
    /// llama.cpp token types by id (empty when absent).
    pub token_types: Vec<i128>,
    /// BPE merges, `"a b"`.
    pub merges: Vec<String>,
    /// Special ids.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// The architecture's context length.
    pub max_length: Option<usize>,
}

fn strings(v: &MetaValue, key: &str) -> Result<Vec<String>> {
    v.as_array()
        .ok_or_else(|| bad(format!("{key} is not an array")))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{key} holds a non-string")))
        })
        .collect()
}

impl GgufVocab {
    /// Reads the vocabulary and special-token metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let get = |k: &str| gguf.get(&format!("tokenizer.{k}"));
        let string = |k: &str| get(k).and_then(MetaValue::as_str).map(str::to_string);
        let id = |k: &str| -> Result<Option<u32>> {
            get(k)
                .map(|v| {
                    v.as_usize()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| bad(format!("tokenizer.{k} is {v:?}, not a token id")))
                })
                .transpose()
        };
        let flag = |k: &str| get(k).and_then(MetaValue::as_bool).unwrap_or(false);
        let ctx = gguf
            .architecture()
            .ok()
            .and_then(|a| gguf.get(&format!("{a}.context_length")))
            .and_then(MetaValue::as_usize);
        let tokens =
            get("ggml.tokens").ok_or_else(|| bad("the file has no tokenizer.ggml.tokens"))?;
        let token_types = match get("ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|t| {
                    t.as_int()
                        .ok_or_else(|| bad("a token type is not an integer"))
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            model: string("ggml.model")
                .ok_or_else(|| bad("the file has no tokenizer.ggml.model"))?,
            pre: string("ggml.pre"),
            tokens: strings(tokens, "tokenizer.ggml.tokens")?,
            token_types,
            merges: match get("ggml.merges") {
                Some(v) => strings(v, "tokenizer.ggml.merges")?,
                None => Vec::new(),
            },
            bos: id("ggml.bos_token_id")?,
            eos: id("ggml.eos_token_id")?,
            unk: id("ggml.unknown_token_id")?,
            pad: id("ggml.padding_token_id")?,
            add_bos: flag("ggml.add_bos_token"),
            add_space_prefix: flag("ggml.add_space_prefix"),
            chat_template: string("chat_template"),
            max_length: ctx,
        })
    }

    /// Token text for an optional id.
    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// `(id, token, special)` for control and user-defined tokens, in id order.
    pub fn added_tokens(&self) -> Vec<(u32, &str, bool)> {
        let types = self.token_types.iter().copied();
        self.tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (_, t))| *t == TOKEN_TYPE_CONTROL || *t == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, (tok, t))| (i as u32, tok.as_str(), t == TOKEN_TYPE_CONTROL))
            .collect()
    }

    /// Builds the byte-level BPE tokenizer: vocab, merges, pre-tokenizer, decoder and added
    /// tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        if self.model != "gpt2" {
            return Err(bad(format!(
                "only byte-level BPE (tokenizer.ggml.model = \"gpt2\") is supported, not {:?}",
                self.model
            )));
        }
        let ids: Vocab = (0u32..)
            .zip(self.tokens.iter().cloned())
            .map(|(i, t)| (t, i))
            .collect();
        if ids.len() != self.tokens.len() {
            return Err(bad("the vocabulary has duplicate tokens"));
        }
        let merges = self
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("malformed merge {m:?} (expected \"a b\")")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(ids, merges)
            .build()
            .map_err(|e| bad(format!("building the BPE model: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(self.pre.as_deref())?));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
        let (special, plain): (Vec<_>, Vec<_>) = self.added_tokens().into_iter().partition(|t| t.2);
        let as_added = |v: Vec<(u32, &str, bool)>| -> Vec<AddedToken> {
            v.into_iter()
                .map(|(_, tok, s)| AddedToken::from(tok, s))
                .collect()
        };
        tokenizer
            .add_special_tokens(as_added(special))
            .map_err(|e| bad(format!("adding special tokens: {e}")))?;
        tokenizer
            .add_tokens(as_added(plain))
            .map_err(|e| bad(format!("adding tokens: {e}")))?;
        Ok(tokenizer)
    }

    /// `tokenizer_config.json` in the style transformers writes for GPT-2-like tokenizers.
    ///
    /// The class is `PreTrainedTokenizerFast`, not `GPT2Tokenizer`: transformers 5 rebuilds a
    /// `GPT2Tokenizer` from vocab/merges with a plain ByteLevel pre-tokenizer, dropping the
    /// Digits split.
    pub fn tokenizer_config_json(&self) -> Json {
        let mut decoder = Map::new();
        for (id, text, special) in self.added_tokens() {
            decoder.insert(id.to_string(), added_token_json(text, special));
        }
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_prefix_space".into(), self.add_space_prefix.into());
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        config.insert("added_tokens_decoder".into(), decoder.into());
        let entries = [
            ("bos_token", self.token(self.bos).map(Json::from)),
            ("eos_token", self.token(self.eos).map(Json::from)),
            ("pad_token", self.token(self.pad).map(Json::from)),
            ("unk_token", self.token(self.unk).map(Json::from)),
            ("model_max_length", self.max_length.map(Json::from)),
            ("chat_template", self.chat_template.clone().map(Json::from)),
        ];
        for (key, value) in entries {
            if let Some(value) = value {
                config.insert(key.to_string(), value);
            }
        }
        config.into()
    }
}

/// The Hugging Face pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt2" => byte_level.into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| bad(format!("building the split regex: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        other => {
            return Err(bad(format!(
                "unsupported llama.cpp pre-tokenizer {other:?}"
            )));
        }
    })
}

fn added_token_json(text: &str, special: bool) -> Json {
    json!({
        "content": text,
        "lstrip": false,
        "normalized": !special,
        "rstrip": false,
        "single_word": false,
        "special": special,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_vocab() -> GgufVocab {
        let tokens = ["<|end|>", "a", "b", "1", "2", "Ġ", "ab", "Ġab"];
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            token_types: vec![3, 1, 1, 1, 1, 1, 1, 1],
            merges: vec!["a b".into(), "Ġ ab".into()],
            bos: None,
            eos: Some(0),
            unk: None,
            pad: None,
            add_bos: false,
            add_space_prefix: false,
            chat_template: None,
            max_length: Some(16),
        }
    }

    #[test]
    fn builds_byte_level_bpe_with_digit_split_and_specials() {
        let tok = tiny_vocab().tokenizer().unwrap();
        let enc = tok.encode("ab ab12<|end|>", false).unwrap();
        assert_eq!(enc.get_ids(), &[6, 7, 3, 4, 0]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "ab ab12<|end|>");
    }

    #[test]
    fn config_names_special_tokens() {
        let config = tiny_vocab().tokenizer_config_json();
        assert_eq!(config["eos_token"], "<|end|>");
        assert_eq!(config["added_tokens_decoder"]["0"]["special"], true);
        assert!(config.get("bos_token").is_none());
    }

    #[test]
    fn other_tokenizer_models_are_refused_by_name() {
        let mut v = tiny_vocab();
        v.model = "llama".into();
        let err = v.tokenizer().unwrap_err().to_string();
        assert!(err.contains("\"llama\""), "{err}");
        v.model = "gpt2".into();
        v.pre = Some("deepseek-coder".into());
        let err = v.tokenizer().unwrap_err().to_string();
        assert!(err.contains("deepseek-coder"), "{err}");
    }
}
