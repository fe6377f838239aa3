//! The exporter on the tiny random-weight variants of `tests/data/tiny` (Llama with Llama 3 RoPE
//! scaling and an untied head, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms), each
//! exported into the target's temp dir and run through [`OnnxBackend`]: prompt logprobs and
//! greedy tokens against their transformers goldens (`tests/data/goldens/tiny-<name>.json`), a
//! left-padded decode batch against each sequence alone, f16 against f32, the marker skipping a
//! current export, and `onnx.checker` (full check) in `runtimes/py-onnx` (which `cargo xtask
//! setup` creates). Variants whose folder is missing are skipped with a note.

use std::path::{Path, PathBuf};
use std::process::Command;

use infermux_backend_onnx::export::{self, ExportDtype, ExportOptions};
use infermux_backend_onnx::{OnnxBackend, OnnxOptions};
use infermux_core::{Backend, LogitsWanted, SlotId};

const VARIANTS: [&str; 4] = ["llama3", "mistral", "qwen2", "qwen3"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
}

fn load(dir: &Path) -> OnnxBackend {
    let options = OnnxOptions {
        intra_threads: Some(1),
        ..OnnxOptions::default()
    };
    OnnxBackend::load(dir, options).expect("loading the exported graph")
}

/// Exports `name` (standalone, so the output folder loads by itself) into a folder of the test
/// `tag` (tests run in parallel).
fn exported(tag: &str, name: &str, dtype: ExportDtype) -> Option<PathBuf> {
    let src = repo().join("tests/data/tiny").join(name);
    if !src.join("model.safetensors").is_file() {
        eprintln!("skipped {name}: no {}", src.display());
        return None;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("onnx-export")
        .join(format!("{tag}-{name}-{}", dtype.as_str()));
    let options = ExportOptions {
        dtype,
        force: true,
        standalone: true,
        lora: None,
    };
    let report = export::export(&src, &out, &options).expect("export");
    assert!(!report.skipped && report.nodes > 0);
    let again = ExportOptions {
        force: false,
        ..options
    };
    assert!(
        export::export(&src, &out, &again).expect("export").skipped,
        "a current export is skipped"
    );
    Some(out)
}

/// Prompt logprobs (from token 1) of `tokens`, scored by one prefill.
fn prompt_logprobs(backend: &mut OnnxBackend, slot: SlotId, tokens: &[u32]) -> Vec<f64> {
    let logits = backend
        .prefill(slot, 0, tokens, LogitsWanted::All)
        .expect("prefill");
    let rows: Vec<&[f32]> = logits.chunk(0).collect();
    backend.release(slot);
    (1..tokens.len())
        .map(|i| log_softmax(rows[i - 1])[tokens[i] as usize])
        .collect()
}

fn golden_cases(name: &str) -> Vec<serde_json::Value> {
    let path = repo().join(format!("tests/data/goldens/tiny-{name}.json"));
    let text = std::fs::read_to_string(&path).expect("goldens");
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    json["cases"].as_array().expect("cases").clone()
}

fn tokens(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("token list")
        .iter()
        .map(|t| t.as_u64().expect("token") as u32)
        .collect()
}

#[test]
fn tiny_variants_match_transformers() {
    for name in VARIANTS {
        let Some(dir) = exported("golden", name, ExportDtype::F32) else {
            continue;
        };
        let mut backend = load(&dir);
        let mut worst = 0f64;
        for case in golden_cases(name) {
            let prompt = tokens(&case["prompt_tokens"]);
            let expected: Vec<f64> = case["prompt_logprobs"].as_array().unwrap()[1..]
                .iter()
                .map(|x| x.as_f64().expect("logprob"))
                .collect();
            let got = prompt_logprobs(&mut backend, SlotId(0), &prompt);
            for (g, e) in got.iter().zip(&expected) {
                worst = worst.max((g - e).abs());
            }
            let greedy = tokens(&case["greedy_tokens"]);
            let slot = SlotId(1);
            let logits = backend
                .prefill(slot, 0, &prompt, LogitsWanted::Last)
                .expect("prefill");
            let mut next = argmax(logits.last_row(0).unwrap());
            let mut out = vec![next];
            while out.len() < greedy.len() {
                let logits = backend.decode(&[(slot, next)]).expect("decode");
                next = argmax(logits.last_row(0).unwrap());
                out.push(next);
            }
            backend.release(slot);
            assert_eq!(out, greedy, "{name} {}: greedy tokens", case["name"]);
        }
        eprintln!("tiny-{name}: max |Δ logprob| vs transformers {worst:.2e}, greedy identical");
        assert!(worst <= 1e-3, "tiny-{name}: max |Δ logprob| {worst}");
    }
}

#[test]
fn left_padded_decode_batches_match_each_sequence_alone() {
    for name in ["qwen3", "llama3"] {
        let Some(dir) = exported("padded", name, ExportDtype::F32) else {
            continue;
        };
        let mut backend = load(&dir);
        let prompts: [&[u32]; 3] = [&[5, 60, 7], &[9, 10, 11, 12, 13, 14, 15, 16], &[42]];
        for (i, p) in prompts.iter().enumerate() {
            let slot = SlotId(i as u32);
            backend.prefill(slot, 0, p, LogitsWanted::Last).unwrap();
            backend.fork(slot, SlotId(slot.0 + 10)).unwrap();
        }
        for step in 0..3u32 {
            let steps: Vec<(SlotId, u32)> = (0..3).map(|i| (SlotId(i), 70 + i + step)).collect();
            let batch = backend.decode(&steps).unwrap();
            for (i, &(slot, token)) in steps.iter().enumerate() {
                let solo = backend.decode(&[(SlotId(slot.0 + 10), token)]).unwrap();
                let (a, b) = (batch.last_row(i).unwrap(), solo.last_row(0).unwrap());
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(d <= 1e-4, "{name} step {step} slot {}: max |Δ| {d}", slot.0);
            }
        }
    }
}

#[test]
fn f16_graphs_stay_close_to_f32() {
    for name in ["qwen2", "llama3"] {
        let (Some(f32_dir), Some(f16_dir)) = (
            exported("f16", name, ExportDtype::F32),
            exported("f16", name, ExportDtype::F16),
        ) else {
            continue;
        };
        let (mut a, mut b) = (load(&f32_dir), load(&f16_dir));
        assert_eq!(b.info().dtype, infermux_core::DType::F16);
        let mut worst = 0f64;
        for case in golden_cases(name) {
            let prompt = tokens(&case["prompt_tokens"]);
            let x = prompt_logprobs(&mut a, SlotId(0), &prompt);
            let y = prompt_logprobs(&mut b, SlotId(0), &prompt);
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs());
            }
        }
        eprintln!("tiny-{name}: f16 vs f32 max |Δ logprob| {worst:.2e}");
        assert!(worst <= 0.1, "tiny-{name}: f16 vs f32 {worst}");
    }
}

#[test]
fn exported_graphs_pass_the_onnx_checker() {
    let python = repo().join("runtimes/py-onnx/bin/python");
    let has_onnx = python.is_file()
        && Command::new(&python)
            .args(["-c", "import onnx"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        has_onnx,
        "no onnx package in {}: run `cargo xtask setup` (its ONNX export step creates it)",
        python.display()
    );
    for name in ["qwen3", "qwen2"] {
        let Some(dir) = exported("checker", name, ExportDtype::F16) else {
            continue;
        };
        let graph = dir.join(export::GRAPH_FILE);
        let status = Command::new(&python)
            .arg("-c")
            .arg("import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)")
            .arg(&graph)
            .status()
            .expect("running python");
        assert!(
            status.success(),
            "onnx.checker rejected {}",
            graph.display()
        );
    }
}
