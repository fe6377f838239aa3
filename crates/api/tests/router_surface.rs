//! What routers and RL frameworks send and read, against `infermux serve` with the real model:
//! the bodies sglang-router 0.3.2 forwards (with its injected SGLang fields), the vLLM / SGLang
//! extension fields and their meaning here, and the liveness / readiness / info routes.

mod server_support;

use serde_json::{Value, json};
use server_support::Server;

const MODEL: &str = "SmolLM2-135M-Instruct";

fn ok(server: &Server, path: &str, body: &Value) -> Value {
    let reply = server.post(path, body);
    assert_eq!(reply.status, 200, "{path} {body}: {}", reply.text());
    reply.json()
}

fn refused(server: &Server, path: &str, body: &Value, param: &str) {
    let reply = server.post(path, body);
    assert_eq!(reply.status, 400, "{path} {body}: {}", reply.text());
    assert_eq!(reply.json()["error"]["param"], param, "{}", reply.text());
}

fn with(base: &Value, extra: Value) -> Value {
    let mut body = base.clone();
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn the_bodies_sglang_router_forwards_are_served() {
    let server = Server::start(&[]);
    // Captured from sglang-router 0.3.2 in front of a recording worker (its injected fields).
    let completion = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": false,
        "echo": false, "no_stop_trim": false, "ignore_eos": false, "skip_special_tokens": true,
        "return_hidden_states": false});
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "model": MODEL,
        "logprobs": false, "max_completion_tokens": 4, "stream": false, "no_stop_trim": false,
        "ignore_eos": false, "continue_final_message": false, "skip_special_tokens": true,
        "separate_reasoning": true, "stream_reasoning": true, "return_hidden_states": false});
    for (path, body) in [
        ("/v1/completions", &completion),
        ("/v1/chat/completions", &chat),
    ] {
        let v = ok(&server, path, body);
        assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
        let v = ok(
            &server,
            path,
            &with(body, json!({"n": 2, "temperature": 1.0, "seed": 3})),
        );
        assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
        let reply = server.post(path, &with(body, json!({"stream": true})));
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.sse_data().last().map(String::as_str), Some("[DONE]"));
        // Strictness stays for genuinely unknown fields.
        let reply = server.post(path, &with(body, json!({"foo_unknown": 1})));
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(reply.text().contains("foo_unknown"), "{}", reply.text());
    }
}

#[test]
fn extension_fields_mean_what_vllm_and_sglang_mean() {
    let server = Server::start(&[]);
    let base = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0});
    let path = "/v1/completions";
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();

    // `no_stop_trim` is `include_stop_str_in_output`.
    let plain = text(&ok(&server, path, &base));
    let word = plain
        .split_whitespace()
        .nth(1)
        .expect("two words")
        .to_string();
    let stop = with(&base, json!({ "stop": [word.clone()] }));
    let trimmed = text(&ok(&server, path, &stop));
    let kept = text(&ok(
        &server,
        path,
        &with(&stop, json!({"no_stop_trim": true})),
    ));
    let vllm = text(&ok(
        &server,
        path,
        &with(&stop, json!({"include_stop_str_in_output": true})),
    ));
    assert!(!trimmed.contains(&word), "{trimmed:?}");
    assert!(kept.ends_with(&word), "{kept:?} should end with {word:?}");
    assert_eq!(kept, vllm);
    refused(
        &server,
        path,
        &with(
            &stop,
            json!({"no_stop_trim": true, "include_stop_str_in_output": false}),
        ),
        "no_stop_trim",
    );

    // `allowed_token_ids` restricts sampling; `bad_words` removes a word.
    let v = ok(
        &server,
        path,
        &with(
            &base,
            json!({"allowed_token_ids": [11], "max_tokens": 3, "logprobs": 0}),
        ),
    );
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3, "{v}");
    assert!(tokens.iter().all(|t| t == &tokens[0]), "{v}");
    let first = plain.split_whitespace().next().unwrap().to_string();
    let banned = text(&ok(
        &server,
        path,
        &with(&base, json!({"bad_words": [first.clone()]})),
    ));
    assert!(!banned.trim_start().starts_with(&first), "{banned:?}");

    // Accepted at their no-op values; refused (naming the field) when they ask for more.
    ok(
        &server,
        path,
        &with(
            &base,
            json!({"priority": 0, "request_id": "r-1", "rid": "r-2",
            "spaces_between_special_tokens": true, "add_special_tokens": true,
            "guided_decoding_backend": "auto", "return_hidden_states": false}),
        ),
    );
    refused(
        &server,
        path,
        &with(&base, json!({"return_hidden_states": true})),
        "return_hidden_states",
    );
    refused(
        &server,
        path,
        &with(&base, json!({"priority": 1})),
        "priority",
    );
}

#[test]
fn continue_final_message_continues_the_assistant_turn() {
    let server = Server::start(&[]);
    let messages = json!([
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]);
    let path = "/v1/chat/completions";
    let base = json!({"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0});
    let cont = ok(
        &server,
        path,
        &with(&base, json!({"continue_final_message": true})),
    );
    let fresh = ok(&server, path, &base);
    // Continuing writes no end-of-turn and no new assistant header: fewer prompt tokens.
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&cont) < tokens(&fresh), "{cont} vs {fresh}");
    let text = cont["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    refused(
        &server,
        path,
        &with(
            &base,
            json!({"continue_final_message": true, "add_generation_prompt": true}),
        ),
        "continue_final_message",
    );
    let user_last = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "continue_final_message": true});
    refused(&server, path, &user_last, "continue_final_message");
}

#[test]
fn liveness_readiness_and_info_routes() {
    let server = Server::start(&[]);
    for path in [
        "/health",
        "/health/live",
        "/ping",
        "/health/ready",
        "/health_generate",
    ] {
        let reply = server.get(path);
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    for path in ["/server_info", "/get_server_info"] {
        let v = server.get(path).json();
        assert_eq!(v["served_model_name"], MODEL, "{v}");
        assert_eq!(v["max_model_len"], 8192, "{v}");
        // No path: sglang-router would try to fetch a tokenizer from it (or a model hub).
        assert!(v.get("model_path").is_none() && v.get("tokenizer_path").is_none());
    }
    for path in ["/model_info", "/get_model_info"] {
        let v = server.get(path).json();
        assert_eq!(v["model"], MODEL, "{v}");
        assert_eq!(v["is_generation"], true, "{v}");
        assert_eq!(v["vocab_size"], 49152, "{v}");
    }
    let reply = server.post("/health/ready", &json!({}));
    assert_eq!(reply.status, 405, "{}", reply.text());
}
