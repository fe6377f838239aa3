//! `/metrics` of `infermux serve` with the real model: vLLM's names next to ours, their types,
//! counters that move by what the replies reported, histogram counts that match the requests
//! and token gaps observed, and an exposition a Prometheus parser accepts (each family once,
//! every sample under its family's `# TYPE`).

mod server_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_support::{Reply, Server};

const MODEL: &str = "SmolLM2-135M-Instruct";

/// `name{model_name="<served>"}`.
fn vllm(name: &str) -> String {
    format!("{name}{{model_name=\"{MODEL}\"}}")
}

fn success(reason: &str) -> String {
    format!("vllm:request_success_total{{finished_reason=\"{reason}\",model_name=\"{MODEL}\"}}")
}

fn infermux(name: &str) -> String {
    format!("{name}{{model=\"{MODEL}\"}}")
}

/// Checks the text exposition as a parser would: every sample belongs to the family of the
/// `# TYPE` line above it (histograms through `_bucket`/`_sum`/`_count`), no family is
/// declared twice, HELP precedes TYPE for the same name, values parse. Returns family → type.
fn parse_exposition(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type {kind} of {name}"
            );
            let before = types.insert(name.to_string(), kind.to_string());
            assert!(before.is_none(), "family {name} declared twice in\n{text}");
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let name = series.split('{').next().unwrap();
        let (family, kind) = current
            .as_ref()
            .unwrap_or_else(|| panic!("{line:?} before any TYPE"));
        let ok = match kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family.as_str())),
            _ => name == family,
        };
        assert!(ok, "sample {line:?} under family {family} ({kind})");
    }
    types
}

fn scrape(server: &Server) -> String {
    let reply = server.get("/metrics");
    assert_eq!(reply.status, 200);
    reply.text()
}

fn value(text: &str, series: &str) -> f64 {
    server_support::metric(text, series)
}

/// The chunks of an SSE reply, `[DONE]` checked and left out.
fn chunks(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let events = reply.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// What the replies reported, added up.
#[derive(Default, Debug)]
struct Seen {
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Prompts of OpenAI generation requests (each one first token, one end).
    openai_prompts: u64,
    /// Prompts of `/v1/sample` requests (one end each, no first-token observation).
    native_prompts: u64,
    /// Gaps between successive token events of each streamed choice.
    token_gaps: u64,
    finishes: BTreeMap<String, u64>,
}

impl Seen {
    fn usage(&mut self, usage: &Value) {
        self.prompt_tokens += usage["prompt_tokens"].as_u64().unwrap();
        self.completion_tokens += usage["completion_tokens"].as_u64().unwrap();
    }

    fn finish(&mut self, reason: &Value) {
        *self
            .finishes
            .entry(reason.as_str().unwrap().to_string())
            .or_default() += 1;
    }

    /// A streamed reply: usage from its last chunk, and per choice the events that carried
    /// tokens (their count is the length of the event's logprobs list: `tokens` for
    /// completions, `content` for chat).
    fn stream(&mut self, chunks: &[Value], token_list: &str) {
        self.usage(&chunks.last().unwrap()["usage"]);
        let mut events: BTreeMap<u64, u64> = BTreeMap::new();
        for chunk in chunks {
            for c in chunk["choices"].as_array().unwrap() {
                let tokens = c["logprobs"][token_list].as_array().map_or(0, Vec::len);
                if tokens > 0 {
                    *events.entry(c["index"].as_u64().unwrap()).or_default() += 1;
                }
                if !c["finish_reason"].is_null() {
                    self.finish(&c["finish_reason"]);
                }
            }
        }
        self.token_gaps += events.values().map(|e| e.saturating_sub(1)).sum::<u64>();
    }
}

/// Polls until nothing runs in the engine (or fails after 20 s).
fn wait_until_idle(server: &Server) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(server);
        if value(&text, &vllm("vllm:num_requests_running")) == 0.0
            && value(&text, &vllm("vllm:num_requests_waiting")) == 0.0
        {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "busy:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vllm_metrics_count_what_the_replies_reported() {
    let server = Server::start(&["--max-num-seqs", "8"]);
    let before = scrape(&server);
    let types = parse_exposition(&before);
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:request_success_total", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:time_per_output_token_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("infermux_prompt_tokens_total", "counter"),
        ("infermux_generation_tokens_total", "counter"),
        ("infermux_request_latency_seconds", "histogram"),
        ("infermux_time_to_first_token_seconds", "histogram"),
        ("infermux_http_requests_in_flight", "gauge"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name} in\n{before}"
        );
    }
    assert!(!types.contains_key("infermux_generation_tokens_per_second"));

    let mut seen = Seen::default();
    // Unstreamed completion and chat.
    let v = server
        .post(
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
        )
        .json();
    seen.usage(&v["usage"]);
    seen.finish(&v["choices"][0]["finish_reason"]);
    seen.openai_prompts += 1;
    let v = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
        )
        .json();
    seen.usage(&v["usage"]);
    seen.finish(&v["choices"][0]["finish_reason"]);
    seen.openai_prompts += 1;
    // Streamed completion with two choices of several tokens each, and a streamed chat.
    let reply = server.post(
        "/v1/completions",
        &json!({
            "prompt": "Once upon a time",
            "max_tokens": 9,
            "n": 2,
            "temperature": 0.8,
            "seed": 7,
            "ignore_eos": true,
            "logprobs": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    );
    seen.stream(&chunks(&reply), "tokens");
    seen.openai_prompts += 1;
    let reply = server.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_completion_tokens": 7,
            "temperature": 0,
            "logprobs": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    );
    seen.stream(&chunks(&reply), "content");
    seen.openai_prompts += 1;
    // The native route: two samples of one prompt (prefilled once).
    let prompt = [504u64, 3575, 282, 4649, 314];
    let v = server
        .post(
            "/v1/sample",
            &json!({
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
                "num_samples": 2,
                "sampling_params": {"max_tokens": 3, "temperature": 0.7, "seed": 1},
            }),
        )
        .json();
    seen.prompt_tokens += prompt.len() as u64;
    for s in v["sequences"].as_array().unwrap() {
        seen.completion_tokens += s["tokens"].as_array().unwrap().len() as u64;
        let reason = match s["finish_reason"].as_str().unwrap() {
            "length" => "length",
            _ => "stop",
        };
        seen.finish(&json!(reason));
    }
    seen.native_prompts += 1;
    // Several tokens per streamed choice: at least one gap each.
    assert!(seen.token_gaps >= 3, "{seen:?}");

    let after = wait_until_idle(&server);
    let types_after = parse_exposition(&after);
    // The same families (and the HTTP reply counter, now that replies were counted).
    let mut expected = types.clone();
    expected.insert("infermux_http_requests_total".into(), "counter".into());
    assert_eq!(types_after, expected, "families changed:\n{after}");
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta(&vllm("vllm:prompt_tokens_total")),
        seen.prompt_tokens as f64,
        "{seen:?}\n{after}"
    );
    assert_eq!(
        delta(&vllm("vllm:generation_tokens_total")),
        seen.completion_tokens as f64,
        "{seen:?}\n{after}"
    );
    assert_eq!(
        delta(&infermux("infermux_prompt_tokens_total")),
        seen.prompt_tokens as f64
    );
    assert_eq!(
        delta(&infermux("infermux_generation_tokens_total")),
        seen.completion_tokens as f64
    );
    assert_eq!(
        delta(&vllm("vllm:time_to_first_token_seconds_count")),
        seen.openai_prompts as f64,
        "{seen:?}\n{after}"
    );
    assert_eq!(
        delta(&vllm("vllm:e2e_request_latency_seconds_count")),
        (seen.openai_prompts + seen.native_prompts) as f64,
        "{seen:?}\n{after}"
    );
    for name in [
        "vllm:inter_token_latency_seconds_count",
        "vllm:time_per_output_token_seconds_count",
    ] {
        assert_eq!(
            delta(&vllm(name)),
            seen.token_gaps as f64,
            "{name}: {seen:?}\n{after}"
        );
    }
    // The +Inf bucket holds every observation; a gap's sum is positive.
    assert_eq!(
        value(
            &after,
            &format!(
                "vllm:inter_token_latency_seconds_bucket{{model_name=\"{MODEL}\",le=\"+Inf\"}}"
            )
        ),
        value(&after, &vllm("vllm:inter_token_latency_seconds_count"))
    );
    assert!(value(&after, &vllm("vllm:inter_token_latency_seconds_sum")) > 0.0);
    for reason in ["stop", "length", "abort"] {
        let expected = seen.finishes.get(reason).copied().unwrap_or(0);
        assert_eq!(
            delta(&success(reason)),
            expected as f64,
            "{reason}: {seen:?}\n{after}"
        );
    }
    // The gauges agree with ours in the same scrape; idle, nothing is reserved.
    for text in [&before, &after] {
        assert_eq!(
            value(text, &vllm("vllm:num_requests_running")),
            value(text, &infermux("infermux_running_requests"))
        );
        assert_eq!(
            value(text, &vllm("vllm:num_requests_waiting")),
            value(text, &infermux("infermux_waiting_requests"))
        );
        let usage = value(text, &vllm("vllm:kv_cache_usage_perc"));
        let reserved = value(text, &infermux("infermux_kv_reserved_bytes"));
        let budget = value(text, &infermux("infermux_kv_budget_bytes"));
        assert!(budget > 0.0);
        assert_eq!(usage, (reserved / budget).min(1.0));
    }
    assert_eq!(value(&after, &vllm("vllm:kv_cache_usage_perc")), 0.0);
}

#[test]
fn kv_usage_shows_a_running_request_and_a_dropped_stream_counts_as_abort() {
    let server = Server::start(&["--max-num-seqs", "4"]);
    let before = scrape(&server);
    let body = json!({
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    let mut conn = TcpStream::connect(&server.addr).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    conn.read_exact(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    let busy = loop {
        let text = scrape(&server);
        if value(&text, &vllm("vllm:num_requests_running")) == 1.0 {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never ran:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let usage = value(&busy, &vllm("vllm:kv_cache_usage_perc"));
    assert!(usage > 0.0 && usage <= 1.0, "{usage}\n{busy}");
    drop(conn);
    let after = wait_until_idle(&server);
    parse_exposition(&after);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(&success("abort")), 1.0, "{after}");
    assert_eq!(delta(&success("length")), 0.0, "{after}");
    // It never finished: no end-to-end latency.
    assert_eq!(
        delta(&vllm("vllm:e2e_request_latency_seconds_count")),
        0.0,
        "{after}"
    );
}
