//! `Tokenizer::token_bytes` on the reference model's byte-level vocabulary: tokens that split a
//! character give their raw bytes (what OpenAI's logprob `bytes` carry), and the bytes of a
//! text's tokens concatenate back to the text.

use std::path::PathBuf;

use infermux::Tokenizer;

fn tokenizer() -> Tokenizer {
    let dir = std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct")
        });
    Tokenizer::from_model_dir(&dir)
        .unwrap_or_else(|e| panic!("run `cargo xtask setup` first ({}): {e}", dir.display()))
}

#[test]
fn token_bytes_concatenate_to_the_text_even_inside_a_character() {
    let tok = tokenizer();
    let text = "Hello café 😀 über 日本";
    let ids = tok.encode(text, false).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
    assert_eq!(bytes, text.as_bytes());
    let split = ids
        .iter()
        .filter(|&&id| std::str::from_utf8(&tok.token_bytes(id)).is_err())
        .count();
    assert!(
        split > 0,
        "expected a token holding part of a character: {ids:?}"
    );
}

#[test]
fn special_tokens_give_their_content() {
    let tok = tokenizer();
    let id = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(tok.token_bytes(id), b"<|im_start|>");
}
