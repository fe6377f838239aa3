//! What RL loops read from the OpenAI routes, against `infermux serve` with the real model:
//! `return_token_ids` (equal to Hugging Face's tokenizer and to the natively sampled ids),
//! `prompt_logprobs` (equal to `/v1/compute_logprobs`), `logprobs_mode` (processed differs from
//! raw under temperature 0.5, matches it at temperature 1 without filters), `weight_version` on
//! every reply and chunk (and `null` at the top of a many-prompt reply whose prompts straddle a
//! weight update), `usage.prompt_tokens_details`, typed 400s, and the official `openai` SDK
//! passing the fields through `extra_body`.
//!
//! The Python runtimes come from `cargo xtask setup` (`runtimes/py-sdks` for transformers'
//! tokenizer, `runtimes/py-openai` for the SDK); without them the tests fail, never skip.

mod server_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_support::{Reply, Server, model_dir, request_with};

const MODEL: &str = "SmolLM2-135M-Instruct";
const ADMIN_KEY: &str = "adm-rl-51c0";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A venv's Python, or a failure saying how to get it.
fn python(venv: &str) -> PathBuf {
    let python = repo_root().join("runtimes").join(venv).join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup`",
        python.display()
    );
    python
}

/// Runs `script` with `args` under the venv's Python; its stdout parsed as JSON.
fn run_python(venv: &str, script: &str, args: &[&str]) -> Value {
    let out = Command::new(python(venv))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Hugging Face's tokenizer on the reference model: each text's ids (no special tokens) and
/// the chat template's ids of each conversation (with the generation prompt).
fn hf_ids(texts: &[&str], conversations: &[Value]) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
    const SCRIPT: &str = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
req = json.loads(sys.argv[2])
def ids(r):
    return list(r) if isinstance(r, list) else list(r["input_ids"])
print(json.dumps({
    "texts": [tok.encode(t, add_special_tokens=False) for t in req["texts"]],
    "chats": [ids(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
              for m in req["chats"]],
}))
"#;
    let req = json!({"texts": texts, "chats": conversations}).to_string();
    let v = run_python(
        "py-sdks",
        SCRIPT,
        &[model_dir().to_str().unwrap(), req.as_str()],
    );
    (ids_of_lists(&v["texts"]), ids_of_lists(&v["chats"]))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of ids: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn ids_of_lists(v: &Value) -> Vec<Vec<u64>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn ok(reply: Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

fn completion(server: &Server, body: Value) -> Value {
    ok(server.post("/v1/completions", &with_model(body)))
}

fn chat(server: &Server, body: Value) -> Value {
    ok(server.post("/v1/chat/completions", &with_model(body)))
}

fn with_model(mut body: Value) -> Value {
    body["model"] = json!(MODEL);
    body
}

/// The chunks of a streamed reply (parsed, `[DONE]` checked and dropped).
fn chunks(reply: Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut events = reply.sse_data();
    assert_eq!(events.pop().as_deref(), Some("[DONE]"), "{events:?}");
    events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

/// The native endpoint's greedy continuation of `prompt`: its token ids.
fn native_greedy(server: &Server, prompt: &[u64], max_tokens: usize) -> Vec<u64> {
    let v = ok(server.post(
        "/v1/sample",
        &json!({
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": 1,
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0},
        }),
    ));
    ids(&v["sequences"][0]["tokens"])
}

/// `/v1/compute_logprobs` of `tokens`.
fn compute_logprobs(server: &Server, tokens: &[u64]) -> Vec<Value> {
    let v = ok(server.post(
        "/v1/compute_logprobs",
        &json!({"prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}}),
    ));
    v["logprobs"].as_array().unwrap().clone()
}

fn assert_400(reply: &Reply, param: &str, says: &str) {
    assert_eq!(reply.status, 400, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["error"]["param"], param, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

/// `usage` with its `prompt_tokens_details.cached_tokens` checked: a count of prompt tokens.
fn check_usage(usage: &Value) {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no prompt_tokens_details.cached_tokens in {usage}"));
    assert!(cached <= prompt, "{usage}");
}

#[test]
fn return_token_ids_are_the_tokenizers_and_the_sampled_ids() {
    let started = Instant::now();
    let server = Server::start(&[]);
    let texts = ["The capital of France is", "def fibonacci(n):"];
    let conversation = json!([{"role": "user", "content": "Name a color."}]);
    let (hf_texts, hf_chats) = hf_ids(&texts, std::slice::from_ref(&conversation));

    // Completions, two prompts × n = 2 seeded: each choice has its prompt's ids and its own.
    let v = completion(
        &server,
        json!({"prompt": texts, "max_tokens": 6, "n": 2, "seed": 7, "temperature": 0.8,
               "return_token_ids": true, "logprobs": 0}),
    );
    check_usage(&v["usage"]);
    assert_eq!(v["weight_version"], "0", "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for c in choices {
        let p = c["index"].as_u64().unwrap() as usize / 2;
        assert_eq!(ids(&c["prompt_token_ids"]), hf_texts[p], "{c}");
        let tokens = ids(&c["token_ids"]);
        assert!(!tokens.is_empty() && tokens.len() <= 6, "{c}");
        // The ids are the ones the logprobs describe, in order.
        assert_eq!(
            c["logprobs"]["tokens"].as_array().unwrap().len(),
            tokens.len()
        );
        assert_eq!(c["weight_version"], "0");
    }
    // Greedy: the ids are the native endpoint's sampled ids for the same prompt.
    let v = completion(
        &server,
        json!({"prompt": texts[0], "max_tokens": 8, "temperature": 0, "return_token_ids": true}),
    );
    let greedy = native_greedy(&server, &hf_texts[0], 8);
    assert_eq!(ids(&v["choices"][0]["token_ids"]), greedy);
    // Without the flag, no ids.
    let plain = completion(&server, json!({"prompt": texts[0], "max_tokens": 2}));
    assert!(plain["choices"][0].get("token_ids").is_none(), "{plain}");
    assert!(plain["choices"][0].get("prompt_token_ids").is_none());
    // Echo: the ids stay the completion's (vLLM's), the text carries the echo.
    let echo = completion(
        &server,
        json!({"prompt": texts[0], "max_tokens": 8, "temperature": 0, "echo": true,
               "return_token_ids": true}),
    );
    assert_eq!(ids(&echo["choices"][0]["token_ids"]), greedy);
    assert_eq!(ids(&echo["choices"][0]["prompt_token_ids"]), hf_texts[0]);
    assert!(
        echo["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(texts[0])
    );

    // Streamed: every chunk's choice has its delta's ids; the prompt's come on each choice's
    // first chunk only.
    let events = chunks(server.post(
        "/v1/completions",
        &with_model(
            json!({"prompt": texts[0], "max_tokens": 8, "temperature": 0,
                           "return_token_ids": true, "stream": true,
                           "stream_options": {"include_usage": true}}),
        ),
    ));
    let mut streamed = Vec::new();
    let mut prompt_ids_seen = 0;
    for chunk in &events {
        assert_eq!(chunk["weight_version"], "0", "{chunk}");
        for c in chunk["choices"].as_array().unwrap() {
            streamed.extend(ids(&c["token_ids"]));
            if let Some(p) = c.get("prompt_token_ids") {
                prompt_ids_seen += 1;
                assert_eq!(ids(p), hf_texts[0]);
                assert_eq!(prompt_ids_seen, 1, "prompt ids twice: {events:?}");
            }
            assert_eq!(c["weight_version"], "0");
        }
    }
    assert_eq!(prompt_ids_seen, 1, "{events:?}");
    assert_eq!(streamed, greedy);
    check_usage(&events.last().unwrap()["usage"]);

    // Chat: the response has the rendered template's ids, each choice its own.
    let v = chat(
        &server,
        json!({"messages": conversation, "max_tokens": 8, "temperature": 0,
               "return_token_ids": true}),
    );
    assert_eq!(v["weight_version"], "0", "{v}");
    check_usage(&v["usage"]);
    let prompt_ids = ids(&v["prompt_token_ids"]);
    assert_eq!(prompt_ids, hf_chats[0]);
    let chat_greedy = native_greedy(&server, &prompt_ids, 8);
    assert_eq!(ids(&v["choices"][0]["token_ids"]), chat_greedy);
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids.len());
    // The same conversation again, n = 3: its prompt comes from the prefix cache (16-token
    // blocks), counted once for the prompt, not per choice.
    let again = chat(
        &server,
        json!({"messages": conversation, "max_tokens": 2, "n": 3, "return_token_ids": true}),
    );
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= 16 && cached < prompt_ids.len() as u64,
        "{}",
        again["usage"]
    );
    eprintln!(
        "cached_tokens on a repeated {}-token chat prompt: {cached}",
        prompt_ids.len()
    );
    // Streamed chat: the role chunks carry the prompt's ids, every chunk its delta's.
    let events = chunks(server.post(
        "/v1/chat/completions",
        &with_model(
            json!({"messages": conversation, "max_tokens": 8, "temperature": 0,
                           "n": 2, "return_token_ids": true, "stream": true,
                           "stream_options": {"include_usage": true}}),
        ),
    ));
    let mut per_choice = [Vec::new(), Vec::new()];
    for chunk in &events {
        assert_eq!(chunk["weight_version"], "0", "{chunk}");
        let choices = chunk["choices"].as_array().unwrap();
        for c in choices {
            let i = c["index"].as_u64().unwrap() as usize;
            if c["delta"]["role"] == "assistant" {
                // vLLM's role chunk: the prompt's ids, no completion ids yet.
                assert_eq!(ids(&chunk["prompt_token_ids"]), hf_chats[0], "{chunk}");
                assert!(c.get("token_ids").is_none(), "{chunk}");
                assert!(per_choice[i].is_empty());
                continue;
            }
            assert!(chunk.get("prompt_token_ids").is_none(), "{chunk}");
            per_choice[i].extend(ids(&c["token_ids"]));
        }
        if choices.is_empty() {
            check_usage(&chunk["usage"]);
        }
    }
    assert_eq!(per_choice[0], chat_greedy);
    assert_eq!(per_choice[1], chat_greedy);
    eprintln!("return_token_ids: {:.1} s", started.elapsed().as_secs_f64());
}

/// The prompt logprobs of a reply's position `i` as (the prompt token's entry, the entries).
fn position(entry: &Value) -> Vec<(u64, Value)> {
    entry
        .as_object()
        .unwrap_or_else(|| panic!("not a position: {entry}"))
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.clone()))
        .collect()
}

/// Checks vLLM's `prompt_logprobs` shape for `tokens` against `/v1/compute_logprobs` (exact)
/// with `k` alternatives; returns how many prompt tokens had a known rank.
fn check_prompt_logprobs(got: &Value, tokens: &[u64], scored: &[Value], k: usize) -> usize {
    let got = got
        .as_array()
        .unwrap_or_else(|| panic!("no prompt_logprobs: {got}"));
    assert_eq!(got.len(), tokens.len());
    assert_eq!(scored.len(), tokens.len());
    assert!(got[0].is_null(), "{}", got[0]);
    let mut ranked = 0;
    for i in 1..tokens.len() {
        let entries = position(&got[i]);
        // The prompt's token first, with compute_logprobs' number exactly.
        let (id, own) = &entries[0];
        assert_eq!(*id, tokens[i], "position {i}: {}", got[i]);
        assert_eq!(own["logprob"], scored[i], "position {i}");
        assert!(own["decoded_token"].is_string());
        // Then the top k best first, ranked 1..k; the prompt's token, when among them, is not
        // repeated and holds the rank left out.
        let alts = &entries[1..];
        let own_in_top = alts.len() < k;
        assert_eq!(alts.len() + usize::from(own_in_top), k, "position {i}");
        let mut ranks: Vec<u64> = alts
            .iter()
            .map(|(_, e)| e["rank"].as_u64().unwrap())
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{}", got[i]);
        let lps: Vec<f64> = alts
            .iter()
            .map(|(_, e)| e["logprob"].as_f64().unwrap())
            .collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]),
            "not best first: {}",
            got[i]
        );
        let own_lp = own["logprob"].as_f64().unwrap();
        match own["rank"].as_u64() {
            Some(r) if own_in_top => {
                ranks.push(r);
                ranks.sort_unstable();
                assert_eq!(ranks, (1..=k as u64).collect::<Vec<_>>(), "{}", got[i]);
                ranked += 1;
            }
            // Ranked from a wider top list than the k shown (echo's `logprobs`).
            Some(r) => {
                assert!(r as usize > k, "{}", got[i]);
                assert!(lps.iter().all(|&lp| lp >= own_lp), "{}", got[i]);
                ranked += 1;
            }
            // Outside the alternatives the engine returned: less likely than all shown.
            None => {
                assert!(!own_in_top, "{}", got[i]);
                assert!(lps.iter().all(|&lp| lp >= own_lp), "{}", got[i]);
            }
        }
    }
    ranked
}

#[test]
fn prompt_logprobs_equal_compute_logprobs() {
    let started = Instant::now();
    let server = Server::start(&[]);
    let prompt: Vec<u64> = vec![504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282];
    let scored = compute_logprobs(&server, &prompt);

    // Completions, n = 2: each choice carries the same list.
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 2, "n": 2, "temperature": 0,
               "prompt_logprobs": 3}),
    );
    for c in v["choices"].as_array().unwrap() {
        check_prompt_logprobs(&c["prompt_logprobs"], &prompt, &scored, 3);
    }
    // k = 0: the prompt's token alone, its rank unknown unless it is the top one (never
    // shown as an alternative: nothing is).
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}),
    );
    let zero = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    for (i, entry) in zero.iter().enumerate().skip(1) {
        let entries = position(entry);
        assert_eq!(entries.len(), 1, "{entry}");
        assert_eq!(entries[0].1["logprob"], scored[i]);
        assert!(entries[0].1["rank"].is_null(), "{entry}");
    }
    // With echo and logprobs: one pass serves both; the echo's own top maps keep `logprobs`
    // entries, and the prompt token's rank comes from the wider of the two.
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 5,
               "prompt_logprobs": 2}),
    );
    let c = &v["choices"][0];
    let ranked = check_prompt_logprobs(&c["prompt_logprobs"], &prompt, &scored, 2);
    let echo_lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(echo_lps.len(), prompt.len());
    for i in 1..prompt.len() {
        assert_eq!(echo_lps[i], scored[i], "echo logprob {i}");
        let top = c["logprobs"]["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 5, "{top:?}");
        let own = &position(&c["prompt_logprobs"][i])[0].1;
        if let Some(r) = own["rank"].as_u64() {
            assert!(r <= 5);
        }
    }
    let wider = (1..prompt.len())
        .filter(|&i| position(&c["prompt_logprobs"][i])[0].1["rank"].is_u64())
        .count();
    assert!(wider >= ranked);
    eprintln!(
        "prompt tokens with a rank: {wider} of {} (top 5)",
        prompt.len() - 1
    );
    // The same with a truncated prompt: the list covers the tokens the engine ran.
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 1,
               "truncate_prompt_tokens": 6, "return_token_ids": true}),
    );
    let tail = &prompt[prompt.len() - 6..];
    assert_eq!(ids(&v["choices"][0]["prompt_token_ids"]), tail);
    check_prompt_logprobs(
        &v["choices"][0]["prompt_logprobs"],
        tail,
        &compute_logprobs(&server, tail),
        1,
    );

    // Chat: on the response, over the rendered prompt.
    let v = chat(
        &server,
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2,
               "prompt_logprobs": 4, "return_token_ids": true}),
    );
    let rendered = ids(&v["prompt_token_ids"]);
    check_prompt_logprobs(
        &v["prompt_logprobs"],
        &rendered,
        &compute_logprobs(&server, &rendered),
        4,
    );
    assert!(v["choices"][0].get("prompt_logprobs").is_none());

    // Typed 400s naming the field.
    for (route, body) in [
        (
            "/v1/completions",
            json!({"prompt": "Hi", "prompt_logprobs": -1}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "prompt_logprobs": 21}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": -3}),
        ),
    ] {
        assert_400(
            &server.post(route, &with_model(body)),
            "prompt_logprobs",
            "between 0 and 20",
        );
    }
    for route in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                          "prompt_logprobs": 1, "stream": true});
        let mut body = with_model(body);
        let key = if route == "/v1/completions" {
            "messages"
        } else {
            "prompt"
        };
        body.as_object_mut().unwrap().remove(key);
        assert_400(&server.post(route, &body), "prompt_logprobs", "stream");
    }
    assert_400(
        &server.post(
            "/v1/completions",
            &with_model(json!({"prompt": "Hi", "prompt_logprobs": "many"})),
        ),
        "prompt_logprobs",
        "invalid",
    );
    eprintln!("prompt_logprobs: {:.1} s", started.elapsed().as_secs_f64());
}

/// The sampled tokens' logprobs of a completion choice.
fn token_logprobs(choice: &Value) -> Vec<f64> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn logprobs_mode_chooses_raw_or_processed() {
    let started = Instant::now();
    let server = Server::start(&[]);
    let prompt: Vec<u64> = vec![504, 3575, 282, 4649, 314];
    let run = |mode: &str, temperature: f64, extra: Value| {
        let mut body = json!({"prompt": prompt, "max_tokens": 12, "seed": 11,
                              "temperature": temperature, "logprobs": 0, "ignore_eos": true,
                              "return_token_ids": true, "logprobs_mode": mode});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        completion(&server, body)["choices"][0].clone()
    };
    // Temperature 0.5: the same seeded tokens, raw logprobs equal to compute_logprobs,
    // processed ones those of the sharper distribution.
    let raw = run("raw_logprobs", 0.5, json!({}));
    let processed = run("processed_logprobs", 0.5, json!({}));
    let tokens = ids(&raw["token_ids"]);
    assert_eq!(tokens, ids(&processed["token_ids"]));
    let mut full = prompt.clone();
    full.extend(&tokens);
    let scored: Vec<f64> = compute_logprobs(&server, &full)[prompt.len()..]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(max_diff(&token_logprobs(&raw), &scored), 0.0);
    let apart = max_diff(&token_logprobs(&processed), &scored);
    assert!(apart > 1e-3, "processed equals raw at T = 0.5 ({apart})");
    // The default is raw.
    let default = run("raw_logprobs", 0.5, json!({}));
    assert_eq!(token_logprobs(&default), token_logprobs(&raw));
    // Temperature 1, no filters: the processed distribution is the raw one.
    let raw1 = run(
        "raw_logprobs",
        1.0,
        json!({"top_p": 1.0, "top_k": 0, "min_p": 0.0}),
    );
    let processed1 = run(
        "processed_logprobs",
        1.0,
        json!({"top_p": 1.0, "top_k": 0, "min_p": 0.0}),
    );
    assert_eq!(ids(&raw1["token_ids"]), ids(&processed1["token_ids"]));
    let same = max_diff(&token_logprobs(&raw1), &token_logprobs(&processed1));
    assert!(same <= 1e-5, "processed differs from raw at T = 1 ({same})");
    // A filter renormalizes: top-k 5 at T = 1 raises every kept token's logprob.
    let topk = run("processed_logprobs", 1.0, json!({"top_k": 5}));
    let topk_raw = run("raw_logprobs", 1.0, json!({"top_k": 5}));
    for (p, r) in token_logprobs(&topk).iter().zip(token_logprobs(&topk_raw)) {
        assert!(*p >= r - 1e-6, "{p} < {r}");
    }
    eprintln!("logprobs_mode: max |processed - raw| {apart:.4} at T = 0.5, {same:.2e} at T = 1");

    // Streamed completions and chat carry the same processed numbers.
    let events = chunks(server.post(
        "/v1/completions",
        &with_model(json!({"prompt": prompt, "max_tokens": 12, "seed": 11,
                           "temperature": 0.5, "logprobs": 0, "ignore_eos": true,
                           "logprobs_mode": "processed_logprobs", "stream": true})),
    ));
    let streamed: Vec<f64> = events
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().clone())
        .flat_map(|c| token_logprobs(&c))
        .collect();
    assert_eq!(streamed, token_logprobs(&processed));
    let chat_lps = |mode: &str| -> Vec<f64> {
        let v = chat(
            &server,
            json!({"messages": [{"role": "user", "content": "Name a color."}],
                   "max_tokens": 8, "seed": 3, "temperature": 0.5, "logprobs": true,
                   "logprobs_mode": mode}),
        );
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect()
    };
    let (chat_raw, chat_processed) = (chat_lps("raw_logprobs"), chat_lps("processed_logprobs"));
    assert!(max_diff(&chat_raw, &chat_processed) > 1e-3);

    // Typed 400s naming the field.
    for (mode, says) in [
        (json!("fancy"), "unknown `logprobs_mode`"),
        (json!("raw_logits"), "unsupported"),
        (json!("processed_logits"), "unsupported"),
    ] {
        for route in ["/v1/completions", "/v1/chat/completions"] {
            let body = if route == "/v1/completions" {
                json!({"prompt": "Hi", "logprobs_mode": mode})
            } else {
                json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs_mode": mode})
            };
            assert_400(
                &server.post(route, &with_model(body)),
                "logprobs_mode",
                says,
            );
        }
    }
    // The engine has no processed top-k: asking for alternatives with it is refused.
    assert_400(
        &server.post(
            "/v1/completions",
            &with_model(
                json!({"prompt": "Hi", "logprobs": 2, "logprobs_mode": "processed_logprobs"}),
            ),
        ),
        "logprobs_mode",
        "top alternatives",
    );
    assert_400(
        &server.post(
            "/v1/chat/completions",
            &with_model(json!({"messages": [{"role": "user", "content": "Hi"}],
                               "logprobs": true, "top_logprobs": 1,
                               "logprobs_mode": "processed_logprobs"})),
        ),
        "logprobs_mode",
        "top alternatives",
    );
    assert_400(
        &server.post(
            "/v1/completions",
            &with_model(json!({"prompt": "Hi", "logprobs_mode": 3})),
        ),
        "logprobs_mode",
        "invalid",
    );
    eprintln!("logprobs_mode: {:.1} s", started.elapsed().as_secs_f64());
}

fn admin(server: &Server, path: &str, body: &Value) -> Reply {
    let auth = format!("Bearer {ADMIN_KEY}");
    request_with(
        &server.addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        Some(body.to_string().as_bytes()),
    )
}

#[test]
fn weight_versions_on_every_reply_and_chunk() {
    let started = Instant::now();
    let model = model_dir().canonicalize().unwrap();
    let allowed = model.parent().unwrap().to_path_buf();
    // 2 sequence slots: a many-prompt request keeps a window of one prompt in the engine.
    let server = Server::start(&[
        "--max-num-seqs",
        "2",
        "--enable-control-routes",
        "--admin-key",
        ADMIN_KEY,
        "--allowed-model-dir",
        allowed.to_str().unwrap(),
    ]);
    let prompt = "Once upon a time";
    // Version "0" everywhere at start: completions, chat, their chunks, Fireworks.
    let v = completion(&server, json!({"prompt": prompt, "max_tokens": 2}));
    assert_eq!(v["weight_version"], "0");
    assert_eq!(v["choices"][0]["weight_version"], "0");
    let v = chat(
        &server,
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(v["weight_version"], "0");
    let streams = [
        (
            "/v1/completions",
            json!({"prompt": prompt, "echo": true, "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                   "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ];
    for (route, body) in streams {
        let events = chunks(server.post(route, &with_model(body)));
        assert!(events.len() >= 3, "{events:?}");
        for chunk in &events {
            assert_eq!(chunk["weight_version"], "0", "{route}: {chunk}");
        }
        check_usage(&events.last().unwrap()["usage"]);
    }
    let fireworks = ok(server.post(
        "/inference/v1/completions",
        &json!({"model": MODEL, "prompt": [504, 3575, 282], "max_tokens": 2}),
    ));
    assert_eq!(fireworks["weight_version"], "0", "{fireworks}");
    check_usage(&fireworks["usage"]);
    let events = chunks(server.post(
        "/inference/v1/completions",
        &json!({"model": MODEL, "prompt": [504, 3575, 282], "max_tokens": 3, "stream": true}),
    ));
    for chunk in &events {
        assert_eq!(chunk["weight_version"], "0", "{chunk}");
    }

    // A many-prompt stream whose first prompt runs when a (drain-mode) update arrives: the
    // first prompt's chunks say "0", the later prompts' the new version, the usage chunk null.
    let body = with_model(json!({"prompt": ["One", "Two", "Three"], "max_tokens": 48,
                                 "ignore_eos": true, "temperature": 0, "stream": true,
                                 "stream_options": {"include_usage": true}}));
    let (sent, got) = std::sync::mpsc::channel();
    let addr = server.addr.clone();
    let streamer =
        std::thread::spawn(move || stream_notifying(&addr, "/v1/completions", &body, &sent));
    got.recv_timeout(Duration::from_secs(120))
        .expect("the stream's first chunk");
    let update = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": model, "weight_version": "step-1"}),
    );
    assert_eq!(update.status, 200, "{}", update.text());
    let events = streamer.join().unwrap();
    let mut versions = std::collections::BTreeMap::<u64, Vec<String>>::new();
    for chunk in &events[..events.len() - 1] {
        let c = &chunk["choices"][0];
        assert_eq!(c["weight_version"], chunk["weight_version"], "{chunk}");
        versions
            .entry(c["index"].as_u64().unwrap())
            .or_default()
            .push(chunk["weight_version"].as_str().unwrap().to_string());
    }
    let per_prompt: Vec<Vec<String>> = versions
        .into_values()
        .map(|mut v| {
            v.dedup();
            v
        })
        .collect();
    assert_eq!(
        per_prompt,
        [
            vec!["0".to_string()],
            vec!["step-1".into()],
            vec!["step-1".into()]
        ],
        "{events:?}"
    );
    let usage = events.last().unwrap();
    assert!(usage["choices"].as_array().unwrap().is_empty(), "{usage}");
    assert!(usage["weight_version"].is_null(), "{usage}");
    // After the update every reply says the new version.
    let v = completion(&server, json!({"prompt": ["a", "b"], "max_tokens": 2}));
    assert_eq!(v["weight_version"], "step-1");
    // Unstreamed, the same straddle: choices keep their own, the top level is null.
    let body = with_model(json!({"prompt": ["One", "Two"], "max_tokens": 48,
                                 "ignore_eos": true, "temperature": 0}));
    let addr = server.addr.clone();
    let waiter = std::thread::spawn(move || {
        server_support::request(
            &addr,
            "POST",
            "/v1/completions",
            Some(body.to_string().as_bytes()),
        )
    });
    let running = "infermux_running_requests{model=\"SmolLM2-135M-Instruct\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric(running) < 1.0 {
        assert!(Instant::now() < deadline, "the request never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let update = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": model, "weight_version": "step-2"}),
    );
    assert_eq!(update.status, 200, "{}", update.text());
    let v = ok(waiter.join().unwrap());
    let choice_versions: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["weight_version"].as_str().unwrap())
        .collect();
    assert_eq!(choice_versions, ["step-1", "step-2"], "{v}");
    assert!(v["weight_version"].is_null(), "{v}");
    eprintln!("weight_version: {:.1} s", started.elapsed().as_secs_f64());
}

/// Streams `body` to `path`, telling `first` when the first data event arrived; the parsed
/// chunks (`[DONE]` dropped).
fn stream_notifying(
    addr: &str,
    path: &str,
    body: &Value,
    first: &std::sync::mpsc::Sender<()>,
) -> Vec<Value> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let body = body.to_string();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut told = false;
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if !told && raw.windows(6).any(|w| w == b"data: ") {
            told = true;
            let _ = first.send(());
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = server_support::dechunk(rest.as_bytes());
    let text = String::from_utf8_lossy(&body);
    let mut events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(events.pop(), Some("[DONE]"), "{text}");
    events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[test]
fn the_openai_sdk_passes_the_fields_through_extra_body() {
    let started = Instant::now();
    let server = Server::start(&[]);
    const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
model = sys.argv[2]
extra = {"return_token_ids": True, "prompt_logprobs": 1, "logprobs_mode": "processed_logprobs"}
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4,
                              temperature=0, logprobs=0, extra_body=extra)
ch = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                    messages=[{"role": "user", "content": "Name a color."}],
                                    extra_body=extra)
chunks = list(client.completions.create(model=model, prompt="The capital of France is",
                                        max_tokens=4, temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body={"return_token_ids": True}))
chat_chunks = list(client.chat.completions.create(
    model=model, max_tokens=4, temperature=0, stream=True,
    messages=[{"role": "user", "content": "Name a color."}],
    stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
print(json.dumps({
    "completion": {
        "weight_version": c.weight_version,
        "token_ids": c.choices[0].token_ids,
        "prompt_token_ids": c.choices[0].prompt_token_ids,
        "prompt_logprobs": c.choices[0].prompt_logprobs,
        "token_logprobs": c.choices[0].logprobs.token_logprobs,
        "cached_tokens": c.usage.prompt_tokens_details.cached_tokens,
    },
    "chat": {
        "weight_version": ch.weight_version,
        "token_ids": ch.choices[0].token_ids,
        "prompt_token_ids": ch.prompt_token_ids,
        "prompt_logprobs": ch.prompt_logprobs,
        "cached_tokens": ch.usage.prompt_tokens_details.cached_tokens,
    },
    "chunk_versions": [k.weight_version for k in chunks],
    "chunk_token_ids": [i for k in chunks for ch_ in k.choices for i in ch_.token_ids],
    "chat_chunk_versions": [k.weight_version for k in chat_chunks],
    "chat_chunk_prompt_ids": [getattr(k, "prompt_token_ids", None) for k in chat_chunks],
}))
"#;
    let got = run_python("py-openai", SCRIPT, &[&server.url(), MODEL]);
    // The same requests over raw HTTP: the SDK keeps every field as sent.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                      "logprobs": 0, "return_token_ids": true, "prompt_logprobs": 1,
                      "logprobs_mode": "processed_logprobs"});
    let v = completion(&server, body);
    let c = &v["choices"][0];
    let want = json!({
        "weight_version": "0",
        "token_ids": c["token_ids"],
        "prompt_token_ids": c["prompt_token_ids"],
        "prompt_logprobs": c["prompt_logprobs"],
        "token_logprobs": c["logprobs"]["token_logprobs"],
        "cached_tokens": v["usage"]["prompt_tokens_details"]["cached_tokens"],
    });
    assert_eq!(got["completion"], want);
    let v = chat(
        &server,
        json!({"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4,
               "temperature": 0, "return_token_ids": true, "prompt_logprobs": 1,
               "logprobs_mode": "processed_logprobs"}),
    );
    assert_eq!(got["chat"]["weight_version"], "0");
    assert_eq!(got["chat"]["token_ids"], v["choices"][0]["token_ids"]);
    assert_eq!(got["chat"]["prompt_token_ids"], v["prompt_token_ids"]);
    assert_eq!(got["chat"]["prompt_logprobs"], v["prompt_logprobs"]);
    let versions = got["chunk_versions"].as_array().unwrap();
    assert!(
        versions.len() >= 3 && versions.iter().all(|v| v == "0"),
        "{got}"
    );
    assert_eq!(got["chunk_token_ids"], c["token_ids"]);
    let chat_versions = got["chat_chunk_versions"].as_array().unwrap();
    assert!(chat_versions.iter().all(|v| v == "0"), "{got}");
    assert_eq!(got["chat_chunk_prompt_ids"][0], v["prompt_token_ids"]);
    eprintln!("openai SDK: {:.1} s", started.elapsed().as_secs_f64());
}
