//! A Python venv under `runtimes/` with pinned packages, for the tests that drive infermux with
//! real clients and peers (the `openai` client, sglang-router, the Tinker and Fireworks SDKs, the
//! transformers reference stack).
//! Idempotent: nothing is fetched once the pinned versions import.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::run_status;

/// One venv and what it must hold.
pub struct PinnedVenv {
    /// The folder, relative to the repository root.
    pub dir: &'static str,
    /// What it holds, for messages ("sglang-router").
    pub what: &'static str,
    /// `pip install` requirement specifiers.
    pub packages: &'static [&'static str],
    /// Extra `pip install` flags (e.g. `--only-binary=NAME`).
    pub pip_flags: &'static [&'static str],
    /// Environment of the `pip install` (build settings of a package built from source).
    pub pip_env: &'static [(&'static str, &'static str)],
    /// Folders of local wheels, relative to the repository root, given to pip as
    /// `--find-links` when they exist (the torch wheel `setup` already downloaded).
    pub find_links: &'static [&'static str],
    /// Python that succeeds only when the pinned packages import at their versions.
    pub import_check: &'static str,
}

impl PinnedVenv {
    /// Creates the venv and installs the packages unless they already import; returns its
    /// Python interpreter.
    pub fn ensure(&self, root: &Path) -> Result<PathBuf> {
        let venv = root.join(self.dir);
        let python = venv.join("bin").join("python");
        if python.is_file() && self.imports_ok(&python) {
            eprintln!("{} ready: {}", self.what, venv.display());
            return Ok(python);
        }
        if !python.is_file() {
            eprintln!("creating Python venv at {}", venv.display());
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "venv"]).arg(&venv);
            run_status(&mut cmd).context("python3 -m venv failed")?;
        }
        let packages = self.packages.join(" ");
        eprintln!("installing {packages} into {}", venv.display());
        let mut cmd = Command::new(&python);
        cmd.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .args(self.pip_flags)
        .envs(self.pip_env.iter().copied());
        for dir in self.find_links.iter().map(|d| root.join(d)) {
            if dir.is_dir() {
                cmd.arg("--find-links").arg(dir);
            }
        }
        cmd.args(self.packages);
        run_status(&mut cmd).with_context(|| format!("pip install of {} failed", self.what))?;
        anyhow::ensure!(
            self.imports_ok(&python),
            "{packages} were installed into {} but do not import",
            venv.display()
        );
        Ok(python)
    }

    pub fn imports_ok(&self, python: &Path) -> bool {
        Command::new(python)
            .args(["-c", self.import_check])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}
