//! The remote client and the HTTP parity contract.
//!
//! - `RemoteSamplingClient` retries 429/5xx (honoring `Retry-After`) and connection failures,
//!   stops at 4xx, and sends the API key — against a scripted loopback server.
//! - Parity: the same prompt and seed through the in-process `SamplingClient`, through
//!   `DeploymentSampler` over HTTP (a spawned `infermux serve`), and through `/v1/completions`
//!   (token-id prompt) give identical tokens and logprobs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infermux::wire::ComputeLogprobsResponse;
use infermux::{
    DeploymentSampler, Error, ModelInput, PromptInput, RemoteError, RemoteSamplingClient,
    RetryConfig, SampleResponse, SampleWithTokensParams, Sampler, SamplingParams, ServiceClient,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// A scripted loopback HTTP server: answers the i-th request with the i-th scripted reply.

#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: String,
}

struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn scripted_server(replies: Vec<Reply>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for reply in replies {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let request = read_request(&stream);
            log.lock().unwrap().push(request);
            write_reply(stream, &reply);
        }
    });
    Scripted { url, seen }
}

fn read_request(stream: &TcpStream) -> Seen {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (mut length, mut authorization) = (0usize, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap(),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Seen {
        path,
        authorization,
        body: String::from_utf8(body).unwrap(),
    }
}

fn write_reply(mut stream: TcpStream, reply: &Reply) {
    let mut head = format!(
        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(reply.body.as_bytes());
}

fn fast_retries(max_retries: u32) -> RetryConfig {
    RetryConfig {
        jitter: 0.0,
        ..RetryConfig::default()
            .with_max_retries(max_retries)
            .with_backoff(Duration::from_millis(5), Duration::from_millis(20))
    }
}

fn canned_sample() -> String {
    json!({
        "sequences": [{"tokens": [5, 6], "logprobs": [-0.5, -1.25], "stop_reason": "length",
                       "finish_reason": "length"}],
        "prompt_logprobs": null,
        "topk_prompt_logprobs": null
    })
    .to_string()
}

#[test]
fn retries_429_and_5xx_honoring_retry_after_then_succeeds() {
    let server = scripted_server(vec![
        Reply::new(503, "").header("retry-after", "0"),
        Reply::new(
            429,
            r#"{"error":{"message":"queue full","type":"overloaded_error"}}"#,
        )
        .header("retry-after", "1"),
        Reply::new(200, canned_sample()),
    ]);
    let client = RemoteSamplingClient::new(&format!("{}/v1", server.url))
        .unwrap()
        .with_api_key("secret")
        .with_retry_config(fast_retries(3));
    let start = Instant::now();
    let reply = client
        .sample(
            ModelInput::from_ints(vec![1, 2]),
            1,
            SamplingParams::greedy(2),
            false,
            0,
        )
        .wait()
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(reply.sequences[0].tokens, [5, 6]);
    assert_eq!(
        reply.sequences[0].logprobs.as_deref(),
        Some(&[-0.5, -1.25][..])
    );
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 must be waited out, waited {waited:?}"
    );
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.path, "/v1/sample");
        assert_eq!(s.authorization.as_deref(), Some("Bearer secret"));
        let body: infermux::wire::SampleRequest = serde_json::from_str(&s.body).unwrap();
        assert_eq!(body.prompt, ModelInput::from_ints(vec![1, 2]));
        assert_eq!(body.sampling_params.max_tokens, Some(2));
    }
}

#[test]
fn client_errors_are_not_retried_and_keep_the_servers_message() {
    let server = scripted_server(vec![Reply::new(
        400,
        r#"{"error":{"message":"invalid `temperature`: must be >= 0","type":"invalid_request_error","param":"temperature"}}"#,
    )]);
    let client = RemoteSamplingClient::new(&server.url)
        .unwrap()
        .with_retry_config(fast_retries(3));
    let err = client
        .compute_logprobs(ModelInput::from_ints(vec![1, 2]))
        .wait()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("HTTP 400") && text.contains("must be >= 0"),
        "{text}"
    );
    assert_eq!(server.seen.lock().unwrap().len(), 1);
    assert_eq!(server.seen.lock().unwrap()[0].path, "/v1/compute_logprobs");
}

#[test]
fn persistent_5xx_gives_up_after_max_retries() {
    let server = scripted_server(vec![Reply::new(500, "boom"); 3]);
    let client = RemoteSamplingClient::new(&server.url)
        .unwrap()
        .with_retry_config(fast_retries(2));
    let err = client
        .compute_logprobs(ModelInput::from_ints(vec![1]))
        .wait()
        .unwrap_err();
    assert!(err.to_string().contains("after 3 tries"), "{err}");
    assert_eq!(server.seen.lock().unwrap().len(), 3);
}

#[test]
fn connection_failures_are_retried_then_reported() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = RemoteSamplingClient::new(&format!("http://127.0.0.1:{port}"))
        .unwrap()
        .with_retry_config(fast_retries(2));
    let err = client
        .compute_logprobs(ModelInput::from_ints(vec![1]))
        .wait()
        .unwrap_err();
    assert!(err.to_string().contains("after 3 tries"), "{err}");
    assert!(
        matches!(
            err,
            Error::Remote(RemoteError::Transport { attempts: 3, .. })
        ),
        "{err:?}"
    );

    assert!(matches!(
        RemoteSamplingClient::new("https://example.invalid"),
        Err(RemoteError::InvalidUrl { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Parity against a real `infermux serve`.

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

/// A spawned `infermux serve`, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(["serve", "--model"])
        .arg(model_dir())
        .args(["--backend", "candle", "--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning infermux serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let mut server = Server {
        child,
        url: String::new(),
    };
    server.url = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("`infermux serve` printed no `listening on http://HOST:PORT` line");
    server
}

fn post(url: &str, body: &Value) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut reply = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string().as_str())
        .unwrap();
    let status = reply.status().as_u16();
    let text = reply.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "{url}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn in_process_remote_deployment_and_completions_agree() {
    let server = spawn_server();
    let client = ServiceClient::new()
        .create_sampling_client(model_dir())
        .unwrap();
    let tok = client.get_tokenizer();
    let prompt = tok.encode("The capital of France is", false).unwrap();
    let (n, max_tokens, temperature, seed) = (2usize, 6usize, 0.8f32, 1234u64);
    let sampling = SamplingParams {
        max_tokens: Some(max_tokens),
        temperature,
        seed: Some(seed),
        ..Default::default()
    };

    // 1. In process.
    let local: SampleResponse = client
        .sample(
            ModelInput::from_ints(prompt.clone()),
            n,
            sampling.clone(),
            true,
            0,
        )
        .wait()
        .unwrap();
    let local_prompt_lps: Vec<f32> = local.prompt_logprobs.as_ref().unwrap()[1..]
        .iter()
        .map(|x| x.unwrap())
        .collect();

    // 2. The native endpoints through the remote client (the Sampler trait object).
    let remote: Arc<dyn Sampler> = Arc::new(
        RemoteSamplingClient::new(&server.url)
            .unwrap()
            .with_model("SmolLM2-135M-Instruct"),
    );
    let over_http = remote
        .sample(ModelInput::from_ints(prompt.clone()), n, sampling, true, 0)
        .wait()
        .unwrap();
    assert_eq!(over_http.sequences, local.sequences);
    assert_eq!(over_http.prompt_logprobs, local.prompt_logprobs);
    let scored_local = client
        .compute_logprobs(ModelInput::from_ints(prompt.clone()))
        .wait()
        .unwrap();
    let scored_remote = remote
        .compute_logprobs(ModelInput::from_ints(prompt.clone()))
        .wait()
        .unwrap();
    assert_eq!(scored_remote, scored_local);
    let raw: ComputeLogprobsResponse = serde_json::from_value(post(
        &format!("{}/v1/compute_logprobs", server.url),
        &json!({"prompt": ModelInput::from_ints(prompt.clone())}),
    ))
    .unwrap();
    assert_eq!(raw.logprobs, scored_local);

    // 3. DeploymentSampler over HTTP (Fireworks' constructor), echo-aligned logprobs.
    let deployment =
        DeploymentSampler::new(&server.url, "SmolLM2-135M-Instruct", None, tok.clone()).unwrap();
    let params = SampleWithTokensParams {
        n,
        max_tokens: Some(max_tokens),
        temperature,
        seed: Some(seed),
        echo: true,
        ..Default::default()
    };
    let completions = deployment
        .sample_with_tokens(PromptInput::Tokens(prompt.clone()), &params)
        .wait()
        .unwrap();
    assert_eq!(completions.len(), n);
    for (c, seq) in completions.iter().zip(&local.sequences) {
        assert_eq!(c.completion_tokens(), &seq.tokens[..]);
        let mut want = local_prompt_lps.clone();
        want.extend(seq.logprobs.as_ref().unwrap());
        assert_eq!(c.inference_logprobs.as_ref(), Some(&want));
        assert_eq!(Some(&c.text), seq.text.as_ref());
    }

    // 4. OpenAI /v1/completions with the prompt as token ids.
    let reply = post(
        &format!("{}/v1/completions", server.url),
        &json!({
            "model": "SmolLM2-135M-Instruct",
            "prompt": prompt,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
            "logprobs": 1,
        }),
    );
    let mut choices = reply["choices"].as_array().unwrap().clone();
    choices.sort_by_key(|c| c["index"].as_u64().unwrap());
    assert_eq!(choices.len(), n);
    for (choice, seq) in choices.iter().zip(&local.sequences) {
        let lp = &choice["logprobs"];
        let tokens: Vec<String> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let want_tokens: Vec<String> = seq
            .tokens
            .iter()
            .map(|&id| tok.decode(&[id], false).unwrap())
            .collect();
        assert_eq!(tokens, want_tokens);
        let logprobs: Vec<f32> = lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(Some(&logprobs), seq.logprobs.as_ref());
        assert_eq!(choice["text"].as_str(), seq.text.as_deref());
    }
}
