//! Property tests over the wire and the library:
//! - structured-but-arbitrary JSON bodies (the routes' field names with arbitrary-typed
//!   values, extreme numbers, random nesting, unicode strings, random token ids, truncated or
//!   garbled bytes) for every POST route of one running `infermux serve`: never a 5xx, never a
//!   dropped connection, every 4xx an OpenAI error body, and afterwards the same known-good
//!   completion and no KV slot held;
//! - arbitrary `SamplingParams` JSON → `serde_json::from_value` → `SamplingClient::sample` /
//!   `sample_stream` on the tiny Llama: no panic, every refusal a typed validation error, and
//!   the engine still serves and frees every slot.
//!
//! Cases are drawn from a fixed seed (`INFERMUX_FUZZ_SEED=<u64>` picks another) and every
//! failing case is collected, not shrunk, so one run lists every distinct failure.

mod server_support;

#[path = "hostile_cases/common.rs"]
mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Harness, MODEL, RawReply, exchange, request_bytes};
use infermux::{EngineError, ModelInput, SamplingClient, SamplingParams, ServiceClient};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value, json};

/// HTTP cases per run (about a minute on 2 cores in a debug test build).
const WIRE_CASES: usize = 300;
/// Library cases per run (the tiny model: fast).
const LIBRARY_CASES: usize = 2000;

fn runner() -> (TestRunner, u64) {
    let seed = std::env::var("INFERMUX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x1f2e_3d4c_5b6a_7988);
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_add(i as u64)).to_le_bytes());
    }
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    (TestRunner::new_with_rng(config, rng), seed)
}

// ---------------------------------------------------------------------------------------------
// Value strategies.
// ---------------------------------------------------------------------------------------------

fn extreme_int() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(u32::MAX)),
        Just(json!(1u64 << 32)),
        Just(json!((1u64 << 53) + 1)),
        Just(json!(1u64 << 63)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
    ]
    .boxed()
}

fn extreme_float() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(json!(1e308)),
        Just(json!(-1e308)),
        Just(json!(1e39)),
        Just(json!(5e-324)),
        Just(json!(-0.0)),
        Just(json!(0.5)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|v| json!(v)),
    ]
    .boxed()
}

fn any_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ]{0,16}",
        3 => ".{0,12}",
        1 => Just(String::new()),
        1 => Just("\u{0}\u{1b}[31m\u{202e}😀é".to_string()),
        1 => Just("<|im_start|>user\n".to_string()),
        1 => Just("a{1000000000}".to_string()),
        1 => Just("x".repeat(5000)),
    ]
    .boxed()
}

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        extreme_int(),
        extreme_float(),
        any_string().prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON value: scalars, and arrays/objects nested a few levels.
fn any_json() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(any_string(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A value that is usually plausible for the field, sometimes anything.
fn mostly(plausible: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![14 => plausible, 1 => any_json()].boxed()
}

/// `max_tokens`: small by construction (≤ 8), or a value no request can run with (huge,
/// over the context, wrong type): never a large valid budget, never `null`.
fn max_tokens() -> BoxedStrategy<Value> {
    prop_oneof![
        40 => (1u64..=8).prop_map(|v| json!(v)),
        1 => Just(json!(0)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(1u64 << 63)),
        1 => Just(json!(100_000)),
        1 => Just(json!(8192)),
        1 => Just(json!(-1)),
        1 => Just(json!("4")),
        1 => Just(json!(2.5)),
        1 => Just(json!([1])),
    ]
    .boxed()
}

/// `n`, `best_of`, `num_samples`: mostly 1..=3.
fn count() -> BoxedStrategy<Value> {
    prop_oneof![
        24 => (1u64..=3).prop_map(|v| json!(v)),
        1 => Just(json!(0)),
        1 => Just(json!(65)),
        1 => extreme_int(),
        1 => any_json(),
    ]
    .boxed()
}

fn small_float(lo: f64, hi: f64) -> BoxedStrategy<Value> {
    prop_oneof![
        20 => (lo..=hi).prop_map(|v| json!(v)),
        1 => extreme_float(),
        1 => Just(json!("NaN")),
        1 => Just(json!(-1)),
    ]
    .boxed()
}

fn small_uint(hi: u64) -> BoxedStrategy<Value> {
    prop_oneof![12 => (0..=hi).prop_map(|v| json!(v)), 1 => extreme_int()].boxed()
}

fn token_id(vocab: u64) -> BoxedStrategy<Value> {
    prop_oneof![
        40 => (0..vocab).prop_map(|v| json!(v)),
        1 => (vocab..=u64::from(u32::MAX)).prop_map(|v| json!(v)),
        1 => extreme_int(),
    ]
    .boxed()
}

fn token_ids(vocab: u64, max_len: usize) -> BoxedStrategy<Value> {
    vec(token_id(vocab), 0..max_len)
        .prop_map(Value::Array)
        .boxed()
}

fn text() -> BoxedStrategy<Value> {
    any_string().prop_map(Value::String).boxed()
}

fn bool_value() -> BoxedStrategy<Value> {
    mostly(any::<bool>().prop_map(Value::Bool).boxed())
}

fn stop() -> BoxedStrategy<Value> {
    mostly(prop_oneof![text(), vec(text(), 0..3).prop_map(Value::Array)].boxed())
}

fn logit_bias(vocab: u64) -> BoxedStrategy<Value> {
    let key = prop_oneof![
        12 => (0..vocab).prop_map(|v| v.to_string()),
        1 => Just("abc".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("99999999999".to_string()),
    ];
    let bias = prop_oneof![
        12 => (-100.0f64..=100.0).prop_map(|v| json!(v)),
        1 => extreme_float(),
        1 => Just(json!("x")),
    ];
    mostly(
        btree_map(key, bias, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
    )
}

fn schema() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(json!({"type": "object"})),
        Just(json!({"type": "string", "maxLength": 3})),
        Just(json!({"type": "integer", "minimum": 0, "maximum": 9})),
        Just(json!({"type": 5})),
        Just(json!({"$ref": "#/nowhere"})),
        any_json(),
    ]
    .boxed()
}

fn regex() -> BoxedStrategy<Value> {
    mostly(
        prop_oneof![
            Just(json!("[a-z]{1,4}")),
            Just(json!("(yes|no)")),
            Just(json!("a{1000000000}")),
            Just(json!("(")),
            Just(json!("")),
            text(),
        ]
        .boxed(),
    )
}

fn choice() -> BoxedStrategy<Value> {
    mostly(
        prop_oneof![
            4 => vec(text(), 0..4).prop_map(Value::Array),
            1 => Just(json!((0..3000).map(|i| format!("c{i}")).collect::<Vec<_>>())),
        ]
        .boxed(),
    )
}

fn response_format() -> BoxedStrategy<Value> {
    mostly(
        prop_oneof![
            Just(json!({"type": "text"})),
            Just(json!({"type": "json_object"})),
            schema().prop_map(
                |s| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}})
            ),
            Just(json!({"type": "json_schema"})),
            text().prop_map(|t| json!({ "type": t })),
        ]
        .boxed(),
    )
}

fn guided_decoding() -> BoxedStrategy<Value> {
    let fields: Vec<(&'static str, BoxedStrategy<Value>)> = vec![
        ("json", schema()),
        ("regex", regex()),
        ("choice", choice()),
        (
            "grammar",
            mostly(
                prop_oneof![
                    Just(json!("start: \"a\" | \"b\"")),
                    Just(json!("start: (((")),
                    text()
                ]
                .boxed(),
            ),
        ),
        ("json_object", bool_value()),
        ("whitespace_pattern", text()),
    ];
    mostly(object(fields, 0.3, vec![]))
}

/// An object with each of `optional` present with probability `p` (in order), the
/// `required` ones always, and sometimes an unknown field.
fn object(
    optional: Vec<(&'static str, BoxedStrategy<Value>)>,
    p: f64,
    required: Vec<(&'static str, BoxedStrategy<Value>)>,
) -> BoxedStrategy<Value> {
    let names: Vec<&'static str> = optional.iter().map(|(n, _)| *n).collect();
    let required_names: Vec<&'static str> = required.iter().map(|(n, _)| *n).collect();
    let picks: Vec<BoxedStrategy<Option<Value>>> = optional
        .into_iter()
        .map(|(_, s)| proptest::option::weighted(p, s).boxed())
        .collect();
    let musts: Vec<BoxedStrategy<Value>> = required.into_iter().map(|(_, s)| s).collect();
    let unknown = proptest::option::weighted(0.03, (any_string(), any_json()));
    (picks, musts, unknown)
        .prop_map(move |(picks, musts, unknown)| {
            let mut map = Map::new();
            for (name, v) in required_names.iter().zip(musts) {
                map.insert((*name).to_string(), v);
            }
            for (name, v) in names.iter().zip(picks) {
                if let Some(v) = v {
                    map.insert((*name).to_string(), v);
                }
            }
            if let Some((k, v)) = unknown {
                map.insert(format!("x_{k}"), v);
            }
            Value::Object(map)
        })
        .boxed()
}

/// The sampling fields completions and chat share (vLLM's extensions included).
fn knob_fields(vocab: u64) -> Vec<(&'static str, BoxedStrategy<Value>)> {
    vec![
        (
            "model",
            mostly(prop_oneof![4 => Just(json!(MODEL)), 1 => Just(json!("gpt-4"))].boxed()),
        ),
        ("n", count()),
        ("temperature", small_float(0.0, 2.0)),
        ("top_p", small_float(0.0, 1.0)),
        (
            "top_k",
            mostly(prop_oneof![(-1i64..=50).prop_map(|v| json!(v)), extreme_int()].boxed()),
        ),
        ("min_p", small_float(0.0, 1.0)),
        ("repetition_penalty", small_float(0.0, 2.0)),
        ("presence_penalty", small_float(-2.0, 2.0)),
        ("frequency_penalty", small_float(-2.0, 2.0)),
        ("logit_bias", logit_bias(vocab)),
        ("seed", mostly(extreme_int())),
        ("stop", stop()),
        ("stop_token_ids", mostly(token_ids(vocab, 3))),
        ("ignore_eos", bool_value()),
        ("min_tokens", small_uint(4)),
        ("stream", bool_value()),
        (
            "stream_options",
            mostly(
                bool_value()
                    .prop_map(|b| json!({"include_usage": b}))
                    .boxed(),
            ),
        ),
        ("response_format", response_format()),
        ("guided_json", schema()),
        ("guided_regex", regex()),
        ("guided_choice", choice()),
        (
            "guided_grammar",
            mostly(
                prop_oneof![
                    Just(json!("start: \"a\"")),
                    Just(json!("start: (((")),
                    text()
                ]
                .boxed(),
            ),
        ),
        ("skip_special_tokens", bool_value()),
        ("include_stop_str_in_output", bool_value()),
        ("truncate_prompt_tokens", small_uint(8)),
        ("user", text()),
        ("return_token_ids", bool_value()),
        (
            "prompt_logprobs",
            mostly(
                prop_oneof![4 => (-1i64..=5).prop_map(|v| json!(v)), 1 => extreme_int()].boxed(),
            ),
        ),
        (
            "logprobs_mode",
            mostly(
                prop_oneof![
                    3 => Just(json!("raw_logprobs")),
                    3 => Just(json!("processed_logprobs")),
                    1 => Just(json!("raw_logits")),
                    1 => text()
                ]
                .boxed(),
            ),
        ),
    ]
}

const VOCAB: u64 = 49_152;

fn openai_prompt() -> BoxedStrategy<Value> {
    mostly(
        prop_oneof![
            4 => text(),
            3 => token_ids(VOCAB, 12),
            2 => vec(text(), 0..3).prop_map(Value::Array),
            2 => vec(token_ids(VOCAB, 8), 0..3).prop_map(Value::Array),
        ]
        .boxed(),
    )
}

fn completions_body() -> BoxedStrategy<Value> {
    let mut fields = knob_fields(VOCAB);
    fields.extend([
        ("max_tokens", max_tokens()),
        (
            "logprobs",
            mostly(prop_oneof![4 => (0u64..=5).prop_map(|v| json!(v)), 1 => extreme_int()].boxed()),
        ),
        ("echo", bool_value()),
        ("best_of", count()),
        ("suffix", text()),
    ]);
    let prompt = prop_oneof![19 => openai_prompt(), 1 => Just(Value::Null)];
    object(fields, 0.12, vec![("prompt", prompt.boxed())])
}

fn message() -> BoxedStrategy<Value> {
    let role = mostly(
        prop_oneof![
            Just(json!("user")),
            Just(json!("system")),
            Just(json!("assistant")),
            text()
        ]
        .boxed(),
    );
    let content = mostly(
        prop_oneof![
            4 => text(),
            1 => vec(
                prop_oneof![
                    text().prop_map(|t| json!({"type": "text", "text": t})),
                    Just(json!({"type": "image_url", "image_url": {"url": "http://x"}})),
                ],
                0..3
            )
            .prop_map(Value::Array),
        ]
        .boxed(),
    );
    object(
        vec![("name", text())],
        0.1,
        vec![("role", role), ("content", content)],
    )
}

fn chat_body() -> BoxedStrategy<Value> {
    let mut fields = knob_fields(VOCAB);
    fields.extend([
        ("max_completion_tokens", max_tokens()),
        ("logprobs", bool_value()),
        (
            "top_logprobs",
            mostly(prop_oneof![4 => (0u64..=5).prop_map(|v| json!(v)), 1 => extreme_int()].boxed()),
        ),
        ("add_generation_prompt", bool_value()),
    ]);
    let messages = mostly(vec(message(), 0..3).prop_map(Value::Array).boxed());
    // `max_tokens` always: without it a valid chat request may run to the context's end.
    object(
        fields,
        0.12,
        vec![("messages", messages), ("max_tokens", max_tokens())],
    )
}

/// Image `expected_tokens`: `safe_only` leaves out sizes between 2^29 and 2^61 positions,
/// which make today's `to_text_tokens` try (and fail) to allocate, aborting the process —
/// fine for the server (the harness restarts it and reports the case), fatal in process.
fn expected_tokens(safe_only: bool) -> BoxedStrategy<Value> {
    if safe_only {
        prop_oneof![
            Just(json!(0)),
            Just(json!(4)),
            Just(json!(1u64 << 62)),
            Just(json!(1u64 << 63)),
            Just(json!(u64::MAX)),
            Just(Value::Null),
        ]
        .boxed()
    } else {
        prop_oneof![
            Just(json!(4)),
            Just(json!(1u64 << 40)),
            Just(json!(u64::MAX)),
            extreme_int(),
            any_json()
        ]
        .boxed()
    }
}

fn chunk(vocab: u64, safe_only: bool) -> BoxedStrategy<Value> {
    prop_oneof![
        16 => token_ids(vocab, 12).prop_map(|t| json!({"type": "encoded_text", "tokens": t})),
        1 => (
            vec(any::<u8>(), 0..4),
            prop_oneof![Just("png"), Just("jpeg"), Just("gif")],
            expected_tokens(safe_only),
        )
            .prop_map(|(data, format, e)| json!({"type": "image", "data": data, "format": format, "expected_tokens": e})),
        1 => any_json(),
    ]
    .boxed()
}

fn model_input(vocab: u64, safe_only: bool) -> BoxedStrategy<Value> {
    mostly(
        vec(chunk(vocab, safe_only), 1..3)
            .prop_map(|chunks| json!({ "chunks": chunks }))
            .boxed(),
    )
}

/// `SamplingParams` fields (every serde name), for a model of `vocab` tokens.
fn sampling_params_fields(vocab: u64) -> Vec<(&'static str, BoxedStrategy<Value>)> {
    vec![
        ("n", count()),
        ("best_of", count()),
        ("presence_penalty", small_float(-2.0, 2.0)),
        ("frequency_penalty", small_float(-2.0, 2.0)),
        ("repetition_penalty", small_float(0.0, 2.0)),
        ("temperature", small_float(0.0, 2.0)),
        ("top_p", small_float(0.0, 1.0)),
        ("min_p", small_float(0.0, 1.0)),
        (
            "top_k",
            mostly(prop_oneof![(-1i64..=50).prop_map(|v| json!(v)), extreme_int()].boxed()),
        ),
        ("seed", mostly(extreme_int())),
        (
            "stop",
            mostly(vec(text(), 0..3).prop_map(Value::Array).boxed()),
        ),
        ("stop_token_ids", mostly(token_ids(vocab, 3))),
        ("stop_pattern", regex()),
        (
            "bad_words",
            mostly(vec(text(), 0..3).prop_map(Value::Array).boxed()),
        ),
        ("ignore_eos", bool_value()),
        ("min_tokens", small_uint(4)),
        ("logprobs", small_uint(5)),
        ("prompt_logprobs", small_uint(5)),
        ("detokenize", bool_value()),
        ("skip_special_tokens", bool_value()),
        ("spaces_between_special_tokens", bool_value()),
        ("include_stop_str_in_output", bool_value()),
        (
            "output_kind",
            mostly(
                prop_oneof![
                    Just(json!("CUMULATIVE")),
                    Just(json!("DELTA")),
                    Just(json!("FINAL_ONLY"))
                ]
                .boxed(),
            ),
        ),
        ("truncate_prompt_tokens", small_uint(8)),
        ("guided_decoding", guided_decoding()),
        ("logit_bias", logit_bias(vocab)),
        ("allowed_token_ids", mostly(token_ids(vocab, 4))),
        ("extra_args", any_json()),
        (
            "logprobs_mode",
            mostly(prop_oneof![Just(json!("raw")), Just(json!("raw_and_processed"))].boxed()),
        ),
    ]
}

/// `sampling_params` with `max_tokens` always there (it defaults to the rest of the context).
fn sampling_params_json(vocab: u64) -> BoxedStrategy<Value> {
    object(
        sampling_params_fields(vocab),
        0.1,
        vec![("max_tokens", max_tokens())],
    )
}

fn sample_body() -> BoxedStrategy<Value> {
    object(
        vec![
            ("num_samples", count()),
            ("include_prompt_logprobs", bool_value()),
            ("topk_prompt_logprobs", small_uint(5)),
        ],
        0.4,
        vec![
            ("prompt", model_input(VOCAB, false)),
            ("sampling_params", mostly(sampling_params_json(VOCAB))),
        ],
    )
}

fn compute_logprobs_body() -> BoxedStrategy<Value> {
    object(vec![], 0.0, vec![("prompt", model_input(VOCAB, false))])
}

/// How the body goes on the wire.
#[derive(Debug, Clone)]
enum Garble {
    /// As serialized.
    None,
    /// Cut at this fraction of its length.
    Truncate(f64),
    /// These bytes instead.
    Bytes(Vec<u8>),
}

fn wire_case() -> BoxedStrategy<(&'static str, Value, Garble)> {
    let garble = prop_oneof![
        17 => Just(Garble::None),
        2 => (0.0f64..1.0).prop_map(Garble::Truncate),
        1 => vec(any::<u8>(), 0..64).prop_map(Garble::Bytes),
    ];
    let route = prop_oneof![
        3 => completions_body().prop_map(|b| ("/v1/completions", b)),
        3 => chat_body().prop_map(|b| ("/v1/chat/completions", b)),
        3 => sample_body().prop_map(|b| ("/v1/sample", b)),
        1 => compute_logprobs_body().prop_map(|b| ("/v1/compute_logprobs", b)),
    ];
    (route, garble)
        .prop_map(|((path, body), garble)| (path, body, garble))
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// The wire property.
// ---------------------------------------------------------------------------------------------

fn body_bytes(body: &Value, garble: &Garble) -> Vec<u8> {
    let text = body.to_string().into_bytes();
    match garble {
        Garble::None => text,
        Garble::Truncate(f) => text[..((text.len() as f64 * f) as usize).min(text.len())].to_vec(),
        Garble::Bytes(b) => b.clone(),
    }
}

/// What is wrong with a reply (empty: acceptable).
fn wire_problems(reply: &RawReply) -> Vec<String> {
    let mut problems = Vec::new();
    if reply.status >= 500 {
        problems.push(format!("status {}: {}", reply.status, reply.snippet(200)));
        return problems;
    }
    let sse = reply
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if reply.status >= 400 {
        match reply.json() {
            Some(v) if v["error"]["message"].is_string() && v["error"]["type"].is_string() => {}
            _ => problems.push(format!(
                "status {} without an OpenAI error body: {}",
                reply.status,
                reply.snippet(200)
            )),
        }
    } else if sse {
        let text = reply.text();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .collect();
        if events.last() != Some(&"[DONE]") {
            problems.push(format!(
                "SSE stream does not end with [DONE]: {}",
                reply.snippet(200)
            ));
        }
        for e in &events {
            if let Ok(v) = serde_json::from_str::<Value>(e)
                && v.get("error").is_some()
            {
                problems.push(format!(
                    "error event inside a {} stream (type {}, param {}): {}",
                    reply.status, v["error"]["type"], v["error"]["param"], v["error"]["message"]
                ));
            }
        }
    } else if reply.json().is_none() {
        problems.push(format!(
            "status {} body is not JSON: {}",
            reply.status,
            reply.snippet(200)
        ));
    }
    problems
}

fn snippet(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() <= n {
        text.into_owned()
    } else {
        format!("{}…", text.chars().take(n).collect::<String>())
    }
}

/// Groups failure lines by their first words, for a short summary.
fn classes(failures: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for f in failures {
        let key = f
            .split(" | ")
            .next()
            .unwrap_or("")
            .split(": ")
            .nth(1)
            .unwrap_or("")
            .chars()
            .take(60)
            .collect::<String>();
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("  {n:4} × {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn arbitrary_json_bodies_never_get_5xx_or_break_the_server() {
    let started = Instant::now();
    let (mut runner, seed) = runner();
    let strategy = wire_case();
    let mut h = Harness::start(&["--request-timeout-secs", "120"]);
    let mut failures: Vec<String> = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut params = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..WIRE_CASES {
        let (path, body, garble) = strategy
            .new_tree(&mut runner)
            .expect("generating a case")
            .current();
        let bytes = body_bytes(&body, &garble);
        let request = request_bytes("POST", path, &[], &bytes);
        let mut problems = match exchange(h.addr(), &request, Duration::from_secs(120)) {
            Ok(reply) => {
                *statuses.entry(reply.status).or_default() += 1;
                if let Some(v) = reply.json().filter(|_| reply.status >= 400) {
                    let p: String = v["error"]["param"]
                        .as_str()
                        .unwrap_or("-")
                        .chars()
                        .take(40)
                        .collect();
                    *params.entry(p).or_default() += 1;
                }
                wire_problems(&reply)
            }
            Err(e) => vec![format!("no reply: {e}")],
        };
        // Check health at once after a failure (to blame the right case), else every 25.
        if !problems.is_empty() || i % 25 == 24 {
            problems.extend(
                h.check_health()
                    .into_iter()
                    .map(|p| format!("afterwards: {p}")),
            );
        }
        if !problems.is_empty() {
            let line = format!(
                "#{i} {path}: {} | body {}",
                problems.join(" | "),
                snippet(&bytes, 300)
            );
            eprintln!("FAIL  {line}");
            failures.push(line);
        }
    }
    let end = h.check_health();
    eprintln!(
        "fuzz wire: {WIRE_CASES} cases run (seed {seed}), statuses {statuses:?}, 4xx params {params:?}, {} failed, {} server restarts, {:.1} s",
        failures.len(),
        h.restarts,
        started.elapsed().as_secs_f64()
    );
    assert!(end.is_empty(), "after the run: {end:?}");
    assert!(
        failures.is_empty(),
        "{} of {WIRE_CASES} arbitrary bodies failed (seed {seed}); by kind:\n{}\nall:\n{}",
        failures.len(),
        classes(&failures),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The library property.
// ---------------------------------------------------------------------------------------------

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny/llama3")
}

fn load_tiny() -> SamplingClient {
    ServiceClient::new()
        .create_sampling_client(tiny_model())
        .expect("loading tests/data/tiny/llama3")
}

fn greedy_tokens(client: &SamplingClient) -> Result<Vec<u32>, String> {
    client
        .sample(
            ModelInput::from_ints(vec![10, 20, 30, 40]),
            1,
            SamplingParams::greedy(6),
            false,
            0,
        )
        .wait()
        .map(|r| r.sequences[0].tokens.clone())
        .map_err(|e| e.to_string())
}

/// `None` once every KV slot is free and nothing runs (waits up to 10 s).
fn library_leak(client: &SamplingClient) -> Option<String> {
    let start = Instant::now();
    loop {
        match client.engine().stats() {
            Err(e) => return Some(format!("engine stats failed: {e}")),
            Ok(s)
                if s.free_slots == s.total_slots
                    && s.running_requests == 0
                    && s.waiting_requests == 0
                    && s.kv_reserved_bytes == 0 =>
            {
                return None;
            }
            Ok(s) if start.elapsed() > Duration::from_secs(10) => {
                return Some(format!(
                    "not idle: {} of {} slots free, {} running, {} waiting, {} bytes reserved",
                    s.free_slots,
                    s.total_slots,
                    s.running_requests,
                    s.waiting_requests,
                    s.kv_reserved_bytes
                ));
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Whether an error is a typed refusal of the request (what hostile input may get).
fn is_typed_refusal(e: &infermux::Error) -> bool {
    matches!(e, infermux::Error::Engine(EngineError::Invalid(_)))
}

/// The field (or variant) a typed refusal names.
fn refusal_kind(e: &infermux::Error) -> String {
    match e {
        infermux::Error::Engine(EngineError::Invalid(v)) => match v {
            infermux::ValidationError::InvalidField { field, .. } => (*field).to_string(),
            other => format!("{other:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or("")
                .to_string(),
        },
        other => other.to_string(),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

#[test]
fn arbitrary_sampling_params_through_the_library_never_panic() {
    let started = Instant::now();
    let (mut runner, seed) = runner();
    let vocab = 256;
    let strategy = (
        sampling_params_json(vocab),
        model_input(vocab, true),
        count(),
        any::<bool>(),
        small_uint(3),
        any::<bool>(),
    );
    let mut client = load_tiny();
    let good = greedy_tokens(&client).expect("greedy on the tiny model");
    let mut failures: Vec<String> = Vec::new();
    let (mut parsed, mut served) = (0usize, 0usize);
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..LIBRARY_CASES {
        let (params_json, prompt_json, num_samples, include_prompt, topk, stream) = strategy
            .new_tree(&mut runner)
            .expect("generating a case")
            .current();
        // Arbitrary JSON either deserializes or is a serde error; both are fine.
        let Ok(params) = serde_json::from_value::<SamplingParams>(params_json.clone()) else {
            continue;
        };
        let Ok(prompt) = serde_json::from_value::<ModelInput>(prompt_json.clone()) else {
            continue;
        };
        parsed += 1;
        let num_samples = num_samples.as_u64().map_or(1, |n| n as usize);
        let topk = topk.as_u64().map_or(0, |k| k as usize);
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if stream {
                for item in client.sample_stream(prompt.clone(), params.clone()) {
                    item.map_err(infermux::Error::from)?;
                }
                Ok(())
            } else {
                client
                    .sample(
                        prompt.clone(),
                        num_samples,
                        params.clone(),
                        include_prompt,
                        topk,
                    )
                    .wait()
                    .map(drop)
            }
        }));
        let problem = match run {
            Ok(Ok(())) => {
                served += 1;
                None
            }
            Ok(Err(e)) if is_typed_refusal(&e) => {
                *refused.entry(refusal_kind(&e)).or_default() += 1;
                None
            }
            Ok(Err(e)) => Some(format!("untyped failure: {e:?}")),
            Err(p) => Some(format!("panicked: {}", panic_text(p.as_ref()))),
        };
        let mut problems: Vec<String> = problem.into_iter().collect();
        if !problems.is_empty() || i % 50 == 49 {
            if let Some(leak) = library_leak(&client) {
                problems.push(leak);
            }
            match greedy_tokens(&client) {
                Ok(t) if t == good => {}
                Ok(t) => problems.push(format!("greedy tokens changed: {t:?} vs {good:?}")),
                Err(e) => problems.push(format!("greedy request failed afterwards: {e}")),
            }
        }
        if !problems.is_empty() {
            let line = format!(
                "#{i} {} num_samples={num_samples} stream={stream}: {} | params {} | prompt {}",
                if stream { "sample_stream" } else { "sample" },
                problems.join(" | "),
                snippet(params_json.to_string().as_bytes(), 300),
                snippet(prompt_json.to_string().as_bytes(), 120),
            );
            eprintln!("FAIL  {line}");
            failures.push(line);
            // A fresh engine for the next cases, whatever this one did to it.
            client = load_tiny();
        }
    }
    let end_leak = library_leak(&client);
    let end_good = greedy_tokens(&client);
    eprintln!(
        "fuzz library: {LIBRARY_CASES} cases run (seed {seed}), {parsed} parsed, {served} served, {} refused with a typed error {refused:?}, {} failed, {:.1} s",
        refused.values().sum::<usize>(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(end_leak, None, "after the run");
    assert_eq!(end_good, Ok(good), "greedy after the run");
    assert!(
        failures.is_empty(),
        "{} of {LIBRARY_CASES} cases failed (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
