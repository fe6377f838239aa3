//! The official Tinker and Fireworks Python SDKs in `runtimes/py-sdks`, for the tests that drive
//! `infermux serve` with them unmodified (`crates/api/tests/tinker_sdk.rs`, the Fireworks one).
//! Idempotent: nothing is fetched once the pinned versions import.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::run_status;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-sdks";
/// The pinned packages: `[training-sdk]` brings `DeploymentSampler`'s deps, `jinja2` chat
/// templates for the local HF tokenizer (transformers comes with tinker).
const PACKAGES: [&str; 3] = [
    "tinker==0.38.0",
    "fireworks-ai[training-sdk]==1.2.30",
    "jinja2",
];
/// Succeeds only when both SDKs import at their pinned versions.
const IMPORT_CHECK: &str = "import importlib.metadata as m\n\
    import tinker, jinja2, transformers\n\
    from fireworks.training.sdk import DeploymentSampler\n\
    for name, want in (('tinker', '0.38.0'), ('fireworks-ai', '1.2.30')):\n    \
        got = m.version(name)\n    \
        assert got == want, (name, got)\n";

/// Creates the venv and installs the pinned SDKs unless they are already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    if python.is_file() && imports_ok(&python) {
        eprintln!("tinker + fireworks-ai SDKs ready: {}", venv.display());
        return Ok(python);
    }
    if !python.is_file() {
        eprintln!("creating Python venv at {}", venv.display());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv"]).arg(&venv);
        run_status(&mut cmd).context("python3 -m venv failed")?;
    }
    eprintln!("installing {} into {}", PACKAGES.join(" "), venv.display());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
    ])
    .args(PACKAGES);
    run_status(&mut cmd).context("pip install of the tinker / fireworks-ai SDKs failed")?;
    anyhow::ensure!(
        imports_ok(&python),
        "{} were installed into {} but do not import",
        PACKAGES.join(" "),
        venv.display()
    );
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
