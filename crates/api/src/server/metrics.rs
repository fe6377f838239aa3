//! Prometheus metrics through the `prometheus` crate, one [`Registry`] per server (never the
//! global one, so servers in one process do not clash): engine gauges and counters read from
//! `Engine::stats()` at scrape time, request latency and time-to-first-token histograms, HTTP
//! replies by status, and vLLM's names (`vllm:*`, label `model_name`) that routers read.
//!
//! vLLM's request series count engine requests as vLLM does: one per prompt for
//! `time_to_first_token` and `e2e_request_latency`, one per returned choice for
//! `request_success` (`stop`, `length`, or `abort` for a choice the reply stopped waiting for:
//! client gone, deadline, another prompt of the request failed; a failed prompt counts
//! nothing). Inter-token latency is the gap between successive token events of a choice in a
//! streamed reply; unstreamed replies add nothing to it, because the engine's final output
//! carries no per-token timing. `/v1/sample` adds to `e2e_request_latency` and
//! `request_success` only (it waits for the final output); `/v1/compute_logprobs` generates
//! nothing and adds to none of them.

use std::time::Duration;

use infermux_core::EngineStats;
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Latency buckets, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Time-to-first-token buckets, in seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const VLLM_TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token (`time_per_output_token`) buckets.
const VLLM_ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets.
const VLLM_E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// vLLM's finish reasons, whose `vllm:request_success_total` series exist from the first scrape.
const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

/// Observes durations into one or two histograms (the server's own, and a model's vLLM one).
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    own: Histogram,
    model: Option<Histogram>,
}

impl Timing {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        self.own.observe(secs);
        if let Some(h) = &self.model {
            h.observe(secs);
        }
    }
}

/// The families registered in a server's registry.
#[derive(Debug)]
struct Families {
    registry: Registry,
    http: IntCounterVec,
    vllm_ttft: HistogramVec,
    vllm_itl: HistogramVec,
    vllm_tpot: HistogramVec,
    vllm_e2e: HistogramVec,
    vllm_success: IntCounterVec,
}

/// A server's metrics: a cheap handle (its registry is shared by clones).
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    /// End-to-end latency of generation and scoring requests (last byte sent), per HTTP request.
    pub(crate) latency: Timing,
    /// Time from a request's arrival to its first generated token; on a handle from
    /// [`Metrics::for_model`] also `vllm:time_to_first_token_seconds` of that model.
    pub(crate) ttft: Timing,
    families: std::sync::Arc<Families>,
}

/// One model's vLLM request series.
#[derive(Debug, Clone)]
pub(crate) struct ModelSeries {
    model: String,
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    success: IntCounterVec,
}

impl ModelSeries {
    /// A prompt's first token, `d` after the request arrived.
    pub(crate) fn first_token(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    /// The gap between two successive token events of one choice (inter-token latency, and
    /// the same under vLLM's older name).
    pub(crate) fn token_gap(&self, d: Duration) {
        let secs = d.as_secs_f64();
        self.itl.observe(secs);
        self.tpot.observe(secs);
    }

    /// A prompt's generation done, `d` after the request arrived.
    pub(crate) fn prompt_done(&self, d: Duration) {
        self.e2e.observe(d.as_secs_f64());
    }

    /// One choice finished for `reason` (`stop`, `length`, `abort`).
    pub(crate) fn finished(&self, reason: &str) {
        self.success.with_label_values(&[&self.model, reason]).inc();
    }

    /// Counts `choices` choices of one submitted prompt as `abort` unless the returned guard
    /// is told the prompt finished or failed (a request dropped mid-generation: client gone,
    /// deadline, another prompt of it failed).
    pub(crate) fn track(&self, choices: usize) -> Tracked {
        Tracked {
            series: self.clone(),
            choices,
        }
    }
}

/// See [`ModelSeries::track`].
#[derive(Debug)]
pub(crate) struct Tracked {
    series: ModelSeries,
    choices: usize,
}

impl Tracked {
    /// One of the prompt's choices finished (its reason counted by the caller).
    pub(crate) fn choice_finished(&mut self) {
        self.choices = self.choices.saturating_sub(1);
    }

    /// The prompt's generation ended, `d` after its request arrived: observed as its end-to-end
    /// latency when `ok`, nothing counted when it failed.
    pub(crate) fn end(mut self, ok: bool, d: Duration) {
        if ok {
            self.series.prompt_done(d);
        }
        self.choices = 0;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.choices > 0 {
            self.series
                .success
                .with_label_values(&[&self.series.model, "abort"])
                .inc_by(self.choices as u64);
        }
    }
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

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("a new name in a fresh registry");
    h
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &["model_name"],
    )
    .expect("a valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("a new name in a fresh registry");
    h
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("a new name in a fresh registry");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let latency = histogram(
            &registry,
            "infermux_request_latency_seconds",
            "End-to-end latency of admitted generation and scoring requests (until the last byte).",
            LATENCY_BUCKETS,
        );
        let ttft = histogram(
            &registry,
            "infermux_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        );
        let families = Families {
            http: counter_vec(
                &registry,
                "infermux_http_requests_total",
                "HTTP replies by route and status.",
                &["route", "status"],
            ),
            vllm_ttft: histogram_vec(
                &registry,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds (per prompt, from the request's arrival).",
                VLLM_TTFT_BUCKETS,
            ),
            vllm_itl: histogram_vec(
                &registry,
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds (gaps between a streamed choice's token events).",
                VLLM_ITL_BUCKETS,
            ),
            vllm_tpot: histogram_vec(
                &registry,
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (the inter-token latency, under vLLM's older name).",
                VLLM_ITL_BUCKETS,
            ),
            vllm_e2e: histogram_vec(
                &registry,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds (per prompt, from the request's arrival).",
                VLLM_E2E_BUCKETS,
            ),
            vllm_success: counter_vec(
                &registry,
                "vllm:request_success_total",
                "Count of successfully processed requests (per returned choice, by finish reason).",
                &["model_name", "finished_reason"],
            ),
            registry,
        };
        Self {
            latency: Timing {
                own: latency,
                model: None,
            },
            ttft: Timing {
                own: ttft,
                model: None,
            },
            families: std::sync::Arc::new(families),
        }
    }
}

/// A metric family built at scrape time.
fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// One sample of a gauge or counter family.
fn sample(kind: MetricType, labels: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut m = proto::Metric::from_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect(),
    );
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

/// Fraction of the KV byte budget reserved (0 with no budget), at most 1.
fn kv_usage(s: &EngineStats) -> f64 {
    if s.kv_budget_bytes == 0 {
        0.0
    } else {
        (s.kv_reserved_bytes as f64 / s.kv_budget_bytes as f64).min(1.0)
    }
}

type Field = fn(&EngineStats) -> f64;

/// The engine series: name, type, help, label name, value.
const ENGINE_METRICS: [(&str, MetricType, &str, &str, Field); 23] = [
    (
        "infermux_waiting_requests",
        MetricType::GAUGE,
        "Requests queued in the engine, not yet admitted (queue depth).",
        "model",
        |s| s.waiting_requests as f64,
    ),
    (
        "infermux_running_requests",
        MetricType::GAUGE,
        "Requests admitted by the engine (prefilling or decoding).",
        "model",
        |s| s.running_requests as f64,
    ),
    (
        "infermux_running_sequences",
        MetricType::GAUGE,
        "Sequences still decoding.",
        "model",
        |s| s.running_sequences as f64,
    ),
    (
        "infermux_kv_slots_free",
        MetricType::GAUGE,
        "KV-cache slots not held by any sequence.",
        "model",
        |s| s.free_slots as f64,
    ),
    (
        "infermux_kv_slots_total",
        MetricType::GAUGE,
        "Size of the KV slot pool (max_num_seqs).",
        "model",
        |s| s.total_slots as f64,
    ),
    (
        "infermux_kv_slots_used_ratio",
        MetricType::GAUGE,
        "Fraction of KV slots in use.",
        "model",
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
        MetricType::GAUGE,
        "KV cache byte budget requests are admitted against.",
        "model",
        |s| s.kv_budget_bytes as f64,
    ),
    (
        "infermux_kv_reserved_bytes",
        MetricType::GAUGE,
        "KV cache bytes running requests reserve (full-length sequences plus one growth copy).",
        "model",
        |s| s.kv_reserved_bytes as f64,
    ),
    (
        "infermux_kv_allocated_bytes",
        MetricType::GAUGE,
        "KV cache bytes the backend has allocated.",
        "model",
        |s| s.kv_allocated_bytes as f64,
    ),
    (
        "infermux_prompt_tokens_total",
        MetricType::COUNTER,
        "Prompt tokens processed since start (prefilled or reused from the prefix cache).",
        "model",
        |s| s.prompt_tokens_total as f64,
    ),
    (
        "infermux_generation_tokens_total",
        MetricType::COUNTER,
        "Tokens generated since start.",
        "model",
        |s| s.generated_tokens_total as f64,
    ),
    (
        "infermux_finished_requests_total",
        MetricType::COUNTER,
        "Engine requests completed since start.",
        "model",
        |s| s.finished_requests_total as f64,
    ),
    (
        "infermux_failed_requests_total",
        MetricType::COUNTER,
        "Engine requests failed (backend or guided-decoding errors) since start.",
        "model",
        |s| s.failed_requests_total as f64,
    ),
    (
        "infermux_engine_up",
        MetricType::GAUGE,
        "1 while the model's engine answers.",
        "model",
        |_| 1.0,
    ),
    (
        "vllm:num_requests_running",
        MetricType::GAUGE,
        "Number of requests in model execution batches.",
        "model_name",
        |s| s.running_requests as f64,
    ),
    (
        "vllm:num_requests_waiting",
        MetricType::GAUGE,
        "Number of requests waiting to be processed.",
        "model_name",
        |s| s.waiting_requests as f64,
    ),
    (
        "vllm:kv_cache_usage_perc",
        MetricType::GAUGE,
        "KV-cache usage. 1 means 100 percent usage (bytes reserved over the KV byte budget).",
        "model_name",
        kv_usage,
    ),
    (
        "vllm:prompt_tokens_total",
        MetricType::COUNTER,
        "Number of prefill tokens processed.",
        "model_name",
        |s| s.prompt_tokens_total as f64,
    ),
    (
        "vllm:generation_tokens_total",
        MetricType::COUNTER,
        "Number of generation tokens processed.",
        "model_name",
        |s| s.generated_tokens_total as f64,
    ),
    (
        "vllm:prefix_cache_queries_total",
        MetricType::COUNTER,
        "Prefix cache queries, in terms of number of queried tokens.",
        "model_name",
        |s| s.prefix_cache_queried_tokens_total as f64,
    ),
    (
        "vllm:prefix_cache_hits_total",
        MetricType::COUNTER,
        "Prefix cache hits, in terms of number of cached tokens.",
        "model_name",
        |s| s.prefix_cache_hit_tokens_total as f64,
    ),
    (
        "infermux_prefix_cache_entries",
        MetricType::GAUGE,
        "Finished prefixes the prefix cache keeps.",
        "model",
        |s| s.prefix_cache_entries as f64,
    ),
    (
        "infermux_prefix_cache_bytes",
        MetricType::GAUGE,
        "KV cache bytes the kept prefixes hold.",
        "model",
        |s| s.prefix_cache_bytes as f64,
    ),
];

impl Metrics {
    /// Counts one HTTP reply.
    pub(crate) fn count_reply(&self, route: &'static str, status: u16) {
        self.families
            .http
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// `model`'s vLLM request series.
    pub(crate) fn model_series(&self, model: &str) -> ModelSeries {
        let f = &self.families;
        ModelSeries {
            model: model.to_string(),
            ttft: f.vllm_ttft.with_label_values(&[model]),
            itl: f.vllm_itl.with_label_values(&[model]),
            tpot: f.vllm_tpot.with_label_values(&[model]),
            e2e: f.vllm_e2e.with_label_values(&[model]),
            success: f.vllm_success.clone(),
        }
    }

    /// A handle whose time-to-first-token observations also go to `model`'s vLLM histogram.
    pub(crate) fn for_model(&self, model: &str) -> Self {
        let mut m = self.clone();
        m.ttft.model = Some(self.families.vllm_ttft.with_label_values(&[model]));
        m
    }

    /// The Prometheus text exposition: the registry's families and those read from `snap`.
    pub(crate) fn render(&self, snap: &Snapshot<'_>) -> String {
        // Every served model's vLLM request series exist from the first scrape, at zero.
        for (model, _) in &snap.engines {
            let _ = self.model_series(model);
            for reason in FINISH_REASONS {
                let _ = self
                    .families
                    .vllm_success
                    .with_label_values(&[model, reason]);
            }
        }
        let mut families = self.families.registry.gather();
        for (name, kind, help, label, field) in ENGINE_METRICS {
            let metrics = snap
                .engines
                .iter()
                .filter_map(|(model, stats)| {
                    let value = match stats {
                        Some(s) => field(s),
                        None if name == "infermux_engine_up" => 0.0,
                        None => return None,
                    };
                    Some(sample(kind, &[(label, model)], value))
                })
                .collect();
            families.push(family(name, help, kind, metrics));
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
            let metrics = vec![sample(MetricType::GAUGE, &[], value as f64)];
            families.push(family(name, help, MetricType::GAUGE, metrics));
        }
        // The encoder refuses a family without samples (no engine answered, say).
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding fails only on a malformed family; ours are built above from valid names.
        if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
            return format!("# encoding the metrics failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(engines: Vec<(&str, Option<EngineStats>)>) -> Snapshot<'_> {
        Snapshot {
            engines,
            in_flight: 0,
            places_in_use: 0,
            queued: 0,
            capacity: 4,
        }
    }

    /// Every `# TYPE` line: (family, type).
    fn types(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                (name.to_string(), kind.to_string())
            })
            .collect()
    }

    #[test]
    fn histograms_engine_series_and_vllm_names_render_in_prometheus_text() {
        let m = Metrics::default();
        m.latency.observe(Duration::from_millis(3));
        m.latency.observe(Duration::from_millis(700));
        m.count_reply("/v1/completions", 200);
        let k = m.model_series("k");
        k.first_token(Duration::from_millis(30));
        k.token_gap(Duration::from_millis(20));
        k.token_gap(Duration::from_millis(60));
        k.finished("stop");
        k.finished("length");
        k.finished("length");
        k.track(3).end(true, Duration::from_millis(400));
        drop(k.track(2));
        m.for_model("k").ttft.observe(Duration::from_millis(50));
        let stats = EngineStats {
            kv_budget_bytes: 1 << 30,
            kv_reserved_bytes: 1 << 28,
            kv_allocated_bytes: 1024,
            running_requests: 2,
            waiting_requests: 3,
            prompt_tokens_total: 17,
            generated_tokens_total: 40,
            prefix_cache_queried_tokens_total: 300,
            prefix_cache_hit_tokens_total: 256,
            ..EngineStats::default()
        };
        let text = m.render(&snapshot(vec![("m", None), ("k", Some(stats))]));
        for series in [
            "infermux_request_latency_seconds_bucket{le=\"0.005\"} 1",
            "infermux_request_latency_seconds_bucket{le=\"1\"} 2",
            "infermux_request_latency_seconds_bucket{le=\"+Inf\"} 2",
            "infermux_request_latency_seconds_count 2",
            "infermux_time_to_first_token_seconds_count 1",
            "infermux_engine_up{model=\"m\"} 0",
            "infermux_engine_up{model=\"k\"} 1",
            "infermux_kv_budget_bytes{model=\"k\"} 1073741824",
            "infermux_kv_reserved_bytes{model=\"k\"} 268435456",
            "infermux_kv_allocated_bytes{model=\"k\"} 1024",
            "infermux_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
            "infermux_http_max_concurrent_requests 4",
            "vllm:num_requests_running{model_name=\"k\"} 2",
            "vllm:num_requests_waiting{model_name=\"k\"} 3",
            "vllm:kv_cache_usage_perc{model_name=\"k\"} 0.25",
            "vllm:prompt_tokens_total{model_name=\"k\"} 17",
            "vllm:prefix_cache_queries_total{model_name=\"k\"} 300",
            "vllm:prefix_cache_hits_total{model_name=\"k\"} 256",
            "vllm:generation_tokens_total{model_name=\"k\"} 40",
            "vllm:time_to_first_token_seconds_count{model_name=\"k\"} 2",
            "vllm:time_to_first_token_seconds_bucket{model_name=\"k\",le=\"0.04\"} 1",
            "vllm:inter_token_latency_seconds_count{model_name=\"k\"} 2",
            "vllm:inter_token_latency_seconds_bucket{model_name=\"k\",le=\"0.025\"} 1",
            "vllm:time_per_output_token_seconds_count{model_name=\"k\"} 2",
            "vllm:e2e_request_latency_seconds_count{model_name=\"k\"} 1",
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"k\"} 1",
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"k\"} 2",
            "vllm:request_success_total{finished_reason=\"abort\",model_name=\"k\"} 2",
            // A model without traffic (its engine gone) still shows its request series at 0.
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 0",
            "vllm:e2e_request_latency_seconds_count{model_name=\"m\"} 0",
        ] {
            assert!(text.contains(series), "no {series} in\n{text}");
        }
        // No series for the engine that is gone, but its `up` gauge.
        assert!(!text.contains("vllm:num_requests_running{model_name=\"m\"}"));
        assert!(!text.contains("infermux_generation_tokens_per_second"));
        let types = types(&text);
        let mut names: Vec<_> = types.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), types.len(), "a family twice in\n{text}");
        for (name, kind) in [
            ("vllm:prompt_tokens_total", "counter"),
            ("vllm:generation_tokens_total", "counter"),
            ("vllm:request_success_total", "counter"),
            ("infermux_prompt_tokens_total", "counter"),
            ("vllm:kv_cache_usage_perc", "gauge"),
            ("vllm:e2e_request_latency_seconds", "histogram"),
        ] {
            assert!(
                types.contains(&(name.to_string(), kind.to_string())),
                "{name} is not a {kind} in\n{text}"
            );
        }
    }

    #[test]
    fn kv_usage_is_a_fraction_of_the_budget_clamped_to_one() {
        let at = |reserved, budget| {
            kv_usage(&EngineStats {
                kv_reserved_bytes: reserved,
                kv_budget_bytes: budget,
                ..EngineStats::default()
            })
        };
        assert_eq!(at(0, 0), 0.0);
        assert_eq!(at(1, 4), 0.25);
        assert_eq!(at(9, 4), 1.0);
    }

    #[test]
    fn servers_keep_separate_registries() {
        let a = Metrics::default();
        let b = Metrics::default();
        a.count_reply("/health", 200);
        let text = b.render(&snapshot(Vec::new()));
        assert!(!text.contains("route=\"/health\""), "{text}");
        assert!(
            a.render(&snapshot(Vec::new()))
                .contains("route=\"/health\"")
        );
    }
}
