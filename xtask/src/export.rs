//! `cargo xtask export-onnx`: export a Hugging Face model folder to an ONNX decoder graph.
//!
//! The exporter is `crates/backend-onnx/export/hf_to_onnx.py` (onnx + numpy, no torch). It runs in
//! the venv `runtimes/py-onnx`, created here and filled from the pinned `requirements.txt`; a
//! marker holding the hash of that file skips `pip` when nothing changed. The script itself skips
//! an export whose `infermux_export.json` marker is current, so a second run is quick.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::run_status;

/// Virtual environment of the exporter, relative to the repository root.
const VENV_DIR: &str = "runtimes/py-onnx";
/// Exporter script, relative to the repository root.
const SCRIPT: &str = "crates/backend-onnx/export/hf_to_onnx.py";
/// Pinned requirements of the exporter, relative to the repository root.
const REQUIREMENTS: &str = "crates/backend-onnx/export/requirements.txt";
/// Marker in the venv recording the hash of the requirements it was filled from.
const VENV_MARKER: &str = ".infermux-requirements";

/// Weight and activation type of the exported graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// float32 (default): the graph the tests compare with the goldens.
    F32,
    /// float16 weights, activations, past/present and logits (norms and softmax in f32).
    F16,
}

impl Dtype {
    fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        }
    }
}

/// Flags of `cargo xtask export-onnx`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Hugging Face model folder (default: the reference model, prepared first if needed).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weight and activation type.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Output folder (default: MODEL/onnx for f32, MODEL/onnx-f16 for f16).
    #[arg(long)]
    out: Option<PathBuf>,
    /// After exporting, check the f32 and f16 graphs against this golden JSON with ONNX Runtime.
    #[arg(long, value_name = "GOLDEN_JSON")]
    verify: Option<PathBuf>,
}

/// Runs `cargo xtask export-onnx`.
pub fn run(root: &Path, args: &ExportArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::setup::run(root)?,
    };
    export(
        root,
        &model,
        args.dtype,
        args.out.as_deref(),
        args.verify.as_deref(),
    )
}

/// The f32 export of `model` into `model/onnx`, as `setup` does for the reference model.
pub fn reference(root: &Path, model: &Path) -> Result<()> {
    export(root, model, Dtype::F32, None, None)
}

/// Ensures the venv, then runs the exporter script.
fn export(
    root: &Path,
    model: &Path,
    dtype: Dtype,
    out: Option<&Path>,
    verify: Option<&Path>,
) -> Result<()> {
    let python = ensure_venv(root)?;
    let mut cmd = Command::new(python);
    cmd.current_dir(root)
        .arg(root.join(SCRIPT))
        .arg("--model")
        .arg(model)
        .args(["--dtype", dtype.as_str()]);
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    if let Some(golden) = verify {
        cmd.arg("--verify").arg(golden);
    }
    run_status(&mut cmd).context("ONNX export failed")
}

/// Creates `runtimes/py-onnx` and installs the pinned requirements unless its marker is current.
fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    let requirements = root.join(REQUIREMENTS);
    let text =
        fs::read(&requirements).with_context(|| format!("reading {}", requirements.display()))?;
    let marker = marker_contents(&text);
    let marker_path = venv.join(VENV_MARKER);
    if python.is_file() && fs::read_to_string(&marker_path).is_ok_and(|m| m == marker) {
        return Ok(python);
    }
    if !python.is_file() {
        eprintln!("creating Python venv at {}", venv.display());
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "venv"]).arg(&venv);
        run_status(&mut cmd).context("python3 -m venv failed")?;
    }
    eprintln!("installing {} into {}", REQUIREMENTS, venv.display());
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pip", "install", "--disable-pip-version-check", "-r"])
        .arg(&requirements);
    run_status(&mut cmd).context("pip install of the exporter requirements failed")?;
    fs::write(&marker_path, marker)
        .with_context(|| format!("writing {}", marker_path.display()))?;
    Ok(python)
}

/// Marker text for a requirements file: its FNV-1a 64 hash (stable across Rust releases).
fn marker_contents(requirements: &[u8]) -> String {
    format!(
        "py-onnx v1 requirements-fnv1a64={:016x}\n",
        fnv1a64(requirements)
    )
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn marker_changes_with_requirements() {
        assert_ne!(marker_contents(b"onnx==1\n"), marker_contents(b"onnx==2\n"));
        assert!(marker_contents(b"x").ends_with('\n'));
    }
}
