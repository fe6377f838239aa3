//! `cargo xtask conformance`: the shared conformance cases on several backends, a table, a JSON
//! report, and a ratchet against `tests/data/conformance-baseline.json`.
//!
//! The measuring happens in the `infermux-conformance` binary of `infermux-tests` (built in the
//! dev profile the tests use, with the requested backends' features); this module builds and
//! runs it, then compares its report with the baseline: an outcome that gets worse beyond a
//! margin, or a pass that becomes a fail, fails the run; improvements are listed, and
//! `--update-baseline` records the current outcomes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Map, Value, json};

use crate::setup::Components;
use crate::{cargo, loader_path, setup_all};

/// Baseline file, relative to the repository root.
pub const BASELINE: &str = "tests/data/conformance-baseline.json";
/// A lower-is-better value may grow by this fraction of itself…
const REL_MARGIN: f64 = 0.5;
/// …or by this fraction of its bound, whichever is larger, before it counts as worse.
const LIMIT_MARGIN: f64 = 0.1;

/// Flags of `cargo xtask conformance`.
#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// Backends to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "candle,torch,onnx")]
    pub backends: Vec<String>,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the report (with the baseline comparison) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Rewrite this device/dtype's entries of the baseline with the current outcomes.
    #[arg(long)]
    pub update_baseline: bool,
    /// Build and run with `--release` instead of the tests' dev profile.
    #[arg(long)]
    pub release: bool,
}

/// Runs the conformance binary, applies the baseline and fails on violations or regressions.
pub fn run(root: &Path, args: &ConformanceArgs) -> Result<()> {
    let backends = normalize_backends(&args.backends)?;
    let components = Components {
        torch: backends.iter().any(|b| b == "torch"),
        onnx: backends.iter().any(|b| b == "onnx"),
    };
    let model = setup_all(root, components)?;
    let out_dir = root.join("target/conformance");
    std::fs::create_dir_all(&out_dir)?;
    let raw = out_dir.join(format!(
        "report-{}-{}.json",
        args.device.replace(':', ""),
        args.dtype
    ));
    let _ = std::fs::remove_file(&raw);

    let mut cmd = cargo();
    cmd.current_dir(root).args([
        "run",
        "--quiet",
        "-p",
        "infermux-tests",
        "--bin",
        "infermux-conformance",
    ]);
    if args.release {
        cmd.arg("--release");
    }
    let features = backend_features(&backends);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    cmd.arg("--")
        .arg("--backends")
        .arg(backends.join(","))
        .args(["--device", &args.device, "--dtype", &args.dtype])
        .arg("--json")
        .arg(&raw);
    runtime_env(&mut cmd, root, &model, components);
    eprintln!("$ cargo run -p infermux-tests --bin infermux-conformance ...");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    let text = std::fs::read_to_string(&raw).with_context(|| {
        format!("the conformance binary wrote no report ({status}); see its output above")
    })?;
    let mut report: Value = serde_json::from_str(&text).context("parsing the report")?;

    let baseline_path = root.join(BASELINE);
    let mut baseline = read_baseline(&baseline_path)?;
    let config = config_key(&args.device, &args.dtype);
    let measured: Vec<String> = report["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let current = outcomes_by_key(&report);
    let previous = baseline["configs"][&config]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let cmp = compare(&previous, &current, &measured);
    print!("{}", cmp.summary(&config, args.update_baseline));
    report["baseline"] = cmp.to_json(&config);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if args.update_baseline {
        let entry = update_entries(&previous, &current, &measured);
        baseline["configs"][&config] = Value::Object(entry);
        std::fs::write(
            &baseline_path,
            serde_json::to_string_pretty(&baseline)? + "\n",
        )?;
        eprintln!("baseline updated: {}", baseline_path.display());
    }
    let violations = report["outcomes"]
        .as_array()
        .map(|o| o.iter().filter(|o| o["pass"] != true).count())
        .unwrap_or(0);
    if !status.success() && violations == 0 {
        bail!("the conformance binary failed ({status})");
    }
    if violations > 0 || !cmp.regressions.is_empty() {
        bail!(
            "conformance failed: {violations} violation(s) of the tolerances, {} regression(s) against {BASELINE}",
            cmp.regressions.len()
        );
    }
    Ok(())
}

/// Lower-cased, de-duplicated backend names, checked against the three known ones.
pub(crate) fn normalize_backends(names: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        let name = name.trim().to_ascii_lowercase();
        if !["candle", "torch", "onnx"].contains(&name.as_str()) {
            bail!("unknown backend {name:?} (expected candle, torch or onnx)");
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.is_empty() {
        bail!("no backend given");
    }
    Ok(out)
}

/// `infermux-tests` features for its report binaries on `backends` (candle is always built).
pub fn backend_features(backends: &[String]) -> Vec<String> {
    std::iter::once("infermux-tests/bins".to_string())
        .chain(
            backends
                .iter()
                .filter(|b| *b != "candle")
                .map(|b| format!("infermux-tests/{b}")),
        )
        .collect()
}

/// What `cargo xtask test` sets: the model folder and, with torch, libtorch on the loader path.
pub fn runtime_env(
    cmd: &mut std::process::Command,
    root: &Path,
    model: &Path,
    components: Components,
) {
    cmd.env("INFERMUX_MODEL_DIR", model);
    if components.torch {
        cmd.env(
            "LD_LIBRARY_PATH",
            loader_path(&root.join("runtimes/libtorch/torch/lib")),
        );
    }
}

/// `cpu/f32`, `cuda/bf16`: a section of the baseline.
fn config_key(device: &str, dtype: &str) -> String {
    let device = device.to_ascii_lowercase();
    let device = device.split(':').next().unwrap_or("cpu");
    format!("{device}/{}", dtype.to_ascii_lowercase())
}

/// The baseline, or an empty one when the file does not exist yet.
fn read_baseline(path: &Path) -> Result<Value> {
    let mut value = match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !value.is_object() {
        bail!("{} is not a JSON object", path.display());
    }
    value["about"] = json!(
        "Outcomes of `cargo xtask conformance` per device/dtype, keyed backend/check/case. \
         A value worse than recorded (beyond max(50% of it, 10% of its limit)) or a pass turned \
         into a fail fails the run; `--update-baseline` rewrites a section."
    );
    if !value["configs"].is_object() {
        value["configs"] = json!({});
    }
    Ok(value)
}

/// One outcome as the ratchet sees it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// NaN when the report holds `null` (a NaN measurement).
    value: f64,
    limit: f64,
    lower_is_better: bool,
    pass: bool,
}

impl Entry {
    fn from_json(v: &Value) -> Option<Entry> {
        Some(Entry {
            value: v["value"].as_f64().unwrap_or(f64::NAN),
            limit: v["limit"].as_f64()?,
            lower_is_better: v["better"].as_str() != Some("higher"),
            pass: v["pass"].as_bool()?,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "value": self.value,
            "limit": self.limit,
            "better": if self.lower_is_better { "lower" } else { "higher" },
            "pass": self.pass,
        })
    }

    /// How far `value` may move the wrong way before it counts as worse.
    fn margin(&self) -> f64 {
        if self.lower_is_better {
            (self.value.abs() * REL_MARGIN).max(self.limit.abs() * LIMIT_MARGIN)
        } else {
            0.0 // counts (agreeing tokens): any loss is a loss
        }
    }
}

/// Outcomes of a report keyed `backend/check/case`.
fn outcomes_by_key(report: &Value) -> BTreeMap<String, Entry> {
    report["outcomes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let key = format!(
                "{}/{}/{}",
                o["backend"].as_str()?,
                o["check"].as_str()?,
                o["case"].as_str()?
            );
            Some((key, Entry::from_json(o)?))
        })
        .collect()
}

/// Whether a key belongs to the measured backends (both sides of a pair).
fn measured_key(key: &str, measured: &[String]) -> bool {
    let backend = key.split('/').next().unwrap_or("");
    backend.split('~').all(|b| measured.iter().any(|m| m == b))
}

/// The ratchet's verdict.
#[derive(Debug, Default, PartialEq)]
struct Comparison {
    regressions: Vec<String>,
    improvements: Vec<String>,
    new: Vec<String>,
    missing: Vec<String>,
    unchanged: usize,
}

fn compare(
    previous: &Map<String, Value>,
    current: &BTreeMap<String, Entry>,
    measured: &[String],
) -> Comparison {
    let mut cmp = Comparison::default();
    let fmt = |e: &Entry| format!("{:.3e} ({})", e.value, if e.pass { "pass" } else { "FAIL" });
    for (key, now) in current {
        let Some(before) = previous.get(key).and_then(Entry::from_json) else {
            cmp.new.push(format!("{key}: {}", fmt(now)));
            continue;
        };
        let line = format!("{key}: {} -> {}", fmt(&before), fmt(now));
        let margin = before.margin();
        let (worse, better) = if before.value.is_nan() {
            (false, !now.value.is_nan())
        } else if now.value.is_nan() {
            (true, false)
        } else if now.lower_is_better {
            (
                now.value > before.value + margin,
                now.value < before.value - margin,
            )
        } else {
            (now.value < before.value, now.value > before.value)
        };
        if (before.pass && !now.pass) || worse {
            cmp.regressions.push(line);
        } else if (!before.pass && now.pass) || better {
            cmp.improvements.push(line);
        } else {
            cmp.unchanged += 1;
        }
    }
    for key in previous.keys() {
        if !current.contains_key(key) && measured_key(key, measured) {
            cmp.missing.push(key.clone());
        }
    }
    cmp
}

impl Comparison {
    fn summary(&self, config: &str, updating: bool) -> String {
        let hint = if updating {
            "recorded now"
        } else {
            "run with --update-baseline to record"
        };
        let mut s = format!(
            "\nbaseline {BASELINE} [{config}]: {} unchanged, {} improved, {} regressed, {} new, {} no longer measured\n",
            self.unchanged,
            self.improvements.len(),
            self.regressions.len(),
            self.new.len(),
            self.missing.len()
        );
        let improved = format!("improved ({hint})");
        for (title, lines) in [
            ("regressed", &self.regressions),
            (improved.as_str(), &self.improvements),
            ("no longer measured", &self.missing),
        ] {
            if !lines.is_empty() {
                s.push_str(&format!("{title}:\n"));
                for line in lines {
                    s.push_str(&format!("  {line}\n"));
                }
            }
        }
        if !self.new.is_empty() {
            s.push_str(&format!(
                "{} outcome(s) not in the baseline yet ({hint})\n",
                self.new.len()
            ));
        }
        s
    }

    fn to_json(&self, config: &str) -> Value {
        json!({
            "file": BASELINE,
            "config": config,
            "unchanged": self.unchanged,
            "regressions": self.regressions,
            "improvements": self.improvements,
            "new": self.new,
            "missing": self.missing,
        })
    }
}

/// The baseline section after a run: outcomes of unmeasured backends are kept, the measured
/// backends' entries are replaced by the current ones.
fn update_entries(
    previous: &Map<String, Value>,
    current: &BTreeMap<String, Entry>,
    measured: &[String],
) -> Map<String, Value> {
    let mut out: Map<String, Value> = previous
        .iter()
        .filter(|(k, _)| !measured_key(k, measured))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, e) in current {
        out.insert(k.clone(), e.to_json());
    }
    // Sorted keys keep diffs of the file readable.
    out.into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: f64, pass: bool) -> Entry {
        Entry {
            value,
            limit: 1e-3,
            lower_is_better: true,
            pass,
        }
    }

    #[test]
    fn ratchet_flags_worse_and_better_outcomes() {
        let previous: Map<String, Value> = [
            ("candle/a/x", entry(1e-5, true)),
            ("candle/a/y", entry(1e-5, true)),
            ("candle/a/z", entry(5e-4, true)),
            ("candle/a/w", entry(2e-3, false)),
            ("torch/a/x", entry(1e-5, true)),
            ("onnx/a/x", entry(1e-5, true)),
        ]
        .into_iter()
        .map(|(k, e)| (k.to_string(), e.to_json()))
        .collect();
        let current: BTreeMap<String, Entry> = [
            ("candle/a/x", entry(9e-5, true)), // within 10% of the limit: unchanged
            ("candle/a/y", entry(2e-4, true)), // worse beyond the margin
            ("candle/a/z", entry(1.1e-3, false)), // pass -> fail
            ("candle/a/w", entry(1e-5, true)), // fail -> pass
            ("candle/a/v", entry(1e-5, true)), // new
            ("onnx/a/x", entry(f64::NAN, false)),
        ]
        .into_iter()
        .map(|(k, e)| (k.to_string(), e))
        .collect();
        let measured = vec!["candle".to_string(), "onnx".to_string()];
        let cmp = compare(&previous, &current, &measured);
        assert_eq!(cmp.unchanged, 1);
        assert_eq!(cmp.regressions.len(), 3, "{cmp:?}");
        assert!(cmp.regressions[0].starts_with("candle/a/y"));
        assert_eq!(cmp.improvements.len(), 1);
        assert_eq!(cmp.new.len(), 1);
        assert!(cmp.missing.is_empty(), "torch was not measured");

        let updated = update_entries(&previous, &current, &measured);
        assert_eq!(updated.len(), 7);
        assert_eq!(updated["torch/a/x"], previous["torch/a/x"]);
        assert_eq!(updated["candle/a/y"]["value"], 2e-4);
    }

    #[test]
    fn counts_regress_on_any_loss() {
        let higher = |v: f64| Entry {
            value: v,
            limit: 32.0,
            lower_is_better: false,
            pass: v >= 32.0,
        };
        let mut before = higher(20.0);
        before.pass = true;
        before.limit = 1.0;
        let previous: Map<String, Value> = [("candle/greedy/x".to_string(), before.to_json())]
            .into_iter()
            .collect();
        let mut now = higher(19.0);
        now.limit = 1.0;
        now.pass = true;
        let current = [("candle/greedy/x".to_string(), now)].into_iter().collect();
        let cmp = compare(&previous, &current, &["candle".to_string()]);
        assert_eq!(cmp.regressions.len(), 1);
    }

    #[test]
    fn names_and_keys() {
        assert_eq!(config_key("CUDA:1", "BF16"), "cuda/bf16");
        assert!(measured_key(
            "candle~torch/p/x",
            &["torch".into(), "candle".into()]
        ));
        assert!(!measured_key("candle~onnx/p/x", &["candle".into()]));
        assert!(normalize_backends(&["tpu".into()]).is_err());
        assert_eq!(
            backend_features(&normalize_backends(&["Candle".into(), "onnx".into()]).unwrap()),
            ["infermux-tests/bins", "infermux-tests/onnx"]
        );
    }
}
