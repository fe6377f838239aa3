//! The official `openai` Python client in `runtimes/py-openai`, for the server's client test
//! (`tests/tests/openai_client.rs`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::venv::PinnedVenv;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-openai";

const VENV: PinnedVenv = PinnedVenv {
    dir: VENV_DIR,
    what: "openai client",
    packages: &["openai==3.54.0"],
    pip_flags: &[],
    pip_env: &[],
    find_links: &[],
    import_check: "import openai\nassert openai.__version__ == '3.54.0', openai.__version__\n",
};

/// Creates the venv and installs the pinned client unless it is already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    VENV.ensure(root)
}
