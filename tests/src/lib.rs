//! Shared fixtures of the integration and conformance suites: where the reference model is, the
//! golden outputs of Hugging Face transformers, and named tolerances.

pub mod cases;

use std::path::PathBuf;

use serde::Deserialize;

/// Folder of the reference model (SmolLM2-135M-Instruct, f32), prepared by `cargo xtask setup`.
///
/// `INFERMUX_MODEL_DIR` overrides the default `<repo>/models/SmolLM2-135M-Instruct`.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the reference model is not prepared at {}: run `cargo xtask setup` (or `cargo xtask test`)",
        dir.display()
    );
    dir
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repo root")
        .to_path_buf()
}

/// Outputs of the reference implementation for one prompt.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenCase {
    /// Short label.
    pub name: String,
    /// The prompt text.
    pub prompt: String,
    /// Its token ids under the reference tokenizer.
    pub prompt_tokens: Vec<u32>,
    /// Logprob of each prompt token (first `None`).
    pub prompt_logprobs: Vec<Option<f64>>,
    /// 32 greedy tokens (EOS not special-cased).
    pub greedy_tokens: Vec<u32>,
    /// Raw logprob of each greedy token.
    pub greedy_logprobs: Vec<f64>,
}

/// The golden file written by `tests/data/make_goldens.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct Goldens {
    /// One entry per prompt.
    pub cases: Vec<GoldenCase>,
}

/// Loads `tests/data/goldens/smollm2-135m-instruct.json`.
pub fn goldens() -> Goldens {
    let path = repo_root().join("tests/data/goldens/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A named bound on absolute differences of logprobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// What the bound is for, shown in failures.
    pub name: &'static str,
    /// Largest allowed |a - b|.
    pub max_abs: f64,
}

impl Tolerance {
    /// f32 backend vs the transformers reference (per prompt token).
    pub const F32_VS_REFERENCE: Tolerance = Tolerance {
        name: "f32 vs reference",
        max_abs: 1e-3,
    };
    /// A sampled token's logprob vs scoring the same sequence.
    pub const SAMPLE_VS_SCORE: Tolerance = Tolerance {
        name: "sample vs compute_logprobs",
        max_abs: 1e-4,
    };

    /// Largest |a - b| over paired entries, with its index; panics if a bound is exceeded.
    pub fn check(&self, what: &str, got: &[f64], expected: &[f64]) -> f64 {
        assert_eq!(got.len(), expected.len(), "{what}: length mismatch");
        let (worst_i, worst) = got
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold((0, 0.0f64), |acc, (i, d)| {
                if d > acc.1 || d.is_nan() { (i, d) } else { acc }
            });
        assert!(
            worst <= self.max_abs,
            "{what}: max |Δ| = {worst:e} at index {worst_i} exceeds {} ({:e}): got {}, expected {}",
            self.name,
            self.max_abs,
            got[worst_i],
            expected[worst_i]
        );
        worst
    }
}
