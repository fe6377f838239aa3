//! SGLang's model gateway (`sglang-router`, a Rust router shipped on PyPI) and the Prometheus
//! text parser (`prometheus_client`) in `runtimes/py-router`, for the loopback scale-out test
//! (`crates/api/tests/scale_out.rs`) and `cargo xtask bench-scale`. Idempotent: nothing is
//! fetched once the pinned versions import.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::run_status;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-router";
/// The pinned packages.
const PACKAGES: [&str; 2] = ["sglang-router==0.3.2", "prometheus_client==0.23.1"];
/// Succeeds only when the pinned packages import at their versions.
const IMPORT_CHECK: &str = "import importlib.metadata as m\n\
    import sglang_router.launch_router, prometheus_client.parser\n\
    for name, want in (('sglang-router', '0.3.2'), ('prometheus_client', '0.23.1')):\n    \
        got = m.version(name)\n    \
        assert got == want, (name, got)\n";

/// Creates the venv and installs the pinned packages unless they are already there; returns
/// its Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    if python.is_file() && imports_ok(&python) {
        eprintln!("sglang-router ready: {}", venv.display());
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
        "--only-binary=sglang-router",
    ])
    .args(PACKAGES);
    run_status(&mut cmd).context("pip install of sglang-router failed")?;
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
