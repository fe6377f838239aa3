//! Test helpers for `infermux serve`: start the real binary on 127.0.0.1:0 and talk HTTP/1.1
//! over a plain `TcpStream` (no client library).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// The reference model folder.
pub fn model_dir() -> PathBuf {
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

/// A running `infermux serve`; killed on drop.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Server {
    /// Starts `infermux serve --model <reference> --backend candle --port 0 <extra>` and waits
    /// for its `listening on http://...` line.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on("candle", extra)
    }

    /// [`Server::start`] on `backend`.
    pub fn start_on(backend: &str, extra: &[&str]) -> Self {
        let model = model_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_infermux"))
            .args(["serve", "--model"])
            .arg(&model)
            .args(["--backend", backend, "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting infermux serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, addr }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A request; returns the parsed reply.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        request(&self.addr, method, path, body)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// `POST path` with a JSON body and `Authorization: Bearer KEY` (the control routes).
    pub fn post_as(&self, key: &str, path: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {key}");
        let body = body.to_string();
        request_with(
            &self.addr,
            "POST",
            path,
            &[("Authorization", &auth)],
            Some(body.as_bytes()),
        )
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None)
    }

    /// The value of the sample `name{labels}` in `/metrics` (labels as written, or none).
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text();
        metric(&text, series)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// An HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body, in order (`[DONE]` included).
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|event| event.trim().strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Sends one request (`Connection: close`) and reads the whole reply (chunked bodies decoded).
pub fn request(addr: &str, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    request_with(addr, method, path, &[], body)
}

/// [`request`] with extra header lines (`name`, `value`).
pub fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading the whole body; ignore a reset while sending.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// The body of a `Transfer-Encoding: chunked` reply (stops at the last chunk or bad input).
pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
}

/// Sends `raw` bytes as they are and parses whatever reply comes back.
pub fn raw_request(addr: &str, raw: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = stream.write_all(raw);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    parse_reply(&out)
}

/// Sends one request and returns the raw reply bytes (head and body as they came).
pub fn raw_reply(addr: &str, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

/// Writes a PEFT adapter for SmolLM2-135M (hidden 576, k/v 192, 30 layers): rank 4 on q and v.
pub fn write_adapter(dir: &Path, salt: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut state = 0x9E37_79B9u32.wrapping_mul(salt + 1);
    let mut add = |name: String, shape: [usize; 2]| {
        let begin = data.len();
        for _ in 0..shape[0] * shape[1] {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let v = (state as f32 / u32::MAX as f32 - 0.5) * 0.15;
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name,
            json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    };
    for layer in 0..30 {
        for (module, out) in [("q_proj", 576), ("v_proj", 192)] {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            add(format!("{base}.lora_A.weight"), [4, 576]);
            add(format!("{base}.lora_B.weight"), [out, 4]);
        }
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("adapter_model.safetensors"), file).unwrap();
    let config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}
