//! `cargo xtask export-onnx`: export a Hugging Face model folder to an ONNX decoder graph.
//!
//! The exporter is the library function `infermux_backend_onnx::export::export`: the graph is
//! recorded from the Rust model definition (`infermux_core::model::Llama`), no Python involved.
//! It skips an export whose `infermux_export.json` marker is current, so a second run (as every
//! `cargo xtask setup` makes) is quick. `--verify`, and `setup` after a fresh export, run
//! `onnx.checker.check_model(full_check)` on the result in the venv `runtimes/py-onnx`, created
//! here with the pinned `onnx` package; numerical checks against transformers are `cargo xtask
//! conformance --backends onnx`'s.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use infermux_backend_onnx::export::{self as onnx_export, ExportDtype, ExportOptions, GRAPH_FILE};

use crate::run_status;

/// Virtual environment of the checker, relative to the repository root.
const VENV_DIR: &str = "runtimes/py-onnx";
/// Pinned requirements of the checker (Python 3.11+).
const REQUIREMENTS: &str = "numpy==2.4.6\nonnx==1.23.2\n";
/// Marker in the venv recording the hash of the requirements it was filled from.
const VENV_MARKER: &str = ".infermux-requirements";
/// The check run in the venv: the ONNX checker with shape inference over the whole graph.
const CHECK_SCRIPT: &str = "import sys, onnx\n\
    onnx.checker.check_model(sys.argv[1], full_check=True)\n\
    print('onnx.checker (full_check): ok,', len(onnx.load(sys.argv[1], load_external_data=False).graph.node), 'nodes')\n";

/// Weight and activation type of the exported graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// float32 (default): the graph the tests compare with the goldens.
    F32,
    /// float16 weights, activations, past/present and logits (norms and softmax in f32).
    F16,
}

impl From<Dtype> for ExportDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => ExportDtype::F32,
            Dtype::F16 => ExportDtype::F16,
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
    /// Output folder (default: MODEL/onnx for f32, MODEL/onnx-f16 for f16). Outside MODEL it
    /// also gets MODEL's config and tokenizer files, so it loads as a model folder of its own.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Export even when the output's marker is current.
    #[arg(long)]
    force: bool,
    /// After exporting, run onnx.checker (full_check) on the graph (Python venv runtimes/py-onnx).
    #[arg(long)]
    verify: bool,
}

/// Runs `cargo xtask export-onnx`.
pub fn run(root: &Path, args: &ExportArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::setup::run(root)?,
    };
    let dtype = ExportDtype::from(args.dtype);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| onnx_export::default_out_dir(&model, dtype));
    let model_abs = std::path::absolute(&model)?;
    let standalone = !std::path::absolute(&out)?.starts_with(&model_abs);
    let options = ExportOptions {
        dtype,
        force: args.force,
        standalone,
        ..Default::default()
    };
    export(&model, &out, &options)?;
    if args.verify {
        check_model(root, &out.join(GRAPH_FILE))?;
    }
    Ok(())
}

/// The f32 export of `model` into `model/onnx`, as `setup` does for the reference model (and
/// `conformance` for the tiny variants); a fresh export is run through the ONNX checker, which
/// also leaves `runtimes/py-onnx` in place for the tests that check graphs.
pub fn reference(root: &Path, model: &Path) -> Result<()> {
    let out = onnx_export::default_out_dir(model, ExportDtype::F32);
    if export(model, &out, &ExportOptions::default())? {
        check_model(root, &out.join(GRAPH_FILE))?;
    }
    Ok(())
}

/// Exports `model`; whether anything was written (false: the export was current).
fn export(model: &Path, out: &Path, options: &ExportOptions) -> Result<bool> {
    let report = onnx_export::export(model, out, options)
        .with_context(|| format!("exporting {} to ONNX", model.display()))?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    if report.skipped {
        eprintln!("onnx export up to date: {}", report.out_dir.display());
    } else {
        eprintln!(
            "exported {} ({}) to {} in {:.1}s: {} nodes, {} initializers, {} {:.2} MiB, {} {:.1} MiB",
            model.display(),
            options.dtype.as_str(),
            report.out_dir.display(),
            report.seconds,
            report.nodes,
            report.initializers,
            GRAPH_FILE,
            mib(report.graph_bytes),
            onnx_export::DATA_FILE,
            mib(report.data_bytes),
        );
    }
    Ok(!report.skipped)
}

/// Runs the ONNX checker on `graph` in `runtimes/py-onnx`.
fn check_model(root: &Path, graph: &Path) -> Result<()> {
    let python = ensure_venv(root)?;
    let mut cmd = Command::new(python);
    cmd.args(["-c", CHECK_SCRIPT]).arg(graph);
    run_status(&mut cmd).with_context(|| format!("onnx.checker rejected {}", graph.display()))
}

/// Creates `runtimes/py-onnx` and installs the pinned requirements unless its marker is current.
fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let python = venv.join("bin").join("python");
    let marker = marker_contents(REQUIREMENTS.as_bytes());
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
    eprintln!("installing the ONNX checker into {}", venv.display());
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(REQUIREMENTS.lines());
    run_status(&mut cmd).context("pip install of the ONNX checker failed")?;
    fs::write(&marker_path, marker)
        .with_context(|| format!("writing {}", marker_path.display()))?;
    Ok(python)
}

/// Marker text for a requirements list: its FNV-1a 64 hash (stable across Rust releases).
fn marker_contents(requirements: &[u8]) -> String {
    format!(
        "py-onnx v2 requirements-fnv1a64={:016x}\n",
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
