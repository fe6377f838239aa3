//! `cargo xtask conformance`: the shared conformance cases on several backends, a table, a JSON
//! report, and a ratchet against `tests/data/conformance-baseline.json`.
//!
//! The measuring happens in the `infermux-conformance` binary of `infermux-tests` (built in the
//! dev profile the tests use, with the requested backends' features); this module builds and
//! runs it, then compares its report with the baseline: an outcome that gets worse beyond a
//! margin, or a pass that becomes a fail, fails the run; improvements are listed, and
//! `--update-baseline` records the current outcomes.
//!
//! The binary runs once per model: the reference model, then each tiny
//! random-weight variant of `tests/data/tiny/` with its `tiny-<name>.json` goldens
//! (`INFERMUX_MODEL_DIR` and `INFERMUX_GOLDENS`); their reports merge into one, keyed
//! `backend/check/tiny-<name>:<case>` for the variants, under one baseline section.
//! `INFERMUX_CONFORMANCE_MODELS=smollm2` (or `tiny`, `tiny-qwen2,…`) restricts a run.

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
/// A quarter, not less: the same commit measures torch's score batch invariance as 0 on
/// AMD EPYC and 1.5e-5 (of a 1e-4 bound) on Intel Sapphire Rapids (libtorch picks its GEMM
/// kernel by CPU), and the baseline must hold on both CI machines.
const LIMIT_MARGIN: f64 = 0.25;

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

/// Environment variable restricting the models of a run (comma-separated `smollm2`, `tiny`,
/// `tiny-<name>`); unset, every model runs. An environment variable rather than a flag, so
/// that callers building [`ConformanceArgs`] (`cargo xtask test`) need not name it.
pub const MODELS_ENV: &str = "INFERMUX_CONFORMANCE_MODELS";
/// The models of a run when [`MODELS_ENV`] is unset.
const DEFAULT_MODELS: &str = "smollm2,tiny";

/// Runs the conformance binary once per model, merges the reports, applies the baseline and
/// fails on violations or regressions.
pub fn run(root: &Path, args: &ConformanceArgs) -> Result<()> {
    let backends = normalize_backends(&args.backends)?;
    let models = std::env::var(MODELS_ENV).unwrap_or_else(|_| DEFAULT_MODELS.to_string());
    let models = normalize_models(&models.split(',').map(String::from).collect::<Vec<_>>())
        .with_context(|| format!("{MODELS_ENV}={models:?}"))?;
    let components = Components {
        torch: backends.iter().any(|b| b == "torch"),
        onnx: backends.iter().any(|b| b == "onnx"),
    };
    let reference = setup_all(root, components)?;
    let out_dir = root.join("target/conformance");
    std::fs::create_dir_all(&out_dir)?;

    let mut merged = Merged::default();
    for model in &models {
        let dir = match model {
            Model::Reference => reference.clone(),
            Model::Tiny(name) if components.onnx => stage_tiny_onnx(root, name)?,
            Model::Tiny(name) => root.join(TINY_ROOT).join(name),
        };
        let raw = out_dir.join(format!(
            "report-{}-{}-{}.json",
            args.device.replace(':', ""),
            args.dtype,
            model.label()
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
        runtime_env(&mut cmd, root, &dir, components);
        match model {
            Model::Reference => cmd.env_remove("INFERMUX_GOLDENS"),
            Model::Tiny(name) => cmd.env(
                "INFERMUX_GOLDENS",
                root.join(GOLDENS_DIR).join(format!("tiny-{name}.json")),
            ),
        };
        eprintln!(
            "\n== {} ({}) ==\n$ cargo run -p infermux-tests --bin infermux-conformance ...",
            model.label(),
            dir.display()
        );
        let status = cmd
            .status()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        let report = std::fs::read_to_string(&raw)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        merged.add(model, &backends, status, report);
    }

    let mut report = merged.report(&args.device, &args.dtype);
    print!("{}", merged.summary());
    let baseline_path = root.join(BASELINE);
    let mut baseline = read_baseline(&baseline_path)?;
    let config = config_key(&args.device, &args.dtype);
    let measured = Scope {
        backends: merged.backends.clone(),
        models: merged.models.clone(),
    };
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
    if violations > 0 || !cmp.regressions.is_empty() {
        bail!(
            "conformance failed: {violations} violation(s) of the tolerances, {} regression(s) against {BASELINE}",
            cmp.regressions.len()
        );
    }
    Ok(())
}

/// Folder of the tiny models, relative to the repository root (see `infermux_tests::TINY_VARIANTS`).
const TINY_ROOT: &str = crate::golden::TINY_ROOT;
/// Folder of the golden files, relative to the repository root.
const GOLDENS_DIR: &str = "tests/data/goldens";
/// The tiny random-weight variants (`tests/data/tiny/<name>`, `tiny-<name>.json`).
const TINY_VARIANTS: [&str; 5] = ["llama3", "llamabias", "mistral", "qwen2", "qwen3"];
/// Files of a tiny model folder.
const TINY_FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
];

/// One model the conformance binary runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    /// SmolLM2-135M-Instruct in `models/` with `smollm2-135m-instruct.json`.
    Reference,
    /// A tiny variant with `tiny-<name>.json`.
    Tiny(&'static str),
}

impl Model {
    /// `smollm2` or `tiny-<name>`: the prefix of the variant's case names.
    fn label(&self) -> String {
        match self {
            Model::Reference => "smollm2".into(),
            Model::Tiny(name) => format!("tiny-{name}"),
        }
    }
}

/// `smollm2`, `tiny` (every variant) and `tiny-<name>`/`<name>`, in the given order, de-duplicated.
fn normalize_models(names: &[String]) -> Result<Vec<Model>> {
    let mut out = Vec::new();
    for name in names {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        let add: Vec<Model> = match name.as_str() {
            "smollm2" => vec![Model::Reference],
            "tiny" => TINY_VARIANTS.iter().map(|&v| Model::Tiny(v)).collect(),
            other => {
                let v = other.strip_prefix("tiny-").unwrap_or(other);
                match TINY_VARIANTS.iter().find(|&&t| t == v) {
                    Some(&t) => vec![Model::Tiny(t)],
                    None => bail!(
                        "unknown model {name:?} (expected smollm2, tiny, or tiny-<{}>)",
                        TINY_VARIANTS.join("|")
                    ),
                }
            }
        };
        for m in add {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    if out.is_empty() {
        bail!("no model given");
    }
    Ok(out)
}

/// `target/tiny/<name>`: a copy of the tiny folder (files rewritten only when they differ, so the
/// exporter's marker stays current) with the f32 ONNX graph in `onnx/`, which every backend of
/// the run loads. `infermux_tests::tiny_onnx_dir` prepares the same folder for `cargo test`.
fn stage_tiny_onnx(root: &Path, name: &str) -> Result<PathBuf> {
    let src = root.join(TINY_ROOT).join(name);
    let dir = root.join("target/tiny").join(name);
    std::fs::create_dir_all(&dir)?;
    for file in TINY_FILES {
        let bytes = std::fs::read(src.join(file))
            .with_context(|| format!("reading {}", src.join(file).display()))?;
        let to = dir.join(file);
        if std::fs::read(&to).ok().as_deref() != Some(bytes.as_slice()) {
            std::fs::write(&to, &bytes).with_context(|| format!("writing {}", to.display()))?;
        }
    }
    crate::export::reference(root, &dir)?;
    Ok(dir)
}

/// The reports of all models, merged: outcome keys carry the model (tiny case names are
/// `tiny-<name>:<case>`), and a tiny model a backend cannot load, or a run that wrote no
/// report, is a failing outcome rather than a skip.
#[derive(Default)]
struct Merged {
    tolerances: Value,
    backends: Vec<String>,
    skipped: Vec<Value>,
    outcomes: Vec<Value>,
    models: Vec<String>,
}

impl Merged {
    fn add(
        &mut self,
        model: &Model,
        backends: &[String],
        status: std::process::ExitStatus,
        report: Option<Value>,
    ) {
        let label = model.label();
        self.models.push(label.clone());
        let prefix = match model {
            Model::Reference => String::new(),
            Model::Tiny(_) => format!("{label}:"),
        };
        let failed = |backend: &str, case: &str, detail: String| {
            json!({
                "backend": backend,
                "check": "runs",
                "case": format!("{prefix}{case}"),
                "value": 1.0,
                "limit": 0.0,
                "better": "lower",
                "pass": false,
                "detail": detail,
            })
        };
        let Some(report) = report else {
            for b in backends {
                self.outcomes.push(failed(
                    b,
                    "all",
                    format!("the conformance binary wrote no report ({status})"),
                ));
            }
            return;
        };
        if self.tolerances.is_null() {
            self.tolerances = report["tolerances"].clone();
        }
        for b in report["backends"].as_array().into_iter().flatten() {
            if let Some(b) = b.as_str()
                && !self.backends.iter().any(|x| x == b)
            {
                self.backends.push(b.to_string());
            }
        }
        let mut any_failure = false;
        for o in report["outcomes"].as_array().into_iter().flatten() {
            let mut o = o.clone();
            let case = o["case"].as_str().unwrap_or_default().to_string();
            if !prefix.is_empty() && !case.starts_with(&prefix) {
                o["case"] = json!(format!("{prefix}{case}"));
            }
            any_failure |= o["pass"] != true;
            self.outcomes.push(o);
        }
        for s in report["skipped"].as_array().into_iter().flatten() {
            let backend = s["backend"].as_str().unwrap_or_default();
            let reason = s["reason"].as_str().unwrap_or_default();
            if matches!(model, Model::Tiny(_)) && reason.starts_with("cannot load") {
                // Every backend must load every variant.
                self.outcomes
                    .push(failed(backend, "load", reason.to_string()));
                any_failure = true;
                if !self.backends.iter().any(|x| x == backend) {
                    self.backends.push(backend.to_string());
                }
            } else {
                let mut s = s.clone();
                s["reason"] = json!(format!("{label}: {reason}"));
                self.skipped.push(s);
            }
        }
        if !status.success() && !any_failure {
            for b in backends {
                self.outcomes.push(failed(
                    b,
                    "all",
                    format!("the conformance binary failed ({status}) without a violation"),
                ));
            }
        }
    }

    fn report(&self, device: &str, dtype: &str) -> Value {
        json!({
            "device": device,
            "dtype": dtype,
            "tolerances": self.tolerances,
            "models": self.models,
            "backends": self.backends,
            "skipped": self.skipped,
            "outcomes": self.outcomes,
        })
    }

    /// Per model and backend: worst |Δ logprob| vs transformers (prompts and greedy tokens), the
    /// fewest agreeing greedy tokens, and the number of violations over all of its checks.
    fn summary(&self) -> String {
        let mut s = String::from(
            "\nper model (single backends; ✗ = violations over all of that model's checks)\n\n\
             | model | backend | max |Δ| vs HF | greedy |Δ| vs HF | greedy agree | violations |\n\
             |---|---|---|---|---|---|\n",
        );
        for model in &self.models {
            let mine = |o: &&Value| {
                let case = o["case"].as_str().unwrap_or_default();
                match case.split_once(':') {
                    Some((m, _)) if m.starts_with("tiny-") => m == model,
                    _ => model == "smollm2",
                }
            };
            for backend in &self.backends {
                let rows: Vec<&Value> = self
                    .outcomes
                    .iter()
                    .filter(mine)
                    .filter(|o| o["backend"].as_str() == Some(backend))
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let value = |o: &Value| o["value"].as_f64().unwrap_or(f64::NAN);
                let worst = |check: &str| {
                    rows.iter()
                        .filter(|o| o["check"] == check)
                        .map(|o| value(o))
                        .fold(None, |acc: Option<f64>, v| {
                            Some(acc.map_or(v, |a| if v > a || v.is_nan() { v } else { a }))
                        })
                };
                let fmt = |v: Option<f64>| match v {
                    Some(v) if v >= f64::MAX => "incomparable".to_string(),
                    Some(v) => format!("{v:.2e}"),
                    None => "—".to_string(),
                };
                let agree = rows
                    .iter()
                    .filter(|o| o["check"] == "greedy_agreement")
                    .map(|o| value(o))
                    .fold(None, |acc: Option<f64>, v| {
                        Some(acc.map_or(v, |a| a.min(v)))
                    });
                let violations = rows.iter().filter(|o| o["pass"] != true).count();
                s.push_str(&format!(
                    "| {model} | {backend} | {} | {} | {} | {} |\n",
                    fmt(worst("reference_logprobs")),
                    fmt(worst("greedy_logprobs")),
                    agree.map_or("—".to_string(), |a| format!("min {a}/32")),
                    if violations == 0 {
                        "0".to_string()
                    } else {
                        format!("{violations} ✗")
                    }
                ));
            }
        }
        s
    }
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

/// What a run measured: its backends, and its models (`smollm2`, `tiny-<name>`).
#[derive(Debug, Clone, Default)]
struct Scope {
    backends: Vec<String>,
    models: Vec<String>,
}

impl Scope {
    /// Whether a key belongs to the measured backends (both sides of a pair) and models.
    fn covers(&self, key: &str) -> bool {
        let mut parts = key.splitn(3, '/');
        let backend = parts.next().unwrap_or("");
        let case = parts.nth(1).unwrap_or("");
        let model = match case.split_once(':') {
            Some((m, _)) if m.starts_with("tiny-") => m,
            _ => "smollm2",
        };
        backend
            .split('~')
            .all(|b| self.backends.iter().any(|m| m == b))
            && self.models.iter().any(|m| m == model)
    }
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
    measured: &Scope,
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
        if !current.contains_key(key) && measured.covers(key) {
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

/// The baseline section after a run: outcomes of unmeasured backends or models are kept, the
/// measured ones' entries are replaced by the current ones.
fn update_entries(
    previous: &Map<String, Value>,
    current: &BTreeMap<String, Entry>,
    measured: &Scope,
) -> Map<String, Value> {
    let mut out: Map<String, Value> = previous
        .iter()
        .filter(|(k, _)| !measured.covers(k))
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
            ("candle/a/x", entry(2e-4, true)), // within 25% of the limit: unchanged
            ("candle/a/y", entry(3e-4, true)), // worse beyond the margin
            ("candle/a/z", entry(1.1e-3, false)), // pass -> fail
            ("candle/a/w", entry(1e-5, true)), // fail -> pass
            ("candle/a/v", entry(1e-5, true)), // new
            ("onnx/a/x", entry(f64::NAN, false)),
        ]
        .into_iter()
        .map(|(k, e)| (k.to_string(), e))
        .collect();
        let measured = Scope {
            backends: vec!["candle".to_string(), "onnx".to_string()],
            models: vec!["smollm2".to_string()],
        };
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
        assert_eq!(updated["candle/a/y"]["value"], 3e-4);
    }

    /// The swing CI saw between two CPUs on one commit is not a regression.
    #[test]
    fn cross_cpu_gemm_noise_is_unchanged() {
        let tight = |value: f64| Entry {
            value,
            limit: 1e-4,
            lower_is_better: true,
            pass: true,
        };
        let previous: Map<String, Value> = [(
            "torch/batch_invariance/score".to_string(),
            tight(0.0).to_json(),
        )]
        .into_iter()
        .collect();
        let scope = Scope {
            backends: vec!["torch".to_string()],
            models: vec!["smollm2".to_string()],
        };
        let now = |v: f64| {
            [("torch/batch_invariance/score".to_string(), tight(v))]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(compare(&previous, &now(1.526e-5), &scope).unchanged, 1);
        assert_eq!(compare(&previous, &now(4e-5), &scope).regressions.len(), 1);
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
        let scope = Scope {
            backends: vec!["candle".to_string()],
            models: vec!["smollm2".to_string()],
        };
        let cmp = compare(&previous, &current, &scope);
        assert_eq!(cmp.regressions.len(), 1);
    }

    #[test]
    fn models_expand_and_reports_merge_with_prefixed_keys() {
        let models =
            normalize_models(&["tiny-qwen2".into(), "smollm2".into(), "tiny".into()]).unwrap();
        assert_eq!(models.len(), 1 + TINY_VARIANTS.len());
        assert_eq!(models[0], Model::Tiny("qwen2"));
        assert_eq!(models[1], Model::Reference);
        assert!(normalize_models(&["gpt2".into()]).is_err());

        let ok = std::process::Command::new("true").status().unwrap();
        let fail = std::process::Command::new("false").status().unwrap();
        let outcome = |case: &str, pass: bool| {
            json!({"backend": "candle", "check": "reference_logprobs", "case": case,
                   "value": 1e-5, "limit": 1e-3, "better": "lower", "pass": pass})
        };
        let mut merged = Merged::default();
        let report = |outcomes: Vec<Value>, skipped: Vec<Value>| {
            json!({"tolerances": {"name": "f32"}, "backends": ["candle"], "outcomes": outcomes,
                   "skipped": skipped})
        };
        let backends = vec!["candle".to_string(), "torch".to_string()];
        merged.add(
            &Model::Reference,
            &backends,
            ok,
            Some(report(vec![outcome("capital", true)], vec![])),
        );
        merged.add(
            &Model::Tiny("qwen2"),
            &backends,
            fail,
            Some(report(
                vec![outcome("tiny-qwen2:long", false), outcome("score", true)],
                vec![json!({"backend": "torch", "reason": "cannot load: shape mismatch"})],
            )),
        );
        merged.add(&Model::Tiny("qwen3"), &backends, fail, None);
        let report = merged.report("cpu", "f32");
        let keys: Vec<String> = outcomes_by_key(&report).into_keys().collect();
        assert_eq!(
            keys,
            [
                "candle/reference_logprobs/capital",
                "candle/reference_logprobs/tiny-qwen2:long",
                "candle/reference_logprobs/tiny-qwen2:score",
                "candle/runs/tiny-qwen3:all",
                "torch/runs/tiny-qwen2:load",
                "torch/runs/tiny-qwen3:all",
            ]
        );
        assert_eq!(merged.backends, ["candle", "torch"]);
        assert!(merged.skipped.is_empty());
        let summary = merged.summary();
        assert!(
            summary.contains("| tiny-qwen2 | candle | 1.00e-5 |"),
            "{summary}"
        );
        assert!(
            summary.contains("| tiny-qwen2 | torch | — | — | — | 1 ✗ |"),
            "{summary}"
        );
        assert!(
            summary.contains("| smollm2 | candle | 1.00e-5 | — | — | 0 |"),
            "{summary}"
        );
    }

    #[test]
    fn names_and_keys() {
        assert_eq!(config_key("CUDA:1", "BF16"), "cuda/bf16");
        let scope = |backends: &[&str], models: &[&str]| Scope {
            backends: backends.iter().map(|b| b.to_string()).collect(),
            models: models.iter().map(|m| m.to_string()).collect(),
        };
        assert!(scope(&["torch", "candle"], &["smollm2"]).covers("candle~torch/p/x"));
        assert!(!scope(&["candle"], &["smollm2"]).covers("candle~onnx/p/x"));
        // Only the models a run measured: a tiny-only run keeps the reference model's entries.
        let tiny = scope(&["candle"], &["tiny-qwen2"]);
        assert!(tiny.covers("candle/reference_logprobs/tiny-qwen2:long"));
        assert!(!tiny.covers("candle/reference_logprobs/capital"));
        assert!(!tiny.covers("candle/reference_logprobs/tiny-qwen3:long"));
        assert!(normalize_backends(&["tpu".into()]).is_err());
        assert_eq!(
            backend_features(&normalize_backends(&["Candle".into(), "onnx".into()]).unwrap()),
            ["infermux-tests/bins", "infermux-tests/onnx"]
        );
    }
}
