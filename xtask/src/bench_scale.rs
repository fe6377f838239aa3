//! `cargo xtask bench-scale`: throughput of `infermux serve` replicas behind sglang-router
//! (`runtimes/py-router`) against one replica answered directly, the same workload in the same
//! run: N concurrent completions of M tokens each (`ignore_eos`, so every one is M tokens).
//! Writes a Markdown table (`docs/bench/scale-out.md` by default) with the machine's CPU.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde_json::json;

use crate::serve_bench::{
    Proc, build_infermux, commit_line, cpu_model, free_port, load_average, quantile, request,
    serve, target_dir, today,
};
use crate::setup;
use crate::setup::py_router;

/// The name replicas serve the model under.
const MODEL: &str = "bench";

/// Flags of `cargo xtask bench-scale`.
#[derive(Args, Debug)]
pub struct BenchScaleArgs {
    /// Concurrent completions per measured run.
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    /// Tokens each completion generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Measured runs per scenario (the table shows the median).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Replicas behind the router.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Router policy (`round_robin` or `cache_aware`; others need what infermux lacks).
    #[arg(long, default_value = "round_robin")]
    pub policy: String,
    /// Output file (default: docs/bench/scale-out.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    wall_s: f64,
    tokens: u64,
    latencies_s: Vec<f64>,
}

impl Run {
    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.wall_s
    }
}

/// A scenario's label and its runs.
struct Scenario {
    label: String,
    replicas: usize,
    routed: bool,
    threads: String,
    runs: Vec<Run>,
}

/// Runs every scenario, then writes and prints the table.
pub fn run(root: &Path, args: &BenchScaleArgs) -> Result<()> {
    ensure!(
        args.requests > 0 && args.max_tokens > 0 && args.repeats > 0 && args.replicas > 0,
        "--requests, --max-tokens, --repeats and --replicas must be positive"
    );
    let model = setup::run(root)?;
    let python = py_router::ensure(root)?;
    let bin = build_infermux(root)?;
    let logs = target_dir(root).join("bench-scale");
    std::fs::create_dir_all(&logs)?;
    let ctx = Ctx {
        bin,
        model,
        python,
        logs,
        args,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let mut scenarios = Vec::new();

    // One replica, directly and through the router.
    {
        let one = ctx.replica(0, None)?;
        let addr = one.1.clone();
        scenarios.push(ctx.measure("1 replica, direct", 1, false, cores, &addr)?);
        let router = ctx.router(std::slice::from_ref(&addr))?;
        scenarios.push(ctx.measure("1 replica, via router", 1, true, cores, &router.1)?);
        drop(router);
        // The same replica stays for the next scenario.
        let mut all = vec![one];
        for i in 1..args.replicas {
            all.push(ctx.replica(i, None)?);
        }
        let addrs: Vec<String> = all.iter().map(|(_, a)| a.clone()).collect();
        let router = ctx.router(&addrs)?;
        let label = format!("{} replicas, via router", args.replicas);
        scenarios.push(ctx.measure(&label, args.replicas, true, cores, &router.1)?);
    }
    // The same, each replica's kernels on one thread, so N replicas use N cores at most.
    if args.replicas > 1 {
        let all: Vec<(Proc, String)> = (0..args.replicas)
            .map(|i| ctx.replica(i, Some(1)))
            .collect::<Result<_>>()?;
        let addrs: Vec<String> = all.iter().map(|(_, a)| a.clone()).collect();
        let router = ctx.router(&addrs)?;
        let label = format!("{} replicas, via router, 1 thread each", args.replicas);
        let mut s = ctx.measure(&label, args.replicas, true, 1, &router.1)?;
        s.threads = "1 (RAYON_NUM_THREADS=1)".into();
        scenarios.push(s);
    }

    let load = (load_before, load_average());
    let markdown = render(root, args, cores, load, &scenarios)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("docs/bench/scale-out.md"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &markdown).with_context(|| format!("writing {}", out.display()))?;
    println!("{markdown}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// What starting processes needs.
struct Ctx<'a> {
    bin: PathBuf,
    model: PathBuf,
    python: PathBuf,
    logs: PathBuf,
    args: &'a BenchScaleArgs,
}

impl Ctx<'_> {
    /// Starts replica `i` on a free loopback port (`threads`: its kernels' thread count, or
    /// candle's default of one per core); waits for its `listening on` line.
    fn replica(&self, i: usize, threads: Option<usize>) -> Result<(Proc, String)> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--model"]).arg(&self.model).args([
            "--backend",
            "candle",
            "--served-model-name",
            MODEL,
            "--kv-cache-memory-bytes",
            "1GiB",
        ]);
        if let Some(t) = threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
        serve(cmd, &self.logs.join(format!("replica-{i}.log")))
            .with_context(|| format!("replica {i}"))
    }

    /// Starts sglang-router in front of `workers` and waits until it counts them all healthy.
    fn router(&self, workers: &[String]) -> Result<(Proc, String)> {
        let port = free_port()?;
        let metrics_port = free_port()?;
        let log = std::fs::File::create(self.logs.join("router.log"))?;
        let mut cmd = Command::new(&self.python);
        cmd.args(["-m", "sglang_router.launch_router", "--worker-urls"])
            .args(workers.iter().map(|w| format!("http://{w}")))
            .args([
                "--policy",
                &self.args.policy,
                "--host",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
            .arg(metrics_port.to_string())
            .args([
                "--health-check-interval-secs",
                "5",
                "--disable-circuit-breaker",
            ])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let proc = Proc(cmd.spawn().with_context(|| format!("starting {cmd:?}"))?);
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let healthy = request(&addr, "GET", "/workers", None)
                .ok()
                .and_then(|(status, v)| (status == 200).then_some(v))
                .map(|v| {
                    v["workers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|w| w["is_healthy"] == true)
                        .count()
                })
                .unwrap_or(0);
            if healthy == workers.len() {
                return Ok((proc, addr));
            }
            if Instant::now() > deadline {
                bail!(
                    "sglang-router did not list {} healthy workers within 120 s (see {})",
                    workers.len(),
                    self.logs.join("router.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A warm-up, then `repeats` runs of the workload against `addr`.
    fn measure(
        &self,
        label: &str,
        replicas: usize,
        routed: bool,
        threads: usize,
        addr: &str,
    ) -> Result<Scenario> {
        eprintln!("{label}: warming up…");
        workload(addr, replicas * 8, 4)?;
        let mut runs = Vec::new();
        for r in 0..self.args.repeats {
            let run = workload(addr, self.args.requests, self.args.max_tokens)?;
            eprintln!(
                "{label}: run {}: {:.1} tok/s ({:.2} s)",
                r + 1,
                run.tok_s(),
                run.wall_s
            );
            runs.push(run);
        }
        Ok(Scenario {
            label: label.into(),
            replicas,
            routed,
            threads: threads.to_string(),
            runs,
        })
    }
}

/// `requests` concurrent completions of `max_tokens` tokens each against `addr`.
fn workload(addr: &str, requests: usize, max_tokens: usize) -> Result<Run> {
    let start = Instant::now();
    let handles: Vec<_> = (0..requests)
        .map(|i| {
            let addr = addr.to_string();
            let body = json!({
                "model": MODEL,
                "prompt": format!("Request {i}. Write a short story about a lighthouse keeper and"),
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "seed": i,
                "ignore_eos": true,
            });
            std::thread::spawn(move || -> Result<(f64, u64)> {
                let t = Instant::now();
                let (status, v) = request(&addr, "POST", "/v1/completions", Some(&body))?;
                ensure!(status == 200, "completion answered {status}: {v}");
                let tokens = v["usage"]["completion_tokens"]
                    .as_u64()
                    .context("no usage.completion_tokens")?;
                Ok((t.elapsed().as_secs_f64(), tokens))
            })
        })
        .collect();
    let mut latencies_s = Vec::new();
    let mut tokens = 0;
    for h in handles {
        let (latency, n) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        latencies_s.push(latency);
        tokens += n;
    }
    let wall_s = start.elapsed().as_secs_f64();
    ensure!(
        tokens == (requests * max_tokens) as u64,
        "{tokens} tokens came back, not {requests} x {max_tokens}"
    );
    latencies_s.sort_by(f64::total_cmp);
    Ok(Run {
        wall_s,
        tokens,
        latencies_s,
    })
}

/// The Markdown report.
fn render(
    root: &Path,
    args: &BenchScaleArgs,
    cores: usize,
    load: (String, String),
    scenarios: &[Scenario],
) -> Result<String> {
    let commit = commit_line(root);
    let date = today();
    let mut md = String::new();
    writeln!(
        md,
        "# Scale-out: replicas behind sglang-router vs one replica direct\n"
    )?;
    writeln!(
        md,
        "`cargo xtask bench-scale` on {date}, {commit}: {cpu}, {cores} cores \
         (`lscpu`, `nproc`). Workload: {n} concurrent `/v1/completions` of {m} tokens each \
         (`ignore_eos`, temperature 0.7, seeded), candle backend, SmolLM2-135M-Instruct f32, \
         `infermux serve` defaults (`--max-num-seqs 64`); sglang-router 0.3.2, policy \
         `{policy}`, every process on 127.0.0.1. Each row: median of {r} runs after a \
         warm-up; latency is the client's, per request, of the median run. 1-minute load \
         average before / after: {l0} / {l1}.\n",
        cpu = cpu_model(),
        n = args.requests,
        m = args.max_tokens,
        policy = args.policy,
        l0 = load.0,
        l1 = load.1,
        r = args.repeats,
    )?;
    writeln!(
        md,
        "| scenario | replicas | via router | kernel threads per replica | tok/s (median) | tok/s of each run | p50 latency | p95 latency | vs 1 replica direct |"
    )?;
    writeln!(md, "|---|---:|:---:|---:|---:|---|---:|---:|---:|")?;
    let median_run = |s: &Scenario| {
        let mut runs = s.runs.clone();
        runs.sort_by(|a, b| a.tok_s().total_cmp(&b.tok_s()));
        runs[runs.len() / 2].clone()
    };
    let base = median_run(&scenarios[0]).tok_s();
    for s in scenarios {
        let m = median_run(s);
        let each: Vec<String> = s.runs.iter().map(|r| format!("{:.0}", r.tok_s())).collect();
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {} | {:.2} s | {:.2} s | {:.2}x |",
            s.label,
            s.replicas,
            if s.routed { "yes" } else { "no" },
            s.threads,
            m.tok_s(),
            each.join(", "),
            quantile(&m.latencies_s, 0.5),
            quantile(&m.latencies_s, 0.95),
            m.tok_s() / base,
        )?;
    }
    writeln!(
        md,
        "\nReading it: a replica adds throughput only when it adds compute. One replica \
         already batches every running sequence into one forward pass per step and spreads \
         its kernels over all {cores} cores; replicas on the same {cores} cores split the same \
         compute, each reading the whole weights per step for a smaller batch, and their \
         kernel threads contend (with default threads there are {} compute threads for \
         {cores} cores). So on one small machine the router's value is availability (a dead \
         replica is routed around, see the scale-out test), not speed; on separate machines \
         or GPUs each replica brings its own compute. The `via router` rows against `direct` \
         show the router's own cost per request (one extra loopback hop, body \
         re-serialization).",
        args.replicas * cores
    )?;
    Ok(md)
}
