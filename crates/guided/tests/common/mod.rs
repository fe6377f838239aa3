//! Shared helpers: the real SmolLM2 tokenizer, one decoder per test binary, and a seeded
//! random "model" that samples among the allowed tokens.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use infermux_core::sampling::SeqRng;
use infermux_guided::{GuidedDecodingParams, LimitsConfig, LlgDecoder, TokenConstraint, TokenMask};
use tokenizers::Tokenizer;

/// SmolLM2's `<|im_end|>` (generation_config.json `eos_token_id`).
pub const EOS: u32 = 2;
/// SmolLM2-135M's logits width (config.json `vocab_size`).
pub const VOCAB: usize = 49152;

pub fn model_dir() -> PathBuf {
    std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct")
        })
}

pub fn tokenizer_path() -> PathBuf {
    let path = model_dir().join("tokenizer.json");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (or set INFERMUX_MODEL_DIR)",
        path.display()
    );
    path
}

pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_file(tokenizer_path()).expect("tokenizer loads"))
}

/// One decoder with default limits, shared by the tests of a binary.
pub fn decoder() -> &'static LlgDecoder {
    static DEC: OnceLock<LlgDecoder> = OnceLock::new();
    DEC.get_or_init(|| {
        LlgDecoder::new(tokenizer().clone(), &[EOS], VOCAB, LimitsConfig::default())
            .expect("decoder builds")
    })
}

/// The ids `mask` allows.
pub fn allowed(mask: &TokenMask) -> Vec<u32> {
    (0..mask.len() as u32)
        .filter(|&id| mask.allows(id))
        .collect()
}

/// One sampled output.
pub struct Sample {
    pub tokens: Vec<u32>,
    pub text: String,
    /// Ended by EOS or by the constraint finishing (not by `max_tokens`).
    pub finished: bool,
}

/// Ids that decode to whitespace only (spaces, tabs, newlines, in any run).
pub fn whitespace_ids() -> &'static [bool] {
    static WS: OnceLock<Vec<bool>> = OnceLock::new();
    WS.get_or_init(|| {
        (0..VOCAB as u32)
            .map(|id| {
                tokenizer()
                    .decode(&[id], false)
                    .is_ok_and(|s| !s.is_empty() && s.chars().all(char::is_whitespace))
            })
            .collect()
    })
}

/// Probability that the random model emits a whitespace-only token when other tokens are
/// allowed too. SmolLM2 has hundreds of whitespace-only tokens: a model that picked them as
/// often as any other token would pad flexible-whitespace JSON almost without end.
pub const WHITESPACE_PROB: f64 = 0.1;

/// Samples until EOS or the constraint finishes. Each step draws fresh i.i.d. logits, so
/// softmax sampling restricted to the mask at temperature 1 picks uniformly among the allowed
/// ids; that is what this does, from a seeded stream, except that whitespace-only tokens
/// together get [`WHITESPACE_PROB`] when anything else is allowed.
pub fn sample(constraint: &mut dyn TokenConstraint, rng: &mut SeqRng, max_tokens: usize) -> Sample {
    let ws = whitespace_ids();
    let mut mask = TokenMask::none(VOCAB);
    let mut tokens = Vec::new();
    let mut finished = false;
    for _ in 0..max_tokens {
        if constraint.is_finished() {
            finished = true;
            break;
        }
        constraint.compute_mask(&mut mask).expect("mask");
        let ids = allowed(&mask);
        assert!(!ids.is_empty(), "empty mask after {tokens:?}");
        let (space, other): (Vec<u32>, Vec<u32>) = ids
            .iter()
            .partition(|&&id| ws.get(id as usize) == Some(&true));
        let pool = if space.is_empty() || (!other.is_empty() && rng.next_f64() >= WHITESPACE_PROB) {
            &other
        } else {
            &space
        };
        let pick = pool[(rng.next_u64() % pool.len() as u64) as usize];
        if pick == EOS {
            finished = true;
            break;
        }
        constraint.commit(pick).expect("commit an allowed token");
        tokens.push(pick);
    }
    if !finished && constraint.is_finished() {
        finished = true;
    }
    let text = tokenizer().decode(&tokens, false).expect("decode");
    Sample {
        tokens,
        text,
        finished,
    }
}

/// `n` outputs for `params`, each from its own seeded stream; all must finish.
pub fn sample_many(params: &GuidedDecodingParams, n: usize, seed: u64) -> Vec<String> {
    let dec = decoder();
    (0..n as u64)
        .map(|i| {
            let mut c = dec.constraint(params).expect("compiles");
            let mut rng = SeqRng::new(seed, i);
            let s = sample(&mut c, &mut rng, 1500);
            assert!(
                s.finished,
                "sample {i} did not finish in 1500 tokens: {:?}",
                s.text
            );
            s.text
        })
        .collect()
}
