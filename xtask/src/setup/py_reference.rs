//! The Python reference stack in `runtimes/py`: PyTorch + Hugging Face transformers (+ peft) on
//! the CPU, the external reference for logits (`cargo xtask golden`), the peer of `cargo xtask
//! bench`, and the trainer of the trainer-agreement test
//! (`crates/api/tests/trainer_agreement.rs`, `tests/data/lora_trainer.py`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::venv::PinnedVenv;

/// The venv, relative to the repository root.
pub const VENV_DIR: &str = "runtimes/py";

/// torch as libtorch's wheel (found in `runtimes/.download` when `setup` fetched it; its CUDA
/// libraries come from PyPI as the wheel's dependencies), transformers pinned with the goldens.
const VENV: PinnedVenv = PinnedVenv {
    dir: VENV_DIR,
    what: "torch + transformers + peft",
    packages: &[
        "torch==2.11.0",
        "transformers==5.23.0",
        "peft==0.21.2",
        "accelerate",
        "gguf==0.19.0",
        "numpy",
        "safetensors",
    ],
    pip_flags: &[],
    pip_env: &[],
    find_links: &[super::install::DOWNLOAD_DIR],
    import_check: "import accelerate, gguf, importlib.metadata, numpy, peft, safetensors, torch, transformers\n\
        assert importlib.metadata.version('gguf') == '0.19.0'\n\
        assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__\n\
        assert transformers.__version__ == '5.23.0', transformers.__version__\n\
        assert peft.__version__ == '0.21.2', peft.__version__\n",
};

/// Creates the venv and installs the pinned stack unless it is already there; returns its
/// Python interpreter.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    VENV.ensure(root)
}
