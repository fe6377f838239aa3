//! What the benchmarks that drive `infermux serve` over loopback HTTP share: starting a
//! server and waiting for it, one blocking JSON request, and the machine facts a report
//! names (CPU, load, commit).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{cargo, run_status};

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the release `infermux` binary (CLI feature) and returns its path.
pub fn build_infermux(root: &Path) -> Result<PathBuf> {
    let mut build = cargo();
    build.current_dir(root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "infermux",
        "--features",
        "cli",
        "--bin",
        "infermux",
    ]);
    run_status(&mut build)?;
    Ok(target_dir(root).join("release/infermux"))
}

/// The cargo target folder (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// Starts `cmd` (an `infermux serve` without `--host`/`--port`) on a free loopback port, its
/// stderr into `log`; waits for its `listening on` line and returns it with its address.
pub fn serve(mut cmd: Command, log: &Path) -> Result<(Proc, String)> {
    let port = free_port()?;
    cmd.args(["--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?);
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("server stdout")?;
    let proc = Proc(child);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = format!("127.0.0.1:{port}");
    ensure!(
        String::from_utf8_lossy(&line).trim() == format!("listening on http://{addr}"),
        "the server did not start (see {})",
        log.display()
    );
    Ok((proc, addr))
}

/// One HTTP/1.1 request (`Connection: close`, loopback); the status and the JSON body.
pub fn request(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    request_as(addr, method, path, body, None)
}

/// [`request`] with `Authorization: Bearer KEY` when `key` is given.
pub fn request_as(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Result<(u16, Value)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP reply head")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked reply to {path}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let value = serde_json::from_slice(&raw[split + 4..]).unwrap_or(Value::Null);
    Ok((status, value))
}

/// A port on 127.0.0.1 nothing listens on now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The CPU model as `lscpu` names it.
pub fn cpu_model() -> String {
    let out = Command::new("lscpu").output().ok();
    out.and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_string()))
    })
    .unwrap_or_else(|| "unknown".into())
}

/// The stdout of `cmd args` trimmed, or `unknown`.
pub fn stdout_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The 1-minute load average (`/proc/loadavg`): other work on the machine skews the figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The `q` quantile of sorted `xs`.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

/// The median of `xs` (any order).
pub fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, 0.5)
}

/// "commit `abc1234`", with "with uncommitted changes" when tracked files differ from it.
pub fn commit_line(root: &Path) -> String {
    let root = root.to_string_lossy();
    let commit = stdout_of("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let dirty = stdout_of(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    );
    if dirty.is_empty() {
        format!("commit `{commit}`")
    } else {
        format!("commit `{commit}` with uncommitted changes")
    }
}

/// Today's date (UTC), for a report's first line.
pub fn today() -> String {
    stdout_of("date", &["-u", "+%Y-%m-%d"])
}
