//! The official Tinker and Fireworks Python SDKs in `runtimes/py-sdks`, for the tests that drive
//! `infermux serve` with them unmodified (`crates/api/tests/tinker_sdk.rs`,
//! `crates/api/tests/fireworks_sdk.rs`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::venv::PinnedVenv;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-sdks";

/// `[training-sdk]` brings `DeploymentSampler`'s deps, `jinja2` chat templates for the local HF
/// tokenizer (transformers comes with tinker).
const VENV: PinnedVenv = PinnedVenv {
    dir: VENV_DIR,
    what: "tinker + fireworks-ai SDKs",
    packages: &[
        "tinker==0.38.0",
        "fireworks-ai[training-sdk]==1.2.30",
        "jinja2",
    ],
    pip_flags: &[],
    pip_env: &[],
    find_links: &[],
    import_check: "import importlib.metadata as m\n\
        import tinker, jinja2, transformers\n\
        from fireworks.training.sdk import DeploymentSampler\n\
        for name, want in (('tinker', '0.38.0'), ('fireworks-ai', '1.2.30')):\n    \
            got = m.version(name)\n    \
            assert got == want, (name, got)\n",
};

/// Creates the venv and installs the pinned SDKs unless they are already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    VENV.ensure(root)
}
