//! SGLang's model gateway (`sglang-router`, a Rust router shipped on PyPI) and the Prometheus
//! text parser (`prometheus_client`) in `runtimes/py-router`, for the loopback scale-out test
//! (`crates/api/tests/scale_out.rs`) and `cargo xtask bench-scale`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::venv::PinnedVenv;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-router";

const VENV: PinnedVenv = PinnedVenv {
    dir: VENV_DIR,
    what: "sglang-router",
    packages: &["sglang-router==0.3.2", "prometheus_client==0.23.1"],
    pip_flags: &["--only-binary=sglang-router"],
    pip_env: &[],
    find_links: &[],
    import_check: "import importlib.metadata as m\n\
        import sglang_router.launch_router, prometheus_client.parser\n\
        for name, want in (('sglang-router', '0.3.2'), ('prometheus_client', '0.23.1')):\n    \
            got = m.version(name)\n    \
            assert got == want, (name, got)\n",
};

/// Creates the venv and installs the pinned packages unless they are already there; returns
/// its Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    VENV.ensure(root)
}
