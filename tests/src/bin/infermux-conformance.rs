//! Runs the shared conformance cases ([`infermux_tests::cases`]) on several backends, prints a
//! table and writes a JSON report; exits 1 on any violation. `cargo xtask conformance` builds
//! and runs this with the right features and environment, then applies the baseline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use infermux::{BackendKind, DType, Device, LoadOptions, ServiceClient};
use infermux_tests::cases::{self, Report, Skipped, Tolerances};
use infermux_tests::{goldens, model_dir};

#[derive(Parser)]
#[command(about = "infermux conformance report")]
struct Args {
    /// Backends to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "candle,torch,onnx")]
    backends: Vec<BackendKind>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let tol = Tolerances::for_dtype(args.dtype);
    let goldens = goldens();
    let mut report = Report {
        device: args.device.to_string(),
        dtype: args.dtype.to_string(),
        tolerances: tol,
        backends: Vec::new(),
        skipped: Vec::new(),
        outcomes: Vec::new(),
    };
    let mut runs = Vec::new();
    for &backend in &args.backends {
        let skip = |reason: String| Skipped {
            backend: backend.to_string(),
            reason,
        };
        if !backend.is_available() {
            report
                .skipped
                .push(skip(format!("not compiled in (feature `{backend}`)")));
            continue;
        }
        let options = LoadOptions {
            backend,
            device: args.device,
            dtype: args.dtype,
            ..LoadOptions::default()
        };
        let started = std::time::Instant::now();
        let client = match ServiceClient::with_options(options).create_sampling_client(model_dir())
        {
            Ok(client) => client,
            Err(e) => {
                eprintln!("{backend}: cannot load: {e}");
                report.skipped.push(skip(format!("cannot load: {e}")));
                continue;
            }
        };
        match cases::run_backend(backend, &client, &goldens, &tol, &mut report.outcomes) {
            Ok(run) => {
                report.backends.push(backend.to_string());
                runs.push(run);
            }
            Err(e) => {
                // A request failing is a violation, not a skip.
                report.outcomes.push(
                    cases::Outcome::at_most(backend.as_str(), "runs", "all", 1.0, 0.0)
                        .with_detail(format!("a request failed: {e}")),
                );
            }
        }
        eprintln!(
            "{backend}: measured in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    report
        .outcomes
        .extend(cases::pairwise(&runs, &goldens.cases, &tol));
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
