//! Hostile inputs, as a table: bad requests on every route of `infermux serve` (bad JSON,
//! wrong types, extreme numbers, huge prompts, image chunks of absurd length, grammar limits,
//! limits on bodies, headers and request lines, wrong methods and routes) and bad flags of
//! `infermux sample` / `logprobs` / `serve`. Each case states the status (or exit code) and the
//! field the error must name; after each HTTP case the server must still serve the same
//! known-good greedy completion and go idle with every KV slot free. Failing cases are
//! collected and reported together at the end, with a summary line.

mod server_support;

#[path = "hostile_cases/common.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Harness, MODEL, RawReply, error_shape_problems, exchange, request_bytes};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The HTTP table.
// ---------------------------------------------------------------------------------------------

/// What the error's `param` must be.
#[derive(Debug, Clone, Copy)]
enum Param {
    /// One of these (`x*`: starts with `x`; `*x*`: contains `x`).
    OneOf(&'static [&'static str]),
    /// `null`: there is no field to blame (bad route, method, body size, headers).
    Null,
    /// Not checked (a body that is not JSON at all may or may not be blamed on a field).
    Any,
}

/// How a case's request goes on the wire.
#[derive(Debug, Clone)]
enum Send {
    /// `POST path` with this JSON body.
    Json(&'static str, Value),
    /// A request with this method, path, extra headers and body bytes.
    Raw {
        method: &'static str,
        path: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// These bytes exactly.
    Wire(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    send: Send,
    status: &'static [u16],
    param: Param,
    /// How long to wait for the reply.
    timeout: Duration,
}

impl Send {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Send::Json(path, body) => request_bytes("POST", path, &[], body.to_string().as_bytes()),
            Send::Raw {
                method,
                path,
                headers,
                body,
            } => {
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                request_bytes(method, path, &headers, body)
            }
            Send::Wire(bytes) => bytes.clone(),
        }
    }
}

const BAD: &[u16] = &[400];

fn post(name: &str, path: &'static str, body: Value, status: &'static [u16], param: Param) -> Case {
    Case {
        name: name.into(),
        send: Send::Json(path, body),
        status,
        param,
        timeout: Duration::from_secs(120),
    }
}

fn raw(
    name: &str,
    method: &'static str,
    path: &str,
    headers: &[(&'static str, &str)],
    body: &[u8],
    status: &'static [u16],
    param: Param,
) -> Case {
    Case {
        name: name.into(),
        send: Send::Raw {
            method,
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            body: body.to_vec(),
        },
        status,
        param,
        timeout: Duration::from_secs(120),
    }
}

fn wire(name: &str, bytes: &[u8], status: &'static [u16], param: Param) -> Case {
    Case {
        name: name.into(),
        send: Send::Wire(bytes.to_vec()),
        status,
        param,
        timeout: Duration::from_secs(120),
    }
}

/// `{"prompt": "Hi", "max_tokens": 2, ...extra}` (extra overrides).
fn completion(extra: Value) -> Value {
    merge(
        json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
        extra,
    )
}

/// `{"messages": [user "Hi"], "max_tokens": 2, ...extra}`.
fn chat(extra: Value) -> Value {
    merge(
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        extra,
    )
}

/// A `/v1/sample` body: the known prompt, 1 sample, `sampling_params` = `{"max_tokens": 2}`
/// merged with `params`, then the top-level `extra`.
fn sample(params: Value, extra: Value) -> Value {
    merge(
        json!({
            "prompt": tokens_prompt(&[504, 3575, 282, 4649, 314]),
            "num_samples": 1,
            "sampling_params": merge(json!({"max_tokens": 2}), params),
        }),
        extra,
    )
}

fn tokens_prompt(ids: &[u64]) -> Value {
    json!({"chunks": [{"type": "encoded_text", "tokens": ids}]})
}

/// A prompt of a few text tokens then `images` image chunks of `expected_tokens` each.
fn image_prompt(expected_tokens: Value, images: usize) -> Value {
    let mut chunks = vec![json!({"type": "encoded_text", "tokens": [504, 3575]})];
    for _ in 0..images {
        chunks.push(json!({"type": "image", "data": [1], "format": "png", "expected_tokens": expected_tokens}));
    }
    json!({ "chunks": chunks })
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
    base
}

/// A prompt far beyond the 8192-token context.
fn huge_text() -> String {
    "hello ".repeat(10_000)
}

fn deep_array(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

const U64_MAX: u64 = u64::MAX;

/// Every HTTP case, one per line: name, route, body, expected status, expected `param`.
/// Bodies that a server might accept anyway are kept cheap (`max_tokens` 2).
#[rustfmt::skip]
#[allow(clippy::too_many_lines)]
fn http_cases() -> Vec<Case> {
    use Param::{Any, Null, OneOf};
    const C: &str = "/v1/completions";
    const CH: &str = "/v1/chat/completions";
    const S: &str = "/v1/sample";
    const L: &str = "/v1/compute_logprobs";
    let choice_20k: Vec<String> = (0..20_000).map(|i| format!("option{i}")).collect();
    let over_256: Vec<String> = (0..257).map(|i| format!("p{i}")).collect();
    let long_ids: Vec<u64> = (0..9000).map(|i| 100 + (i % 1000)).collect();
    let mut v = vec![
        // --- /v1/completions: prompt ---
        post("completions: no prompt", C, json!({"model": MODEL, "max_tokens": 2}), BAD, OneOf(&["prompt"])),
        post("completions: empty prompt", C, completion(json!({"prompt": ""})), BAD, OneOf(&["prompt"])),
        post("completions: empty prompt list", C, completion(json!({"prompt": []})), BAD, OneOf(&["prompt"])),
        post("completions: empty token list in a list", C, completion(json!({"prompt": [[]]})), BAD, OneOf(&["prompt*"])),
        post("completions: prompt is a number", C, completion(json!({"prompt": 42})), BAD, OneOf(&["prompt*"])),
        post("completions: prompt is an object", C, completion(json!({"prompt": {"text": "x"}})), BAD, OneOf(&["prompt*"])),
        post("completions: prompt mixes ids and text", C, completion(json!({"prompt": [1, "a"]})), BAD, OneOf(&["prompt*"])),
        post("completions: token id out of vocabulary", C, completion(json!({"prompt": [999_999]})), BAD, OneOf(&["prompt*"])),
        post("completions: token id u32::MAX", C, completion(json!({"prompt": [u32::MAX]})), BAD, OneOf(&["prompt*"])),
        post("completions: token id over u32", C, completion(json!({"prompt": [4_294_967_296u64]})), BAD, OneOf(&["prompt*"])),
        post("completions: negative token id", C, completion(json!({"prompt": [-1]})), BAD, OneOf(&["prompt*"])),
        post("completions: huge text prompt", C, completion(json!({"prompt": huge_text(), "max_tokens": 5})), BAD, OneOf(&["prompt", "max_tokens"])),
        post("completions: 9000 token ids", C, completion(json!({"prompt": long_ids, "max_tokens": 5})), BAD, OneOf(&["prompt", "max_tokens"])),
        post("completions: 257 prompts (over max sequences per request)", C, completion(json!({"prompt": over_256, "max_tokens": 1})), BAD, OneOf(&["prompt"])),
        post("completions: 5 prompts x n=60 (over max sequences per request)", C, completion(json!({"prompt": ["a", "b", "c", "d", "e"], "n": 60, "max_tokens": 1})), BAD, OneOf(&["prompt", "n"])),
        // --- /v1/completions: numbers ---
        post("completions: max_tokens u64::MAX", C, completion(json!({"max_tokens": U64_MAX})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens 2^63", C, completion(json!({"max_tokens": 1u64 << 63})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens 100000 (context)", C, completion(json!({"max_tokens": 100_000})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens 0", C, completion(json!({"max_tokens": 0})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens -1", C, completion(json!({"max_tokens": -1})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens 1.5", C, completion(json!({"max_tokens": 1.5})), BAD, OneOf(&["max_tokens"])),
        post("completions: max_tokens as a string", C, completion(json!({"max_tokens": "10"})), BAD, OneOf(&["max_tokens"])),
        post("completions: n 0", C, completion(json!({"n": 0})), BAD, OneOf(&["n"])),
        post("completions: n u64::MAX", C, completion(json!({"n": U64_MAX})), BAD, OneOf(&["n"])),
        post("completions: n -1", C, completion(json!({"n": -1})), BAD, OneOf(&["n"])),
        post("completions: best_of u64::MAX", C, completion(json!({"best_of": U64_MAX})), BAD, OneOf(&["best_of"])),
        post("completions: best_of < n", C, completion(json!({"n": 3, "best_of": 2})), BAD, OneOf(&["best_of"])),
        post("completions: n u64::MAX with best_of u64::MAX", C, completion(json!({"n": U64_MAX, "best_of": U64_MAX})), BAD, OneOf(&["n", "best_of"])),
        post("completions: logprobs 1000", C, completion(json!({"logprobs": 1000})), BAD, OneOf(&["logprobs"])),
        post("completions: logprobs 100000", C, completion(json!({"logprobs": 100_000})), BAD, OneOf(&["logprobs"])),
        post("completions: logprobs u64::MAX with echo", C, completion(json!({"logprobs": U64_MAX, "echo": true})), BAD, OneOf(&["logprobs"])),
        post("completions: temperature \"NaN\"", C, completion(json!({"temperature": "NaN"})), BAD, OneOf(&["temperature"])),
        post("completions: temperature 1e39 (inf as f32)", C, completion(json!({"temperature": 1e39})), BAD, OneOf(&["temperature"])),
        post("completions: temperature -0.5", C, completion(json!({"temperature": -0.5})), BAD, OneOf(&["temperature"])),
        post("completions: top_p 0", C, completion(json!({"top_p": 0})), BAD, OneOf(&["top_p"])),
        post("completions: top_p 1.5", C, completion(json!({"top_p": 1.5})), BAD, OneOf(&["top_p"])),
        post("completions: top_k over i32", C, completion(json!({"top_k": 10_000_000_000u64})), BAD, OneOf(&["top_k"])),
        post("completions: min_p 2", C, completion(json!({"min_p": 2})), BAD, OneOf(&["min_p"])),
        post("completions: repetition_penalty 0", C, completion(json!({"repetition_penalty": 0})), BAD, OneOf(&["repetition_penalty"])),
        post("completions: presence_penalty 3", C, completion(json!({"presence_penalty": 3})), BAD, OneOf(&["presence_penalty"])),
        post("completions: frequency_penalty -1e30", C, completion(json!({"frequency_penalty": -1e30})), BAD, OneOf(&["frequency_penalty"])),
        post("completions: seed -1", C, completion(json!({"seed": -1})), BAD, OneOf(&["seed"])),
        post("completions: min_tokens > max_tokens", C, completion(json!({"min_tokens": 100})), BAD, OneOf(&["min_tokens"])),
        post("completions: min_tokens u64::MAX", C, completion(json!({"min_tokens": U64_MAX})), BAD, OneOf(&["min_tokens"])),
        post("completions: truncate_prompt_tokens 0", C, completion(json!({"truncate_prompt_tokens": 0})), BAD, OneOf(&["truncate_prompt_tokens"])),
        // --- /v1/completions: other fields ---
        post("completions: logit_bias key not a token id", C, completion(json!({"logit_bias": {"abc": 1}})), BAD, OneOf(&["logit_bias*"])),
        post("completions: logit_bias 500", C, completion(json!({"logit_bias": {"1": 500}})), BAD, OneOf(&["logit_bias*"])),
        post("completions: logit_bias token out of vocabulary", C, completion(json!({"logit_bias": {"99999999": 1}})), BAD, OneOf(&["logit_bias*"])),
        post("completions: logit_bias value a string", C, completion(json!({"logit_bias": {"1": "a"}})), BAD, OneOf(&["logit_bias*"])),
        post("completions: empty stop string", C, completion(json!({"stop": ""})), BAD, OneOf(&["stop"])),
        post("completions: stop is a number", C, completion(json!({"stop": 5})), BAD, OneOf(&["stop*"])),
        post("completions: stop_token_ids out of vocabulary", C, completion(json!({"stop_token_ids": [99_999]})), BAD, OneOf(&["stop_token_ids*"])),
        post("completions: suffix", C, completion(json!({"suffix": "x"})), BAD, OneOf(&["suffix"])),
        post("completions: unknown field", C, completion(json!({"temprature": 1})), BAD, OneOf(&["temprature"])),
        post("completions: duplicate of a field as wrong type", C, completion(json!({"echo": "yes"})), BAD, OneOf(&["echo"])),
        post("completions: stream_options.include_usage a string", C, completion(json!({"stream_options": {"include_usage": "yes"}})), BAD, OneOf(&["stream_options*"])),
        post("completions: stream a string", C, completion(json!({"stream": "yes"})), BAD, OneOf(&["stream"])),
        post("completions: best_of > n with stream", C, completion(json!({"n": 1, "best_of": 2, "stream": true})), BAD, OneOf(&["best_of"])),
        post("completions: unknown model", C, completion(json!({"model": "gpt-4"})), &[404], OneOf(&["model"])),
        post("completions: model a number", C, completion(json!({"model": 42})), BAD, OneOf(&["model"])),
        // --- guided decoding on the OpenAI routes ---
        post("completions: guided_regex a{1000000000}", C, completion(json!({"guided_regex": "a{1000000000}"})), BAD, OneOf(&["guided_decoding", "guided_regex"])),
        post("completions: guided_regex unbalanced", C, completion(json!({"guided_regex": "(ab"})), BAD, OneOf(&["guided_decoding", "guided_regex"])),
        post("completions: guided_choice of 20000 options", C, completion(json!({"guided_choice": choice_20k})), BAD, OneOf(&["guided_decoding", "guided_choice"])),
        post("completions: guided_choice empty", C, completion(json!({"guided_choice": []})), BAD, OneOf(&["guided_decoding*", "guided_choice"])),
        post("completions: guided_json invalid schema", C, completion(json!({"guided_json": {"type": 12}})), BAD, OneOf(&["guided_decoding", "guided_json"])),
        post("completions: guided_grammar not a grammar", C, completion(json!({"guided_grammar": "start: ((("})), BAD, OneOf(&["guided_decoding", "guided_grammar"])),
        post("completions: two guided constraints", C, completion(json!({"guided_regex": "a+", "guided_choice": ["a"]})), BAD, OneOf(&["guided_decoding", "guided_regex", "guided_choice"])),
        post("completions: response_format type xml", C, completion(json!({"response_format": {"type": "xml"}})), BAD, OneOf(&["response_format*"])),
        post("completions: response_format json_schema without schema", C, completion(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})), BAD, OneOf(&["response_format*"])),
        post("completions: response_format schema invalid", C, completion(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})), BAD, OneOf(&["guided_decoding", "response_format*"])),
        // --- /v1/chat/completions ---
        post("chat: no messages", CH, json!({"model": MODEL, "max_tokens": 2}), BAD, OneOf(&["messages"])),
        post("chat: empty messages", CH, chat(json!({"messages": []})), BAD, OneOf(&["messages"])),
        post("chat: messages a string", CH, chat(json!({"messages": "Hi"})), BAD, OneOf(&["messages*"])),
        post("chat: message without role", CH, chat(json!({"messages": [{"content": "Hi"}]})), BAD, OneOf(&["messages*"])),
        post("chat: role a number", CH, chat(json!({"messages": [{"role": 42, "content": "Hi"}]})), BAD, OneOf(&["messages*"])),
        post("chat: content a number", CH, chat(json!({"messages": [{"role": "user", "content": 42}]})), BAD, OneOf(&["messages*"])),
        post("chat: image content part", CH, chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})), BAD, OneOf(&["messages*"])),
        post("chat: huge message", CH, chat(json!({"messages": [{"role": "user", "content": huge_text()}]})), BAD, OneOf(&["messages", "max_tokens"])),
        post("chat: top_logprobs 1000", CH, chat(json!({"logprobs": true, "top_logprobs": 1000})), BAD, OneOf(&["top_logprobs"])),
        post("chat: top_logprobs without logprobs", CH, chat(json!({"top_logprobs": 3})), BAD, OneOf(&["top_logprobs"])),
        post("chat: logprobs a number", CH, chat(json!({"logprobs": 5})), BAD, OneOf(&["logprobs"])),
        post("chat: max_completion_tokens u64::MAX", CH, chat(json!({"max_completion_tokens": U64_MAX})), BAD, OneOf(&["max_completion_tokens", "max_tokens"])),
        post("chat: max_tokens u64::MAX", CH, chat(json!({"max_tokens": U64_MAX})), BAD, OneOf(&["max_tokens"])),
        post("chat: max_tokens 100000", CH, chat(json!({"max_tokens": 100_000})), BAD, OneOf(&["max_tokens"])),
        post("chat: n 0", CH, chat(json!({"n": 0})), BAD, OneOf(&["n"])),
        post("chat: n u64::MAX", CH, chat(json!({"n": U64_MAX})), BAD, OneOf(&["n"])),
        post("chat: temperature \"NaN\"", CH, chat(json!({"temperature": "NaN"})), BAD, OneOf(&["temperature"])),
        post("chat: top_p -1", CH, chat(json!({"top_p": -1})), BAD, OneOf(&["top_p"])),
        post("chat: guided_regex a{1000000000}", CH, chat(json!({"guided_regex": "a{1000000000}"})), BAD, OneOf(&["guided_decoding", "guided_regex"])),
        post("chat: response_format schema invalid type", CH, chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})), BAD, OneOf(&["guided_decoding", "response_format*"])),
        post("chat: unknown model", CH, chat(json!({"model": "gpt-4"})), &[404], OneOf(&["model"])),
        post("chat: unknown field", CH, chat(json!({"functions": []})), BAD, OneOf(&["functions"])),
        // --- /v1/sample ---
        post("sample: no prompt", S, json!({"num_samples": 1, "sampling_params": {"max_tokens": 2}}), BAD, OneOf(&["prompt"])),
        post("sample: prompt a string", S, sample(json!({}), json!({"prompt": "Hi"})), BAD, OneOf(&["prompt*"])),
        post("sample: no chunks", S, sample(json!({}), json!({"prompt": {"chunks": []}})), BAD, OneOf(&["prompt*"])),
        post("sample: empty text chunk", S, sample(json!({}), json!({"prompt": tokens_prompt(&[])})), BAD, OneOf(&["prompt*"])),
        post("sample: unknown chunk type", S, sample(json!({}), json!({"prompt": {"chunks": [{"type": "audio", "tokens": [1]}]}})), BAD, OneOf(&["prompt*"])),
        post("sample: token out of vocabulary", S, sample(json!({}), json!({"prompt": tokens_prompt(&[49_152])})), BAD, OneOf(&["prompt*"])),
        post("sample: image chunk (text-only model)", S, sample(json!({}), json!({"prompt": image_prompt(json!(4), 1)})), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("sample: image expected_tokens u64::MAX", S, sample(json!({}), json!({"prompt": image_prompt(json!(U64_MAX), 1)})), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("sample: two images of 2^63 expected_tokens", S, sample(json!({}), json!({"prompt": image_prompt(json!(1u64 << 63), 2)})), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("sample: image expected_tokens 2^40", S, sample(json!({}), json!({"prompt": image_prompt(json!(1u64 << 40), 1)})), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("sample: image format gif", S, sample(json!({}), json!({"prompt": {"chunks": [{"type": "image", "data": [1], "format": "gif", "expected_tokens": 1}]}})), BAD, OneOf(&["prompt*"])),
        post("sample: num_samples 0", S, sample(json!({}), json!({"num_samples": 0})), BAD, OneOf(&["num_samples", "n"])),
        post("sample: num_samples u64::MAX", S, sample(json!({}), json!({"num_samples": U64_MAX})), BAD, OneOf(&["num_samples", "n"])),
        post("sample: sampling_params.n != num_samples", S, sample(json!({"n": 2}), json!({"num_samples": 1})), BAD, OneOf(&["sampling_params.n"])),
        post("sample: sampling_params.n 0 with num_samples 1", S, sample(json!({"n": 0}), json!({})), BAD, OneOf(&["sampling_params.n"])),
        post("sample: max_tokens u64::MAX", S, sample(json!({"max_tokens": U64_MAX}), json!({})), BAD, OneOf(&["max_tokens", "sampling_params.max_tokens"])),
        post("sample: max_tokens 100000", S, sample(json!({"max_tokens": 100_000}), json!({})), BAD, OneOf(&["max_tokens", "sampling_params.max_tokens"])),
        post("sample: temperature \"NaN\"", S, sample(json!({"temperature": "NaN"}), json!({})), BAD, OneOf(&["sampling_params.temperature", "temperature"])),
        post("sample: temperature -1", S, sample(json!({"temperature": -1}), json!({})), BAD, OneOf(&["sampling_params.temperature", "temperature"])),
        post("sample: best_of 2 greedy", S, sample(json!({"best_of": 2, "temperature": 0}), json!({})), BAD, OneOf(&["sampling_params.best_of", "best_of"])),
        post("sample: truncate_prompt_tokens u64::MAX, max_tokens u64::MAX", S, sample(json!({"truncate_prompt_tokens": U64_MAX, "max_tokens": U64_MAX}), json!({})), BAD, OneOf(&["max_tokens", "sampling_params.max_tokens"])),
        post("sample: logprobs 5000", S, sample(json!({"logprobs": 5000}), json!({})), BAD, OneOf(&["sampling_params.logprobs", "logprobs"])),
        post("sample: prompt_logprobs u64::MAX", S, sample(json!({"prompt_logprobs": U64_MAX}), json!({})), BAD, OneOf(&["sampling_params.prompt_logprobs", "prompt_logprobs"])),
        post("sample: topk_prompt_logprobs 100000", S, sample(json!({}), json!({"topk_prompt_logprobs": 100_000})), BAD, OneOf(&["topk_prompt_logprobs"])),
        post("sample: include_prompt_logprobs a string", S, sample(json!({}), json!({"include_prompt_logprobs": "yes"})), BAD, OneOf(&["include_prompt_logprobs"])),
        post("sample: stop_pattern unbalanced", S, sample(json!({"stop_pattern": "("}), json!({})), BAD, OneOf(&["sampling_params.stop_pattern", "stop_pattern"])),
        post("sample: stop_pattern a{1000000000}", S, sample(json!({"stop_pattern": "a{1000000000}"}), json!({})), BAD, OneOf(&["sampling_params.stop_pattern", "stop_pattern"])),
        post("sample: bad_words blank", S, sample(json!({"bad_words": [" "]}), json!({})), BAD, OneOf(&["sampling_params.bad_words", "bad_words"])),
        post("sample: allowed_token_ids empty", S, sample(json!({"allowed_token_ids": []}), json!({})), BAD, OneOf(&["sampling_params.allowed_token_ids", "allowed_token_ids"])),
        post("sample: allowed_token_ids out of vocabulary", S, sample(json!({"allowed_token_ids": [999_999]}), json!({})), BAD, OneOf(&["sampling_params.allowed_token_ids", "allowed_token_ids"])),
        post("sample: output_kind unknown", S, sample(json!({"output_kind": "SIDEWAYS"}), json!({})), BAD, OneOf(&["sampling_params.output_kind"])),
        post("sample: unknown sampling_params field", S, sample(json!({"temprature": 1}), json!({})), BAD, OneOf(&["sampling_params.temprature", "temprature"])),
        post("sample: unknown top-level field", S, sample(json!({}), json!({"bogus": 1})), BAD, OneOf(&["bogus"])),
        post("sample: guided regex a{1000000000}", S, sample(json!({"guided_decoding": {"regex": "a{1000000000}"}}), json!({})), BAD, OneOf(&["guided_decoding", "sampling_params.guided_decoding"])),
        post("sample: guided choice of 20000 options", S, sample(json!({"guided_decoding": {"choice": choice_20k}}), json!({})), BAD, OneOf(&["guided_decoding", "sampling_params.guided_decoding"])),
        post("sample: guided json schema invalid", S, sample(json!({"guided_decoding": {"json": {"type": "nonsense"}}}), json!({})), BAD, OneOf(&["guided_decoding", "sampling_params.guided_decoding"])),
        post("sample: guided grammar invalid", S, sample(json!({"guided_decoding": {"grammar": "start: ((("}}), json!({})), BAD, OneOf(&["guided_decoding", "sampling_params.guided_decoding"])),
        post("sample: guided unknown field", S, sample(json!({"guided_decoding": {"regexp": "a"}}), json!({})), BAD, OneOf(&["sampling_params.guided_decoding*"])),
        // --- /v1/compute_logprobs ---
        post("logprobs: no prompt", L, json!({}), BAD, OneOf(&["prompt"])),
        post("logprobs: no chunks", L, json!({"prompt": {"chunks": []}}), BAD, OneOf(&["prompt*"])),
        post("logprobs: token out of vocabulary", L, json!({"prompt": tokens_prompt(&[1, 70_000])}), BAD, OneOf(&["prompt*"])),
        post("logprobs: 9000 tokens (context)", L, json!({"prompt": tokens_prompt(&(0..9000).map(|i| 100 + i % 1000).collect::<Vec<u64>>())}), BAD, OneOf(&["prompt"])),
        post("logprobs: image expected_tokens u64::MAX", L, json!({"prompt": image_prompt(json!(U64_MAX), 1)}), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("logprobs: two images of 2^63 expected_tokens", L, json!({"prompt": image_prompt(json!(1u64 << 63), 2)}), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("logprobs: image expected_tokens 2^40", L, json!({"prompt": image_prompt(json!(1u64 << 40), 1)}), BAD, OneOf(&["prompt*", "*expected_tokens*"])),
        post("logprobs: expected_tokens negative", L, json!({"prompt": image_prompt(json!(-1), 1)}), BAD, OneOf(&["prompt*"])),
        post("logprobs: unknown field", L, json!({"prompt": tokens_prompt(&[1, 2]), "top_k": 5}), BAD, OneOf(&["top_k"])),
        post("logprobs: body is an array", L, json!([1, 2, 3]), BAD, Any),
    ];
    // Bodies `json!` cannot write: raw JSON text.
    let raw_json = |name: &str, path: &'static str, text: String, param: Param| {
        raw(name, "POST", path, &[], text.as_bytes(), BAD, param)
    };
    v.extend([
        raw_json("completions: lone surrogate in prompt", C, r#"{"prompt": "\ud800", "max_tokens": 2}"#.into(), OneOf(&["prompt"])),
        raw_json("completions: max_tokens over u64", C, r#"{"prompt": "Hi", "max_tokens": 18446744073709551616}"#.into(), OneOf(&["max_tokens"])),
        raw_json("completions: temperature 1e400", C, r#"{"prompt": "Hi", "max_tokens": 2, "temperature": 1e400}"#.into(), OneOf(&["temperature"])),
        raw_json("completions: duplicate key", C, r#"{"prompt": "Hi", "prompt": "Ho", "max_tokens": 2}"#.into(), OneOf(&["prompt"])),
        raw_json("completions: nesting 10000 deep", C, format!(r#"{{"prompt": {}, "max_tokens": 2}}"#, deep_array(10_000)), Any),
        raw_json("completions: guided_json nesting 10000 deep", C, format!(r#"{{"prompt": "Hi", "max_tokens": 2, "guided_json": {}}}"#, deep_array(10_000)), Any),
        raw_json("completions: truncated JSON", C, r#"{"prompt": "Hi", "max_tokens": "#.into(), Any),
        raw_json("completions: trailing garbage", C, r#"{"prompt": "Hi", "max_tokens": 2} xyz"#.into(), Null),
        raw_json("completions: JSON null", C, "null".into(), Any),
        raw_json("completions: JSON with NaN literal", C, r#"{"prompt": "Hi", "temperature": NaN}"#.into(), Any),
        raw_json("chat: truncated JSON", CH, r#"{"messages": [{"role": "user", "content": "Hi"#.into(), Any),
        raw_json("sample: truncated JSON", S, r#"{"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2"#.into(), Any),
        raw_json("logprobs: empty body", L, String::new(), Any),
        raw_json("sample: JSON string body", S, r#""prompt""#.into(), Any),
        raw("completions: body not UTF-8", "POST", C, &[], b"{\"prompt\": \"\xff\xfe\", \"max_tokens\": 2}", BAD, Any),
        raw("completions: XML body and content type", "POST", C, &[("Content-Type", "application/xml")], b"<prompt>Hi</prompt>", &[400, 415], Any),
        raw("chat: form body and content type", "POST", CH, &[("Content-Type", "application/x-www-form-urlencoded")], b"messages=hi", &[400, 415], Any),
        raw("completions: invalid chunked body", "POST", C, &[("Transfer-Encoding", "chunked")], b"zz\r\nnot hex\r\n0\r\n\r\n", BAD, Any),
        raw("completions: body over --max-body-bytes", "POST", C, &[], &oversized_body(), &[413], Null),
        // A declared length over the limit is refused from the header, not waited for.
        Case { timeout: Duration::from_secs(15), ..raw("sample: Content-Length far over the limit", "POST", S, &[("Content-Length", "99999999999")], b"{}", &[413], Null) },
        // --- GET routes, methods, unknown routes ---
        raw("models: unknown id", "GET", "/v1/models/gpt-4", &[], b"", &[404], OneOf(&["model"])),
        raw("models: id of 10000 characters", "GET", &format!("/v1/models/{}", "m".repeat(10_000)), &[], b"", &[404], OneOf(&["model"])),
        raw("models: id with invalid percent-escape", "GET", "/v1/models/%ZZ", &[], b"", &[400, 404], Any),
        raw("models: id decoding to invalid UTF-8", "GET", "/v1/models/%FF%FE", &[], b"", &[400, 404], Any),
        raw("models: POST /v1/models", "POST", "/v1/models", &[], b"{}", &[405], Null),
        raw("models: DELETE /v1/models/{id}", "DELETE", &format!("/v1/models/{MODEL}"), &[], b"", &[405], Null),
        raw("completions: GET", "GET", C, &[], b"", &[405], Null),
        raw("chat: PUT", "PUT", CH, &[], b"{}", &[405], Null),
        raw("sample: GET", "GET", S, &[], b"", &[405], Null),
        raw("logprobs: DELETE", "DELETE", L, &[], b"", &[405], Null),
        raw("health: POST", "POST", "/health", &[], b"{}", &[405], Null),
        raw("metrics: PUT", "PUT", "/metrics", &[], b"x", &[405], Null),
        raw("completions: OPTIONS", "OPTIONS", C, &[], b"", &[405], Null),
        raw("unknown route", "GET", "/v1/nothing", &[], b"", &[404], Null),
        raw("unknown route: POST /v1/completion (typo)", "POST", "/v1/completion", &[], br#"{"prompt": "Hi"}"#, &[404], Null),
        raw("unknown route: /v2/completions", "POST", "/v2/completions", &[], b"{}", &[404], Null),
        raw("unknown route: path of 70000 characters", "GET", &format!("/{}", "a".repeat(70_000)), &[], b"", &[404, 414], Null),
        raw("health: header of 2 MB", "GET", "/health", &[("X-Big", &"h".repeat(2_000_000))], b"", &[431], Null),
        raw("metrics: 200 headers", "GET", "/metrics", &hundreds_of_headers(), b"", &[431], Null),
        wire("malformed request line: one word", b"GARBAGE\r\n\r\n", &[400], Null),
        wire("malformed request line: binary method", b"\x00\x01\x02 /health HTTP/1.1\r\nHost: x\r\n\r\n", &[400], Null),
        wire("malformed request line: no version", b"GET /health\r\nHost: x\r\n\r\n", &[400], Null),
        wire("malformed header line", b"GET /health HTTP/1.1\r\nHost x no colon\r\n\r\n", &[400], Null),
    ]);
    v
}

/// Bodies over the server's `--max-body-bytes 1048576`.
fn oversized_body() -> Vec<u8> {
    json!({"prompt": "x".repeat(2 << 20), "max_tokens": 1})
        .to_string()
        .into_bytes()
}

fn hundreds_of_headers() -> Vec<(&'static str, &'static str)> {
    // Leaked once per run: header names must be 'static in the table.
    (0..200)
        .map(|i| {
            let name: &'static str = Box::leak(format!("X-H{i}").into_boxed_str());
            (name, "v")
        })
        .collect()
}

/// Adds, for each completions/chat JSON case without `stream`, the same body with
/// `"stream": true`: a bad streaming request must get the same status and param, as JSON,
/// before any SSE byte.
fn with_stream_twins(cases: Vec<Case>) -> Vec<Case> {
    let mut out = Vec::with_capacity(cases.len() * 2);
    for case in cases {
        let twin = match &case.send {
            Send::Json(path, Value::Object(body))
                if (*path == "/v1/completions" || *path == "/v1/chat/completions")
                    && !body.contains_key("stream") =>
            {
                let mut body = body.clone();
                body.insert("stream".into(), json!(true));
                Some(Case {
                    name: format!("{} [stream]", case.name),
                    send: Send::Json(path, Value::Object(body)),
                    ..case.clone()
                })
            }
            _ => None,
        };
        out.push(case);
        out.extend(twin);
    }
    out
}

fn param_matches(pattern: &str, got: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(rest), _) => got.contains(rest.trim_end_matches('*')),
        (None, Some(prefix)) => got.starts_with(prefix),
        (None, None) => got == pattern,
    }
}

/// What is wrong with `reply` for `case` (empty: as specified).
fn judge(case: &Case, reply: &RawReply) -> Vec<String> {
    let mut problems = Vec::new();
    if !case.status.contains(&reply.status) {
        problems.push(format!(
            "status {} (expected {:?}): {}",
            reply.status,
            case.status,
            reply.snippet(200)
        ));
    }
    let content_type = reply.header("content-type").unwrap_or("");
    if !content_type.starts_with("application/json") {
        problems.push(format!(
            "content-type {content_type:?}, not application/json"
        ));
    }
    let Some(v) = reply.json() else {
        problems.push(format!("body is not JSON: {:?}", reply.snippet(120)));
        return problems;
    };
    problems.extend(error_shape_problems(&v));
    let param = &v["error"]["param"];
    match case.param {
        Param::Any => {}
        Param::Null => {
            if !param.is_null() {
                problems.push(format!("param {param} (expected null)"));
            }
        }
        Param::OneOf(patterns) => match param.as_str() {
            Some(p) if patterns.iter().any(|pat| param_matches(pat, p)) => {}
            _ => problems.push(format!(
                "param {param} (expected one of {patterns:?}); message: {}",
                v["error"]["message"]
            )),
        },
    }
    problems
}

/// Runs every HTTP case against one server (restarted when a case kills or breaks it);
/// returns the failing cases with their problems.
fn run_http_table(h: &mut Harness, cases: &[Case]) -> Vec<(String, Vec<String>)> {
    let mut failures = Vec::new();
    for case in cases {
        let started = Instant::now();
        let mut problems = match exchange(h.addr(), &case.send.bytes(), case.timeout) {
            Ok(reply) => judge(case, &reply),
            Err(e) => vec![e],
        };
        let health = h.check_health();
        problems.extend(health.iter().map(|p| format!("afterwards: {p}")));
        let ms = started.elapsed().as_millis();
        if problems.is_empty() {
            eprintln!("ok    {} ({ms} ms)", case.name);
        } else {
            eprintln!("FAIL  {} ({ms} ms): {}", case.name, problems.join(" | "));
            failures.push((case.name.clone(), problems));
        }
    }
    failures
}

/// A problem without its case-specific details, to count failures by kind.
fn kind(problem: &str) -> String {
    if let Some(rest) = problem.strip_prefix("status ") {
        let head = rest.split(':').next().unwrap_or(rest);
        let sse = if rest.contains(": data: ") {
            " as SSE"
        } else {
            ""
        };
        return format!("status {head}{sse}");
    }
    if problem.starts_with("param ") {
        return "param does not name the field".into();
    }
    if problem.starts_with("afterwards:") {
        return "afterwards: server broken or slot leaked".into();
    }
    problem
        .split(':')
        .next()
        .unwrap_or(problem)
        .chars()
        .take(70)
        .collect()
}

fn by_kind(failures: &[(String, Vec<String>)]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, problems) in failures {
        for p in problems {
            *counts.entry(kind(p)).or_default() += 1;
        }
    }
    let mut rows: Vec<(usize, String)> = counts.into_iter().map(|(k, n)| (n, k)).collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    rows.iter()
        .map(|(n, k)| format!("  {n:4} × {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn hostile_http_requests_get_4xx_naming_the_field_and_break_nothing() {
    let started = Instant::now();
    let cases = with_stream_twins(http_cases());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(
            names.insert(c.name.clone()),
            "duplicate case name {}",
            c.name
        );
    }
    let mut h = Harness::start(&[
        "--max-body-bytes",
        "1048576",
        "--request-timeout-secs",
        "120",
    ]);
    let failures = run_http_table(&mut h, &cases);
    // At the end: nothing leaked, the text is unchanged.
    let end = h.check_health();
    eprintln!(
        "hostile http: {} cases run ({} without stream twins), {} failed, {} server restarts, {:.1} s",
        cases.len(),
        http_cases().len(),
        failures.len(),
        h.restarts,
        started.elapsed().as_secs_f64()
    );
    assert!(end.is_empty(), "after the table: {end:?}");
    assert!(
        failures.is_empty(),
        "{} of {} hostile HTTP cases failed; problems by kind:\n{}\ncases:\n{}",
        failures.len(),
        cases.len(),
        by_kind(&failures),
        failures
            .iter()
            .map(|(name, problems)| format!("{name}: {}", problems.join(" | ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI table.
// ---------------------------------------------------------------------------------------------

struct CliCase {
    name: &'static str,
    args: Vec<String>,
    /// Allowed exit codes (1: the request was refused, 2: bad usage).
    exit: &'static [i32],
    /// stderr must contain one of these (the flag or the field it sets).
    names: Vec<&'static str>,
}

fn model_dir() -> String {
    server_support::model_dir().to_string_lossy().into_owned()
}

fn has(extra: &[&str], flag: &str) -> bool {
    extra
        .iter()
        .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
}

/// `infermux <cmd> --model M --backend candle` + a prompt and (for sample) `--max-tokens 2`
/// unless `extra` sets them.
fn cli_args(cmd: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![cmd.into()];
    if !has(extra, "--model") {
        args.extend(["--model".into(), model_dir()]);
    }
    if !has(extra, "--backend") {
        args.extend(["--backend".into(), "candle".into()]);
    }
    if cmd != "serve" {
        if !has(extra, "--prompt") && !has(extra, "--prompt-tokens") {
            args.extend(["--prompt".into(), "Hi".into()]);
        }
        if cmd == "sample" && !has(extra, "--max-tokens") {
            args.extend(["--max-tokens".into(), "2".into()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Temporary files the CLI cases point at.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("infermux-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("empty-model")).unwrap();
        std::fs::write(dir.join("not-json.json"), "{ this is not json").unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Every CLI case, one per line: name, subcommand, flags, allowed exit codes, what stderr
/// must name.
#[rustfmt::skip]
#[allow(clippy::too_many_lines)]
fn cli_cases(files: &Files) -> Vec<CliCase> {
    let case = |name, cmd: &str, extra: &[&str], exit, names: &[&'static str]| CliCase {
        name,
        args: cli_args(cmd, extra),
        exit,
        names: names.to_vec(),
    };
    const USAGE: &[i32] = &[2];
    const REFUSED: &[i32] = &[1];
    let choice_20k = leak((0..20_000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    let tokens_9000 = leak(vec!["100"; 9000].join(","));
    let missing_schema = leak(files.path("missing/schema.json"));
    let missing_grammar = leak(files.path("missing/grammar.lark"));
    let not_json = leak(files.path("not-json.json"));
    let empty_model = leak(files.path("empty-model"));
    vec![
        // Refused by the flag parser (exit 2, no model loaded).
        CliCase { name: "sample: no --max-tokens", args: vec!["sample".into(), "--model".into(), model_dir(), "--prompt".into(), "Hi".into()], exit: USAGE, names: vec!["--max-tokens"] },
        case("sample: --max-tokens over u64", "sample", &["--max-tokens", "18446744073709551616"], USAGE, &["--max-tokens"]),
        case("sample: --max-tokens -1", "sample", &["--max-tokens", "-1"], USAGE, &["--max-tokens"]),
        case("sample: --max-tokens=-1", "sample", &["--max-tokens=-1"], USAGE, &["--max-tokens"]),
        case("sample: --max-tokens abc", "sample", &["--max-tokens", "abc"], USAGE, &["--max-tokens"]),
        case("sample: --temperature warm", "sample", &["--temperature", "warm"], USAGE, &["--temperature"]),
        case("sample: --top-k over i32", "sample", &["--top-k", "99999999999"], USAGE, &["--top-k"]),
        case("sample: --num-samples=-3", "sample", &["--num-samples=-3"], USAGE, &["--num-samples"]),
        case("sample: --seed=-1", "sample", &["--seed=-1"], USAGE, &["--seed"]),
        case("sample: --seed 1.5", "sample", &["--seed", "1.5"], USAGE, &["--seed"]),
        case("sample: --backend nonsense", "sample", &["--backend", "nonsense"], USAGE, &["--backend"]),
        case("sample: --device quantum", "sample", &["--device", "quantum"], USAGE, &["--device"]),
        case("sample: --dtype f8", "sample", &["--dtype", "f8"], USAGE, &["--dtype"]),
        case("sample: --prompt-tokens 1,x,3", "sample", &["--prompt-tokens", "1,x,3"], USAGE, &["--prompt-tokens"]),
        case("sample: --prompt-tokens over u32", "sample", &["--prompt-tokens", "4294967296"], USAGE, &["--prompt-tokens"]),
        case("sample: --prompt and --prompt-tokens", "sample", &["--prompt", "a", "--prompt-tokens", "1"], USAGE, &["--prompt"]),
        CliCase { name: "sample: no prompt", args: vec!["sample".into(), "--model".into(), model_dir(), "--max-tokens".into(), "2".into()], exit: USAGE, names: vec!["--prompt"] },
        case("sample: --logprobs=-1", "sample", &["--logprobs=-1"], USAGE, &["--logprobs"]),
        case("sample: --regex and --choice", "sample", &["--regex", "a", "--choice", "b"], USAGE, &["--regex", "--choice"]),
        case("sample: --beam-width with --num-samples", "sample", &["--beam-width", "2", "--num-samples", "2"], USAGE, &["--beam-width", "--num-samples"]),
        case("sample: --chat with --prompt-tokens", "sample", &["--prompt-tokens", "1", "--chat"], USAGE, &["--chat", "--prompt"]),
        case("sample: unknown flag", "sample", &["--bogus-flag"], USAGE, &["--bogus-flag"]),
        CliCase { name: "logprobs: no --model", args: vec!["logprobs".into(), "--prompt-tokens".into(), "1,2".into()], exit: USAGE, names: vec!["--model"] },
        case("logprobs: --prompt-tokens over u32", "logprobs", &["--prompt-tokens", "1,99999999999"], USAGE, &["--prompt-tokens"]),
        case("serve: --port 70000", "serve", &["--port", "70000"], USAGE, &["--port"]),
        case("serve: --kv-cache-memory-bytes 0", "serve", &["--kv-cache-memory-bytes", "0"], USAGE, &["--kv-cache-memory-bytes"]),
        case("serve: --kv-cache-memory-bytes 5parsecs", "serve", &["--kv-cache-memory-bytes", "5parsecs"], USAGE, &["--kv-cache-memory-bytes"]),
        case("serve: --kv-cache-memory-bytes 99999999999T", "serve", &["--kv-cache-memory-bytes", "99999999999T"], USAGE, &["--kv-cache-memory-bytes"]),
        case("serve: --max-body-bytes=-5", "serve", &["--max-body-bytes=-5"], USAGE, &["--max-body-bytes"]),
        case("serve: --request-timeout-secs 1e99", "serve", &["--request-timeout-secs", "1e99"], USAGE, &["--request-timeout-secs"]),
        CliCase { name: "unknown subcommand", args: vec!["frobnicate".into()], exit: USAGE, names: vec!["frobnicate"] },
        // Parsed, then refused with a typed error (exit 1).
        case("sample: --max-tokens u64::MAX", "sample", &["--max-tokens", "18446744073709551615"], REFUSED, &["max_tokens", "--max-tokens"]),
        case("sample: --max-tokens 0", "sample", &["--max-tokens", "0"], REFUSED, &["max_tokens", "--max-tokens"]),
        case("sample: --temperature=-1", "sample", &["--temperature=-1"], REFUSED, &["temperature"]),
        case("sample: --temperature NaN", "sample", &["--temperature", "NaN"], REFUSED, &["temperature"]),
        case("sample: --top-p 0", "sample", &["--top-p", "0"], REFUSED, &["top_p", "--top-p"]),
        case("sample: --top-p inf", "sample", &["--top-p", "inf"], REFUSED, &["top_p", "--top-p"]),
        case("sample: --min-p 5", "sample", &["--min-p", "5"], REFUSED, &["min_p", "--min-p"]),
        case("sample: --num-samples 0", "sample", &["--num-samples", "0"], REFUSED, &["num_samples", "--num-samples", "`n`"]),
        case("sample: --num-samples u64::MAX", "sample", &["--num-samples", "18446744073709551615"], REFUSED, &["num_samples", "--num-samples", "`n`"]),
        case("sample: --logprobs 100000", "sample", &["--logprobs", "100000"], REFUSED, &["logprobs"]),
        case("sample: --prompt-tokens out of vocabulary", "sample", &["--prompt-tokens", "999999"], REFUSED, &["prompt"]),
        case("sample: empty --prompt", "sample", &["--prompt", ""], REFUSED, &["prompt"]),
        case("sample: empty --stop", "sample", &["--stop", ""], REFUSED, &["stop"]),
        case("sample: --beam-width 0", "sample", &["--beam-width", "0"], REFUSED, &["beam_width", "--beam-width"]),
        case("sample: --beam-width u64::MAX", "sample", &["--beam-width", "18446744073709551615"], REFUSED, &["beam_width", "--beam-width"]),
        case("sample: --beam-width 2 --max-tokens u64::MAX", "sample", &["--beam-width", "2", "--max-tokens", "18446744073709551615"], REFUSED, &["max_tokens", "--max-tokens"]),
        case("sample: --regex a{1000000000}", "sample", &["--regex", "a{1000000000}"], REFUSED, &["guided_decoding", "--regex", "regex"]),
        case("sample: --choice of 20000 options", "sample", &["--choice", choice_20k], REFUSED, &["guided_decoding", "--choice", "choice"]),
        case("sample: --json-schema file missing", "sample", &["--json-schema", missing_schema], REFUSED, &[missing_schema]),
        case("sample: --json-schema file not JSON", "sample", &["--json-schema", not_json], REFUSED, &[not_json]),
        case("sample: --grammar file missing", "sample", &["--grammar", missing_grammar], REFUSED, &[missing_grammar]),
        case("sample: --model folder missing", "sample", &["--model", "/nonexistent/infermux-model"], REFUSED, &["/nonexistent/infermux-model"]),
        case("sample: --model folder empty", "sample", &["--model", empty_model], REFUSED, &[empty_model]),
        case("logprobs: --prompt-tokens out of vocabulary", "logprobs", &["--prompt-tokens", "1,999999"], REFUSED, &["prompt"]),
        case("logprobs: empty --prompt", "logprobs", &["--prompt", ""], REFUSED, &["prompt"]),
        case("logprobs: 9000 tokens (context)", "logprobs", &["--prompt-tokens", tokens_9000], REFUSED, &["prompt"]),
        case("serve: --max-num-seqs 0", "serve", &["--max-num-seqs", "0", "--port", "0"], USAGE, &["max_num_seqs", "--max-num-seqs"]),
        case("serve: --max-num-batched-tokens 0", "serve", &["--max-num-batched-tokens", "0", "--port", "0"], USAGE, &["max_num_batched_tokens", "--max-num-batched-tokens"]),
        case("serve: --host not an address", "serve", &["--host", "999.1.1.1", "--port", "0"], REFUSED, &["999.1.1.1"]),
    ]
}

/// Runs the binary with a time limit; `(exit code or None for a signal, stdout, stderr)`.
fn run_cli(args: &[String], limit: Duration) -> Result<(Option<i32>, String, String), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start infermux: {e}"))?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "still running after {} s (killed)",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status.code(), out.join().unwrap(), err.join().unwrap()))
}

fn judge_cli(case: &CliCase) -> Vec<String> {
    let (code, stdout, stderr) = match run_cli(&case.args, Duration::from_secs(120)) {
        Ok(r) => r,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let tail = |s: &str| {
        let s = s.trim();
        // A panic: its location and message, not the backtrace.
        if let Some(at) = s.find("panicked at") {
            return s[at..].lines().take(2).collect::<Vec<_>>().join(" ⏎ ");
        }
        let start = s.char_indices().rev().nth(300).map_or(0, |(i, _)| i);
        s[start..].replace('\n', " ⏎ ")
    };
    match code {
        Some(c) if case.exit.contains(&c) => {}
        Some(101) => problems.push(format!("exit 101 (panic): {}", tail(&stderr))),
        Some(134) => problems.push(format!("exit 134 (abort): {}", tail(&stderr))),
        Some(c) => problems.push(format!(
            "exit {c} (expected {:?}): {}",
            case.exit,
            tail(&stderr)
        )),
        None => problems.push(format!("killed by a signal (abort?): {}", tail(&stderr))),
    }
    if stderr.contains("panicked") {
        problems.push("stderr shows a panic".into());
    }
    if !case.names.iter().any(|n| stderr.contains(n)) {
        problems.push(format!(
            "stderr names none of {:?}: {}",
            case.names,
            tail(&stderr)
        ));
    }
    if !stdout.trim().is_empty() {
        problems.push(format!("printed to stdout: {}", tail(&stdout)));
    }
    problems
}

#[test]
fn hostile_cli_flags_exit_1_or_2_naming_the_flag() {
    let started = Instant::now();
    let files = Files::new();
    let cases = cli_cases(&files);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    // Two at a time: most cases load the model.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = cases.get(i) else { break };
                    let t = Instant::now();
                    let problems = judge_cli(case);
                    let ms = t.elapsed().as_millis();
                    if problems.is_empty() {
                        eprintln!("ok    cli {} ({ms} ms)", case.name);
                    } else {
                        eprintln!(
                            "FAIL  cli {} ({ms} ms): {}",
                            case.name,
                            problems.join(" | ")
                        );
                        failures
                            .lock()
                            .unwrap()
                            .push((i, format!("{}: {}", case.name, problems.join(" | "))));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    eprintln!(
        "hostile cli: {} cases run, {} failed, {:.1} s",
        cases.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} hostile CLI cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures
            .iter()
            .map(|(_, f)| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
