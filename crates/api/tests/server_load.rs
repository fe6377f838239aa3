//! 200 concurrent streaming requests against `infermux serve` on loopback, past its concurrency
//! and queue limits: each completes or gets 429 (with Retry-After), none fails, and afterwards
//! every KV slot is free.

mod server_support;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use serde_json::{Value, json};
use server_support::{Server, metric, request};

const CLIENTS: usize = 200;

#[test]
fn two_hundred_concurrent_streams_complete_or_get_429() {
    let server = Server::start(&[
        "--max-concurrent-requests",
        "64",
        "--max-queue",
        "64",
        "--max-num-seqs",
        "64",
    ]);
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let start = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = server.addr.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "prompt": format!("Request {i}: the capital of France is"),
                    "max_tokens": 4,
                    "temperature": 0.7,
                    "seed": i,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                })
                .to_string();
                barrier.wait();
                request(&addr, "POST", "/v1/completions", Some(body.as_bytes()))
            })
        })
        .collect();
    let (mut ok, mut rejected, mut tokens) = (0, 0, 0u64);
    for h in handles {
        let reply = h.join().expect("client thread");
        match reply.status {
            200 => {
                let events = reply.sse_data();
                assert_eq!(
                    events.last().map(String::as_str),
                    Some("[DONE]"),
                    "{}",
                    reply.text()
                );
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                tokens += usage["usage"]["completion_tokens"].as_u64().unwrap();
                assert!(
                    events
                        .iter()
                        .any(|e| e.contains("\"finish_reason\":\"length\"")
                            || e.contains("\"finish_reason\":\"stop\"")),
                    "{events:?}"
                );
                ok += 1;
            }
            429 => {
                assert_eq!(reply.header("retry-after"), Some("1"));
                assert_eq!(reply.json()["error"]["type"], "overloaded_error");
                rejected += 1;
            }
            other => panic!("unexpected status {other}: {}", reply.text()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "{CLIENTS} streams: {ok} completed, {rejected} got 429, {tokens} tokens in {elapsed:.2} s ({:.1} tok/s)",
        tokens as f64 / elapsed
    );
    assert_eq!(ok + rejected, CLIENTS);
    assert!(ok >= 64, "only {ok} completed");
    assert!(rejected > 0, "the queue limit never applied");

    let text = server.get("/metrics").text();
    let model = "{model=\"SmolLM2-135M-Instruct\"}";
    assert_eq!(
        metric(&text, &format!("infermux_kv_slots_free{model}")),
        metric(&text, &format!("infermux_kv_slots_total{model}")),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("infermux_running_requests{model}")),
        0.0
    );
    assert_eq!(
        metric(&text, &format!("infermux_waiting_requests{model}")),
        0.0
    );
    assert_eq!(metric(&text, "infermux_http_requests_in_flight"), 0.0);
    assert_eq!(metric(&text, "infermux_http_requests_queued"), 0.0);
    assert_eq!(
        metric(
            &text,
            "infermux_http_requests_total{route=\"/v1/completions\",status=\"429\"}"
        ),
        rejected as f64
    );
    assert!(!text.contains("status=\"5"), "{text}");
}
