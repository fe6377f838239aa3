//! The pinned native runtimes: libtorch (for `tch`) and ONNX Runtime (for `ort`).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::install::{Pick, Runtime, Wheel, check_ldd};

/// PyTorch release `tch = "0.24"` expects.
pub const TORCH_VERSION: &str = "2.11.0";
/// ONNX Runtime release whose shared library `ORT_DYLIB_PATH` names.
pub const ORT_VERSION: &str = "1.31.1";

/// libtorch from the PyPI torch wheel, in site-packages layout so its `$ORIGIN` RPATHs resolve.
pub const LIBTORCH: Runtime = Runtime {
    name: "libtorch",
    marker: "libtorch v1 (torch==2.11.0, nvidia-cuda-runtime==13.0.96, nvidia-cuda-cupti==13.0.85)\n",
    wheels: &[
        Wheel::pin("torch", TORCH_VERSION),
        Wheel::pin("nvidia-cuda-runtime", "13.0.96"),
        Wheel::pin("nvidia-cuda-cupti", "13.0.85"),
    ],
    picks: &[
        Pick::keep("torch/lib/*"),
        Pick::keep("torch/include/*"),
        Pick::keep("torch/version.py"),
        Pick::keep("nvidia/*.so*"),
    ],
    entry: "torch",
    finish: finish_libtorch,
};

/// ONNX Runtime's shared library from the PyPI onnxruntime wheel, flattened into `lib/`.
pub const ONNXRUNTIME: Runtime = Runtime {
    name: "onnxruntime",
    marker: "onnxruntime v1 (onnxruntime==1.31.1)\n",
    wheels: &[Wheel::pin("onnxruntime", ORT_VERSION)],
    picks: &[Pick::moved(
        "onnxruntime/capi/libonnxruntime*.so*",
        "onnxruntime/capi/",
        "lib/",
    )],
    entry: "lib/libonnxruntime.so.1.31.1",
    finish: finish_onnxruntime,
};

/// Writes `torch/build-version` (read by torch-sys) and checks the CPU libraries' dependencies.
fn finish_libtorch(dir: &Path) -> Result<()> {
    // libtorch.so and libtorch_cuda.so need cuBLAS, cuDNN, NCCL… which are not installed: binaries
    // link with `--as-needed` and only load libtorch_cpu.so and libc10.so.
    let torch = dir.join("torch");
    let version = wheel_torch_version(&torch)?;
    ensure!(
        version.split('+').next() == Some(TORCH_VERSION),
        "torch wheel has version {version}, expected {TORCH_VERSION}"
    );
    fs::write(torch.join("build-version"), format!("{version}\n"))
        .context("writing build-version")?;
    for lib in ["libc10.so", "libtorch_cpu.so"] {
        check_ldd(&torch.join("lib").join(lib))?;
    }
    Ok(())
}

/// `__version__` from the wheel's `torch/version.py` (e.g. `2.11.0+cu130`).
fn wheel_torch_version(torch: &Path) -> Result<String> {
    let path = torch.join("version.py");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
        .context("version.py has no __version__")
}

/// Adds the SONAME and unversioned links next to the library and checks its dependencies.
fn finish_onnxruntime(dir: &Path) -> Result<()> {
    let lib = dir.join("lib");
    let file = format!("libonnxruntime.so.{ORT_VERSION}");
    for link in ["libonnxruntime.so.1", "libonnxruntime.so"] {
        std::os::unix::fs::symlink(&file, lib.join(link))
            .with_context(|| format!("linking {link}"))?;
    }
    check_ldd(&lib.join(file))
}
