//! `infermux serve` over HTTP with the real model: OpenAI completions and chat, SSE streaming,
//! the native endpoints, errors, limits, cancellation on disconnect and the metrics.

mod server_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_support::Server;

const KV_FREE: &str = "infermux_kv_slots_free{model=\"SmolLM2-135M-Instruct\"}";
const KV_TOTAL: &str = "infermux_kv_slots_total{model=\"SmolLM2-135M-Instruct\"}";
const RUNNING: &str = "infermux_running_requests{model=\"SmolLM2-135M-Instruct\"}";

fn greedy_completion(server: &Server, extra: Value) -> Value {
    let mut body = json!({
        "model": "SmolLM2-135M-Instruct",
        "prompt": "The capital of France is",
        "max_tokens": 5,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let reply = server.post("/v1/completions", &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[test]
fn completions_chat_and_models() {
    let server = Server::start(&[]);
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct");
    assert_eq!(server.get("/health").status, 200);

    let v = greedy_completion(&server, json!({ "logprobs": 2 }));
    assert_eq!(v["object"], "text_completion");
    let choice = &v["choices"][0];
    assert!(choice["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 10);
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);

    // echo: the prompt comes first, with its logprobs (the first token's is null).
    let echo = greedy_completion(&server, json!({ "echo": true, "logprobs": 1 }));
    let text = echo["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("The capital of France is"), "{text}");
    assert_eq!(
        text,
        format!(
            "The capital of France is{}",
            choice["text"].as_str().unwrap()
        )
    );
    let lp = &echo["choices"][0]["logprobs"];
    assert!(lp["token_logprobs"][0].is_null());
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 10);

    // A token-id prompt and n = 2 seeded samples.
    let ids = server
        .post("/v1/sample", &json!({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [504, 3575, 282, 4649, 314]}]}, "sampling_params": {"max_tokens": 1, "temperature": 0}}));
    assert_eq!(ids.status, 200, "{}", ids.text());
    let v = greedy_completion(
        &server,
        json!({ "prompt": [504, 3575, 282, 4649, 314], "n": 2, "temperature": 0.8, "seed": 3 }),
    );
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 10);

    // Chat through the model's template.
    let reply = server.post(
        "/v1/chat/completions",
        &json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 2,
        }),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["object"], "chat.completion");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert!(
        message["content"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[test]
fn streaming_matches_the_non_streamed_text() {
    let server = Server::start(&[]);
    let whole = greedy_completion(&server, json!({ "max_tokens": 8 }));
    let reply = server.post(
        "/v1/completions",
        &json!({
            "prompt": "The capital of France is",
            "max_tokens": 8,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    );
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = reply.sse_data();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert!(chunks[0]["usage"].is_null());
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().iter())
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);

    // Chat: a role chunk first, then content deltas, n = 2 choices.
    let reply = server.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 4,
            "n": 2,
            "stream": true,
        }),
    );
    let events = reply.sse_data();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let finished: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| c["choices"].as_array().unwrap().clone())
        .filter(|c| !c["finish_reason"].is_null())
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finished.len(), 2, "{events:?}");
}

#[test]
fn native_sample_and_compute_logprobs_agree() {
    let server = Server::start(&[]);
    let prompt =
        json!({"chunks": [{"type": "encoded_text", "tokens": [504, 3575, 282, 4649, 314]}]});
    let reply = server.post(
        "/v1/sample",
        &json!({"prompt": prompt, "num_samples": 1, "sampling_params": {"max_tokens": 4, "temperature": 0}}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let v = reply.json();
    let seq = &v["sequences"][0];
    let tokens: Vec<u64> = seq["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let mut all = vec![504, 3575, 282, 4649, 314];
    all.extend(&tokens);
    let reply = server.post(
        "/v1/compute_logprobs",
        &json!({"prompt": {"chunks": [{"type": "encoded_text", "tokens": all}]}}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let scored = reply.json()["logprobs"].as_array().unwrap().clone();
    assert!(scored[0].is_null());
    for (i, lp) in seq["logprobs"].as_array().unwrap().iter().enumerate() {
        let a = lp.as_f64().unwrap();
        let b = scored[5 + i].as_f64().unwrap();
        assert!((a - b).abs() < 1e-3, "token {i}: sampled {a} vs scored {b}");
    }
}

#[test]
fn errors_have_the_right_status_and_name_the_field() {
    let server = Server::start(&["--max-body-bytes", "2000"]);
    let check = |reply: server_support::Reply, status: u16, param: Option<&str>| {
        assert_eq!(reply.status, status, "{}", reply.text());
        let v = reply.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(param) = param {
            assert_eq!(v["error"]["param"], param, "{v}");
        }
    };
    let post = |body: Value| server.post("/v1/completions", &body);
    check(
        post(json!({"prompt": "x", "temperature": "hot"})),
        400,
        Some("temperature"),
    );
    check(post(json!({"prompt": "x", "top_p": 0})), 400, Some("top_p"));
    check(
        post(json!({"prompt": "x", "temprature": 1})),
        400,
        Some("temprature"),
    );
    check(post(json!({"max_tokens": 3})), 400, Some("prompt"));
    check(
        post(json!({"prompt": "", "max_tokens": 3})),
        400,
        Some("prompt"),
    );
    check(
        post(json!({"prompt": [999999], "max_tokens": 3})),
        400,
        Some("prompt"),
    );
    check(
        post(json!({"prompt": "x", "max_tokens": 100000})),
        400,
        Some("max_tokens"),
    );
    check(
        post(json!({"prompt": "x", "logit_bias": {"abc": 1}})),
        400,
        Some("logit_bias"),
    );
    check(
        post(json!({"prompt": "x", "model": "gpt-4"})),
        404,
        Some("model"),
    );
    check(
        server.post(
            "/v1/chat/completions",
            &json!({"messages": [], "max_tokens": 2}),
        ),
        400,
        Some("messages"),
    );
    check(
        server.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": true}),
        ),
        400,
        Some("top_logprobs"),
    );
    check(
        server.post("/v1/sample", &json!({"prompt": {"chunks": []}, "bogus": 1})),
        400,
        Some("bogus"),
    );
    check(
        server.request("POST", "/v1/completions", Some(b"{not json")),
        400,
        None,
    );
    let big = json!({"prompt": "x".repeat(5000)});
    check(post(big), 413, None);
    check(server.get("/v1/nothing"), 404, None);
    // The server is still fine.
    assert_eq!(
        greedy_completion(&server, json!({}))["choices"][0]["finish_reason"],
        "length"
    );
    let text = server.get("/metrics").text();
    assert!(
        text.contains("infermux_http_requests_total{route=\"/v1/completions\",status=\"413\"} 1"),
        "{text}"
    );
    assert!(text.contains("status=\"400\""), "{text}");
}

#[test]
fn metrics_have_the_engine_gauges_and_histograms() {
    let server = Server::start(&["--max-num-seqs", "8"]);
    greedy_completion(&server, json!({}));
    let text = server.get("/metrics").text();
    for series in [
        "# TYPE infermux_waiting_requests gauge",
        "# TYPE infermux_running_sequences gauge",
        "# TYPE infermux_generation_tokens_per_second gauge",
        "# TYPE infermux_request_latency_seconds histogram",
        "# TYPE infermux_time_to_first_token_seconds histogram",
        "infermux_request_latency_seconds_bucket{le=\"+Inf\"} 1",
        "infermux_time_to_first_token_seconds_count 1",
        "infermux_http_requests_in_flight 0",
        "infermux_http_requests_queued 0",
    ] {
        assert!(text.contains(series), "missing {series:?} in\n{text}");
    }
    assert_eq!(server_support::metric(&text, KV_TOTAL), 8.0);
    assert_eq!(server_support::metric(&text, KV_FREE), 8.0);
    assert_eq!(
        server_support::metric(
            &text,
            "infermux_generation_tokens_total{model=\"SmolLM2-135M-Instruct\"}"
        ),
        5.0
    );
}

/// Polls until every KV slot is free and nothing runs (or fails after 20 s).
fn wait_until_idle(server: &Server) {
    let start = Instant::now();
    loop {
        let text = server.get("/metrics").text();
        let free = server_support::metric(&text, KV_FREE);
        let total = server_support::metric(&text, KV_TOTAL);
        let running = server_support::metric(&text, RUNNING);
        if free == total && running == 0.0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not idle:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dropped_connection_cancels_its_request_and_frees_its_slots() {
    let server = Server::start(&["--max-num-seqs", "4"]);
    for stream in [true, false] {
        let body = json!({
            "prompt": "Once upon a time",
            "max_tokens": 2000,
            "ignore_eos": true,
            "n": 2,
            "stream": stream,
        })
        .to_string();
        let mut conn = TcpStream::connect(&server.addr).unwrap();
        write!(
            conn,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        if stream {
            let mut first = [0u8; 64];
            conn.read_exact(&mut first).unwrap();
            assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));
        }
        // Wait until the engine runs it.
        let start = Instant::now();
        while server.metric(KV_FREE) == 4.0 {
            assert!(start.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(server.metric(KV_FREE) < 4.0);
        drop(conn);
        let dropped = Instant::now();
        wait_until_idle(&server);
        eprintln!(
            "stream={stream}: slots free {:.0} ms after the disconnect",
            dropped.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[test]
fn a_request_past_its_timeout_gets_504() {
    let server = Server::start(&["--request-timeout-secs", "1"]);
    let reply = server.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 5000, "ignore_eos": true}),
    );
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "timeout_error");
    wait_until_idle(&server);
}
