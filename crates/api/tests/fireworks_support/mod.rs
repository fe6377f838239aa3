//! Helpers of the Fireworks SDK test: the venv's Python with `fireworks-ai` (fails naming the
//! xtask command that installs it), and `driver.py`, run with a job on stdin and a deadline,
//! its JSON answer parsed.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `runtimes/py-sdks`' Python, checked to import the SDK's `DeploymentSampler` and
/// transformers' `AutoTokenizer`; panics naming `cargo xtask setup` when it cannot.
pub fn sdk_python() -> PathBuf {
    let python = repo_root().join("runtimes/py-sdks/bin/python");
    let ok = python.is_file()
        && Command::new(&python)
            .args([
                "-c",
                "from fireworks.training.sdk import DeploymentSampler; from transformers import AutoTokenizer",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import fireworks-ai's DeploymentSampler: run `cargo xtask setup` to install \
         runtimes/py-sdks",
        python.display()
    );
    python
}

/// Runs `driver.py` with `job` on stdin; its stdout parsed as JSON. Panics (with its stderr)
/// when it fails or runs past `deadline`, killing it then.
pub fn run_driver(job: &Value, deadline: Duration) -> Value {
    let python = sdk_python();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fireworks_support/driver.py");
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fireworks-driver-{}.log",
        job["mode"].as_str().unwrap_or("job")
    ));
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        // Loopback only: no proxy in between, and no model hub behind the tokenizer.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1");
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().expect("starting driver.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "driver.py ran past {deadline:?}; its log {}:\n{}",
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "driver.py failed ({status}); stderr:\n{stderr}"
    );
    eprintln!(
        "driver.py ({}) took {:.1} s",
        job["mode"],
        start.elapsed().as_secs_f64()
    );
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "driver.py's output is not JSON ({e}): {}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out)
        )
    })
}

/// One `SampledCompletion` as the SDK returned it.
#[derive(Debug, Clone, Deserialize)]
pub struct SdkCompletion {
    pub text: String,
    pub full_tokens: Vec<u32>,
    pub prompt_len: usize,
    pub finish_reason: String,
    pub completion_len: usize,
    pub inference_logprobs: Option<Vec<f64>>,
    pub sampling_logprobs: Option<Vec<Option<f64>>>,
    pub logprobs_echoed: bool,
}

/// One transport attempt the SDK recorded (`drain_metrics`).
#[derive(Debug, Clone, Deserialize)]
pub struct Attempt {
    pub status: Option<u16>,
    pub attempt: Option<u32>,
    pub error: Option<String>,
}

/// One parity case's SDK answer.
#[derive(Debug, Clone, Deserialize)]
pub struct SdkCase {
    pub completions: Vec<SdkCompletion>,
    pub seconds: f64,
    pub attempts: Vec<Attempt>,
}

/// An error reply as the SDK surfaced it (`httpx.HTTPStatusError`), or what it raised instead.
#[derive(Debug, Clone, Deserialize)]
pub struct SdkError {
    pub status: Option<u16>,
    pub body: Option<Value>,
    pub unexpected: Option<String>,
    pub seconds: f64,
}

/// The parity job's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Parity {
    /// Each case's prompt, as the SDK's tokenizer call made it.
    pub prompts: Vec<Vec<u32>>,
    pub cases: Vec<SdkCase>,
    pub wrong_key: SdkError,
    pub unknown_model: SdkError,
}

/// One request of the load job that succeeded.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadOk {
    pub index: usize,
    pub completions: Vec<SdkCompletion>,
}

/// One request of the load job that failed, with the SDK's exception.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadFailed {
    pub index: usize,
    pub error: String,
}

/// The load job's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Load {
    pub ok: Vec<LoadOk>,
    pub failed: Vec<LoadFailed>,
    pub attempts: Vec<Attempt>,
    pub seconds: f64,
}
