//! The model's tokenizer (`tokenizer.json`, or a GGUF file's metadata), shared cheaply between
//! clients and threads.

pub mod gguf;

use std::path::Path;
use std::sync::Arc;

use infermux_core::text::ByteSpelling;
use infermux_core::{TextError, TokenId};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};

/// A Hugging Face tokenizer (and the model's chat template, if any) behind an `Arc`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Ids of the added tokens marked special (sorted), for `skip_special_tokens`.
    special: Arc<Vec<TokenId>>,
    /// How the vocabulary's pieces spell bytes (for [`Tokenizer::token_bytes`]).
    spelling: ByteSpelling,
    chat_template: Option<Arc<ChatTemplate>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (no chat template).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("loading {}: {e}", path.display())))?;
        Ok(Self::from_hf(inner))
    }

    /// The tokenizer and chat template of a GGUF file, rebuilt from its metadata
    /// ([`gguf::GgufVocab`]).
    pub fn from_gguf(file: &infermux_core::model::gguf::GgufFile) -> Result<Self> {
        let vocab = gguf::GgufVocab::from_gguf(file)?;
        let mut tokenizer = Self::from_hf(vocab.tokenizer()?);
        tokenizer.chat_template =
            ChatTemplate::from_config_json(&vocab.tokenizer_config_json(), &file.path)?
                .map(Arc::new);
        Ok(tokenizer)
    }

    /// A model's tokenizer: a folder's `tokenizer.json` and chat template, or a GGUF file's.
    pub fn from_model_path(path: &Path) -> Result<Self> {
        if infermux_core::model::gguf::is_gguf(path) {
            let file = infermux_core::model::gguf::GgufFile::read(path)?;
            return Self::from_gguf(&file);
        }
        if !path.join("tokenizer.json").is_file() {
            return Err(infermux_core::ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "tokenizer.json".into(),
            }
            .into());
        }
        Self::from_model_dir(path)
    }

    fn from_hf(inner: tokenizers::Tokenizer) -> Self {
        let mut special: Vec<TokenId> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.sort_unstable();
        Self {
            spelling: byte_spelling(&inner),
            inner: Arc::new(inner),
            special: Arc::new(special),
            chat_template: None,
        }
    }

    /// Loads a model folder's `tokenizer.json` and the chat template of its
    /// `tokenizer_config.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tokenizer = Self::from_file(dir.join("tokenizer.json"))?;
        tokenizer.chat_template = ChatTemplate::from_model_dir(dir)?.map(Arc::new);
        Ok(tokenizer)
    }

    /// Renders `messages` with the model's chat template (Hugging Face's `apply_chat_template`
    /// with `tokenize=False`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::Tokenizer("this model has no chat_template in tokenizer_config.json".into())
        })?;
        template.render(messages, add_generation_prompt)
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognized. `add_special_tokens` adds the model's BOS/EOS template, if it has one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, optionally leaving out special tokens.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The raw bytes of one token: what it adds to the text, which need not be valid UTF-8 on
    /// its own (half of a multi-byte character). Special and added tokens give their content.
    pub fn token_bytes(&self, id: TokenId) -> Vec<u8> {
        let added = self.inner.get_added_vocabulary().simple_id_to_token(id);
        added
            .map(String::into_bytes)
            .or_else(|| {
                let piece = self.inner.id_to_token(id)?;
                self.spelling.piece_bytes(&piece)
            })
            .unwrap_or_else(|| self.decode(&[id], false).unwrap_or_default().into_bytes())
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a special token (left out by `skip_special_tokens`).
    pub fn is_special(&self, id: TokenId) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The underlying `tokenizers` object, for anything this wrapper does not expose.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The engine detokenizes (stop strings, streamed text) and tokenizes bad words with this.
impl infermux_core::TextCodec for Tokenizer {
    fn encode(&self, text: &str) -> std::result::Result<Vec<TokenId>, TextError> {
        Tokenizer::encode(self, text, false).map_err(|e| TextError(e.to_string()))
    }

    fn decode(&self, ids: &[TokenId]) -> std::result::Result<String, TextError> {
        Tokenizer::decode(self, ids, false).map_err(|e| TextError(e.to_string()))
    }

    fn is_special(&self, id: TokenId) -> bool {
        Tokenizer::is_special(self, id)
    }
}

/// `ByteLevel` when the decoder maps GPT-2's byte alphabet back (alone or in a sequence), else
/// SentencePiece pieces with `▁` for spaces and `<0xNN>` bytes.
fn byte_spelling(tokenizer: &tokenizers::Tokenizer) -> ByteSpelling {
    use tokenizers::DecoderWrapper;
    fn byte_level(d: &DecoderWrapper) -> bool {
        match d {
            DecoderWrapper::ByteLevel(_) => true,
            DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(byte_level),
            _ => false,
        }
    }
    if tokenizer.get_decoder().is_some_and(byte_level) {
        ByteSpelling::ByteLevel
    } else {
        ByteSpelling::ByteFallback { space: '▁' }
    }
}
