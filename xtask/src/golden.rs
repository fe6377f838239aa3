//! `cargo xtask golden`: regenerate reference outputs with Hugging Face transformers.
//!
//! First the tiny random-weight Llama-family models (`tests/data/tiny/<name>/`, built from configs
//! with seeded weights, no download) and their goldens (`tests/data/goldens/tiny-<name>.json`),
//! then the SmolLM2 logit and beam goldens (which need the prepared model and its GGUF).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{run_status, setup};

/// Golden generator script, relative to the repository root.
const SCRIPT: &str = "tests/data/make_goldens.py";
/// Folder of the tiny models' folders, relative to the repository root.
pub const TINY_ROOT: &str = "tests/data/tiny";
/// Folder of the golden files, relative to the repository root.
const GOLDENS_DIR: &str = "tests/data/goldens";
/// Output file, relative to the repository root.
const OUTPUT: &str = "tests/data/goldens/smollm2-135m-instruct.json";
/// Beam-search golden generator and its output, relative to the repository root.
const BEAM_SCRIPT: &str = "tests/data/make_beam_goldens.py";
const BEAM_OUTPUT: &str = "tests/data/goldens/smollm2-135m-instruct-beams.json";

/// Ensures the Python stack (unless `python` is given), writes the tiny models and their
/// goldens, then prepares the reference model and runs the SmolLM2 scripts.
pub fn run(root: &Path, python: Option<&Path>) -> Result<()> {
    let python = match python {
        Some(p) => p.to_path_buf(),
        None => setup::py_reference::ensure(root)?,
    };
    let mut tiny = Command::new(&python);
    tiny.current_dir(root)
        .arg(SCRIPT)
        .arg("--tiny")
        .arg(root.join(TINY_ROOT))
        .arg("--out-dir")
        .arg(root.join(GOLDENS_DIR));
    run_status(&mut tiny).context("tiny model golden generation failed")?;
    let model = setup::run(root)?;
    let gguf = setup::ensure_gguf(root)?;
    let mut cmd = Command::new(&python);
    cmd.current_dir(root)
        .arg(SCRIPT)
        .arg("--model")
        .arg(&model)
        .arg("--gguf")
        .arg(&gguf)
        .arg("--out")
        .arg(root.join(OUTPUT));
    run_status(&mut cmd).context("golden generation failed")?;
    let mut beams = Command::new(&python);
    beams
        .current_dir(root)
        .arg(BEAM_SCRIPT)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(root.join(BEAM_OUTPUT));
    run_status(&mut beams).context("beam golden generation failed")
}
