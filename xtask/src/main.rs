//! Developer tasks for infermux (`cargo xtask <command>`).

mod golden;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Command-line interface of `cargo xtask`.
#[derive(Parser)]
#[command(name = "xtask", about = "infermux developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and convert the reference model (SmolLM2-135M-Instruct) into models/.
    Setup,
    /// Run setup, then sample a short completion with the candle backend.
    Quickstart,
    /// Run setup, then `cargo test --workspace --exclude xtask` against the reference model.
    Test {
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
}

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
        Cmd::Setup => setup::run(&root).map(|_| ()),
        Cmd::Quickstart => quickstart(&root),
        Cmd::Test { args } => test(&root, &args),
        Cmd::Golden { python } => golden::run(&root, python.as_deref()),
    }
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

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let model = setup::run(root)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--exclude", "xtask"])
        .args(extra)
        .env("INFERMUX_MODEL_DIR", &model);
    run_status(&mut cmd)
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
