//! Developer tasks for infermux (`cargo xtask <command>`).

mod bench;
mod bench_gguf;
mod bench_rl;
mod bench_scale;
mod conformance;
mod cuda;
mod export;
mod golden;
mod gpu_bundle;
mod serve_bench;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

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
    /// (SmolLM2-135M-Instruct) in models/ with its Q8_0 and F16 GGUF files in models/gguf and,
    /// with ONNX Runtime, export it to models/*/onnx.
    Setup {
        #[command(flatten)]
        runtimes: RuntimeFlags,
        /// Also build llama.cpp (llama-cpp-python, ~12 min on 2 cores) into
        /// runtimes/py-llamacpp and make the Q4_K_M GGUF with it: the peer of `bench --gguf`
        /// and the maker of the llama.cpp goldens.
        #[arg(long)]
        llama_cpp: bool,
    },
    /// Run setup for the model only, then sample a short completion with the candle backend.
    Quickstart,
    /// Run setup, then what CI checks: clippy (`-D warnings`) on every target with the
    /// installed backends, `cargo test --workspace --exclude xtask` with the torch and onnx
    /// suites, `cargo test -p xtask`, the conformance ratchet on every installed backend, and
    /// (with both runtimes) the CUDA build of every backend with the GPU bundle run on the CPU.
    Test {
        #[command(flatten)]
        runtimes: RuntimeFlags,
        /// Only run `cargo test --workspace --exclude xtask` (no clippy, no xtask tests, no
        /// conformance).
        #[arg(long)]
        tests_only: bool,
        /// Extra arguments passed on to `cargo test --workspace`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build every installed backend with its `cuda` feature from the pinned PyPI CUDA 13.0
    /// wheels (runtimes/cuda-toolkit; no GPU needed), copy the binaries to target/cuda/<profile>,
    /// and check that `--device cuda` is a typed error on each backend here when there is no driver.
    CudaBuild {
        #[command(flatten)]
        runtimes: RuntimeFlags,
        /// Build with the release profile (what the GPU bundle's measured figures use).
        #[arg(long)]
        release: bool,
    },
    /// Write target/gpu-bundle: the CUDA build's binaries (stripped, xz), tokenizer, configs and
    /// `run.sh`, which one device call runs end to end (weights and goldens made there,
    /// conformance and bench vs transformers on cuda); `--run-cpu` runs it here on the CPU.
    GpuBundle(gpu_bundle::GpuBundleArgs),
    /// Regenerate tests/data/goldens with Hugging Face transformers (Python venv in runtimes/py).
    Golden {
        /// Use this Python interpreter instead of creating runtimes/py.
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Export a Hugging Face model folder to an ONNX decoder graph (Optimum layout), with the
    /// Rust exporter (`infermux_backend_onnx::export`: the graph recorded from the one model
    /// definition); `--verify` runs onnx.checker in runtimes/py-onnx.
    ExportOnnx(export::ExportArgs),
    /// Run the shared conformance cases on each backend: a table, a JSON report, and a ratchet
    /// against tests/data/conformance-baseline.json; fails on any violation or regression.
    Conformance(conformance::ConformanceArgs),
    /// End-to-end throughput and memory of each backend through the public API, next to
    /// Hugging Face transformers (runtimes/py) as the peer: Markdown, JSON and SVG results.
    Bench(bench::BenchArgs),
    /// Throughput of `infermux serve` replicas behind sglang-router (runtimes/py-router)
    /// against one replica direct, same workload, same run → docs/bench/scale-out.md.
    BenchScale(bench_scale::BenchScaleArgs),
    /// What an RL loop asks of `infermux serve`: prefix-cache TTFT, a GRPO step with and
    /// without the cache, mixed-adapter batches, weight updates under load → docs/bench/rl.md.
    BenchRl(bench_rl::BenchRlArgs),
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
        Cmd::Setup {
            runtimes,
            llama_cpp,
        } => {
            setup_all(&root, runtimes.components())?;
            if llama_cpp {
                let python = setup::py_llamacpp::ensure(&root)?;
                setup::gguf_files::ensure_llamacpp(&root, &python)?;
            }
            Ok(())
        }
        Cmd::Quickstart => quickstart(&root),
        Cmd::Test {
            runtimes,
            tests_only,
            args,
        } => test(&root, runtimes.components(), tests_only, &args),
        Cmd::CudaBuild { runtimes, release } => cuda::run(&root, runtimes.components(), release),
        Cmd::GpuBundle(args) => gpu_bundle::run(&root, &args),
        Cmd::Golden { python } => golden::run(&root, python.as_deref()),
        Cmd::ExportOnnx(args) => export::run(&root, &args),
        Cmd::Conformance(args) => conformance::run(&root, &args),
        Cmd::Bench(args) => bench::run(&root, &args),
        Cmd::BenchScale(args) => bench_scale::run(&root, &args),
        Cmd::BenchRl(args) => bench_rl::run(&root, &args),
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
                "run",
                "--quiet",
                "-p",
                "infermux",
                "--features",
                "cli",
                "--bin",
                "infermux",
                "--",
                "sample",
                "--model",
            ])
            .arg(&model)
            .args(["--backend", "candle", "--temperature", "0"])
            .args(extra);
        run_status(&mut cmd)?;
    }
    Ok(())
}

/// Runs setup for `components`, then (unless `tests_only`) each CI step in turn, failing at the
/// first that fails; prints how long each step took.
fn test(root: &Path, components: Components, tests_only: bool, extra: &[String]) -> Result<()> {
    let started = Instant::now();
    let model = setup_all(root, components)?;
    let mut timings = vec![("setup".to_string(), started.elapsed())];
    let features = test_features(components);
    let outcome = test_steps(
        root,
        &model,
        components,
        tests_only,
        &features,
        extra,
        &mut timings,
    );
    eprintln!("\nxtask test: step timings");
    for (step, took) in &timings {
        eprintln!("  {:>7.1} s  {step}", took.as_secs_f64());
    }
    eprintln!("  {:>7.1} s  total", started.elapsed().as_secs_f64());
    outcome
}

/// The steps after setup; each one's time is pushed onto `timings` once it succeeds.
fn test_steps(
    root: &Path,
    model: &Path,
    components: Components,
    tests_only: bool,
    features: &[&str],
    extra: &[String],
    timings: &mut Vec<(String, Duration)>,
) -> Result<()> {
    let mut step = |name: &str, cmd: &mut Command| -> Result<()> {
        eprintln!("\n== xtask test: {name}");
        let t = Instant::now();
        run_status(cmd)?;
        timings.push((name.to_string(), t.elapsed()));
        Ok(())
    };
    if !tests_only {
        for (name, args) in lint_commands(features) {
            let mut cmd = cargo();
            cmd.current_dir(root).args(&args);
            step(&name, &mut cmd)?;
        }
    }
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--exclude", "xtask"]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    cmd.args(extra);
    conformance::runtime_env(&mut cmd, root, model, components);
    step("cargo test --workspace", &mut cmd)?;
    if tests_only {
        return Ok(());
    }
    let mut cmd = cargo();
    cmd.current_dir(root).args(["test", "-p", "xtask"]);
    step("cargo test -p xtask", &mut cmd)?;

    eprintln!("\n== xtask test: conformance");
    let t = Instant::now();
    let report = root.join("target/conformance/xtask-test.json");
    conformance::run(
        root,
        &conformance::ConformanceArgs {
            backends: installed_backends(components),
            device: "cpu".into(),
            dtype: "f32".into(),
            json: Some(report.clone()),
            update_baseline: false,
            release: false,
        },
    )?;
    require_all_measured(&report)?;
    timings.push(("cargo xtask conformance".into(), t.elapsed()));

    if components.torch && components.onnx {
        eprintln!("\n== xtask test: CUDA build and the GPU bundle on the CPU");
        let t = Instant::now();
        gpu_bundle::check(root)?;
        timings.push(("cargo xtask gpu-bundle --dev --run-cpu".into(), t.elapsed()));
    }
    Ok(())
}

/// The lint steps: clippy on every target of the workspace with the installed backends'
/// features and the report binaries (`infermux-tests/bins`; the workspace lints deny
/// undocumented `unsafe` blocks), then the `infermux` library alone with its default and with no
/// features, the builds a dependent gets, which the workspace build (its tests enable `cli`,
/// `server` and `remote`) never compiles.
fn lint_commands(features: &[&str]) -> Vec<(String, Vec<String>)> {
    let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let mut workspace = owned(&["clippy", "--workspace", "--all-targets", "--features"]);
    let mut all = vec!["infermux-tests/bins"];
    all.extend_from_slice(features);
    workspace.push(all.join(","));
    workspace.extend(owned(&["--", "-D", "warnings"]));
    vec![
        ("clippy --workspace --all-targets".into(), workspace),
        (
            "clippy -p infermux (default features)".into(),
            owned(&["clippy", "-p", "infermux", "--lib", "--", "-D", "warnings"]),
        ),
        (
            "clippy -p infermux --no-default-features".into(),
            owned(&[
                "clippy",
                "-p",
                "infermux",
                "--lib",
                "--no-default-features",
                "--",
                "-D",
                "warnings",
            ]),
        ),
    ]
}

/// The backends whose runtimes `components` installs (candle always).
fn installed_backends(components: Components) -> Vec<String> {
    let mut backends = vec!["candle".to_string()];
    if components.torch {
        backends.push("torch".into());
    }
    if components.onnx {
        backends.push("onnx".into());
    }
    backends
}

/// Fails if the conformance report at `path` skipped a backend: every installed runtime must
/// load and be measured, not quietly left out of the ratchet.
fn require_all_measured(path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let skipped: Vec<String> = report["skipped"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}: {}", s["backend"], s["reason"]))
        .collect();
    if !skipped.is_empty() {
        bail!(
            "conformance skipped installed backends:\n  {}",
            skipped.join("\n  ")
        );
    }
    Ok(())
}

/// `dir` prepended to the current `LD_LIBRARY_PATH`.
fn loader_path(dir: &Path) -> std::ffi::OsString {
    prepend_path("LD_LIBRARY_PATH", dir)
}

/// `dir` in front of the path list in environment variable `var`.
fn prepend_path(var: &str, dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(existing) = std::env::var_os(var) {
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
            Cmd::Test { runtimes, args, .. } => (runtimes.components(), args),
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

    #[test]
    fn tests_only_is_a_flag_not_a_cargo_arg() {
        let cli = Cli::try_parse_from(["xtask", "test", "--tests-only", "-q"]).unwrap();
        let Cmd::Test {
            tests_only, args, ..
        } = cli.command
        else {
            panic!("not a test command");
        };
        assert!(tests_only);
        assert_eq!(args, ["-q"]);
    }

    #[test]
    fn lints_deny_warnings_with_the_installed_backends() {
        let lints = lint_commands(ONNX_TEST_FEATURES);
        let (_, workspace) = &lints[0];
        assert_eq!(&workspace[..3], ["clippy", "--workspace", "--all-targets"]);
        let features = ["--features", "infermux-tests/bins,infermux-tests/onnx"];
        assert!(workspace.windows(2).any(|w| w == features));
        for (name, args) in &lints {
            assert!(args.ends_with(&["-D".into(), "warnings".into()]), "{name}");
        }
        assert!(
            lints
                .iter()
                .any(|(_, a)| a.contains(&"--no-default-features".into()))
        );
        let bare = &lint_commands(&[])[0].1;
        assert!(
            bare.windows(2)
                .any(|w| w == ["--features", "infermux-tests/bins"])
        );
    }

    #[test]
    fn conformance_runs_every_installed_backend() {
        let all = Components {
            torch: true,
            onnx: true,
        };
        assert_eq!(installed_backends(all), ["candle", "torch", "onnx"]);
        let none = Components {
            torch: false,
            onnx: false,
        };
        assert_eq!(installed_backends(none), ["candle"]);
    }

    #[test]
    fn a_skipped_backend_fails_the_run() {
        let dir = std::env::temp_dir().join(format!("xtask-skip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.json");
        std::fs::write(&path, r#"{"backends": ["candle"], "skipped": []}"#).unwrap();
        require_all_measured(&path).unwrap();
        std::fs::write(
            &path,
            r#"{"backends": [], "skipped": [{"backend": "torch", "reason": "cannot load"}]}"#,
        )
        .unwrap();
        let err = require_all_measured(&path).unwrap_err().to_string();
        assert!(
            err.contains("torch") && err.contains("cannot load"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
