//! GGUF files of other types made from the shipped Q4_1 file, for the conformance tier of
//! quantized arithmetic and the llama.cpp peer of `cargo xtask bench --gguf`.
//!
//! Q8_0 and F16 are made by `tests/data/derive_gguf.py` with gguf-py (llama.cpp's own Python
//! package, in runtimes/py) exactly as `llama_model_quantize` makes them; the llama.cpp goldens
//! record the tensors' digest of llama.cpp's file, and conformance checks ours against it.
//! Q4_K_M (k-quants, which gguf-py cannot quantize) is made by llama.cpp itself when its venv
//! (`cargo xtask setup --llama-cpp`) is there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run_status;

/// The derivation script, relative to the repository root.
const DERIVE_SCRIPT: &str = "tests/data/derive_gguf.py";
/// llama.cpp's quantize call, relative to the repository root.
const LLAMACPP_SCRIPT: &str = "tests/data/make_llamacpp_goldens.py";
/// Types gguf-py derives (on every machine).
pub const DERIVED: [&str; 2] = ["Q8_0", "F16"];
/// Types only llama.cpp makes.
pub const LLAMACPP_ONLY: [&str; 1] = ["Q4_K_M"];

/// `models/gguf/SmolLM2-135M-Instruct.<TYPE>.gguf`.
pub fn path(root: &Path, kind: &str) -> PathBuf {
    root.join("models/gguf")
        .join(format!("{}.{kind}.gguf", super::MODEL_NAME))
}

/// Makes every missing file of [`DERIVED`] with `python` (runtimes/py).
pub fn ensure_derived(root: &Path, python: &Path) -> Result<()> {
    let src = super::ensure_gguf(root)?;
    for kind in DERIVED {
        let dst = path(root, kind);
        if dst.is_file() {
            continue;
        }
        std::fs::create_dir_all(dst.parent().context("no parent")?)?;
        eprintln!("deriving {} (gguf-py)…", dst.display());
        let mut cmd = Command::new(python);
        cmd.current_dir(root)
            .arg(DERIVE_SCRIPT)
            .arg(&src)
            .arg(&dst)
            .arg(kind);
        run_status(&mut cmd).with_context(|| format!("deriving the {kind} GGUF"))?;
    }
    Ok(())
}

/// Makes every missing file of [`LLAMACPP_ONLY`] with llama.cpp's quantize (`python` is the
/// llama.cpp venv's).
pub fn ensure_llamacpp(root: &Path, python: &Path) -> Result<()> {
    let src = super::ensure_gguf(root)?;
    for kind in LLAMACPP_ONLY {
        let dst = path(root, kind);
        if dst.is_file() {
            continue;
        }
        std::fs::create_dir_all(dst.parent().context("no parent")?)?;
        eprintln!("quantizing {} (llama.cpp)…", dst.display());
        let tmp = dst.with_extension("gguf.part");
        let mut cmd = Command::new(python);
        cmd.current_dir(root)
            .arg(LLAMACPP_SCRIPT)
            .arg("--quantize")
            .arg(&src)
            .arg(&tmp)
            .arg(kind);
        run_status(&mut cmd).with_context(|| format!("quantizing the {kind} GGUF"))?;
        std::fs::rename(&tmp, &dst)?;
    }
    Ok(())
}
