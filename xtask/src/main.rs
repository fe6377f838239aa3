//! Developer tasks for infermux (`cargo xtask <command>`).

mod bench;
mod conformance;
mod export;
mod golden;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use setup::Components;

/// Command-line interface of `cargo xtask`.
#[derive(Parser)]
#[command(name = "xtask", about = "infermux developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install libtorch and ONNX Runtime into runtimes/, prepare the reference model
    /// (SmolLM2-135M-Instruct) in models/ and, with ONNX Runtime, export it to models/*/onnx.
    Setup {
        #[command(flatten)]
        runtimes: RuntimeFlags,
    },
    /// Run setup for the model only, then sample a short completion with the candle backend.
    Quickstart,
    /// Run setup, then `cargo test --workspace --exclude xtask` with the torch and onnx suites.
    Test {
        #[command(flatten)]
        runtimes: RuntimeFlags,
        /// Extra arguments passed on to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate tests/data/goldens with Hugging Face transformers (Python venv in runtimes/py).
    Golden {
        /// Use this Python interpreter instead of creating runtimes/py.
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Export a Hugging Face model folder to an ONNX decoder graph (Optimum layout), with the
    /// Python exporter in crates/backend-onnx/export (venv in runtimes/py-onnx).
    ExportOnnx(export::ExportArgs),
    /// Run the shared conformance cases on each backend: a table, a JSON report, and a ratchet
    /// against tests/data/conformance-baseline.json; fails on any violation or regression.
    Conformance(conformance::ConformanceArgs),
    /// End-to-end throughput and memory of each backend through the public API, next to
    /// Hugging Face transformers (runtimes/py) as the peer: Markdown, JSON and SVG results.
    Bench(bench::BenchArgs),
}

/// Flags that leave out a native runtime (the model is always prepared).
#[derive(Args)]
struct RuntimeFlags {
    /// Skip libtorch (and, for `test`, the torch test features).
    #[arg(long)]
    no_torch: bool,
    /// Skip ONNX Runtime (and, for `test`, the onnx test features).
    #[arg(long)]
    no_onnx: bool,
}

impl RuntimeFlags {
    /// The components these flags keep.
    fn components(&self) -> Components {
        Components {
            torch: !self.no_torch,
            onnx: !self.no_onnx,
        }
    }
}

/// `cargo test` features that need libtorch; dropped by `--no-torch`.
const TORCH_TEST_FEATURES: &[&str] = &["infermux-tests/torch"];
/// `cargo test` features that need ONNX Runtime; dropped by `--no-onnx`.
const ONNX_TEST_FEATURES: &[&str] = &["infermux-tests/onnx"];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = repo_root();
    match cli.command {
        Cmd::Setup { runtimes } => setup_all(&root, runtimes.components()).map(|_| ()),
        Cmd::Quickstart => quickstart(&root),
        Cmd::Test { runtimes, args } => test(&root, runtimes.components(), &args),
        Cmd::Golden { python } => golden::run(&root, python.as_deref()),
        Cmd::ExportOnnx(args) => export::run(&root, &args),
        Cmd::Conformance(args) => conformance::run(&root, &args),
        Cmd::Bench(args) => bench::run(&root, &args),
    }
}

/// `setup::all`, then, with ONNX Runtime, the f32 ONNX export of the model; returns the model folder.
fn setup_all(root: &Path, components: Components) -> Result<PathBuf> {
    let model = setup::all(root, components)?;
    if components.onnx {
        export::reference(root, &model)?;
    }
    Ok(model)
}

/// The workspace root: the parent of this crate's manifest directory.
///
/// Prefers the value `cargo run` sets at run time, so a moved checkout never uses a stale path.
fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().unwrap_or(&manifest).to_path_buf()
}

/// The `cargo` that launched us, so the same toolchain runs the nested command.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Candle-only fast path: prepares the model (no native runtimes) and samples twice.
fn quickstart(root: &Path) -> Result<()> {
    let model = setup::run(root)?;
    let model = model.strip_prefix(root).unwrap_or(&model).to_path_buf();
    // A plain completion, then the same question through the model's chat template.
    let runs: [&[&str]; 2] = [
        &["--prompt", "The capital of France is", "--max-tokens", "3"],
        &[
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-tokens",
            "32",
        ],
    ];
    for extra in runs {
        eprintln!(
            "\n$ infermux sample --model {} --backend candle --temperature 0 {}",
            model.display(),
            extra.join(" ")
        );
        let mut cmd = cargo();
        cmd.current_dir(root)
            .args([
                "run", "--quiet", "-p", "infermux", "--bin", "infermux", "--", "sample", "--model",
            ])
            .arg(&model)
            .args(["--backend", "candle", "--temperature", "0"])
            .args(extra);
        run_status(&mut cmd)?;
    }
    Ok(())
}

/// Runs setup for `components`, then the workspace tests with their features enabled.
fn test(root: &Path, components: Components, extra: &[String]) -> Result<()> {
    let model = setup_all(root, components)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--exclude", "xtask"]);
    let features = test_features(components);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    cmd.args(extra).env("INFERMUX_MODEL_DIR", &model);
    if components.torch {
        // rustdoc runs merged doctests from a temporary folder, out of the rpath's reach.
        cmd.env(
            "LD_LIBRARY_PATH",
            loader_path(&root.join("runtimes/libtorch/torch/lib")),
        );
    }
    run_status(&mut cmd)
}

/// `dir` prepended to the current `LD_LIBRARY_PATH`.
fn loader_path(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

/// The `cargo test` features the installed `components` allow.
fn test_features(components: Components) -> Vec<&'static str> {
    let torch = components.torch.then_some(TORCH_TEST_FEATURES);
    let onnx = components.onnx.then_some(ONNX_TEST_FEATURES);
    [torch, onnx]
        .into_iter()
        .flatten()
        .flatten()
        .copied()
        .collect()
}

/// Runs a command with inherited stdio and fails if it exits non-zero.
pub(crate) fn run_status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a `test` command line into its flags and pass-through arguments.
    fn parse_test(argv: &[&str]) -> (Components, Vec<String>) {
        let cli = Cli::try_parse_from(["xtask", "test"].iter().chain(argv)).unwrap();
        match cli.command {
            Cmd::Test { runtimes, args } => (runtimes.components(), args),
            _ => panic!("not a test command"),
        }
    }

    #[test]
    fn test_flags_drop_features_and_keep_cargo_args() {
        let (components, args) = parse_test(&["--no-torch", "--release", "--", "--nocapture"]);
        assert_eq!(test_features(components), ONNX_TEST_FEATURES);
        assert_eq!(args, ["--release", "--", "--nocapture"]);
        let (components, args) = parse_test(&["-p", "infermux-tests"]);
        assert_eq!(test_features(components).len(), 2);
        assert_eq!(args, ["-p", "infermux-tests"]);
        let (components, _) = parse_test(&["--no-onnx", "--no-torch"]);
        assert!(test_features(components).is_empty());
    }
}
