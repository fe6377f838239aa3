//! The official `tinker` SDK (PyPI 0.38.0, in `runtimes/py-sdks` from `cargo xtask setup`),
//! unmodified, against the real `infermux serve` on candle over loopback, with an API key.
//! `tinker_support/drive.py` runs the SDK and prints what it got; these tests compare that with
//! the in-process `SamplingClient` on the same model folder:
//! - `num_samples = 4` with a seed, prompt logprobs, top-k prompt and sampled logprobs, and
//!   `compute_logprobs`, sync (`.result()`), async (`sample_async` / `compute_logprobs_async`)
//!   and awaited APIFutures, and through a `tinker://` `model_path`: tokens and logprobs equal;
//! - 64 concurrent SDK samples against a server with room for 4 and a queue of 4: none fails,
//!   results still equal in-process, the SDK saw 429s (each with `Retry-After`), never a 5xx;
//! - errors in Tinker's shape (`{"detail": …}` or a failed future with category `user`), each
//!   raised by the SDK at once rather than retried: unknown models and `model_path`s, bad
//!   parameters, training and checkpoint routes, a wrong key, raw protocol misuse.
//!
//! The venv missing is a failure, not a skip: `cargo xtask test` runs setup first.

mod server_support;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use infermux::{ModelInput, SampleResponse, SamplingClient, SamplingParams, ServiceClient};
use serde_json::{Value, json};
use server_support::{Reply, Server, model_dir, request_with, write_adapter};

/// The key the servers here require (Tinker's SDK insists on the `tml-` prefix).
const KEY: &str = "tml-infermux-test-key";
/// The served name (`--served-model-name` unset: the folder's name).
const MODEL: &str = "SmolLM2-135M-Instruct";
/// Longest a driver run may take (the load run takes about 10 s here).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(240);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The SDK venv's interpreter; its absence fails the test.
fn python() -> PathBuf {
    let python = repo().join("runtimes/py-sdks/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs tinker==0.38.0 there)",
        python.display()
    );
    python
}

/// One in-process client for the whole file, on the same folder the servers load.
fn local() -> &'static SamplingClient {
    static CLIENT: OnceLock<SamplingClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        ServiceClient::new()
            .create_sampling_client(model_dir())
            .expect("loading the model in process")
    })
}

fn start_server(extra: &[&str]) -> Server {
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Runs `drive.py MODE` on `spec` (plus the server's address, key and model) and returns the
/// JSON it printed. Panics with its stderr if it fails or runs past [`DRIVER_TIMEOUT`].
fn drive(mode: &str, server: &Server, mut spec: Value) -> Value {
    spec["base_url"] = json!(server.url());
    spec["api_key"] = json!(KEY);
    spec["model"] = json!(MODEL);
    let spec_path = std::env::temp_dir().join(format!(
        "infermux-tinker-{mode}-{}-{}.json",
        std::process::id(),
        server.addr.replace([':', '.'], "-")
    ));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tinker_support/drive.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(mode)
        .arg(&spec_path)
        // Loopback only: no proxy may see these requests, no stray SDK settings apply.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env_remove("TINKER_BASE_URL")
        .env_remove("TINKER_API_KEY")
        .env_remove("TINKER_FEATURE_GATES")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the SDK driver");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > DRIVER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let _ = std::fs::remove_file(&spec_path);
    let Some(status) = status else {
        panic!("drive.py {mode} ran past {DRIVER_TIMEOUT:?}; stderr:\n{err}");
    };
    assert!(
        status.success(),
        "drive.py {mode} failed ({status}); stderr:\n{err}"
    );
    let last = out.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("drive.py {mode} printed no JSON ({e}): {out}\nstderr:\n{err}"));
    assert_eq!(
        v["tinker_version"], "0.38.0",
        "the SDK this test is written against"
    );
    eprintln!(
        "drive.py {mode}: {:.1} s, {}",
        start.elapsed().as_secs_f64(),
        v["http"]["by_route_and_status"]
    );
    v
}

/// A sample request as the driver spells it and as the in-process client takes it.
#[derive(Clone)]
struct Case {
    prompt: Vec<u32>,
    num_samples: usize,
    params: Value,
    include_prompt_logprobs: bool,
    topk_prompt_logprobs: usize,
    topk_sample_logprobs: usize,
}

impl Case {
    fn json(&self) -> Value {
        json!({
            "prompt": self.prompt,
            "num_samples": self.num_samples,
            "params": self.params,
            "include_prompt_logprobs": self.include_prompt_logprobs,
            "topk_prompt_logprobs": self.topk_prompt_logprobs,
            "topk_sample_logprobs": self.topk_sample_logprobs,
        })
    }

    /// Tinker's `SamplingParams` (the keys used here) as ours.
    fn params(&self) -> SamplingParams {
        let p = &self.params;
        SamplingParams {
            max_tokens: p["max_tokens"].as_u64().map(|n| n as usize),
            seed: p["seed"].as_u64(),
            temperature: p["temperature"].as_f64().unwrap_or(1.0) as f32,
            top_k: p["top_k"].as_i64().unwrap_or(-1) as i32,
            top_p: p["top_p"].as_f64().unwrap_or(1.0) as f32,
            stop: p["stop"]
                .as_array()
                .map(|v| v.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default(),
            logprobs: (self.topk_sample_logprobs > 0).then_some(self.topk_sample_logprobs),
            ..SamplingParams::default()
        }
    }

    /// What the in-process client returns for this request.
    fn expected(&self) -> SampleResponse {
        local()
            .sample(
                ModelInput::from_ints(self.prompt.clone()),
                self.num_samples,
                self.params(),
                self.include_prompt_logprobs,
                self.topk_prompt_logprobs,
            )
            .wait()
            .unwrap()
    }
}

fn tokens(text: &str) -> Vec<u32> {
    local().get_tokenizer().encode(text, false).unwrap()
}

/// A logprob the SDK decoded, as the f32 it was: the driver prints Python's exact `repr` of it
/// as a string (serde_json's default number parsing may be an ulp off; `str::parse` is not).
fn f32_of(v: &Value) -> f32 {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("not a number as text: {v}"));
    let x: f64 = text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(x as f32 as f64, x, "{text} is not an f32");
    x as f32
}

fn opt_f32s(v: &Value) -> Vec<Option<f32>> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| (!x.is_null()).then(|| f32_of(x)))
        .collect()
}

fn topk_rows(v: &Value) -> Vec<Option<Vec<(u32, f32)>>> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|row| {
            row.as_array().map(|cells| {
                cells
                    .iter()
                    .map(|c| (c[0].as_u64().unwrap() as u32, f32_of(&c[1])))
                    .collect()
            })
        })
        .collect()
}

/// `got` (the SDK's `SampleResponse`, as the driver printed it) is `want`: the same tokens,
/// stop reasons and logprobs, bit for bit (the server tests' rule: exact tokens, logprobs
/// equal), and one distinct `sequence_id` per sequence.
fn assert_same(got: &Value, want: &SampleResponse, what: &str) {
    let seqs = got["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), want.sequences.len(), "{what}: {got}");
    let mut ids = std::collections::HashSet::new();
    for (i, (g, w)) in seqs.iter().zip(&want.sequences).enumerate() {
        let toks: Vec<u32> = g["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(toks, w.tokens, "{what}: sequence {i} tokens");
        let lps: Vec<f32> = g["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(f32_of)
            .collect();
        assert_eq!(
            Some(&lps),
            w.logprobs.as_ref(),
            "{what}: sequence {i} logprobs"
        );
        let stop = serde_json::to_value(w.stop_reason).unwrap();
        assert_eq!(g["stop_reason"], stop, "{what}: sequence {i} stop_reason");
        match &w.top_logprobs {
            Some(rows) => {
                let rows: Vec<Option<Vec<(u32, f32)>>> = rows.iter().cloned().map(Some).collect();
                assert_eq!(
                    topk_rows(&g["topk_logprobs"]),
                    rows,
                    "{what}: sequence {i} top-k"
                );
            }
            None => assert!(g["topk_logprobs"].is_null(), "{what}: sequence {i} top-k"),
        }
        let id = g["sequence_id"].as_str().unwrap().to_string();
        assert!(ids.insert(id), "{what}: sequence ids repeat: {got}");
    }
    match &want.prompt_logprobs {
        Some(lps) => assert_eq!(
            &opt_f32s(&got["prompt_logprobs"]),
            lps,
            "{what}: prompt logprobs"
        ),
        None => assert!(got["prompt_logprobs"].is_null(), "{what}: {got}"),
    }
    match &want.topk_prompt_logprobs {
        Some(rows) => assert_eq!(
            &topk_rows(&got["topk_prompt_logprobs"]),
            rows,
            "{what}: top-k prompt logprobs"
        ),
        None => assert!(got["topk_prompt_logprobs"].is_null(), "{what}: {got}"),
    }
}

/// The 5xx replies in a `/metrics` exposition's `infermux_http_requests_total`, and the count
/// of `route`'s replies with `status`.
fn http_counts(metrics: &str, route: &str, status: u16) -> (f64, f64) {
    let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("infermux_http_requests_total{"))
        .collect();
    let errors = series
        .iter()
        .filter(|l| l.contains("status=\"5"))
        .map(|l| value(l))
        .sum();
    let want = format!("route=\"{route}\",status=\"{status}\"");
    let count = series
        .iter()
        .filter(|l| l.contains(&want))
        .map(|l| value(l))
        .sum();
    (errors, count)
}

#[test]
fn sdk_samples_and_logprobs_equal_the_in_process_client() {
    let server = start_server(&[]);
    let a = tokens("The capital of France is");
    let b = tokens("Write a haiku about the sea.\n");
    let cases = [
        Case {
            prompt: a.clone(),
            num_samples: 4,
            params: json!({"max_tokens": 8, "seed": 1234, "temperature": 0.8}),
            include_prompt_logprobs: true,
            topk_prompt_logprobs: 3,
            topk_sample_logprobs: 2,
        },
        Case {
            prompt: b.clone(),
            num_samples: 4,
            params: json!({"max_tokens": 12, "seed": 7, "temperature": 1.0, "top_k": 20,
                           "top_p": 0.9, "stop": ["."]}),
            include_prompt_logprobs: true,
            topk_prompt_logprobs: 0,
            topk_sample_logprobs: 0,
        },
        Case {
            prompt: a.clone(),
            num_samples: 1,
            params: json!({"max_tokens": 6, "temperature": 0.0}),
            include_prompt_logprobs: false,
            topk_prompt_logprobs: 5,
            topk_sample_logprobs: 0,
        },
    ];
    let score = [a.clone(), b.clone()];
    let got = drive(
        "parity",
        &server,
        json!({
            "cases": cases.iter().map(Case::json).collect::<Vec<_>>(),
            "score": score,
            "model_path": format!("tinker://{MODEL}"),
        }),
    );
    let want: Vec<SampleResponse> = cases.iter().map(Case::expected).collect();
    let want_scores: Vec<Vec<Option<f32>>> = score
        .iter()
        .map(|p| {
            local()
                .compute_logprobs(ModelInput::from_ints(p.clone()))
                .wait()
                .unwrap()
        })
        .collect();
    assert!(
        want[0]
            .sequences
            .iter()
            .any(|s| s.tokens != want[0].sequences[0].tokens),
        "four seeded samples at temperature 0.8 should not all agree"
    );
    assert_eq!(got["base_model"], MODEL);
    for style in ["sync", "async", "awaited"] {
        let samples = got[style]["samples"].as_array().unwrap();
        assert_eq!(samples.len(), cases.len(), "{style}");
        for (i, (g, w)) in samples.iter().zip(&want).enumerate() {
            assert_same(g, w, &format!("{style} sample {i}"));
        }
        let scores = got[style]["scores"].as_array().unwrap();
        for (i, (g, w)) in scores.iter().zip(&want_scores).enumerate() {
            assert_eq!(&opt_f32s(g), w, "{style} compute_logprobs {i}");
        }
    }
    assert_eq!(got["model_path"]["base_model"], MODEL);
    assert_same(&got["model_path"]["sample"], &want[0], "model_path sample");
    let http = &got["http"];
    assert_eq!(http["status_5xx"], 0, "{http}");
    let by = &http["by_route_and_status"];
    for seen in [
        "POST /api/v1/client/config 200",
        "POST /api/v1/create_session 200",
        "POST /api/v1/create_sampling_session 200",
        "GET /api/v1/samplers/",
        "POST /api/v1/asample 200",
        "POST /api/v1/retrieve_future 200",
    ] {
        assert!(
            by.as_object().unwrap().keys().any(|k| k.starts_with(seen)),
            "the SDK never got {seen}: {by}"
        );
    }
    let errors = by
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.ends_with(" 200"))
        .collect::<Vec<_>>();
    assert!(errors.is_empty(), "error replies on the happy path: {by}");
}

/// Tinker's `create_sampling_client(model_path=...)` on trained weights: a `tinker://` path
/// whose last segment names a loaded LoRA adapter samples and scores on that adapter (equal
/// to the in-process client on the same adapter, unlike the base), and reports the base model.
#[test]
fn a_tinker_model_path_naming_a_loaded_adapter_samples_from_the_adapter() {
    let dir = std::env::temp_dir().join(format!("infermux-tinker-lora-{}", std::process::id()));
    write_adapter(&dir, 3);
    let module = format!("step-3={}", dir.display());
    let server = start_server(&["--lora-modules", &module]);
    let case = Case {
        prompt: tokens("The capital of France is"),
        num_samples: 2,
        params: json!({"max_tokens": 8, "seed": 11, "temperature": 0.9}),
        include_prompt_logprobs: false,
        topk_prompt_logprobs: 0,
        topk_sample_logprobs: 0,
    };
    let score = tokens("Paris is the capital of France.");
    let got = drive(
        "lora",
        &server,
        json!({"model_path": "tinker://run-7/sampler_weights/step-3",
               "cases": [case.json()], "score": score}),
    );
    let adapted = local().create_lora_client(&dir).unwrap();
    let want = adapted
        .sample(
            ModelInput::from_ints(case.prompt.clone()),
            case.num_samples,
            case.params(),
            false,
            0,
        )
        .wait()
        .unwrap();
    assert_eq!(got["base_model"], MODEL);
    assert_same(&got["sample"], &want, "adapter sample");
    assert_ne!(
        want.sequences,
        case.expected().sequences,
        "the adapter changed nothing"
    );
    let want_score = adapted
        .compute_logprobs(ModelInput::from_ints(score.clone()))
        .wait()
        .unwrap();
    assert_eq!(opt_f32s(&got["score"]), want_score);
    assert_ne!(
        want_score,
        local()
            .compute_logprobs(ModelInput::from_ints(score))
            .wait()
            .unwrap()
    );
    assert_eq!(got["http"]["status_5xx"], 0, "{}", got["http"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sixty_four_concurrent_sdk_samples_see_429_with_retry_after_and_never_5xx() {
    let server = start_server(&["--max-concurrent-requests", "4", "--max-queue", "4"]);
    let prompt = tokens("Once upon a time");
    let cases: Vec<Case> = (0..64)
        .map(|i| Case {
            prompt: prompt.clone(),
            num_samples: 1,
            params: json!({"max_tokens": 8, "seed": 1000 + i, "temperature": 0.9}),
            include_prompt_logprobs: false,
            topk_prompt_logprobs: 0,
            topk_sample_logprobs: 0,
        })
        .collect();
    let got = drive(
        "load",
        &server,
        json!({"cases": cases.iter().map(Case::json).collect::<Vec<_>>()}),
    );
    let results = got["results"].as_array().unwrap();
    assert_eq!(results.len(), 64);
    let failed: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 64 failed: {failed:?}",
        failed.len()
    );
    // Submitted all at once here too, so the engine batches them as it likes.
    let pending: Vec<_> = cases
        .iter()
        .map(|c| {
            local().sample(
                ModelInput::from_ints(c.prompt.clone()),
                1,
                c.params(),
                false,
                0,
            )
        })
        .collect();
    for (i, (g, p)) in results.iter().zip(pending).enumerate() {
        assert_same(g, &p.wait().unwrap(), &format!("concurrent sample {i}"));
    }
    let http = &got["http"];
    let seen_429 = http["status_429"].as_u64().unwrap();
    assert!(seen_429 > 0, "the server never filled: {http}");
    assert_eq!(
        http["status_429_with_retry_after"], seen_429,
        "a 429 without Retry-After: {http}"
    );
    assert_eq!(http["status_5xx"], 0, "{http}");
    let (server_5xx, server_429) =
        http_counts(&server.get("/metrics").text(), "/api/v1/asample", 429);
    assert_eq!(server_5xx, 0.0);
    assert_eq!(
        server_429, seen_429 as f64,
        "the server counts what the SDK saw"
    );
}

/// A raw request with the key.
fn call(server: &Server, method: &str, path: &str, body: Option<Value>) -> Reply {
    let body = body.map(|b| b.to_string());
    request_with(
        &server.addr,
        method,
        path,
        &[("X-API-Key", KEY)],
        body.as_deref().map(str::as_bytes),
    )
}

/// `reply` is `status` with Tinker's `{"detail": "…"}` naming `needle`.
fn assert_detail(reply: &Reply, status: u16, needle: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let v = reply.json();
    let detail = v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail: {v}"));
    assert!(detail.contains(needle), "{needle:?} not in {detail:?}");
}

#[test]
fn errors_answer_in_tinkers_shape_and_the_sdk_raises_them_at_once() {
    let server = start_server(&[]);
    let got = drive("errors", &server, json!({"prompt": tokens("Hello there")}));
    let results = got["results"].as_array().unwrap();
    let find = |name: &str| {
        results
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name}: {results:?}"))
    };
    // (name, exception the SDK raised, HTTP status or future category, text it names).
    let expected = [
        (
            "unknown model_path",
            "BadRequestError",
            json!(400),
            "tinker://run-1/weights/ckpt-1",
        ),
        (
            "unknown base_model",
            "BadRequestError",
            json!(400),
            "Qwen/Qwen3-8B",
        ),
        (
            "negative temperature",
            "RequestFailedError",
            json!("user"),
            "temperature",
        ),
        (
            "token out of vocabulary",
            "RequestFailedError",
            json!("user"),
            "out of range",
        ),
        (
            "prompt_alt_tokens_k",
            "RequestFailedError",
            json!("user"),
            "prompt_alt_tokens_k",
        ),
        (
            "training client",
            "NotFoundError",
            json!(404),
            "/api/v1/create_model is not supported",
        ),
        (
            "rest: training runs",
            "NotFoundError",
            json!(404),
            "/api/v1/training_runs is not",
        ),
        ("wrong key", "AuthenticationError", json!(401), "API key"),
    ];
    for (name, kind, code, needle) in expected {
        let r = find(name);
        assert_eq!(r["ok"], false, "{name}: {r}");
        assert_eq!(r["type"], kind, "{name}: {r}");
        if code.is_u64() {
            assert_eq!(r["status"], code, "{name}: {r}");
            let body = &r["body"];
            assert!(
                body["detail"].is_string() || body["error"]["message"].is_string(),
                "{r}"
            );
        } else {
            assert_eq!(r["category"], code, "{name}: {r}");
        }
        let message = r["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{name}: {needle:?} not in {message:?}"
        );
        // Raised at once: nothing the SDK retries (a 5xx or 429 it would retry for minutes).
        assert!(
            r["seconds"].as_f64().unwrap() < 10.0,
            "{name} took long: {r}"
        );
    }
    assert_eq!(find("sample after errors")["ok"], true);
    assert_eq!(got["http"]["status_5xx"], 0, "{}", got["http"]);
    assert_eq!(got["http"]["status_429"], 0, "{}", got["http"]);

    // The protocol misused by hand: Tinker's shape, 4xx, never HTML or 5xx.
    let session = json!({"session_id": "s", "sampling_session_seq_id": 0});
    let mut local_path = session.clone();
    local_path["model_path"] = json!("/tmp/elsewhere");
    let cases = [
        (
            "POST",
            "/api/v1/create_sampling_session",
            Some(local_path),
            400,
            "tinker://",
        ),
        (
            "POST",
            "/api/v1/create_sampling_session",
            Some(session),
            400,
            "base_model",
        ),
        (
            "POST",
            "/api/v1/forward_backward",
            Some(json!({})),
            404,
            "not supported",
        ),
        (
            "POST",
            "/api/v1/save_weights_for_sampler",
            Some(json!({})),
            404,
            "not supported",
        ),
        (
            "GET",
            "/api/v1/training_runs/r/checkpoints",
            None,
            404,
            "not supported",
        ),
        ("POST", "/api/v1", None, 404, "not supported"),
        ("GET", "/api/v1/asample", None, 405, "POST"),
        (
            "POST",
            "/api/v1/retrieve_future",
            Some(json!({"request_id": "nope"})),
            404,
            "nope",
        ),
        (
            "POST",
            "/api/v1/retrieve_future",
            Some(json!({})),
            400,
            "request_id",
        ),
        ("GET", "/api/v1/samplers/nope", None, 404, "nope"),
        (
            "POST",
            "/api/v1/asample",
            Some(
                json!({"sampling_session_id": "nope", "seq_id": 0, "num_samples": 1,
                        "prompt": {"chunks": []}, "sampling_params": {}}),
            ),
            404,
            "create_sampling_session",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        assert_detail(&call(&server, method, path, body), status, needle);
    }
    let reply = request_with(
        &server.addr,
        "POST",
        "/api/v1/asample",
        &[],
        Some(b"{not json"),
    );
    assert_eq!(reply.status, 401, "the key comes first: {}", reply.text());
    let reply = call(&server, "POST", "/api/v1/asample", None);
    assert_detail(&reply, 400, "not JSON");
    let open = request_with(&server.addr, "GET", "/api/v1/healthz", &[], None);
    assert_eq!((open.status, open.json()), (200, json!({"status": "ok"})));
    let (server_5xx, _) = http_counts(&server.get("/metrics").text(), "/api/v1", 404);
    assert_eq!(server_5xx, 0.0);
}
