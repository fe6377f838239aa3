//! Scale-out on loopback: three `infermux serve` replicas (the real binary, real model, candle)
//! behind SGLang's model gateway (`sglang-router` 0.3.2 from `runtimes/py-router`, which
//! `cargo xtask setup` installs; the test fails naming that command when it is missing), all on
//! 127.0.0.1.
//!
//! - 300 concurrent mixed requests (completions, chat, streaming, n = 2) through the router:
//!   each succeeds or is a 429 with `Retry-After`, none is a 5xx, every replica served some;
//! - one replica SIGKILLed mid-load: requests in flight fail cleanly (an error, a 5xx or a cut
//!   stream; never a hang) or are retried by the router; once the router marks it unhealthy
//!   every request succeeds on the other two; a replacement on the same port gets traffic again;
//! - seeded requests (temperature 1) give the same tokens and logprobs from every replica,
//!   directly and through the router;
//! - every replica's `/metrics` passes prometheus_client's strict parser and promtool's lints.
//!
//! Children are killed when their guards drop, on a panic too; each wait has a deadline.

mod scale_out_support;
mod server_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use scale_out_support::{MODEL, Outcome, Replica, Router, call, checked_metrics, served};
use serde_json::{Value, json};

/// Longest any one request may take before it counts as hung.
const REQUEST_DEADLINE: Duration = Duration::from_secs(240);

/// One request of the mixed workload.
#[derive(Debug, Clone)]
struct Req {
    path: &'static str,
    body: Value,
    n: usize,
    stream: bool,
}

/// Request `i` of a mixed workload: completions and chat, plain, streamed and n = 2, greedy
/// and sampled, each with its own prompt.
fn mixed(i: usize, max_tokens: usize) -> Req {
    let prompt = format!("Fact {i}: the number {} is", 3 * i + 1);
    let (n, stream) = match i % 6 {
        0 | 3 => (1, false),
        1 | 4 => (1, true),
        2 => (2, false),
        _ => (2, true),
    };
    let sampled = json!({"temperature": 0.8, "seed": i});
    let mut body = if i % 6 < 3 {
        json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
    } else {
        json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
               "max_tokens": max_tokens})
    };
    if n > 1 || i.is_multiple_of(4) {
        body.as_object_mut()
            .unwrap()
            .extend(sampled.as_object().unwrap().clone());
    }
    if n > 1 {
        body["n"] = json!(n);
    }
    if stream {
        body["stream"] = json!(true);
    }
    Req {
        path: if i % 6 < 3 {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        },
        body,
        n,
        stream,
    }
}

/// What one request came to.
#[derive(Debug)]
enum Verdict {
    /// 200 with a well-formed, complete body.
    Ok,
    /// 429 with `Retry-After`.
    Busy,
    /// The connection failed or the body was cut (a stream without its end).
    Cut(String),
    /// Another status.
    Status(u16, String),
    /// A complete 200 whose body is wrong.
    Wrong(String),
    /// No complete reply within [`REQUEST_DEADLINE`].
    Hung(String),
}

impl Verdict {
    /// The verdict with its detail, for a failure message.
    fn describe(&self) -> String {
        match self {
            Verdict::Ok => "ok".into(),
            Verdict::Busy => "429 with Retry-After".into(),
            Verdict::Cut(e) => format!("cut: {e}"),
            Verdict::Status(s, body) => format!("status {s}: {body}"),
            Verdict::Wrong(e) => format!("wrong: {e}"),
            Verdict::Hung(e) => format!("hung: {e}"),
        }
    }
}

/// Judges `outcome` as the answer to `req`.
fn judge(req: &Req, outcome: Result<Outcome, String>) -> Verdict {
    let out = match outcome {
        Err(e) if e.starts_with("HUNG") => return Verdict::Hung(e),
        Err(e) => return Verdict::Cut(e),
        Ok(out) => out,
    };
    let reply = &out.reply;
    if reply.status == 429 {
        return match reply.header("retry-after") {
            Some(_) => Verdict::Busy,
            None => Verdict::Status(429, format!("no Retry-After: {}", reply.text())),
        };
    }
    if reply.status != 200 {
        return Verdict::Status(reply.status, reply.text());
    }
    if !out.complete {
        return Verdict::Cut(format!("body cut after {} bytes", reply.body.len()));
    }
    let chat = req.path.contains("chat");
    if req.stream {
        let data = reply.sse_data();
        if data.last().map(String::as_str) != Some("[DONE]") {
            return Verdict::Cut(format!("stream without [DONE]: {}", reply.text()));
        }
        let mut finished = vec![false; req.n];
        for d in &data[..data.len() - 1] {
            let Ok(v) = serde_json::from_str::<Value>(d) else {
                return Verdict::Wrong(format!("event is not JSON: {d}"));
            };
            for c in v["choices"].as_array().into_iter().flatten() {
                let index = c["index"].as_u64().unwrap_or(u64::MAX) as usize;
                if index >= req.n {
                    return Verdict::Wrong(format!("choice index {index} of n = {}", req.n));
                }
                finished[index] |= c["finish_reason"].is_string();
            }
        }
        if !finished.iter().all(|f| *f) {
            return Verdict::Wrong(format!("a choice never finished: {}", reply.text()));
        }
        return Verdict::Ok;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&reply.body) else {
        return Verdict::Wrong(format!("not JSON: {}", reply.text()));
    };
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    let text_ok = |c: &Value| {
        if chat {
            c["message"]["content"].is_string()
        } else {
            c["text"].is_string()
        }
    };
    if choices.len() != req.n
        || !choices
            .iter()
            .all(|c| text_ok(c) && c["finish_reason"].is_string())
    {
        return Verdict::Wrong(format!("want {} choices: {v}", req.n));
    }
    Verdict::Ok
}

/// Sends every request of `reqs` to `addr` at once (a thread each) and judges the replies.
fn run_all(addr: &str, reqs: &[Req]) -> Vec<Verdict> {
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|req| {
            let addr = addr.to_string();
            std::thread::spawn(move || {
                let outcome = call(&addr, "POST", req.path, Some(&req.body), REQUEST_DEADLINE);
                judge(&req, outcome)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Verdict::Wrong("client thread panicked".into()))
        })
        .collect()
}

/// How many verdicts of each kind (`Ok`, `Busy`, `Cut`, `Status 5xx`, ...).
fn tally(verdicts: &[Verdict]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for v in verdicts {
        let key = match v {
            Verdict::Ok => "ok".to_string(),
            Verdict::Busy => "429".to_string(),
            Verdict::Cut(_) => "cut".to_string(),
            Verdict::Status(s, _) => format!("status {s}"),
            Verdict::Wrong(_) => "wrong".to_string(),
            Verdict::Hung(_) => "hung".to_string(),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Panics listing the verdicts `allowed` refuses (at most 10 shown).
fn require(phase: &str, verdicts: &[Verdict], allowed: impl Fn(&Verdict) -> bool) {
    let bad: Vec<String> = verdicts
        .iter()
        .filter(|v| !allowed(v))
        .map(Verdict::describe)
        .collect();
    assert!(
        bad.is_empty(),
        "{phase}: {} of {} requests failed ({:?}); first:\n{}",
        bad.len(),
        verdicts.len(),
        tally(verdicts),
        bad[..bad.len().min(10)].join("\n")
    );
}

/// Each replica's count of successful completions/chat replies, in order.
fn counts(python: &Path, replicas: &[&Replica]) -> Vec<f64> {
    replicas.iter().map(|r| served(python, &r.addr())).collect()
}

/// The choices of a seeded reply (the id and timestamp differ per replica).
fn seeded_choices(addr: &str, path: &str, body: &Value) -> Value {
    let out = call(addr, "POST", path, Some(body), REQUEST_DEADLINE)
        .unwrap_or_else(|e| panic!("seeded request to {addr}: {e}"));
    assert_eq!(out.reply.status, 200, "{}", out.reply.text());
    out.reply.json()["choices"].clone()
}

#[test]
fn replicas_behind_sglang_router() {
    let started = Instant::now();
    let python = scale_out_support::router_python();
    let ports: Vec<u16> = (0..3).map(|_| scale_out_support::free_port()).collect();
    let mut replicas: Vec<Replica> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| Replica::start(p, &format!("replica-{i}")))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    let mut router = Router::start(&python, &urls, "round_robin");
    let took = router.wait_workers(&urls, &[], Duration::from_secs(120));
    eprintln!("router up, 3 workers healthy after {took:?}");
    let raddr = router.addr();

    // 1. 300 concurrent mixed requests through the router.
    let reqs: Vec<Req> = (0..300).map(|i| mixed(i, 8)).collect();
    let t = Instant::now();
    let verdicts = run_all(&raddr, &reqs);
    eprintln!("mixed load: {:?} in {:?}", tally(&verdicts), t.elapsed());
    require("300 mixed requests", &verdicts, |v| {
        matches!(v, Verdict::Ok | Verdict::Busy)
    });
    let served_by = counts(&python, &replicas.iter().collect::<Vec<_>>());
    eprintln!("served per replica: {served_by:?}");
    assert!(
        served_by.iter().all(|&c| c > 0.0),
        "a replica served nothing: {served_by:?}"
    );

    // 2. SIGKILL one replica while it has requests in flight.
    let victim = 1;
    let load: Vec<Req> = (1000..1060).map(|i| mixed(i, 48)).collect();
    let load_addr = raddr.clone();
    let in_flight = std::thread::spawn(move || run_all(&load_addr, &load));
    let victim_addr = replicas[victim].addr();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let busy: f64 = checked_metrics(&python, &victim_addr)
            .iter()
            .filter(|s| s.name == "infermux_http_requests_in_flight")
            .map(|s| s.value)
            .sum();
        if busy >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim never had requests in flight"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = replicas[victim].guard.pid();
    replicas[victim].guard.kill();
    eprintln!("SIGKILLed replica {victim} (pid {pid}) mid-load");
    let verdicts = in_flight.join().expect("load thread");
    eprintln!("load across the kill: {:?}", tally(&verdicts));
    require("requests across the kill", &verdicts, |v| match v {
        Verdict::Ok | Verdict::Busy | Verdict::Cut(_) => true,
        Verdict::Status(s, _) => *s >= 500,
        Verdict::Wrong(_) | Verdict::Hung(_) => false,
    });
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, u)| u.clone())
        .collect();
    let took = router.wait_workers(&survivors, &[urls[victim].clone()], Duration::from_secs(60));
    eprintln!("router marked the victim unhealthy {took:?} after the load ended");
    let before = counts(&python, &[&replicas[0], &replicas[2]]);
    let reqs: Vec<Req> = (2000..2030).map(|i| mixed(i, 8)).collect();
    let verdicts = run_all(&raddr, &reqs);
    require("requests after the kill", &verdicts, |v| {
        matches!(v, Verdict::Ok)
    });
    let after = counts(&python, &[&replicas[0], &replicas[2]]);
    let moved: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert!(
        moved >= 30.0,
        "the survivors served {moved} of 30 requests ({before:?} -> {after:?})"
    );

    // 3. A replacement on the victim's port is taken back into rotation.
    let mut replacement = None;
    for attempt in 0..10 {
        replacement = Replica::try_start(
            ports[victim],
            &format!("replica-{victim}-replacement-{attempt}"),
            Duration::from_secs(180),
        );
        if replacement.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    replicas[victim] = replacement.expect("a replacement on the victim's port");
    let took = router.wait_workers(&urls, &[], Duration::from_secs(120));
    eprintln!("replacement healthy in the router after {took:?}");
    let reqs: Vec<Req> = (3000..3030).map(|i| mixed(i, 8)).collect();
    let verdicts = run_all(&raddr, &reqs);
    require("requests after the replacement", &verdicts, |v| {
        matches!(v, Verdict::Ok)
    });
    let fresh = served(&python, &replicas[victim].addr());
    assert!(fresh > 0.0, "the replacement got no traffic");
    eprintln!("replacement served {fresh} of 30");

    // 4. Seeded requests: the same tokens from every replica, directly and through the router.
    let seeded = [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon a time, in a small village,",
                   "max_tokens": 16, "temperature": 1.0, "seed": 1234, "logprobs": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a color."}],
                   "max_tokens": 16, "temperature": 1.0, "seed": 99, "n": 2,
                   "logprobs": true, "top_logprobs": 2}),
        ),
    ];
    for (path, body) in &seeded {
        let want = seeded_choices(&replicas[0].addr(), path, body);
        for r in &replicas[1..] {
            assert_eq!(
                seeded_choices(&r.addr(), path, body),
                want,
                "{path} from {} differs from replica 0",
                r.url()
            );
        }
        let before = counts(&python, &replicas.iter().collect::<Vec<_>>());
        for _ in 0..6 {
            assert_eq!(
                seeded_choices(&raddr, path, body),
                want,
                "{path} through the router differs"
            );
        }
        let after = counts(&python, &replicas.iter().collect::<Vec<_>>());
        assert!(
            after.iter().zip(&before).all(|(a, b)| a > b),
            "the router did not send {path} to every replica ({before:?} -> {after:?})"
        );
    }

    // 5. Every replica's exposition passes the strict parser and lints; our families are there.
    for r in &replicas {
        let samples = checked_metrics(&python, &r.addr());
        for family in [
            "infermux_http_requests_total",
            "infermux_running_requests",
            "infermux_request_latency_seconds_bucket",
        ] {
            assert!(
                samples.iter().any(|s| s.name == family),
                "{} has no {family}",
                r.url()
            );
        }
    }
    assert!(
        router.workers().len() == 3,
        "router lost a worker: {:?}",
        router.workers()
    );
    let total = started.elapsed();
    eprintln!("scale-out test took {total:?}");
    assert!(
        total < Duration::from_secs(900),
        "the scale-out test took {total:?}"
    );
}
