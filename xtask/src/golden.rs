//! `cargo xtask golden`: regenerate reference outputs with Hugging Face transformers.
//!
//! First the tiny random-weight Llama-family models (`tests/data/tiny/<name>/`, built from configs
//! with seeded weights, no download) and their goldens (`tests/data/goldens/tiny-<name>.json`),
//! then the SmolLM2 logit and beam goldens (which need the prepared model and its GGUF).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::{run_status, setup};

/// Virtual environment holding the Python reference stack.
const VENV_DIR: &str = "runtimes/py";
/// Pinned packages of the reference stack.
const PY_PACKAGES: [&str; 6] = [
    "torch==2.11.0",
    "transformers==5.23.0",
    "accelerate",
    "gguf",
    "numpy",
    "safetensors",
];
/// Succeeds only when the pinned stack is importable.
const IMPORT_CHECK: &str = "import accelerate, gguf, numpy, safetensors, torch, transformers\n\
    assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__\n\
    assert transformers.__version__ == '5.23.0', transformers.__version__\n";
/// Where `setup` keeps the runtime wheels it downloaded (torch among them).
const SETUP_WHEELS: &str = "runtimes/.download";
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
        None => ensure_venv(root)?,
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

/// Creates `runtimes/py` and installs the pinned packages unless they already import.
fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        eprintln!("creating Python venv at {}", venv.display());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv"]).arg(&venv);
        run_status(&mut cmd).context("python3 -m venv failed")?;
    }
    if imports_ok(&python) {
        return Ok(python);
    }
    eprintln!(
        "installing {} into {}",
        PY_PACKAGES.join(" "),
        venv.display()
    );
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    // Reuse the torch wheel `setup` downloaded for libtorch, if it is there.
    let wheels = root.join(SETUP_WHEELS);
    if wheels.is_dir() {
        cmd.arg("--find-links").arg(&wheels);
    }
    cmd.args(PY_PACKAGES);
    run_status(&mut cmd).context("pip install of the reference stack failed")?;
    Ok(python)
}

fn imports_ok(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", IMPORT_CHECK])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
