//! Shared by `hostile.rs` and `fuzz_wire.rs`: raw HTTP/1.1 exchanges that report a broken
//! reply instead of panicking, and a harness around one `infermux serve` that checks, after a
//! hostile request, that the server still serves the same known-good greedy completion and
//! holds no KV slot, restarting it when a request killed it (so later cases still run).
//!
//! Included with `#[path = "hostile_cases/common.rs"] mod common;` next to
//! `mod server_support;` (this folder has no `main.rs`, so cargo does not build it alone).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server_support::Server;

/// The name the reference model is served under.
pub const MODEL: &str = "SmolLM2-135M-Instruct";

/// A reply as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// At most `n` characters of the body, for messages.
    pub fn snippet(&self, n: usize) -> String {
        let text = self.text();
        if text.chars().count() <= n {
            text
        } else {
            format!("{}…", text.chars().take(n).collect::<String>())
        }
    }
}

/// The bytes of one HTTP/1.1 request with `Host`, `Content-Length` and `Connection: close`
/// (and `Content-Type: application/json` unless `headers` sets a content type).
pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    let sets_length = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    if !sets_length {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Sends `request` on a new connection and reads the reply until the server closes it.
/// The request is written on a helper thread, so a server that answers (413, 431) before
/// reading everything does not block us. `Err` says what went wrong: no connection, nothing
/// came back (a dropped connection), or no reply within `timeout`.
pub fn exchange(addr: &str, request: &[u8], timeout: Duration) -> Result<RawReply, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let request = request.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
        let _ = writer.flush();
    });
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut timed_out = false;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => raw.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                timed_out = true;
                break;
            }
            // A reset after (part of) the reply: keep what came.
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    let _ = sender.join();
    if raw.is_empty() {
        return Err(if timed_out {
            format!("no reply within {:.0} s", started.elapsed().as_secs_f64())
        } else {
            "the connection closed without a reply".into()
        });
    }
    let reply = parse_reply(&raw)?;
    if timed_out && !reply_complete(&reply, &raw) {
        return Err(format!(
            "reply incomplete after {:.0} s (status {})",
            started.elapsed().as_secs_f64(),
            reply.status
        ));
    }
    Ok(reply)
}

/// `exchange` of a JSON `POST`.
pub fn post_json(
    addr: &str,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<RawReply, String> {
    exchange(
        addr,
        &request_bytes("POST", path, &[], body.to_string().as_bytes()),
        timeout,
    )
}

/// `exchange` of a bodiless `GET`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<RawReply, String> {
    exchange(addr, &request_bytes("GET", path, &[], b""), timeout)
}

fn reply_complete(reply: &RawReply, raw: &[u8]) -> bool {
    match reply
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) => reply.body.len() >= n,
        None => raw.ends_with(b"0\r\n\r\n"),
    }
}

fn parse_reply(raw: &[u8]) -> Result<RawReply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            format!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        crate::server_support::dechunk(rest)
    } else {
        rest.to_vec()
    };
    Ok(RawReply {
        status,
        headers,
        body,
    })
}

/// The value of `series` (`name{labels}` as written) in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}

/// Problems with an error body's OpenAI shape: `{"error": {"message": string, "type": string,
/// "param": string|null, "code": string|null}}` — all four keys present, as OpenAI sends them.
pub fn error_shape_problems(v: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(e) = v.get("error").and_then(Value::as_object) else {
        return vec![format!("no `error` object in {v}")];
    };
    match e.get("message").and_then(Value::as_str) {
        Some(m) if !m.trim().is_empty() => {}
        _ => problems.push("`error.message` is not a non-empty string".into()),
    }
    if !e.get("type").is_some_and(Value::is_string) {
        problems.push("`error.type` is not a string".into());
    }
    for key in ["param", "code"] {
        match e.get(key) {
            None => problems.push(format!(
                "`error.{key}` is missing (OpenAI sends it, null if none)"
            )),
            Some(Value::String(_) | Value::Null) => {}
            Some(other) => problems.push(format!("`error.{key}` is {other}, not a string or null")),
        }
    }
    problems
}

/// The known-good request: a greedy completion whose text must not change.
pub fn good_body() -> Value {
    json!({
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 5,
        "temperature": 0,
    })
}

/// The engine gauges that must read "idle" after every request has finished.
const IDLE_GAUGES: [&str; 4] = [
    "infermux_running_requests",
    "infermux_waiting_requests",
    "infermux_running_sequences",
    "infermux_kv_reserved_bytes",
];

/// One `infermux serve` plus what "healthy" means for it.
pub struct Harness {
    pub server: Server,
    extra: Vec<String>,
    /// The known-good completion's text, captured at the first start.
    pub good: String,
    /// How many times a case killed or broke the server and it was started again.
    pub restarts: usize,
    pub timeout: Duration,
}

impl Harness {
    /// Starts the server with `extra` flags and captures the known-good text.
    pub fn start(extra: &[&str]) -> Self {
        let server = Server::start(extra);
        let timeout = Duration::from_secs(120);
        let good = good_text(&server.addr, timeout)
            .unwrap_or_else(|e| panic!("the known-good completion fails on a fresh server: {e}"));
        assert!(!good.is_empty(), "the known-good completion is empty");
        Self {
            server,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            good,
            restarts: 0,
            timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.server.addr
    }

    /// Starts a fresh server (the old one is killed).
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.server = Server::start(&extra);
        self.restarts += 1;
    }

    /// After a hostile request: the server must be up, serve the known-good text and go idle
    /// with every KV slot free. Returns the problems (empty when healthy); restarts the server
    /// when it is dead or broken so the next case starts clean.
    pub fn check_health(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        match good_text(self.addr(), self.timeout) {
            Ok(text) if text == self.good => {}
            Ok(text) => problems.push(format!(
                "known-good completion changed: {text:?} instead of {:?}",
                self.good
            )),
            Err(e) => problems.push(format!("known-good completion failed afterwards: {e}")),
        }
        if problems.is_empty()
            && let Some(leak) = self.idle_problem(Duration::from_secs(30))
        {
            problems.push(leak);
        }
        if !problems.is_empty() {
            self.restart();
        }
        problems
    }

    /// `None` once `/metrics` shows every KV slot free and nothing running or reserved;
    /// otherwise (after `patience`) what it still shows.
    pub fn idle_problem(&self, patience: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            let state = match get(self.addr(), "/metrics", self.timeout) {
                Err(e) => Err(format!("/metrics failed: {e}")),
                Ok(r) if r.status != 200 => Err(format!("/metrics answered {}", r.status)),
                Ok(r) => Ok(idle_state(&r.text())),
            };
            match state {
                Ok(Ok(())) => return None,
                Ok(Err(busy)) | Err(busy) if start.elapsed() >= patience => {
                    return Some(format!(
                        "not idle {:.0} s later: {busy}",
                        patience.as_secs_f64()
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// `Ok` when the exposition shows an idle engine with every KV slot free.
fn idle_state(text: &str) -> Result<(), String> {
    let labels = format!("{{model=\"{MODEL}\"}}");
    let read = |name: &str| {
        metric(text, &format!("{name}{labels}")).ok_or_else(|| format!("no series {name}{labels}"))
    };
    let free = read("infermux_kv_slots_free")?;
    let total = read("infermux_kv_slots_total")?;
    let mut busy = Vec::new();
    if free != total {
        busy.push(format!("KV slots free {free} of {total} (leak)"));
    }
    for name in IDLE_GAUGES {
        let v = read(name)?;
        if v != 0.0 {
            busy.push(format!("{name} = {v}"));
        }
    }
    if busy.is_empty() {
        Ok(())
    } else {
        Err(busy.join(", "))
    }
}

/// The known-good completion's text.
pub fn good_text(addr: &str, timeout: Duration) -> Result<String, String> {
    let reply = post_json(addr, "/v1/completions", &good_body(), timeout)?;
    if reply.status != 200 {
        return Err(format!("status {}: {}", reply.status, reply.snippet(300)));
    }
    reply
        .json()
        .and_then(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .ok_or_else(|| format!("no choices[0].text in {}", reply.snippet(300)))
}
