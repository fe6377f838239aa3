//! `cargo xtask bench --gguf Q4_1,Q8_0,F16`: the bench workload on GGUF files, each next to
//! llama.cpp (llama-cpp-python in runtimes/py-llamacpp) on the same file with the same
//! threads, in the same run; every figure also as a ratio to llama.cpp and batch-1 decode as a
//! share of the bandwidth ceiling of that file (its tensor bytes ÷ measured read bandwidth).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use infermux_core::model::gguf::GgufFile;
use serde_json::{Value, json};

use crate::bench::{
    BenchArgs, BenchRun, build_bench_bin, cpu_model, json_line, measure_bandwidth, num, workload,
};
use crate::conformance::backend_features;
use crate::setup::{self, Components, gguf_files};

/// The llama.cpp peer script, relative to the repository root.
const PEER_SCRIPT: &str = "xtask/peer_llamacpp.py";

/// Metrics of the table: key, label, unit.
const METRICS: [(&str, &str, &str); 6] = [
    ("decode_b1_tok_s", "decode, 1 stream", "tok/s"),
    ("decode_b8_tok_s", "decode, 8 concurrent", "tok/s"),
    ("decode_b32_tok_s", "decode, 32 concurrent", "tok/s"),
    ("prefill_tok_s", "prefill", "tok/s"),
    ("scoring_s", "scoring", "s"),
    ("peak_rss_mib", "peak RSS", "MiB"),
];

/// The file of one type: the shipped Q4_1, or one made by `cargo xtask setup`.
fn file_of(root: &Path, kind: &str) -> Result<PathBuf> {
    if kind == "Q4_1" {
        return setup::ensure_gguf(root);
    }
    if !gguf_files::DERIVED.contains(&kind) && !gguf_files::LLAMACPP_ONLY.contains(&kind) {
        bail!(
            "--gguf {kind}: the files are Q4_1, {}, {}",
            gguf_files::DERIVED.join(", "),
            gguf_files::LLAMACPP_ONLY.join(", ")
        );
    }
    let path = gguf_files::path(root, kind);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo xtask setup{}`",
            path.display(),
            if gguf_files::LLAMACPP_ONLY.contains(&kind) {
                " --llama-cpp"
            } else {
                ""
            }
        );
    }
    Ok(path)
}

/// Runs every file on each backend and on llama.cpp, then writes and prints the results.
pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    let backends = crate::conformance::normalize_backends(&args.backends)?;
    let components = Components {
        torch: backends.iter().any(|b| b == "torch"),
        onnx: backends.iter().any(|b| b == "onnx"),
    };
    let model = crate::setup_all(root, components)?;
    let kinds: Vec<String> = args.gguf.iter().map(|k| k.to_ascii_uppercase()).collect();
    let files = kinds
        .iter()
        .map(|k| file_of(root, k))
        .collect::<Result<Vec<_>>>()?;
    let (shape, out_dir) = crate::bench::shape_and_out_dir(root, args)?;
    let workload_path = root.join("target/bench-workload.json");
    std::fs::write(
        &workload_path,
        serde_json::to_string(&workload(root, &shape)?)?,
    )?;
    let python = args
        .python
        .clone()
        .or_else(|| setup::py_llamacpp::python(root));
    if python.is_none() && !args.no_peer {
        eprintln!(
            "no peer: {} lacks llama-cpp-python (run `cargo xtask setup --llama-cpp`)",
            setup::py_llamacpp::VENV_DIR
        );
    }

    eprintln!("measuring memory bandwidth…");
    let bandwidth = measure_bandwidth();
    let features = backend_features(&backends);
    build_bench_bin(root, &features)?;
    let mut reports = Vec::new();
    for (kind, file) in kinds.iter().zip(&files) {
        let bytes = tensor_bytes(file)?;
        let mut results = Vec::new();
        for backend in &backends {
            eprintln!("benchmarking {backend} on {kind}…");
            let run = BenchRun {
                backend,
                dtype: "f32",
                device: &args.device,
                workload: &workload_path,
                model: &model,
                gguf: Some(file),
            };
            match run.run(root, &features, components) {
                Ok(v) => results.push(v),
                Err(e) => {
                    eprintln!("{backend} on {kind}: {e:#}");
                    results.push(json!({"name": backend, "error": format!("{e:#}")}));
                }
            }
        }
        let peer = match (&python, args.no_peer) {
            (Some(python), false) => {
                let mut cmd = Command::new(python);
                cmd.current_dir(root)
                    .arg(PEER_SCRIPT)
                    .arg("--model")
                    .arg(file)
                    .arg("--workload")
                    .arg(&workload_path)
                    .arg("--threads")
                    .arg(args.peer_threads.to_string());
                eprintln!("benchmarking llama.cpp on {kind}…");
                json_line(&mut cmd)
                    .map_err(|e| eprintln!("llama.cpp on {kind}: {e:#}"))
                    .ok()
            }
            _ => None,
        };
        reports.push(json!({
            "type": kind,
            "file": file.strip_prefix(root).unwrap_or(file),
            "tensor_bytes": bytes,
            "decode_b1_ceiling_tok_s": bandwidth.read_gbs * 1e9 / bytes as f64,
            "results": results,
            "peer": peer,
        }));
    }
    let report = json!({
        "quick": args.quick,
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "cpu_model": cpu_model(),
            "read_bandwidth_gb_s": bandwidth.read_gbs,
        },
        "workload": {
            "decode_tokens": shape.decode_tokens,
            "decode_prompt_len": shape.decode_prompt_len,
            "prefill_tokens": shape.prefill_len,
            "scoring": format!("{}x{}", shape.scoring.0, shape.scoring.1),
            "repeats": shape.repeats,
        },
        "files": reports,
    });
    let markdown = markdown(&report);
    std::fs::write(out_dir.join("gguf.md"), &markdown)?;
    std::fs::write(
        out_dir.join("gguf.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("{markdown}");
    eprintln!("written: {}/{{gguf.md, gguf.json}}", out_dir.display());
    Ok(())
}

/// Bytes of a GGUF file's tensors: what one batch-1 decode step reads (each weight once; the
/// tied embedding is the output head).
fn tensor_bytes(file: &Path) -> Result<u64> {
    let gguf = GgufFile::read(file).with_context(|| format!("reading {}", file.display()))?;
    gguf.tensors
        .iter()
        .map(|t| {
            t.bytes
                .with_context(|| format!("{}: type {} has no size", t.name, t.ggml_type.name()))
        })
        .sum()
}

/// The Markdown results: one table per file, each backend next to llama.cpp.
fn markdown(report: &Value) -> String {
    let m = &report["machine"];
    let w = &report["workload"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# infermux on GGUF files, next to llama.cpp{}\n",
        if report["quick"] == true {
            " (quick smoke run: not representative)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Measured on {} ({} CPUs) by `cargo xtask bench --gguf …`, every figure of a table in the same run. Workload: greedy decode of {} tokens after a {}-token prompt (1, 8, 32 concurrent requests; llama.cpp runs one stream); prefill = one {}-token prompt with every position's logits; scoring = {} tokens (sequences × length; llama.cpp scores them one after another); best of {}. `(×r)` = ours ÷ llama.cpp: above 1 is better for tok/s, below 1 for seconds and MiB. Ceiling = the file's tensor bytes ÷ {:.1} GB/s measured streaming reads.",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cpus"],
        w["decode_tokens"],
        w["decode_prompt_len"],
        w["prefill_tokens"],
        w["scoring"].as_str().unwrap_or("?"),
        w["repeats"],
        m["read_bandwidth_gb_s"].as_f64().unwrap_or(0.0),
    );
    for f in report["files"].as_array().into_iter().flatten() {
        let peer = &f["peer"];
        let ceiling = f["decode_b1_ceiling_tok_s"].as_f64().unwrap_or(f64::NAN);
        let mut cols: Vec<&Value> = f["results"].as_array().into_iter().flatten().collect();
        if !peer.is_null() {
            cols.push(peer);
        }
        let _ = writeln!(
            s,
            "\n## {} (`{}`, {:.1} MB of tensors, ceiling {:.0} tok/s)\n",
            f["type"].as_str().unwrap_or("?"),
            f["file"].as_str().unwrap_or("?"),
            f["tensor_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            ceiling,
        );
        s.push_str("| metric |");
        for c in &cols {
            let _ = write!(s, " {} |", c["name"].as_str().unwrap_or("?"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(cols.len()));
        s.push('\n');
        for (key, label, unit) in METRICS {
            let _ = write!(s, "| {label} ({unit}) |");
            for c in &cols {
                let cell = match (c[key].as_f64(), peer[key].as_f64()) {
                    _ if !c["error"].is_null() => "refused".to_string(),
                    (None, _) => "–".to_string(),
                    (Some(v), Some(p)) if p > 0.0 && !std::ptr::eq(*c, peer) => {
                        format!("{} (×{:.2})", num(v), v / p)
                    }
                    (Some(v), _) => num(v),
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
        s.push_str("| decode, 1 stream: share of the ceiling |");
        for c in &cols {
            let cell = c["decode_b1_tok_s"]
                .as_f64()
                .map(|v| format!("{:.0}%", 100.0 * v / ceiling))
                .unwrap_or_else(|| "–".into());
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
        for c in &cols {
            if let Some(e) = c["error"].as_str() {
                let _ = writeln!(
                    s,
                    "\n{}: {}",
                    c["name"].as_str().unwrap_or("?"),
                    e.lines().next().unwrap_or("")
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_gives_ratios_to_llama_cpp_and_the_ceiling_share() {
        let report = json!({
            "quick": false,
            "machine": {"cpus": 2, "cpu_model": "Test CPU", "read_bandwidth_gb_s": 10.0},
            "workload": {"decode_tokens": 64, "decode_prompt_len": 16, "prefill_tokens": 512,
                "scoring": "32x256", "repeats": 2},
            "files": [{
                "type": "Q4_1", "file": "models/x.gguf", "tensor_bytes": 1.0e8,
                "decode_b1_ceiling_tok_s": 100.0,
                "results": [
                    {"name": "candle", "decode_b1_tok_s": 60.0, "prefill_tok_s": 300.0},
                    {"name": "torch", "error": "GGUF weights are unsupported on torch\nmore"},
                ],
                "peer": {"name": "llama.cpp", "decode_b1_tok_s": 80.0, "prefill_tok_s": 200.0},
            }],
        });
        let md = markdown(&report);
        assert!(
            md.contains("| metric | candle | torch | llama.cpp |"),
            "{md}"
        );
        assert!(
            md.contains("| decode, 1 stream (tok/s) | 60.0 (×0.75) | refused | 80.0 |"),
            "{md}"
        );
        assert!(md.contains("| prefill (tok/s) | 300 (×1.50) |"), "{md}");
        assert!(
            md.contains("| decode, 1 stream: share of the ceiling | 60% | – | 80% |"),
            "{md}"
        );
        assert!(md.contains("ceiling 100 tok/s"), "{md}");
        assert!(
            md.contains("torch: GGUF weights are unsupported on torch\n"),
            "{md}"
        );
    }
}
