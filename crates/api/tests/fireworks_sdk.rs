//! PyPI `fireworks-ai` (1.2.30), unmodified, against the real `infermux serve` (candle, the
//! reference model, 127.0.0.1, `--api-key`): its `DeploymentSampler.sample_with_tokens` posts
//! to `/inference/v1/completions` (token ids, `raw_output`, streamed; `n` separate requests),
//! with messages through the model folder's Hugging Face tokenizer. The venv is
//! `runtimes/py-sdks` (`cargo xtask setup`); the test fails naming that command without it.
//!
//! - Parity: for the same cases (n = 4, `logprobs=True`, `echo=True`; greedy, seeded, tempered;
//!   `max_seq_len` pre-filter and post-filter at its boundary) the SDK's `full_tokens`,
//!   `prompt_len`, `inference_logprobs` and `finish_reason` equal our Rust `DeploymentSampler`'s
//!   over the same server (bit for bit). One difference is by design and checked as such: the
//!   SDK sends a seeded `n = 4` as four requests with the same seed, so it gets four copies of
//!   sample 0, where ours draws samples `(seed, 0..4)`.
//! - The SDK's fast failures: a wrong key is 401 and an unknown model 400 (a 404 would make it
//!   wait about 50 s for a "deployment not ready"); the SDK's warm-up probe (unstreamed) is
//!   served; bad bodies are 400 naming the field.
//! - Load: 64 concurrent SDK calls against `--max-concurrent-requests 4 --max-queue 4`: all
//!   succeed through the SDK's own retries, the server answered 429 with `Retry-After` and no
//!   5xx (counted in `/metrics`).

mod fireworks_support;
mod server_support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use fireworks_support::{Parity, SdkCompletion, run_driver};
use infermux::{
    ChatMessage, DeploymentSampler, PromptInput, SampleWithTokensParams, SampledCompletion,
    Tokenizer,
};
use serde_json::{Value, json};
use server_support::{Reply, Server, model_dir, request_with};

/// The key the servers require.
const KEY: &str = "fw-test-key";
/// The name the servers serve the model under.
const MODEL: &str = "smol";
/// The route the SDK posts to.
const ROUTE: &str = "/inference/v1/completions";

/// One `sample_with_tokens` call, sent the same way through both samplers.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    prompt: &'static str,
    n: usize,
    max_tokens: usize,
    temperature: f32,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<u64>,
    max_seq_len: Option<usize>,
}

impl Case {
    fn messages(&self) -> Vec<ChatMessage> {
        vec![ChatMessage::user(self.prompt)]
    }

    /// Our sampler's parameters (its defaults for top_p / top_k are the SDK's: 1 and 0).
    fn params(&self) -> SampleWithTokensParams {
        SampleWithTokensParams {
            n: self.n,
            max_tokens: Some(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            seed: self.seed,
            logprobs: true,
            echo: true,
            max_seq_len: self.max_seq_len,
            ..Default::default()
        }
    }

    /// The SDK's call: `sample_with_tokens(messages, n, max_tokens, temperature, max_seq_len,
    /// **kwargs)`.
    fn job(&self) -> Value {
        let mut kwargs = json!({"logprobs": true, "echo": true});
        if let Some(seed) = self.seed {
            kwargs["seed"] = json!(seed);
        }
        if let Some(top_p) = self.top_p {
            kwargs["top_p"] = json!(top_p);
        }
        if let Some(top_k) = self.top_k {
            kwargs["top_k"] = json!(top_k);
        }
        json!({
            "messages": [{"role": "user", "content": self.prompt}],
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "max_seq_len": self.max_seq_len,
            "kwargs": kwargs,
        })
    }
}

/// The fields the comparison covers, as both samplers report them.
#[derive(Debug, Clone, PartialEq)]
struct Compared {
    full_tokens: Vec<u32>,
    prompt_len: usize,
    inference_logprobs: Option<Vec<f32>>,
    finish_reason: String,
}

impl Compared {
    fn ours(c: &SampledCompletion) -> Self {
        Self {
            full_tokens: c.full_tokens.clone(),
            prompt_len: c.prompt_len,
            inference_logprobs: c.inference_logprobs.clone(),
            finish_reason: serde_json::to_value(c.finish_reason)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string(),
        }
    }

    /// The SDK's floats are the server's shortest f32 text read as f64: back to f32 exactly.
    fn sdk(c: &SdkCompletion) -> Self {
        Self {
            full_tokens: c.full_tokens.clone(),
            prompt_len: c.prompt_len,
            inference_logprobs: c
                .inference_logprobs
                .as_ref()
                .map(|v| v.iter().map(|&x| x as f32).collect()),
            finish_reason: c.finish_reason.clone(),
        }
    }
}

fn ours_all(out: &[SampledCompletion]) -> Vec<Compared> {
    out.iter().map(Compared::ours).collect()
}

fn sdk_all(out: &[SdkCompletion]) -> Vec<Compared> {
    out.iter().map(Compared::sdk).collect()
}

/// The largest |Δ| between two logprob lists of equal length (for a failure message).
fn max_delta(a: &Compared, b: &Compared) -> Option<f32> {
    let (x, y) = (
        a.inference_logprobs.as_ref()?,
        b.inference_logprobs.as_ref()?,
    );
    (x.len() == y.len()).then(|| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    })
}

/// `method` on the SDK's route with the key (and `body`).
fn keyed(server: &Server, method: &str, body: Option<&Value>) -> Reply {
    let auth = format!("Bearer {KEY}");
    let body = body.map(Value::to_string);
    request_with(
        &server.addr,
        method,
        ROUTE,
        &[("Authorization", &auth)],
        body.as_deref().map(str::as_bytes),
    )
}

/// `infermux_http_requests_total` of the SDK's route with `status`, 0 when absent.
fn route_count(text: &str, status: u16) -> f64 {
    let series = format!("infermux_http_requests_total{{route=\"{ROUTE}\",status=\"{status}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every `infermux_http_requests_total` series with a 5xx status.
fn server_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("infermux_http_requests_total{") && l.contains("status=\"5"))
        .map(str::to_string)
        .collect()
}

#[test]
fn sdk_sample_with_tokens_equals_the_rust_deployment_sampler() {
    fireworks_support::sdk_python();
    let server = Server::start(&[
        "--served-model-name",
        MODEL,
        "--api-key",
        KEY,
        "--kv-cache-memory-bytes",
        "256MiB",
    ]);
    let tokenizer = Tokenizer::from_model_dir(model_dir()).unwrap();
    let ours = DeploymentSampler::new(&server.url(), MODEL, Some(KEY), tokenizer).unwrap();
    let sample = |case: &Case| {
        ours.sample_with_tokens(case.messages(), &case.params())
            .wait()
            .unwrap_or_else(|e| panic!("{}: our sampler failed: {e}", case.name))
    };

    let color = "Name a color.";
    let sea = "Write one short sentence about the sea.";
    let greedy = Case {
        name: "greedy",
        prompt: color,
        n: 4,
        max_tokens: 12,
        temperature: 0.0,
        top_p: None,
        top_k: None,
        seed: None,
        max_seq_len: None,
    };
    let greedy_out = sample(&greedy);
    assert_eq!(greedy_out.len(), 4);
    let prompt_len = greedy_out[0].prompt_len;
    let completion_len = greedy_out[0].completion_len;
    assert!(completion_len > 1, "{greedy_out:?}");
    assert!(
        greedy_out
            .iter()
            .all(|c| c.completion_len == completion_len)
    );

    let seeded = Case {
        name: "seeded",
        prompt: sea,
        n: 4,
        max_tokens: 16,
        temperature: 1.0,
        seed: Some(7),
        ..greedy.clone()
    };
    let tempered = Case {
        name: "tempered",
        prompt: sea,
        n: 1,
        max_tokens: 16,
        temperature: 0.7,
        top_p: Some(0.9),
        top_k: Some(40),
        seed: Some(11),
        max_seq_len: None,
    };
    // Pre-filter: a prompt of max_seq_len tokens is not sent at all.
    let pre_filter = Case {
        name: "pre-filter",
        max_seq_len: Some(prompt_len),
        ..greedy.clone()
    };
    // Post-filter at its boundary: prompt + completion == max_seq_len is kept, one over is not.
    let post_kept = Case {
        name: "post-filter kept",
        max_seq_len: Some(prompt_len + completion_len),
        ..greedy.clone()
    };
    let post_dropped = Case {
        name: "post-filter dropped",
        max_seq_len: Some(prompt_len + completion_len - 1),
        ..greedy.clone()
    };
    let cases = [
        greedy.clone(),
        seeded.clone(),
        tempered.clone(),
        pre_filter,
        post_kept,
        post_dropped,
    ];
    let mut rust: Vec<Vec<SampledCompletion>> = vec![greedy_out];
    rust.extend(cases[1..].iter().map(sample));
    // The SDK's seeded n = 4 is four n = 1 requests with the same seed: ours with n = 1.
    let seeded_one = sample(&Case {
        n: 1,
        ..seeded.clone()
    });

    let job = json!({
        "mode": "parity",
        "base_url": server.url(),
        "api_key": KEY,
        "model": MODEL,
        "tokenizer_dir": model_dir(),
        "cases": cases.iter().map(Case::job).collect::<Vec<_>>(),
    });
    let sdk: Parity = serde_json::from_value(run_driver(&job, Duration::from_secs(300))).unwrap();
    assert_eq!(sdk.cases.len(), cases.len());

    for (i, case) in cases.iter().enumerate() {
        // The same prompt ids from transformers' apply_chat_template and from ours.
        let want = ours
            .tokenize(&PromptInput::Messages(case.messages()), true)
            .unwrap();
        assert_eq!(sdk.prompts[i], want, "{}: prompt token ids", case.name);
        let theirs = &sdk.cases[i];
        eprintln!(
            "{}: SDK {:.2} s, {} completions, attempts {:?}",
            case.name,
            theirs.seconds,
            theirs.completions.len(),
            theirs.attempts.iter().map(|a| a.status).collect::<Vec<_>>()
        );
        assert!(
            theirs
                .attempts
                .iter()
                .all(|a| a.status == Some(200) && a.attempt == Some(1) && a.error.is_none()),
            "{}: every SDK attempt should succeed at once: {:?}",
            case.name,
            theirs.attempts
        );
        for c in &theirs.completions {
            assert!(c.logprobs_echoed, "{}: {c:?}", case.name);
            assert_eq!(c.completion_len, c.full_tokens.len() - c.prompt_len);
            assert_eq!(
                c.inference_logprobs.as_ref().map(Vec::len),
                Some(c.full_tokens.len() - 1),
                "{}: echo gives P + C - 1 logprobs",
                case.name
            );
            // The SDK's text with echo is the echoed prompt's and the completion's.
            assert!(
                c.text.starts_with("<|im_start|>"),
                "{}: {:?}",
                case.name,
                c.text
            );
        }
        let (theirs, mine) = (sdk_all(&theirs.completions), ours_all(&rust[i]));
        if case.name == "seeded" {
            // By design, not a bug here: the SDK's four same-seed requests give four copies
            // of sample 0, which is ours with n = 1 (and our n = 4's first).
            let one = ours_all(&seeded_one);
            assert_eq!(theirs.len(), 4);
            for t in &theirs {
                assert_eq!(t, &one[0], "seeded: the SDK's sample vs ours with n = 1");
            }
            assert_eq!(
                mine[0], one[0],
                "seeded: our n = 4's sample 0 is our n = 1's"
            );
            assert!(
                mine.iter().skip(1).any(|m| m != &mine[0]),
                "seeded: our n = 4 draws distinct samples (seed, 0..4): {mine:?}"
            );
            continue;
        }
        assert_eq!(
            theirs.len(),
            mine.len(),
            "{}: completions kept (SDK {theirs:?}, ours {mine:?})",
            case.name
        );
        for (t, m) in theirs.iter().zip(&mine) {
            assert_eq!(
                t,
                m,
                "{}: SDK vs ours (max |Δ logprob| {:?})",
                case.name,
                max_delta(t, m)
            );
        }
    }
    assert!(rust[3].is_empty() && rust[5].is_empty() && rust[4].len() == 4);

    // The tempered case: sampling_logprob is the processed distribution's, not the raw one;
    // echoed prompt rows have none.
    let t = &sdk.cases[2].completions[0];
    let sampling = t.sampling_logprobs.as_ref().unwrap();
    let raw = t.inference_logprobs.as_ref().unwrap();
    let p = t.prompt_len - 1;
    assert!(sampling[..p].iter().all(Option::is_none), "{sampling:?}");
    assert!(sampling[p..].iter().all(Option::is_some), "{sampling:?}");
    assert!(
        sampling[p..]
            .iter()
            .zip(&raw[p..])
            .any(|(s, r)| (s.unwrap() - r).abs() > 1e-3),
        "at T = 0.7, top_p 0.9, top_k 40 some sampling_logprob differs from the raw one"
    );
    // At T = 1 with top_p 1 and top_k 0 the two are the same distribution.
    let s = &sdk.cases[1].completions[0];
    let (sampling, raw) = (
        s.sampling_logprobs.as_ref().unwrap(),
        s.inference_logprobs.as_ref().unwrap(),
    );
    let p = s.prompt_len - 1;
    for (a, b) in sampling[p..].iter().zip(&raw[p..]) {
        assert!((a.unwrap() - b).abs() <= 1e-5, "{a:?} vs {b}");
    }

    // Fast, final failures: no retries, no "deployment not ready" wait.
    let wrong = &sdk.wrong_key;
    assert_eq!(wrong.unexpected, None);
    assert_eq!(wrong.status, Some(401), "{wrong:?}");
    assert_eq!(
        wrong.body.as_ref().unwrap()["error"]["code"],
        "invalid_api_key"
    );
    assert!(wrong.seconds < 5.0, "{wrong:?}");
    let unknown = &sdk.unknown_model;
    assert_eq!(unknown.unexpected, None);
    assert_eq!(unknown.status, Some(400), "{unknown:?}");
    assert_eq!(unknown.body.as_ref().unwrap()["error"]["param"], "model");
    assert!(unknown.seconds < 5.0, "{unknown:?}");

    // The SDK's deployment warm-up probe (`DeploymentManager.warmup`): unstreamed, bare.
    let warmup = keyed(
        &server,
        "POST",
        Some(&json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0})),
    );
    assert_eq!(warmup.status, 200, "{}", warmup.text());
    let warm = warmup.json();
    assert!(warm["choices"][0]["text"].is_string(), "{warm}");
    assert!(
        warm["usage"]["completion_tokens"].as_u64().unwrap() <= 4,
        "{warm}"
    );

    // The SDK's requests as the server counted them: 4 + 4 + 1 + 0 (pre-filtered) + 4 + 4,
    // and the warm-up.
    let metrics = server.get("/metrics").text();
    assert_eq!(route_count(&metrics, 200), 18.0, "{metrics}");
    assert_eq!(route_count(&metrics, 401), 1.0);
    assert_eq!(route_count(&metrics, 400), 1.0);
    assert!(server_errors(&metrics).is_empty(), "{metrics}");

    // Bad input: 400 naming the field, never a 404 the SDK would wait on, never a 5xx.
    for (body, param) in [
        (json!({"prompt": [1, 2], "bogus": 1}), "bogus"),
        (
            json!({"prompt": [1, 2], "top_sampling_format": "parquet_v1"}),
            "top_sampling_format",
        ),
        (
            json!({"prompt": [1, 2], "include_routing_matrix": true}),
            "include_routing_matrix",
        ),
        (json!({"prompt": [1, 2], "images": ["data:,"]}), "images"),
        (json!({"prompt": [999_999]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [[1], [2]]}), "prompt"),
        (
            json!({"prompt": [1, 2], "logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (json!({"prompt": [1, 2], "top_logprobs": 2}), "top_logprobs"),
        (
            json!({"prompt": [1, 2], "echo_last": 1, "echo": false}),
            "echo_last",
        ),
        (json!({"prompt": [1, 2], "n": 0}), "n"),
        (json!({"prompt": [1, 2], "temperature": -1}), "temperature"),
        (
            json!({"prompt": [1, 2], "max_tokens": 100_000}),
            "max_tokens",
        ),
        (json!({"prompt": [1, 2], "model": "nope"}), "model"),
    ] {
        let reply = keyed(&server, "POST", Some(&body));
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert_eq!(
            reply.json()["error"]["param"],
            param,
            "{body}: {}",
            reply.text()
        );
    }
    let wrong_method = keyed(&server, "GET", None);
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("POST"));
}

/// Holds `count` long streaming requests open (unread) so the server's places fill up.
fn hold(addr: &str, count: usize) -> Vec<TcpStream> {
    let body = json!({
        "model": MODEL,
        "prompt": [1, 9690, 198],
        "max_tokens": 300,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    (0..count)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST {ROUTE} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            s
        })
        .collect()
}

#[test]
fn sdk_under_load_retries_429_to_success() {
    fireworks_support::sdk_python();
    let server = Server::start(&[
        "--served-model-name",
        MODEL,
        "--api-key",
        KEY,
        "--kv-cache-memory-bytes",
        "256MiB",
        "--max-concurrent-requests",
        "4",
        "--max-queue",
        "4",
    ]);

    // A full server: 4 running and 4 waiting (as `/metrics` shows); the next is 429 with
    // Retry-After, before any stream byte.
    let held = hold(&server.addr, 8);
    let full = |text: &str| {
        server_support::metric(text, "infermux_http_requests_in_flight") == 4.0
            && server_support::metric(text, "infermux_http_requests_queued") == 4.0
    };
    let mut text = String::new();
    for _ in 0..300 {
        text = server.get("/metrics").text();
        if full(&text) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        full(&text),
        "the held requests did not fill the server:\n{text}"
    );
    let probe = json!({"model": MODEL, "prompt": [1, 9690], "max_tokens": 1, "stream": true});
    let refused = keyed(&server, "POST", Some(&probe));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    assert_eq!(
        refused.json()["error"]["code"],
        "overloaded",
        "{}",
        refused.text()
    );
    drop(held);
    // The held requests are cancelled when their connections close.
    let mut idle = false;
    for _ in 0..600 {
        let text = server.get("/metrics").text();
        if server_support::metric(&text, "infermux_http_requests_in_flight") == 0.0
            && server_support::metric(&text, "infermux_http_requests_queued") == 0.0
        {
            idle = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(idle, "the held requests were not cancelled");
    let before = server.get("/metrics").text();

    let count = 64;
    let job = json!({
        "mode": "load",
        "base_url": server.url(),
        "api_key": KEY,
        "model": MODEL,
        "tokenizer_dir": model_dir(),
        "count": count,
        "max_tokens": 6,
    });
    let load: fireworks_support::Load =
        serde_json::from_value(run_driver(&job, Duration::from_secs(400))).unwrap();
    let after = server.get("/metrics").text();

    let failed: Vec<String> = load
        .failed
        .iter()
        .map(|f| format!("call {}: {}", f.index, f.error))
        .collect();
    assert!(failed.is_empty(), "SDK calls failed: {failed:#?}");
    assert_eq!(load.ok.len(), count);
    for ok in &load.ok {
        assert_eq!(ok.completions.len(), 1, "{ok:?}");
        let c = &ok.completions[0];
        assert!(
            matches!(c.finish_reason.as_str(), "stop" | "length"),
            "{c:?}"
        );
        assert!((1..=6).contains(&c.completion_len), "{c:?}");
        assert_eq!(
            c.inference_logprobs.as_ref().map(Vec::len),
            Some(c.completion_len)
        );
        assert!(!c.logprobs_echoed);
        assert!(ok.index < count);
    }
    let refused_seen = load
        .attempts
        .iter()
        .filter(|a| a.status == Some(429))
        .count();
    let succeeded = load
        .attempts
        .iter()
        .filter(|a| a.status == Some(200))
        .count();
    let worst = load
        .attempts
        .iter()
        .filter_map(|a| a.attempt)
        .max()
        .unwrap_or(0);
    eprintln!(
        "load: {count} SDK calls in {:.1} s; {} attempts: {succeeded} × 200, {refused_seen} × 429; \
         at most {worst} attempts for one call",
        load.seconds,
        load.attempts.len()
    );
    assert!(
        refused_seen > 0,
        "the server was never full: {:?}",
        load.attempts
    );
    assert_eq!(succeeded, count);
    assert!(
        load.attempts
            .iter()
            .all(|a| matches!(a.status, Some(200 | 429))),
        "{:?}",
        load.attempts
    );
    // The server's own count agrees, and it answered no 5xx on any route.
    assert_eq!(
        route_count(&after, 200) - route_count(&before, 200),
        count as f64
    );
    assert_eq!(
        route_count(&after, 429) - route_count(&before, 429),
        refused_seen as f64
    );
    assert!(server_errors(&after).is_empty(), "{after}");
}
