//! `cargo xtask gpu-bundle`: one folder (under [`MAX_BYTES`]) that a single call on a GPU
//! machine runs end to end: the CUDA build's binaries (stripped, xz), the reference model's
//! tokenizer and configs, the scripts that make weights and goldens there, and `run.sh`
//! (see `deploy/gpu/run.sh`). `--run-cpu` also runs it here with `--device cpu`, which is how CI
//! tests the bundle's plumbing without a GPU.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::bench::{Shape, workload};
use crate::setup::{self, Components};
use crate::{cuda, run_status};

/// The device machine takes 64 MiB per call; the bundle stays under this.
const MAX_BYTES: u64 = 60 * 1024 * 1024;
/// The bundle's sources in the repository.
const SOURCES: &str = "deploy/gpu";
/// Files of the prepared model the bundle carries (no weights).
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];
/// The GPU workload: decode at batch 1, 8 and 64, a 2,048-token prefill, 64 × 1,024 scored.
const GPU_SHAPE: Shape = Shape {
    decode_tokens: 64,
    decode_batches: [1, 8, 64],
    decode_prompt_len: 16,
    prefill_len: 2048,
    scoring: (64, 1024),
    repeats: 2,
};
/// The same steps, small enough for CI's two cores.
const CPU_SHAPE: Shape = Shape {
    decode_tokens: 4,
    decode_batches: [1, 2, 4],
    decode_prompt_len: 16,
    prefill_len: 64,
    scoring: (2, 32),
    repeats: 1,
};

/// Flags of `cargo xtask gpu-bundle`.
#[derive(Args)]
pub struct GpuBundleArgs {
    /// Where to write the bundle (default: target/gpu-bundle).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Build with the dev profile instead of release (shares the test build's artifacts; CI).
    #[arg(long)]
    dev: bool,
    /// Then run the bundle here with `--device cpu` (output in target/gpu-bundle-cpu) and check
    /// that `--device cuda` is a typed error with its `infermux`.
    #[arg(long)]
    run_cpu: bool,
}

/// What `cargo xtask test` runs: the dev-profile bundle, run here with `--device cpu`.
pub fn check(root: &Path) -> Result<()> {
    run(
        root,
        &GpuBundleArgs {
            out: None,
            dev: true,
            run_cpu: true,
        },
    )
}

/// Builds the bundle; with `--run-cpu`, runs it here on the CPU.
pub fn run(root: &Path, args: &GpuBundleArgs) -> Result<()> {
    // libtorch is needed to build the torch backend; ONNX Runtime only for the onnx one.
    let components = Components {
        torch: true,
        onnx: true,
    };
    let model = setup::all(root, components)?;
    let bins = cuda::build(root, components, !args.dev)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/gpu-bundle"));
    write(root, &model, &bins, &out)?;
    if args.run_cpu {
        cuda::check_device_errors(root, &bins.join("infermux"), &model, components)?;
        let results = root.join("target/gpu-bundle-cpu");
        crate::setup::remove_dir_if_exists(&results)?;
        let mut cmd = Command::new(out.join("run.sh"));
        cmd.args(["--device", "cpu", "--out"])
            .arg(&results)
            .env("PYTHON", setup::py_reference::ensure(root)?);
        run_status(&mut cmd).context("run.sh --device cpu failed")?;
        ensure!(
            results.join("bench-smollm2-135m.md").is_file(),
            "run.sh wrote no bench table in {}",
            results.display()
        );
        crate::require_all_measured(&results.join("conformance-f32.json"))?;
    }
    Ok(())
}

/// Writes the bundle folder `out` from the binaries in `bins`.
fn write(root: &Path, model: &Path, bins: &Path, out: &Path) -> Result<()> {
    setup::remove_dir_if_exists(out)?;
    let sources = root.join(SOURCES);
    let dirs = [
        "bin",
        "scripts",
        "tokenizer",
        "workloads",
        "models/smollm2-135m",
    ];
    for dir in dirs {
        fs::create_dir_all(out.join(dir)).with_context(|| format!("creating {dir}"))?;
    }
    for bin in cuda::BINARIES {
        pack_binary(&bins.join(bin), &out.join("bin").join(format!("{bin}.xz")))?;
    }
    copy(&sources.join("run.sh"), &out.join("run.sh"))?;
    for (from, name) in [
        (sources.join("make_model.py"), "make_model.py"),
        (sources.join("tables.py"), "tables.py"),
        (root.join("tests/data/make_goldens.py"), "make_goldens.py"),
        (root.join("xtask/peer_bench.py"), "peer_bench.py"),
    ] {
        copy(&from, &out.join("scripts").join(name))?;
    }
    for file in TOKENIZER_FILES {
        copy(&model.join(file), &out.join("tokenizer").join(file))?;
    }
    copy(
        &model.join("config.json"),
        &out.join("models/smollm2-135m/config.json"),
    )?;
    copy_dir(&sources.join("configs"), &out.join("models"))?;
    for (name, shape) in [("gpu.json", GPU_SHAPE), ("cpu.json", CPU_SHAPE)] {
        let text = serde_json::to_string(&workload(root, &shape)?)?;
        fs::write(out.join("workloads").join(name), text).context("writing a workload")?;
    }
    let bytes = size_of_dir(out)?;
    eprintln!(
        "gpu bundle: {} ({:.1} MiB); on the device: bash {}/run.sh (writes $OUT)",
        out.display(),
        bytes as f64 / (1024.0 * 1024.0),
        out.strip_prefix(root).unwrap_or(out).display()
    );
    if bytes > MAX_BYTES {
        bail!(
            "the bundle is {bytes} bytes, over the {MAX_BYTES} a device call can carry with room to spare"
        );
    }
    Ok(())
}

/// Strips `bin` (symbols and debug info) and compresses it with xz into `dest`.
fn pack_binary(bin: &Path, dest: &Path) -> Result<()> {
    let stripped = dest.with_extension("stripped");
    run_status(
        Command::new("strip")
            .arg("--strip-all")
            .arg(bin)
            .arg("-o")
            .arg(&stripped),
    )
    .with_context(|| format!("stripping {}", bin.display()))?;
    let out = fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    run_status(
        Command::new("xz")
            .args(["-6", "--stdout", "--threads=0"])
            .arg(&stripped)
            .stdout(out),
    )
    .with_context(|| format!("compressing {}", bin.display()))?;
    fs::remove_file(&stripped).context("removing the stripped copy")
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Copies the files of `from` (recursively) into `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let dest = to.join(path.file_name().context("an entry without a name")?);
        if path.is_dir() {
            fs::create_dir_all(&dest)?;
            copy_dir(&path, &dest)?;
        } else {
            copy(&path, &dest)?;
        }
    }
    Ok(())
}

/// Total bytes of the files under `dir`.
fn size_of_dir(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            size_of_dir(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
