//! The official `openai` Python client in `runtimes/py-openai`, for the server's client test
//! (`tests/tests/openai_client.rs`). Idempotent: nothing is fetched once the pinned version
//! imports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::run_status;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-openai";
/// The pinned client.
const PACKAGE: &str = "openai==3.54.0";
/// Succeeds only when the pinned client imports.
const IMPORT_CHECK: &str =
    "import openai\nassert openai.__version__ == '3.54.0', openai.__version__\n";

/// Creates the venv and installs the pinned client unless it is already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    if python.is_file() && imports_ok(&python) {
        eprintln!("openai client ready: {}", venv.display());
        return Ok(python);
    }
    if !python.is_file() {
        eprintln!("creating Python venv at {}", venv.display());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv"]).arg(&venv);
        run_status(&mut cmd).context("python3 -m venv failed")?;
    }
    eprintln!("installing {PACKAGE} into {}", venv.display());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
        PACKAGE,
    ]);
    run_status(&mut cmd).context("pip install of the openai client failed")?;
    anyhow::ensure!(
        imports_ok(&python),
        "{PACKAGE} was installed into {} but does not import",
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
