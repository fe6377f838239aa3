//! GGUF byte-level BPE vocabulary → Hugging Face `tokenizer.json` and `tokenizer_config.json`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Map, Value as Json, json};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::model::{open, value_u32, value_usize, write_json};

/// llama.cpp token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp token type of user-defined (added, not special) tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
/// Text that must survive an encode/decode round trip.
const ROUND_TRIP_TEXT: &str = "Hello world! 12345 café 😀 <|im_start|>user";
/// Pre-tokenizer split of llama.cpp's "llama-bpe" (Llama 3) vocabularies.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer a GGUF describes, as stored in its `tokenizer.*` metadata.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i64>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
    pub max_length: Option<usize>,
}

/// Writes `tokenizer.json` and `tokenizer_config.json` for `gguf` into `out`, then checks them.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let (content, _) = open(gguf)?;
    let vocab = GgufVocab::from_gguf(&content)?;
    let path = out.join("tokenizer.json");
    build_tokenizer(&vocab)?
        .save(&path, true)
        .map_err(|e| anyhow!("saving {}: {e}", path.display()))?;
    verify_tokenizer(&path, &vocab)?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config_json(&vocab)?,
    )
}

impl GgufVocab {
    /// Reads the vocabulary and special-token metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |k: &str| md.get(&format!("tokenizer.{k}"));
        let string = |k: &str| get(k).map(|v| v.to_string().cloned()).transpose();
        let id = |k: &str| get(k).map(value_u32).transpose();
        let flag = |k: &str| get(k).map(|v| v.to_bool()).transpose();
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok());
        let ctx = arch.and_then(|a| md.get(&format!("{a}.context_length")));
        Ok(Self {
            model: string("ggml.model")?.context("GGUF lacks tokenizer.ggml.model")?,
            pre: string("ggml.pre")?,
            tokens: string_array(get("ggml.tokens").context("GGUF lacks tokens")?)?,
            token_types: int_array(get("ggml.token_type"))?,
            merges: match get("ggml.merges") {
                Some(v) => string_array(v)?,
                None => Vec::new(),
            },
            bos: id("ggml.bos_token_id")?,
            eos: id("ggml.eos_token_id")?,
            unk: id("ggml.unknown_token_id")?,
            pad: id("ggml.padding_token_id")?,
            add_bos: flag("ggml.add_bos_token")?.unwrap_or(false),
            add_space_prefix: flag("ggml.add_space_prefix")?.unwrap_or(false),
            chat_template: string("chat_template")?,
            max_length: ctx.map(value_usize).transpose()?,
        })
    }

    /// Token text for an optional id.
    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// `(id, token, special)` for control and user-defined tokens, in id order.
    fn added_tokens(&self) -> Vec<(u32, &str, bool)> {
        let types = self.token_types.iter().copied();
        self.tokens
            .iter()
            .zip(types)
            .enumerate()
            .filter(|(_, (_, t))| *t == TOKEN_TYPE_CONTROL || *t == TOKEN_TYPE_USER_DEFINED)
            .map(|(i, (tok, t))| (i as u32, tok.as_str(), t == TOKEN_TYPE_CONTROL))
            .collect()
    }
}

/// Builds the byte-level BPE tokenizer: vocab, merges, pre-tokenizer, decoder and added tokens.
pub fn build_tokenizer(vocab: &GgufVocab) -> Result<Tokenizer> {
    ensure!(
        vocab.model == "gpt2",
        "only byte-level BPE (tokenizer.ggml.model = \"gpt2\") is supported, not {:?}",
        vocab.model
    );
    let ids: Vocab = (0u32..)
        .zip(vocab.tokens.iter().cloned())
        .map(|(i, t)| (t, i))
        .collect();
    ensure!(
        ids.len() == vocab.tokens.len(),
        "GGUF vocabulary has duplicate tokens"
    );
    let merges = vocab
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect::<Option<Vec<_>>>()
        .context("malformed merge (expected \"a b\")")?;
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .build()
        .map_err(|e| anyhow!("building BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(vocab.pre.as_deref())?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let (special, plain): (Vec<_>, Vec<_>) = vocab.added_tokens().into_iter().partition(|t| t.2);
    let as_added = |v: Vec<(u32, &str, bool)>| -> Vec<AddedToken> {
        v.into_iter()
            .map(|(_, tok, s)| AddedToken::from(tok, s))
            .collect()
    };
    tokenizer
        .add_special_tokens(as_added(special))
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    tokenizer
        .add_tokens(as_added(plain))
        .map_err(|e| anyhow!("adding tokens: {e}"))?;
    Ok(tokenizer)
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
            .map_err(|e| anyhow!("building split regex: {e}"))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        other => bail!("unsupported llama.cpp pre-tokenizer {other:?}"),
    })
}

/// Reloads the saved file and checks ids of special tokens and an encode/decode round trip.
fn verify_tokenizer(path: &Path, vocab: &GgufVocab) -> Result<()> {
    let tok = Tokenizer::from_file(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    ensure!(
        tok.get_vocab_size(true) == vocab.tokens.len(),
        "tokenizer.json has {} tokens, GGUF has {}",
        tok.get_vocab_size(true),
        vocab.tokens.len()
    );
    for (id, text, _) in vocab.added_tokens() {
        ensure!(
            tok.token_to_id(text) == Some(id),
            "added token {text:?} is not id {id}"
        );
    }
    let enc = tok
        .encode(ROUND_TRIP_TEXT, false)
        .map_err(|e| anyhow!("encoding: {e}"))?;
    let back = tok
        .decode(enc.get_ids(), false)
        .map_err(|e| anyhow!("decoding: {e}"))?;
    ensure!(
        back == ROUND_TRIP_TEXT,
        "round trip changed {ROUND_TRIP_TEXT:?} into {back:?}"
    );
    eprintln!(
        "tokenizer round trip ok: {} tokens {:?}",
        enc.get_ids().len(),
        enc.get_tokens()
    );
    Ok(())
}

/// `tokenizer_config.json` in the style transformers writes for GPT-2-like tokenizers.
///
/// The class is `PreTrainedTokenizerFast`, not `GPT2Tokenizer`: transformers 5 rebuilds a
/// `GPT2Tokenizer` from vocab/merges with a plain ByteLevel pre-tokenizer, dropping our Digits split.
pub fn tokenizer_config_json(vocab: &GgufVocab) -> Result<Json> {
    let mut decoder = Map::new();
    for (id, text, special) in vocab.added_tokens() {
        decoder.insert(id.to_string(), added_token_json(text, special));
    }
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_prefix_space": vocab.add_space_prefix,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": decoder,
    });
    let entries = [
        ("bos_token", vocab.token(vocab.bos).map(Json::from)),
        ("eos_token", vocab.token(vocab.eos).map(Json::from)),
        ("pad_token", vocab.token(vocab.pad).map(Json::from)),
        ("unk_token", vocab.token(vocab.unk).map(Json::from)),
        ("model_max_length", vocab.max_length.map(Json::from)),
        ("chat_template", vocab.chat_template.clone().map(Json::from)),
    ];
    let obj = config.as_object_mut().context("config is an object")?;
    for (key, value) in entries {
        if let Some(value) = value {
            obj.insert(key.to_string(), value);
        }
    }
    Ok(config)
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

fn string_array(v: &Value) -> Result<Vec<String>> {
    v.to_vec()?
        .iter()
        .map(|s| Ok(s.to_string()?.clone()))
        .collect()
}

fn int_array(v: Option<&Value>) -> Result<Vec<i64>> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.to_vec()?
        .iter()
        .map(|x| match x {
            Value::I32(n) => Ok(i64::from(*n)),
            other => Ok(i64::try_from(value_usize(other)?)?),
        })
        .collect()
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
        let tok = build_tokenizer(&tiny_vocab()).unwrap();
        let enc = tok.encode("ab ab12<|end|>", false).unwrap();
        assert_eq!(enc.get_ids(), &[6, 7, 3, 4, 0]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "ab ab12<|end|>");
    }

    #[test]
    fn config_names_special_tokens() {
        let config = tokenizer_config_json(&tiny_vocab()).unwrap();
        assert_eq!(config["eos_token"], "<|end|>");
        assert_eq!(config["added_tokens_decoder"]["0"]["special"], true);
        assert!(config.get("bos_token").is_none());
    }
}
