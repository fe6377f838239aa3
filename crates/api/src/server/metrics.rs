//! Prometheus metrics: engine gauges and counters (from `Engine::stats()`), generation
//! throughput, request latency and time-to-first-token histograms, HTTP replies by status.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use infermux_core::EngineStats;

/// Latency buckets, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Time-to-first-token buckets, in seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// How far back the generation-throughput gauge looks.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus `+Inf`.
    counts: Vec<AtomicU64>,
    /// Sum of observations, in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let labels = match labels.trim_end_matches(',') {
            "" => String::new(),
            l => format!("{{{l}}}"),
        };
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {cumulative}");
    }
}

/// The server's own metrics (engine numbers are read at scrape time).
#[derive(Debug)]
pub(crate) struct Metrics {
    /// End-to-end latency of generation and scoring requests (last byte sent).
    pub(crate) latency: Histogram,
    /// Time from a request's arrival to its first generated token.
    pub(crate) ttft: Histogram,
    /// HTTP replies by (route, status).
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// `(when, generated_tokens_total)` per model, for the throughput gauge.
    samples: Mutex<BTreeMap<String, VecDeque<(Instant, u64)>>>,
}

/// What a scrape shows besides the server's own metrics.
pub(crate) struct Snapshot<'a> {
    /// Per model: its name and its engine's stats (`None` if the engine is gone).
    pub(crate) engines: Vec<(&'a str, Option<EngineStats>)>,
    /// Requests holding admission places.
    pub(crate) in_flight: usize,
    /// Places they hold (sequences).
    pub(crate) places_in_use: usize,
    /// Requests waiting for one.
    pub(crate) queued: usize,
    /// `max_concurrent_requests`.
    pub(crate) capacity: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            latency: Histogram::new(LATENCY_BUCKETS),
            ttft: Histogram::new(TTFT_BUCKETS),
            http: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Counts one HTTP reply.
    pub(crate) fn count_reply(&self, route: &'static str, status: u16) {
        let mut http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *http.entry((route, status)).or_default() += 1;
    }

    /// Generated tokens per second of `model` over the last [`RATE_WINDOW`], given its total now.
    fn rate(&self, model: &str, total: u64) -> f64 {
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let ring = samples.entry(model.to_string()).or_default();
        while ring.len() > 1 && ring[0].0 + RATE_WINDOW < now {
            ring.pop_front();
        }
        let rate = match ring.front() {
            Some(&(at, before)) if now > at => {
                total.saturating_sub(before) as f64 / (now - at).as_secs_f64()
            }
            _ => 0.0,
        };
        ring.push_back((now, total));
        rate
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self, snap: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(8192);
        type Field = fn(&EngineStats) -> f64;
        let engine_metrics: [(&str, &str, &str, Field); 14] = [
            (
                "infermux_waiting_requests",
                "gauge",
                "Requests queued in the engine, not yet admitted (queue depth).",
                |s| s.waiting_requests as f64,
            ),
            (
                "infermux_running_requests",
                "gauge",
                "Requests admitted by the engine (prefilling or decoding).",
                |s| s.running_requests as f64,
            ),
            (
                "infermux_running_sequences",
                "gauge",
                "Sequences still decoding.",
                |s| s.running_sequences as f64,
            ),
            (
                "infermux_kv_slots_free",
                "gauge",
                "KV-cache slots not held by any sequence.",
                |s| s.free_slots as f64,
            ),
            (
                "infermux_kv_slots_total",
                "gauge",
                "Size of the KV slot pool (max_num_seqs).",
                |s| s.total_slots as f64,
            ),
            (
                "infermux_kv_slots_used_ratio",
                "gauge",
                "Fraction of KV slots in use.",
                |s| {
                    if s.total_slots == 0 {
                        0.0
                    } else {
                        1.0 - s.free_slots as f64 / s.total_slots as f64
                    }
                },
            ),
            (
                "infermux_kv_budget_bytes",
                "gauge",
                "KV cache byte budget requests are admitted against.",
                |s| s.kv_budget_bytes as f64,
            ),
            (
                "infermux_kv_reserved_bytes",
                "gauge",
                "KV cache bytes running requests reserve (full-length sequences plus one growth copy).",
                |s| s.kv_reserved_bytes as f64,
            ),
            (
                "infermux_kv_allocated_bytes",
                "gauge",
                "KV cache bytes the backend has allocated.",
                |s| s.kv_allocated_bytes as f64,
            ),
            (
                "infermux_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled since start.",
                |s| s.prompt_tokens_total as f64,
            ),
            (
                "infermux_generation_tokens_total",
                "counter",
                "Tokens generated since start.",
                |s| s.generated_tokens_total as f64,
            ),
            (
                "infermux_finished_requests_total",
                "counter",
                "Engine requests completed since start.",
                |s| s.finished_requests_total as f64,
            ),
            (
                "infermux_failed_requests_total",
                "counter",
                "Engine requests failed (backend or guided-decoding errors) since start.",
                |s| s.failed_requests_total as f64,
            ),
            (
                "infermux_engine_up",
                "gauge",
                "1 while the model's engine answers.",
                |_| 1.0,
            ),
        ];
        for (name, kind, help, field) in engine_metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, stats) in &snap.engines {
                let value = match stats {
                    Some(s) => field(s),
                    None if name == "infermux_engine_up" => 0.0,
                    None => continue,
                };
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {value}", escape(model));
            }
        }
        let name = "infermux_generation_tokens_per_second";
        let _ = writeln!(
            out,
            "# HELP {name} Generated tokens per second over the last {} s (since the previous scrape at most that long ago).\n# TYPE {name} gauge",
            RATE_WINDOW.as_secs()
        );
        for (model, stats) in &snap.engines {
            if let Some(s) = stats {
                let rate = self.rate(model, s.generated_tokens_total);
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {rate}", escape(model));
            }
        }
        for (name, help, value) in [
            (
                "infermux_http_requests_in_flight",
                "Requests admitted (holding admission places).",
                snap.in_flight,
            ),
            (
                "infermux_http_sequences_in_flight",
                "Admission places held: the sequences admitted requests keep in the engine at once.",
                snap.places_in_use,
            ),
            (
                "infermux_http_requests_queued",
                "Requests waiting for admission places.",
                snap.queued,
            ),
            (
                "infermux_http_max_concurrent_requests",
                "Requests served at once (--max-concurrent-requests).",
                snap.capacity,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let name = "infermux_http_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP replies by route and status.\n# TYPE {name} counter"
        );
        let http = self.http.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for ((route, status), count) in http {
            let _ = writeln!(
                out,
                "{name}{{route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        self.latency.render(
            &mut out,
            "infermux_request_latency_seconds",
            "End-to-end latency of admitted generation and scoring requests (until the last byte).",
            "",
        );
        self.ttft.render(
            &mut out,
            "infermux_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            "",
        );
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_renders_in_prometheus_text() {
        let m = Metrics::default();
        m.latency.observe(Duration::from_millis(3));
        m.latency.observe(Duration::from_millis(700));
        m.count_reply("/v1/completions", 200);
        let stats = EngineStats {
            kv_budget_bytes: 1 << 30,
            kv_reserved_bytes: 4096,
            kv_allocated_bytes: 1024,
            ..EngineStats::default()
        };
        let text = m.render(&Snapshot {
            engines: vec![("m", None), ("k", Some(stats))],
            in_flight: 0,
            places_in_use: 0,
            queued: 0,
            capacity: 4,
        });
        assert!(text.contains("infermux_request_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("infermux_request_latency_seconds_bucket{le=\"1\"} 2"));
        assert!(text.contains("infermux_request_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("infermux_request_latency_seconds_count 2"));
        assert!(text.contains("infermux_engine_up{model=\"m\"} 0"));
        assert!(text.contains("infermux_kv_budget_bytes{model=\"k\"} 1073741824"));
        assert!(text.contains("infermux_kv_reserved_bytes{model=\"k\"} 4096"));
        assert!(text.contains("infermux_kv_allocated_bytes{model=\"k\"} 1024"));
        assert!(
            text.contains(
                "infermux_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1"
            )
        );
    }
}
