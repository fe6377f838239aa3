//! Helpers of the scale-out test: `infermux serve` replicas and sglang-router (from
//! `runtimes/py-router`) as child processes on 127.0.0.1, each killed when its guard drops
//! (panics included), an HTTP/1.1 client that tells a complete reply from a cut one and never
//! waits past a deadline, and the Prometheus check (`check_metrics.py` in the venv's Python).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::server_support::{Reply, model_dir};

/// The name the replicas serve the model under.
pub const MODEL: &str = "scale-out";

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's Python with sglang-router and prometheus_client; fails naming the xtask command
/// that installs them when they are missing.
pub fn router_python() -> PathBuf {
    let python = repo_root().join("runtimes/py-router/bin/python");
    let ok = python.is_file()
        && Command::new(&python)
            .args([
                "-c",
                "import sglang_router.launch_router, prometheus_client.parser",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} lacks sglang-router / prometheus_client: run `cargo xtask setup` to install them",
        python.display()
    );
    python
}

/// A folder for the children's logs (kept after the run for a look at a failure).
pub fn log_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port on 127.0.0.1 nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// The last lines of a log file, for a failure message.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guard {
    child: Option<Child>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Guard {
    /// Spawns `cmd` with its stderr into `log`.
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Self {
            child: Some(child),
            log,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the child has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            None => Some("killed".into()),
            _ => None,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `infermux serve` on `127.0.0.1:port`.
pub struct Replica {
    pub guard: Guard,
    pub port: u16,
}

/// The flags every replica gets (besides model, backend, host and port).
pub const REPLICA_FLAGS: &[&str] = &[
    "--served-model-name",
    MODEL,
    "--max-num-seqs",
    "8",
    "--max-concurrent-requests",
    "16",
    "--max-queue",
    "64",
    "--kv-cache-memory-bytes",
    "256MiB",
];

impl Replica {
    /// Starts a replica on `port` and waits (at most `timeout`) for its `listening on` line;
    /// `None` when it exits first (e.g. the port is still taken).
    pub fn try_start(port: u16, name: &str, timeout: Duration) -> Option<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermux"));
        cmd.args(["serve", "--model"])
            .arg(model_dir())
            .args(["--backend", "candle", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(REPLICA_FLAGS)
            .stdout(Stdio::piped());
        let log = log_dir("scale-out").join(format!("{name}.log"));
        let mut guard = Guard::spawn(cmd, log);
        let stdout = guard.child.as_mut().and_then(|c| c.stdout.take()).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the server never writes into a closed pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(timeout).unwrap_or_default();
        let want = format!("listening on http://127.0.0.1:{port}");
        if line.trim() == want {
            return Some(Self { guard, port });
        }
        let exit_by = Instant::now() + Duration::from_secs(5);
        while guard.exited().is_none() && Instant::now() < exit_by {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            guard.exited().is_some(),
            "replica {name} did not print {want:?} within {timeout:?} (got {line:?}); log {}:\n{}",
            guard.log.display(),
            tail(&guard.log)
        );
        None
    }

    /// [`Replica::try_start`] that panics (with the log) when the replica does not come up.
    pub fn start(port: u16, name: &str) -> Self {
        Self::try_start(port, name, Duration::from_secs(180)).unwrap_or_else(|| {
            let log = log_dir("scale-out").join(format!("{name}.log"));
            panic!(
                "replica {name} exited; log {}:\n{}",
                log.display(),
                tail(&log)
            )
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }
}

/// sglang-router on `127.0.0.1:port`, its Prometheus exporter on `127.0.0.1:metrics_port`.
pub struct Router {
    pub guard: Guard,
    pub port: u16,
    pub metrics_port: u16,
}

/// Seconds between the router's health checks (3 failures mark a worker unhealthy, 2
/// successes healthy again).
pub const HEALTH_INTERVAL_SECS: u64 = 1;

impl Router {
    /// Starts the router in front of `workers` (URLs) with `policy`; returns once its port
    /// answers (workers may still be registering: see [`Router::wait_workers`]).
    pub fn start(python: &Path, workers: &[String], policy: &str) -> Self {
        let port = free_port();
        let metrics_port = free_port();
        let mut cmd = Command::new(python);
        cmd.args(["-m", "sglang_router.launch_router", "--worker-urls"])
            .args(workers)
            .args(["--policy", policy, "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
            .arg(metrics_port.to_string())
            .arg("--health-check-interval-secs")
            .arg(HEALTH_INTERVAL_SECS.to_string())
            .args(["--health-check-timeout-secs", "5"])
            .args(["--worker-startup-timeout-secs", "120"])
            // Its breaker counts 429s (and the dead worker's refusals) and benches a worker for
            // 60 s, long past the replacement's start; health checks take a dead one out.
            .arg("--disable-circuit-breaker")
            .args(["--log-level", "warn"])
            .stdout(Stdio::null());
        let log = log_dir("scale-out").join("router.log");
        let mut router = Self {
            guard: Guard::spawn(cmd, log),
            port,
            metrics_port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(router.addr()).is_err() {
            router.check_alive_until(deadline, "its port to open");
            std::thread::sleep(Duration::from_millis(200));
        }
        router
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Panics (with the log) when the router has exited or `deadline` has passed.
    fn check_alive_until(&mut self, deadline: Instant, what: &str) {
        let exited = self.guard.exited();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "sglang-router {} waiting for {what}; log {}:\n{}",
            exited.map_or("timed out".into(), |s| format!("exited ({s})")),
            self.guard.log.display(),
            tail(&self.guard.log)
        );
    }

    /// `GET /workers`: each registered worker's URL and whether the router counts it healthy.
    pub fn workers(&self) -> Vec<(String, bool)> {
        let Ok(reply) = call(
            &self.addr(),
            "GET",
            "/workers",
            None,
            Duration::from_secs(10),
        ) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_slice::<Value>(&reply.reply.body) else {
            return Vec::new();
        };
        v["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                (
                    w["url"].as_str().unwrap_or_default().to_string(),
                    w["is_healthy"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    }

    /// Waits until `/workers` lists exactly `healthy` as healthy and `unhealthy` as not (URLs),
    /// at most `timeout`; returns how long it took.
    pub fn wait_workers(
        &mut self,
        healthy: &[String],
        unhealthy: &[String],
        timeout: Duration,
    ) -> Duration {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let workers = self.workers();
            let state = |url: &String| workers.iter().find(|(u, _)| u == url).map(|(_, h)| *h);
            if healthy.iter().all(|u| state(u) == Some(true))
                && unhealthy.iter().all(|u| state(u) == Some(false))
                && workers.len() == healthy.len() + unhealthy.len()
            {
                return start.elapsed();
            }
            self.check_alive_until(
                deadline,
                &format!("healthy {healthy:?}, unhealthy {unhealthy:?} (now {workers:?})"),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A reply and whether its body arrived whole (the declared length, or the last chunk).
#[derive(Debug)]
pub struct Outcome {
    pub reply: Reply,
    pub complete: bool,
}

/// One request (`Connection: close`) to `addr`; `Err` on a refused or reset connection, a
/// reply that is not HTTP, or a reply not finished within `deadline` (the message says which).
pub fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    deadline: Duration,
) -> Result<Outcome, String> {
    let start = Instant::now();
    let sock: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let mut read_error = None;
    loop {
        if start.elapsed() > deadline {
            return Err(format!(
                "HUNG: no complete reply within {deadline:?} ({} bytes so far)",
                raw.len()
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(format!(
            "no reply head ({} bytes; {})",
            raw.len(),
            read_error.unwrap_or_else(|| "closed".into())
        ));
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let (body, complete) = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        (rest[..rest.len().min(len)].to_vec(), rest.len() >= len)
    } else {
        (rest.to_vec(), read_error.is_none())
    };
    Ok(Outcome {
        reply: Reply {
            status,
            headers,
            body,
        },
        complete,
    })
}

/// A chunked body and whether its last (zero) chunk arrived.
fn dechunk(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
        else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        if data.len() < eol + 2 + size {
            out.extend_from_slice(&data[eol + 2..]);
            return (out, false);
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
}

/// One sample of a Prometheus exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

/// Fetches `addr`'s `/metrics` and checks it with `check_metrics.py` (prometheus_client's
/// strict text parser plus promtool's lints); panics naming the problems, returns the samples.
pub fn checked_metrics(python: &Path, addr: &str) -> Vec<Sample> {
    let reply = call(addr, "GET", "/metrics", None, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(reply.reply.status, 200, "{}", reply.reply.text());
    assert!(reply.complete, "cut /metrics reply from {addr}");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scale_out_support/check_metrics.py");
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running check_metrics.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&reply.reply.body)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "/metrics of {addr} fails the Prometheus check:\n{}\n--- exposition:\n{}",
        String::from_utf8_lossy(&out.stderr),
        reply.reply.text()
    );
    let rows: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).expect("check_metrics.py prints JSON");
    rows.into_iter()
        .map(|(name, labels, value)| Sample {
            name,
            labels,
            value,
        })
        .collect()
}

/// Successful (200) completions and chat replies a replica counted, from its checked
/// `/metrics`.
pub fn served(python: &Path, addr: &str) -> f64 {
    checked_metrics(python, addr)
        .iter()
        .filter(|s| s.name == "infermux_http_requests_total")
        .filter(|s| {
            matches!(
                s.labels.get("route").and_then(Value::as_str),
                Some("/v1/completions" | "/v1/chat/completions")
            ) && s.labels.get("status").and_then(Value::as_str) == Some("200")
        })
        .map(|s| s.value)
        .sum()
}
