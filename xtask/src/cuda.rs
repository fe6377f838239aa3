//! `cargo xtask cuda-build`: every backend compiled with its `cuda` feature on a machine with
//! no GPU and no system CUDA, from the pinned PyPI CUDA 13.0 wheels (`runtimes/cuda-toolkit`),
//! then the built `infermux` asked for `--device cuda` on each backend: each must answer with a
//! typed error that names what is missing, never a panic or a loader failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::setup::{self, Components, install, runtimes};
use crate::{cargo, conformance, prepend_path, run_status};

/// GPU architecture the kernels are built for unless `CUDA_COMPUTE_CAP` is set: the H200
/// (sm_90) the device machines have.
pub const COMPUTE_CAP: &str = "90";
/// The binaries a CUDA build produces, all linked with the `cuda` feature.
pub const BINARIES: [&str; 3] = ["infermux", "infermux-conformance", "infermux-bench"];

/// Installs the toolkit wheels (idempotent) and returns the toolkit folder.
pub fn toolkit(root: &Path) -> Result<PathBuf> {
    let nvcc = install::ensure(root, &runtimes::CUDA_TOOLKIT)?;
    Ok(nvcc
        .parent()
        .and_then(Path::parent)
        .context("nvcc is not in a bin/ folder")?
        .to_path_buf())
}

/// The build environment of a CUDA compile: the toolkit found by candle's kernel build
/// (cudaforge: `NVCC`, `CUDA_HOME`) and by cudarc (`CUDARC_CUDA_VERSION` picks its 13.0
/// bindings without running nvcc), kernels for [`COMPUTE_CAP`] only, and the static CUDA
/// runtime found first by the linker (`LIBRARY_PATH`; see `CUDA_TOOLKIT`'s `link/`).
pub fn build_env(cmd: &mut Command, toolkit: &Path) {
    let bin = toolkit.join("bin");
    cmd.env("CUDA_HOME", toolkit)
        .env("CUDA_PATH", toolkit)
        .env("NVCC", bin.join("nvcc"))
        .env("PATH", prepend_path("PATH", &bin))
        .env(
            "CUDA_COMPUTE_CAP",
            std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| COMPUTE_CAP.into()),
        )
        .env("CUDARC_CUDA_VERSION", "13000")
        .env(
            "LIBRARY_PATH",
            prepend_path("LIBRARY_PATH", &toolkit.join("link")),
        )
        // cudaforge compiles candle's kernels on half the cores by default; they are most of
        // the build's time (two cores: ~18 min on one, ~9 on both).
        .env("CUDAFORGE_THREADS", cores().to_string());
}

/// This machine's cores.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `--features` of a CUDA build with the installed backends.
fn features(components: Components) -> String {
    let mut features = vec!["infermux/cli", "infermux/cuda", "infermux-tests/bins"];
    if components.torch {
        features.push("infermux-tests/torch");
    }
    if components.onnx {
        features.push("infermux-tests/onnx");
    }
    features.join(",")
}

/// Builds [`BINARIES`] with `cuda` (dev profile, or `release`) and copies them into
/// `target/cuda/<profile>/` (the cargo target keeps one copy of a binary per name, which the next
/// CPU build overwrites); returns that folder.
pub fn build(root: &Path, components: Components, release: bool) -> Result<PathBuf> {
    let toolkit = toolkit(root)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["build", "-p", "infermux", "-p", "infermux-tests"]);
    for bin in BINARIES {
        cmd.args(["--bin", bin]);
    }
    cmd.arg("--features").arg(features(components));
    if release {
        cmd.arg("--release");
    }
    build_env(&mut cmd, &toolkit);
    eprintln!(
        "$ cargo build --features {} (CUDA 13.0 from {})",
        features(components),
        toolkit.display()
    );
    run_status(&mut cmd).context("the CUDA build failed")?;
    let profile = if release { "release" } else { "debug" };
    let out = root.join("target/cuda").join(profile);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for bin in BINARIES {
        let from = root.join("target").join(profile).join(bin);
        std::fs::copy(&from, out.join(bin))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(out)
}

/// `cargo xtask cuda-build`: the build, then [`check_device_errors`] with its `infermux`.
pub fn run(root: &Path, components: Components, release: bool) -> Result<()> {
    let model = setup::all(root, components)?;
    let bins = build(root, components, release)?;
    check_device_errors(root, &bins.join("infermux"), &model, components)
}

/// `infermux sample --device cuda` on every installed backend must end in a typed answer: where
/// this machine has no usable driver or device, exit status 1 with the error naming exactly
/// that (not a build without `cuda`); where it has a GPU, success or exit 1 with a typed
/// `cannot run on cuda` (the CPU installs of libtorch and ONNX Runtime lack CUDA). Never a
/// signal, a panic or a loader error.
pub fn check_device_errors(
    root: &Path,
    infermux: &Path,
    model: &Path,
    components: Components,
) -> Result<()> {
    use infermux_core::DeviceMissing;
    let here = infermux_core::cuda::check_driver(0);
    let expected = match &here {
        Ok(_) => None,
        Err(DeviceMissing::Driver(_)) => Some("no usable CUDA driver"),
        Err(DeviceMissing::NoDevice { .. }) => Some("no CUDA device"),
        Err(other) => bail!("probing this machine's CUDA driver: {other}"),
    };
    for backend in crate::installed_backends(components) {
        let mut cmd = Command::new(infermux);
        cmd.args(["sample", "--model"])
            .arg(model)
            .args(["--backend", &backend, "--device", "cuda"])
            .args(["--prompt", "The capital of France is", "--max-tokens", "2"])
            .args(["--temperature", "0"]);
        conformance::runtime_env(&mut cmd, root, model, components);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", infermux.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        eprintln!(
            "--device cuda on {backend}: exit {code:?}: {}",
            stderr.trim()
        );
        ensure!(
            !stderr.contains("panicked") && !stderr.contains("error while loading shared"),
            "{backend}: --device cuda crashed instead of a typed error:\n{stderr}"
        );
        let typed = code == Some(1) && stderr.contains("cannot run on cuda");
        ensure!(
            !stderr.contains("no CUDA support"),
            "{backend}: the CUDA build answered as a build without `cuda`:\n{stderr}"
        );
        match expected {
            Some(missing) => ensure!(
                typed && stderr.contains(missing),
                "{backend}: --device cuda here must exit 1 with `{missing}`, got {code:?}:\n{stderr}"
            ),
            None => ensure!(
                out.status.success() || typed,
                "{backend}: --device cuda on this GPU machine neither ran nor gave a typed \
                 error, exit {code:?}:\n{stderr}"
            ),
        }
    }
    Ok(())
}
