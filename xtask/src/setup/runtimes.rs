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

/// The CUDA 13.0 compiler pieces candle's kernels need at build time (nvcc, ptxas, cicc,
/// libdevice, the CUDA runtime and CCCL headers), from their PyPI wheels, in one toolkit tree.
/// Pinned to 13.0.x: the GPU machines' driver is 13.0, and PTX from a newer nvcc would not load.
pub const CUDA_TOOLKIT: Runtime = Runtime {
    name: "cuda-toolkit",
    marker: "cuda-toolkit v3 (nvidia-cuda-nvcc==13.0.88, nvidia-nvvm==13.0.88, \
             nvidia-cuda-crt==13.0.88, nvidia-cuda-runtime==13.0.96, nvidia-cuda-cccl==13.0.85)\n",
    wheels: &[
        Wheel::pin("nvidia-cuda-nvcc", "13.0.88"),
        Wheel::pin("nvidia-nvvm", "13.0.88"),
        Wheel::pin("nvidia-cuda-crt", "13.0.88"),
        Wheel::pin("nvidia-cuda-runtime", "13.0.96"),
        Wheel::pin("nvidia-cuda-cccl", "13.0.85"),
    ],
    picks: &[
        Pick::moved("nvidia/cu13/bin/*", "nvidia/cu13/", ""),
        Pick::moved("nvidia/cu13/include/*", "nvidia/cu13/", ""),
        Pick::moved("nvidia/cu13/lib/*", "nvidia/cu13/", ""),
        Pick::moved("nvidia/cu13/nvvm/*", "nvidia/cu13/", ""),
    ],
    entry: "bin/nvcc",
    finish: finish_cuda_toolkit,
};

/// Adds the folders build scripts and the linker look in, and checks that nvcc runs.
fn finish_cuda_toolkit(dir: &Path) -> Result<()> {
    // Build scripts (cudarc, candle-kernels) expect the toolkit's `lib64`.
    std::os::unix::fs::symlink("lib", dir.join("lib64")).context("linking lib64")?;
    // candle-kernels asks for `-lcudart` (its statically compiled kernels launch through the
    // CUDA runtime). There is no `libcudart.so` in the toolkit, so `link/libcudart.a` on
    // `LIBRARY_PATH` makes that the static runtime: the binary needs no libcudart to start
    // (the static runtime opens libcuda itself when first used).
    let link = dir.join("link");
    fs::create_dir_all(&link).context("creating link/")?;
    std::os::unix::fs::symlink("../lib/libcudart_static.a", link.join("libcudart.a"))
        .context("linking link/libcudart.a")?;
    let out = std::process::Command::new(dir.join("bin/nvcc"))
        .arg("--version")
        .output()
        .context("running nvcc --version")?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("release 13.0"),
        "nvcc --version did not report release 13.0: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
