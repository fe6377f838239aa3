//! llama.cpp through llama-cpp-python in `runtimes/py-llamacpp`: the reference for quantized
//! files (`tests/data/make_llamacpp_goldens.py`) and the peer of `cargo xtask bench --gguf`.
//! Optional (`cargo xtask setup --llama-cpp`): pip builds llama.cpp from source, about 12
//! minutes on 2 cores, more than CI can spend; CI checks against the committed goldens.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::venv::PinnedVenv;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py-llamacpp";

const VENV: PinnedVenv = PinnedVenv {
    dir: VENV_DIR,
    what: "llama-cpp-python (llama.cpp built from source)",
    packages: &["llama-cpp-python==0.3.36", "numpy", "gguf==0.19.0"],
    pip_flags: &[],
    pip_env: &[("CMAKE_BUILD_PARALLEL_LEVEL", "2")],
    find_links: &[],
    import_check: "import importlib.metadata, llama_cpp, numpy, gguf\n\
        assert llama_cpp.__version__ == '0.3.36', llama_cpp.__version__\n\
        assert importlib.metadata.version('gguf') == '0.19.0'\n",
};

/// Creates the venv and builds llama-cpp-python unless it is already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    VENV.ensure(root)
}

/// The venv's Python when llama-cpp-python is installed there.
pub fn python(root: &Path) -> Option<PathBuf> {
    let python = root.join(VENV_DIR).join("bin/python");
    VENV.imports_ok(&python).then_some(python)
}
