//! A GGUF's byte-level BPE vocabulary → Hugging Face `tokenizer.json` and
//! `tokenizer_config.json`: the library's reconstruction ([`infermux::GgufVocab`], what
//! `--model file.gguf` tokenizes with) written out for transformers, torch and onnx, then
//! reloaded and checked.

use std::path::Path;

use anyhow::{Context, Result, anyhow, ensure};
use infermux::GgufVocab;
use infermux_core::model::gguf::GgufFile;
use tokenizers::Tokenizer;

use super::model::write_json;

/// Text that must survive an encode/decode round trip.
const ROUND_TRIP_TEXT: &str = "Hello world! 12345 café 😀 <|im_start|>user";

/// Writes `tokenizer.json` and `tokenizer_config.json` for `gguf` into `out`, then checks them.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let file = GgufFile::read(gguf).with_context(|| format!("reading {}", gguf.display()))?;
    let vocab = GgufVocab::from_gguf(&file)?;
    let path = out.join("tokenizer.json");
    vocab
        .tokenizer()?
        .save(&path, true)
        .map_err(|e| anyhow!("saving {}: {e}", path.display()))?;
    verify_tokenizer(&path, &vocab)?;
    write_json(
        &out.join("tokenizer_config.json"),
        &vocab.tokenizer_config_json(),
    )
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
