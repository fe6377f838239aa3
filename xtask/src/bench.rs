//! `cargo xtask bench`: an end-to-end workload through the public API on each backend, one
//! process per backend (so its peak RSS is its own), next to Hugging Face transformers as the
//! peer when `runtimes/py` has it; results as Markdown, JSON and an SVG chart, every figure
//! also as a ratio to the peer measured in the same run, plus this machine's memory-bandwidth
//! ceiling for batch-1 decode.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::conformance::{backend_features, runtime_env};
use crate::setup::Components;
use crate::{cargo, setup_all};

/// The Python peer script, relative to the repository root.
const PEER_SCRIPT: &str = "xtask/peer_bench.py";
/// The reference stack's venv (`cargo xtask setup` creates it).
const PEER_PYTHON: &str = "runtimes/py/bin/python";
/// Goldens whose tokens make the workload's prompts (real text, not random ids).
const CORPUS: &str = "tests/data/goldens/smollm2-135m-instruct.json";

/// Flags of `cargo xtask bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Backends to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "candle,torch,onnx")]
    pub backends: Vec<String>,
    /// `f32`, `bf16` or `f16` (the peer always runs f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// `cpu` or `cuda` (the peer always runs on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A short smoke run: few tokens, small scoring batch, one repeat; writes to target/bench.
    #[arg(long)]
    pub quick: bool,
    /// Output folder (default: docs/bench, or target/bench with --quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the transformers peer.
    #[arg(long)]
    pub no_peer: bool,
    /// Python with torch + transformers for the peer (default: runtimes/py).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Threads of the peer (torch.set_num_threads, llama.cpp's n_threads).
    #[arg(long, default_value_t = 2)]
    pub peer_threads: usize,
    /// Run GGUF files of these types instead (Q4_1 as shipped, Q8_0, F16, Q4_K_M; see
    /// `cargo xtask setup`) next to llama.cpp on the same files (runtimes/py-llamacpp, made by
    /// `cargo xtask setup --llama-cpp`) → gguf.md. Backends that refuse GGUF are reported so.
    #[arg(long, value_delimiter = ',')]
    pub gguf: Vec<String>,
}

/// Sizes of one workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    pub decode_tokens: usize,
    pub decode_batches: [usize; 3],
    pub decode_prompt_len: usize,
    pub prefill_len: usize,
    /// Sequences scored together, and their length.
    pub scoring: (usize, usize),
    pub repeats: usize,
}

impl Shape {
    pub(crate) const FULL: Shape = Shape {
        decode_tokens: 64,
        decode_batches: [1, 8, 32],
        decode_prompt_len: 16,
        prefill_len: 512,
        scoring: (32, 256),
        repeats: 2,
    };
    pub(crate) const QUICK: Shape = Shape {
        decode_tokens: 8,
        decode_batches: [1, 8, 32],
        decode_prompt_len: 16,
        prefill_len: 512,
        scoring: (8, 128),
        repeats: 1,
    };
}

/// The metrics of a result object, in table order: key, label, unit, whether lower is better.
const METRICS: [(&str, &str, &str, bool); 7] = [
    ("decode_b1_tok_s", "decode, 1 stream", "tok/s", false),
    ("decode_b8_tok_s", "decode, 8 concurrent", "tok/s", false),
    ("decode_b32_tok_s", "decode, 32 concurrent", "tok/s", false),
    ("prefill_tok_s", "prefill", "tok/s", false),
    ("scoring_s", "scoring", "s", true),
    ("peak_rss_mib", "peak RSS", "MiB", true),
    ("load_s", "load", "s", true),
];

/// Runs the workload on each backend and the peer, then writes and prints the results.
pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    if !args.gguf.is_empty() {
        return crate::bench_gguf::run(root, args);
    }
    let backends = crate::conformance::normalize_backends(&args.backends)?;
    let components = Components {
        torch: backends.iter().any(|b| b == "torch"),
        onnx: backends.iter().any(|b| b == "onnx"),
    };
    let model = setup_all(root, components)?;
    let (shape, out_dir) = shape_and_out_dir(root, args)?;
    let workload = workload(root, &shape)?;
    let workload_path = root.join("target/bench-workload.json");
    std::fs::write(&workload_path, serde_json::to_string(&workload)?)?;

    eprintln!("measuring memory bandwidth…");
    let bandwidth = measure_bandwidth();
    let weight_bytes = weight_bytes(&model.join("model.safetensors"), &args.dtype)?;
    let ceiling = bandwidth.read_gbs * 1e9 / weight_bytes as f64;

    // Build once (release: no debug assertions) with every requested backend, then one
    // process per backend.
    let features = backend_features(&backends);
    build_bench_bin(root, &features)?;
    let mut results = Vec::new();
    for backend in &backends {
        let run = BenchRun {
            backend,
            dtype: &args.dtype,
            device: &args.device,
            workload: &workload_path,
            model: &model,
            gguf: None,
        };
        eprintln!("benchmarking {backend}…");
        match run.run(root, &features, components) {
            Ok(v) => results.push(v),
            Err(e) => eprintln!("{backend}: {e:#}"),
        }
    }
    let peer = if args.no_peer {
        None
    } else {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| root.join(PEER_PYTHON));
        if python.is_file() {
            let mut cmd = Command::new(&python);
            cmd.current_dir(root)
                .arg(PEER_SCRIPT)
                .arg("--model")
                .arg(&model)
                .arg("--workload")
                .arg(&workload_path)
                .arg("--threads")
                .arg(args.peer_threads.to_string());
            eprintln!("benchmarking the peer (transformers)…");
            match json_line(&mut cmd) {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("peer: {e:#}");
                    None
                }
            }
        } else {
            eprintln!(
                "no peer: {} missing (run `cargo xtask setup` to create it)",
                python.display()
            );
            None
        }
    };
    if results.is_empty() {
        bail!("no backend produced results");
    }

    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model(),
        "read_bandwidth_gb_s": bandwidth.read_gbs,
        "copy_bandwidth_gb_s": bandwidth.copy_gbs,
        "weight_bytes_per_decode_step": weight_bytes,
        "decode_b1_ceiling_tok_s": ceiling,
    });
    let report = json!({
        "quick": args.quick,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "dtype": args.dtype,
        "device": args.device,
        "workload": {
            "decode_tokens": shape.decode_tokens,
            "decode_prompt_len": shape.decode_prompt_len,
            "decode_batches": shape.decode_batches,
            "prefill_tokens": shape.prefill_len,
            "scoring": format!("{}x{}", shape.scoring.0, shape.scoring.1),
            "repeats": shape.repeats,
        },
        "machine": machine,
        "results": results,
        "peer": peer,
    });
    let markdown = markdown(&report);
    std::fs::write(out_dir.join("results.md"), &markdown)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(out_dir.join("chart.svg"), svg_chart(&report))?;
    println!("{markdown}");
    eprintln!(
        "written: {}/{{results.md, results.json, chart.svg}}",
        out_dir.display()
    );
    Ok(())
}

/// The workload's sizes (`--quick` or full) and the output folder (created).
pub(crate) fn shape_and_out_dir(root: &Path, args: &BenchArgs) -> Result<(Shape, PathBuf)> {
    let shape = if args.quick {
        Shape::QUICK
    } else {
        Shape::FULL
    };
    let out_dir = args.out.clone().unwrap_or_else(|| {
        root.join(if args.quick {
            "target/bench"
        } else {
            "docs/bench"
        })
    });
    std::fs::create_dir_all(&out_dir)?;
    Ok((shape, out_dir))
}

/// `cargo <verb> --release` of the bench binary with `features`.
fn bench_bin(root: &Path, verb: &str, features: &[String]) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(root).args([
        verb,
        "--quiet",
        "--release",
        "-p",
        "infermux-tests",
        "--bin",
        "infermux-bench",
    ]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    cmd
}

/// `cargo build --release` of the bench binary with `features`.
pub(crate) fn build_bench_bin(root: &Path, features: &[String]) -> Result<()> {
    crate::run_status(&mut bench_bin(root, "build", features))
}

/// One backend's run of the bench binary (in a process of its own).
pub(crate) struct BenchRun<'a> {
    pub backend: &'a str,
    pub dtype: &'a str,
    pub device: &'a str,
    pub workload: &'a Path,
    /// The reference model folder (the environment of the tests' helpers).
    pub model: &'a Path,
    /// A GGUF file to run instead of the folder.
    pub gguf: Option<&'a Path>,
}

impl BenchRun<'_> {
    /// Runs it and returns its result object.
    pub(crate) fn run(
        &self,
        root: &Path,
        features: &[String],
        components: Components,
    ) -> Result<Value> {
        let mut cmd = bench_bin(root, "run", features);
        cmd.args(["--", "--backend", self.backend, "--dtype", self.dtype])
            .args(["--device", self.device, "--workload"])
            .arg(self.workload);
        if let Some(file) = self.gguf {
            cmd.arg("--model").arg(file);
        }
        runtime_env(&mut cmd, root, self.model, components);
        json_line(&mut cmd)
    }
}

/// Runs `cmd` (stderr inherited) and parses the last line of its stdout as JSON.
pub(crate) fn json_line(cmd: &mut Command) -> Result<Value> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed with {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line in the output")?;
    serde_json::from_str(line).context("parsing the result line")
}

/// The workload's token ids, cut from the goldens' prompts and continuations (real text).
pub(crate) fn workload(root: &Path, shape: &Shape) -> Result<Value> {
    let text = std::fs::read_to_string(root.join(CORPUS)).context("reading the goldens")?;
    let goldens: Value = serde_json::from_str(&text)?;
    let mut corpus: Vec<u64> = Vec::new();
    for case in goldens["cases"]
        .as_array()
        .context("goldens without cases")?
    {
        for key in ["prompt_tokens", "greedy_tokens"] {
            corpus.extend(
                case[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64),
            );
        }
    }
    if corpus.is_empty() {
        bail!("empty corpus");
    }
    let window = |start: usize, len: usize| -> Vec<u64> {
        (0..len)
            .map(|i| corpus[(start + i) % corpus.len()])
            .collect()
    };
    let max_batch = shape.decode_batches.iter().copied().max().unwrap_or(1);
    Ok(json!({
        "decode_tokens": shape.decode_tokens,
        "decode_batches": shape.decode_batches,
        "decode_prompts": (0..max_batch).map(|i| window(i * 29, shape.decode_prompt_len)).collect::<Vec<_>>(),
        "prefill_prompt": window(7, shape.prefill_len),
        "scoring_prompts": (0..shape.scoring.0).map(|i| window(i * 53 + 3, shape.scoring.1)).collect::<Vec<_>>(),
        "repeats": shape.repeats,
    }))
}

/// Measured memory bandwidth in GB/s (10⁹ bytes per second).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bandwidth {
    /// Streaming reads (a wrapping sum over a large array), best over 1..=cpus threads.
    pub read_gbs: f64,
    /// `copy_from_slice` between two large arrays, counting bytes read plus written.
    pub copy_gbs: f64,
}

/// Streams a 1 GiB array (beyond any last-level cache; this machine reports 300 MiB) with 1 and
/// with all threads; best of 5. Each thread reads four streams at once, as a matmul sweeping
/// several weight rows does: one stream alone leaves the prefetchers idle part of the time.
pub(crate) fn measure_bandwidth() -> Bandwidth {
    const WORDS: usize = 128 << 20; // 1 GiB of u64
    let src: Vec<u64> = (0..WORDS as u64).collect();
    let mut dst = vec![0u64; WORDS];
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let bytes = (WORDS * 8) as f64;
    let mut read_gbs = 0.0f64;
    let mut copy_gbs = 0.0f64;
    for threads in [1, cpus] {
        let chunk = WORDS.div_ceil(threads);
        for _ in 0..5 {
            let start = Instant::now();
            let sum: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = src
                    .chunks(chunk)
                    .map(|c| s.spawn(move || sum_words(c)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0u64, u64::wrapping_add)
            });
            std::hint::black_box(sum);
            read_gbs = read_gbs.max(bytes / start.elapsed().as_secs_f64() / 1e9);

            let start = Instant::now();
            std::thread::scope(|s| {
                for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                    s.spawn(move || d.copy_from_slice(c));
                }
            });
            std::hint::black_box(&dst);
            copy_gbs = copy_gbs.max(2.0 * bytes / start.elapsed().as_secs_f64() / 1e9);
        }
    }
    Bandwidth { read_gbs, copy_gbs }
}

/// A wrapping sum of `words` front to back in 16 lanes (vectorizes, no float reassociation):
/// one stream per thread, as a decode step reads its weights (four interleaved streams read
/// ~20% slower on AMD EPYC and understated the ceiling).
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 16];
    let chunks = words.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    for chunk in chunks {
        for (l, w) in lanes.iter_mut().zip(chunk) {
            *l = l.wrapping_add(*w);
        }
    }
    lanes.iter().fold(tail, |a, &l| a.wrapping_add(l))
}

/// Bytes of weights one batch-1 decode step reads: every tensor of the checkpoint once (the
/// tied embedding is the output head), at the run's precision.
fn weight_bytes(safetensors: &Path, dtype: &str) -> Result<u64> {
    let mut file = std::fs::File::open(safetensors)
        .with_context(|| format!("opening {}", safetensors.display()))?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut file, &mut len)?;
    let header = u64::from_le_bytes(len);
    let total = file.metadata()?.len();
    let f32_bytes = total.saturating_sub(8 + header);
    Ok(match dtype.to_ascii_lowercase().as_str() {
        "bf16" | "f16" => f32_bytes / 2,
        _ => f32_bytes,
    })
}

/// The CPU's model name from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A figure with a sensible number of digits.
pub(crate) fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The columns of the tables and chart: each backend, then the peer.
fn columns(report: &Value) -> Vec<&Value> {
    let mut cols: Vec<&Value> = report["results"].as_array().into_iter().flatten().collect();
    if !report["peer"].is_null() {
        cols.push(&report["peer"]);
    }
    cols
}

/// The Markdown results: the machine, the workload, one row per metric, ratios to the peer.
fn markdown(report: &Value) -> String {
    let cols = columns(report);
    let peer = &report["peer"];
    let m = &report["machine"];
    let w = &report["workload"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# infermux benchmark{}\n",
        if report["quick"] == true {
            " (quick smoke run: not representative)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "{} on {} ({} CPUs), {} on {}. Workload (`cargo xtask bench`): greedy decode of {} tokens after a {}-token prompt per request at 1, 8 and 32 concurrent requests; prefill = scoring one {}-token prompt; scoring = `compute_logprobs` of {} tokens (sequences × length, submitted together); best of {}; peak RSS = VmHWM of a process per backend.",
        if report["quick"] == true {
            "Quick run"
        } else {
            "Measured"
        },
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cpus"],
        report["dtype"].as_str().unwrap_or("f32"),
        report["device"].as_str().unwrap_or("cpu"),
        w["decode_tokens"],
        w["decode_prompt_len"],
        w["prefill_tokens"],
        w["scoring"].as_str().unwrap_or("?"),
        w["repeats"],
    );
    if !peer.is_null() {
        let _ = writeln!(
            s,
            "\nPeer: Hugging Face {} (f32, CPU, {} threads; batched decode = one padded `generate`). `(×r)` = backend ÷ peer in this run: above 1 is better for tok/s, below 1 is better for seconds and MiB.",
            peer["version"].as_str().unwrap_or("transformers"),
            peer["threads"],
        );
    }
    s.push_str("\n| metric |");
    for c in &cols {
        let name = c["name"].as_str().unwrap_or("?");
        let _ = write!(
            s,
            " {name}{} |",
            if std::ptr::eq(*c, peer) {
                " (peer)"
            } else {
                ""
            }
        );
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(cols.len()));
    s.push('\n');
    for (key, label, unit, _) in METRICS {
        let label = match key {
            "prefill_tok_s" => format!("{label} {} tokens ({unit})", w["prefill_tokens"]),
            "scoring_s" => format!("{label} {} ({unit})", w["scoring"].as_str().unwrap_or("")),
            _ => format!("{label} ({unit})"),
        };
        let _ = write!(s, "| {label} |");
        for c in &cols {
            let cell = match c[key].as_f64() {
                None => "–".to_string(),
                Some(v) => match peer[key].as_f64() {
                    Some(p) if p > 0.0 && !std::ptr::eq(*c, peer) => {
                        format!("{} (×{:.2})", num(v), v / p)
                    }
                    _ => num(v),
                },
            };
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    let ceiling = m["decode_b1_ceiling_tok_s"].as_f64().unwrap_or(f64::NAN);
    let _ = write!(s, "| decode, 1 stream: share of the bandwidth ceiling |");
    for c in &cols {
        let cell = c["decode_b1_tok_s"]
            .as_f64()
            .map(|v| format!("{:.0}%", 100.0 * v / ceiling))
            .unwrap_or_else(|| "–".into());
        let _ = write!(s, " {cell} |");
    }
    let _ = writeln!(
        s,
        "\n\nMemory-bandwidth ceiling for batch-1 decode: {:.1} MB of weights per step ÷ {:.1} GB/s measured streaming reads ({:.1} GB/s copy) = **{:.1} tok/s**. A step reads every weight once; above 100% means caches serve part of the weights.",
        m["weight_bytes_per_decode_step"].as_f64().unwrap_or(0.0) / 1e6,
        m["read_bandwidth_gb_s"].as_f64().unwrap_or(0.0),
        m["copy_bandwidth_gb_s"].as_f64().unwrap_or(0.0),
        ceiling
    );
    s.push_str("\n![throughput chart](chart.svg)\n");
    s
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Small multiples: one panel per metric, one bar per backend (and the peer), each panel on its
/// own scale with the values printed on the bars. Hand-written SVG, no dependencies.
fn svg_chart(report: &Value) -> String {
    const PALETTE: [&str; 5] = ["#4e79a7", "#f28e2b", "#59a14f", "#9c9c9c", "#e15759"];
    const PANEL_W: f64 = 300.0;
    const PANEL_H: f64 = 190.0;
    const PER_ROW: usize = 3;
    let cols = columns(report);
    let metrics: Vec<_> = METRICS
        .iter()
        .filter(|(key, ..)| *key != "load_s")
        .collect();
    let rows = metrics.len().div_ceil(PER_ROW);
    let width = PANEL_W * PER_ROW as f64 + 20.0;
    let height = PANEL_H * rows as f64 + 70.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "infermux {} on {} — {}",
        report["dtype"].as_str().unwrap_or(""),
        report["device"].as_str().unwrap_or(""),
        report["machine"]["cpu_model"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(&title)
    );
    // Legend.
    let mut x = 10.0;
    for (i, c) in cols.iter().enumerate() {
        let name = c["name"].as_str().unwrap_or("?");
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="40">{}</text>"#,
            PALETTE[i % PALETTE.len()],
            x + 16.0,
            esc(name)
        );
        x += 30.0 + 7.0 * name.len() as f64;
    }
    for (m, (key, label, unit, lower)) in metrics.iter().enumerate() {
        let ox = 10.0 + PANEL_W * (m % PER_ROW) as f64;
        let oy = 55.0 + PANEL_H * (m / PER_ROW) as f64;
        let values: Vec<Option<f64>> = cols.iter().map(|c| c[*key].as_f64()).collect();
        let max = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold">{} ({}, {} is better)</text>"#,
            ox,
            oy + 12.0,
            esc(label),
            esc(unit),
            if *lower { "lower" } else { "higher" }
        );
        let (top, bottom) = (oy + 32.0, oy + PANEL_H - 30.0);
        let _ = writeln!(
            s,
            r##"<line x1="{ox}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/>"##,
            ox + PANEL_W - 20.0
        );
        let slot = (PANEL_W - 20.0) / cols.len().max(1) as f64;
        for (i, v) in values.iter().enumerate() {
            let bx = ox + slot * i as f64 + slot * 0.15;
            let bw = slot * 0.7;
            if let Some(v) = v {
                let h = if max > 0.0 {
                    (bottom - top) * v / max
                } else {
                    0.0
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{bw:.1}" height="{h:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    bottom - h,
                    PALETTE[i % PALETTE.len()],
                    bx + bw / 2.0,
                    bottom - h - 3.0,
                    num(*v)
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                bx + bw / 2.0,
                bottom + 14.0,
                esc(cols[i]["name"].as_str().unwrap_or("?"))
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Value {
        json!({
            "quick": true, "dtype": "f32", "device": "cpu",
            "workload": {"decode_tokens": 8, "decode_prompt_len": 16, "decode_batches": [1, 8, 32],
                         "prefill_tokens": 512, "scoring": "8x128", "repeats": 1},
            "machine": {"cpus": 2, "cpu_model": "Test CPU", "read_bandwidth_gb_s": 10.0,
                        "copy_bandwidth_gb_s": 12.0, "weight_bytes_per_decode_step": 5e8,
                        "decode_b1_ceiling_tok_s": 20.0},
            "results": [{"name": "candle", "decode_b1_tok_s": 10.0, "scoring_s": 3.0, "peak_rss_mib": 900.0}],
            "peer": {"name": "transformers", "version": "transformers 5.23.0", "threads": 2,
                     "decode_b1_tok_s": 20.0, "scoring_s": 2.0, "peak_rss_mib": 1200.0},
        })
    }

    #[test]
    fn markdown_gives_ratios_to_the_peer_and_the_ceiling() {
        let md = markdown(&sample_report());
        assert!(
            md.contains("| metric | candle | transformers (peer) |"),
            "{md}"
        );
        assert!(
            md.contains("| decode, 1 stream (tok/s) | 10.0 (×0.50) | 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| scoring 8x128 (s) | 3.00 (×1.50) | 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| decode, 1 stream: share of the bandwidth ceiling | 50% | 100% |"),
            "{md}"
        );
        assert!(md.contains("**20.0 tok/s**"), "{md}");
    }

    #[test]
    fn chart_is_well_formed_svg() {
        let svg = svg_chart(&sample_report());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.contains(">candle<") && svg.contains(">transformers<"));
    }

    #[test]
    fn word_sum_and_workload_shapes() {
        let words: Vec<u64> = (0..1003).collect();
        assert_eq!(sum_words(&words), 1003 * 1002 / 2);
        let root = crate::repo_root();
        let w = workload(&root, &Shape::QUICK).unwrap();
        assert_eq!(w["decode_prompts"].as_array().unwrap().len(), 32);
        assert_eq!(w["decode_prompts"][5].as_array().unwrap().len(), 16);
        assert_eq!(w["prefill_prompt"].as_array().unwrap().len(), 512);
        assert_eq!(w["scoring_prompts"].as_array().unwrap().len(), 8);
    }
}
