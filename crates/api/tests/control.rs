//! API keys and the control routes against `infermux serve` with the real model: 401 without or
//! with a wrong API key (Bearer or `X-API-Key`), probes open; 403 on control routes without the
//! admin key; 400 on model paths outside `--allowed-model-dir` (`..`, absolute, a symlink out)
//! or on a checkpoint of another model (old weights keep serving); a weight update from disk in
//! drain mode (the running request finishes on the old weights) and abort mode (it ends with
//! 503 `aborted`), the new weights serving after, and back.

mod server_support;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use server_support::{Reply, Server, model_dir, request_with};

const API_KEY: &str = "sk-test-3b1f";
const ADMIN_KEY: &str = "adm-9c2e";
const PROMPT: [u32; 6] = [504, 3575, 282, 4649, 314, 260];

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Links (or copies) every file of the model folder into `to`, except those in `skip`.
fn link_model(to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if !entry.file_type().unwrap().is_file() || skip.contains(&name.to_str().unwrap()) {
            continue;
        }
        std::fs::hard_link(entry.path(), to.join(&name))
            .or_else(|_| std::fs::copy(entry.path(), to.join(&name)).map(drop))
            .unwrap();
    }
}

/// Writes the model's safetensors to `to` with `model.norm.weight` scaled by `scale` (f32 data
/// patched in place: the logits scale with it, so every logprob moves).
fn write_scaled_norm(to: &Path, scale: f32) {
    let mut bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let tensor = &header["model.norm.weight"];
    assert_eq!(tensor["dtype"], "F32", "{tensor}");
    let start = 8 + header_len + tensor["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + header_len + tensor["data_offsets"][1].as_u64().unwrap() as usize;
    for x in bytes[start..end].chunks_exact_mut(4) {
        let v = f32::from_le_bytes(x.try_into().unwrap()) * scale;
        x.copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(to.join("model.safetensors"), bytes).unwrap();
}

/// The folders the test serves from: `allowed/{base,step-1,other-model,escape}` and a model
/// outside it.
fn checkpoints() -> (Scratch, PathBuf) {
    let root = std::env::temp_dir().join(format!("infermux-control-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let allowed = root.join("allowed");
    link_model(&allowed.join("base"), &[]);
    link_model(&allowed.join("step-1"), &["model.safetensors"]);
    write_scaled_norm(&allowed.join("step-1"), 0.5);
    // Another model: the same tensors under a config that says 29 layers.
    let other = allowed.join("other-model");
    link_model(&other, &["config.json"]);
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(29);
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    let outside = root.join("outside");
    link_model(&outside, &[]);
    std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();
    (Scratch(root), allowed)
}

fn call(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let body = body.map(Value::to_string);
    request_with(
        &server.addr,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
}

fn admin(server: &Server, path: &str, body: &Value) -> Reply {
    call(server, "POST", path, Some(ADMIN_KEY), Some(body))
}

/// The logprobs of `PROMPT` under the weights served now.
fn logprobs(server: &Server) -> Vec<Value> {
    let body = json!({"prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]}});
    let reply = call(
        server,
        "POST",
        "/v1/compute_logprobs",
        Some(API_KEY),
        Some(&body),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["logprobs"].as_array().unwrap().clone()
}

fn completion(addr: &str, max_tokens: u32) -> Reply {
    let body = json!({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true});
    let auth = format!("Bearer {API_KEY}");
    request_with(
        addr,
        "POST",
        "/v1/completions",
        &[("Authorization", &auth)],
        Some(body.to_string().as_bytes()),
    )
}

fn weight_version(server: &Server) -> Value {
    let reply = call(server, "GET", "/get_weight_version", Some(API_KEY), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["weight_version"].clone()
}

fn assert_error(reply: &Reply, status: u16, param: Option<&str>, says: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["error"]["param"].as_str(), param, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

#[test]
fn api_keys_guard_every_route_but_probes_and_metrics() {
    let server = Server::start(&["--api-key", API_KEY]);
    for path in [
        "/v1/models",
        "/server_info",
        "/get_weight_version",
        "/api/v1/get_server_capabilities",
    ] {
        let reply = call(&server, "GET", path, None, None);
        assert_error(&reply, 401, None, "Missing API key");
        assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert_error(
            &call(&server, "GET", path, Some("sk-wrong"), None),
            401,
            None,
            "Incorrect",
        );
        // A key one byte longer or shorter is wrong too.
        let longer = format!("{API_KEY}x");
        assert_eq!(call(&server, "GET", path, Some(&longer), None).status, 401);
        assert_eq!(
            call(&server, "GET", path, Some(&API_KEY[1..]), None).status,
            401
        );
    }
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    assert_eq!(
        call(&server, "POST", "/v1/completions", None, Some(&body)).status,
        401
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "/v1/completions",
            Some(API_KEY),
            Some(&body)
        )
        .status,
        200
    );
    // Tinker's SDK sends the key as X-API-Key only.
    let reply = request_with(
        &server.addr,
        "GET",
        "/v1/models",
        &[("X-API-Key", API_KEY)],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = request_with(
        &server.addr,
        "GET",
        "/v1/models",
        &[("X-API-Key", "nope")],
        None,
    );
    assert_eq!(reply.status, 401, "{}", reply.text());
    for open in [
        "/health",
        "/health/live",
        "/health/ready",
        "/ping",
        "/metrics",
    ] {
        let reply = call(&server, "GET", open, None, None);
        assert_eq!(reply.status, 200, "{open}: {}", reply.text());
    }
    // 401s are counted like any reply.
    assert!(
        server.metric("infermux_http_requests_total{route=\"/v1/models\",status=\"401\"}") >= 5.0
    );
    // Without --enable-control-routes the control routes do not exist (behind the key too).
    let update = json!({"model_path": "/tmp"});
    assert_eq!(
        call(
            &server,
            "POST",
            "/update_weights_from_disk",
            None,
            Some(&update)
        )
        .status,
        401
    );
    let reply = call(
        &server,
        "POST",
        "/update_weights_from_disk",
        Some(API_KEY),
        Some(&update),
    );
    assert_eq!(reply.status, 404, "{}", reply.text());
}

#[test]
fn control_routes_need_the_admin_key_and_stay_in_the_allowed_folder() {
    let (_scratch, allowed) = checkpoints();
    let server = Server::start(&[
        "--api-key",
        API_KEY,
        "--enable-control-routes",
        "--admin-key",
        ADMIN_KEY,
        "--allowed-model-dir",
        allowed.to_str().unwrap(),
    ]);
    let step1 = json!({"model_path": "step-1"});
    for path in [
        "/update_weights_from_disk",
        "/pause_generation",
        "/continue_generation",
    ] {
        for key in [None, Some(API_KEY), Some("adm-wrong")] {
            let reply = call(&server, "POST", path, key, Some(&step1));
            assert_error(&reply, 403, None, "--admin-key");
        }
    }
    // The admin key is not an API key.
    assert_eq!(
        call(&server, "GET", "/v1/models", Some(ADMIN_KEY), None).status,
        401
    );

    let base = logprobs(&server);
    assert_eq!(weight_version(&server), "0");
    let outside = allowed.parent().unwrap().join("outside");
    let escapes = [
        ("step-1/../base", "contains `..`"),
        ("../outside", "contains `..`"),
        (
            outside.to_str().unwrap(),
            "outside the allowed model folder",
        ),
        ("escape", "outside the allowed model folder"),
        ("missing", "cannot be opened"),
        ("", "empty"),
    ];
    for (path, says) in escapes {
        let reply = admin(
            &server,
            "/update_weights_from_disk",
            &json!({"model_path": path}),
        );
        assert_error(&reply, 400, Some("model_path"), says);
        assert_eq!(reply.json()["success"], false);
    }
    // A checkpoint of another model is named as such; the old weights keep serving.
    let reply = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": "other-model"}),
    );
    assert_error(
        &reply,
        400,
        Some("model_path"),
        "num_hidden_layers: served 30, checkpoint 29",
    );
    let reply = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": "base", "bogus": 1}),
    );
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(logprobs(&server), base);
    assert_eq!(weight_version(&server), "0");

    // Drain: a running request finishes on the old weights, then the new ones serve.
    let before = completion(&server.addr, 160);
    assert_eq!(before.status, 200, "{}", before.text());
    let addr = server.addr.clone();
    let running = std::thread::spawn(move || completion(&addr, 160));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let reply = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": "step-1", "weight_version": "step-1"}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["success"], true, "{report}");
    assert_eq!(report["weight_version"], "step-1", "{report}");
    let drained = running.join().unwrap();
    assert_eq!(drained.status, 200, "{}", drained.text());
    assert_eq!(
        drained.json()["choices"][0]["text"],
        before.json()["choices"][0]["text"],
        "the drained request ran on the old weights"
    );
    assert_eq!(report["drained_requests"], 1, "{report}");
    let stepped = logprobs(&server);
    assert_ne!(stepped, base, "the new weights serve");
    assert_eq!(weight_version(&server), "step-1");

    // Abort: a running request ends with 503 `aborted` (it may be sent again).
    let addr = server.addr.clone();
    let running = std::thread::spawn(move || completion(&addr, 4000));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let reply = admin(
        &server,
        "/update_weights_from_disk",
        &json!({"model_path": allowed.join("base"), "abort_all_requests": true}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["aborted_requests"], 1, "{}", reply.text());
    let aborted = running.join().unwrap();
    assert_eq!(aborted.status, 503, "{}", aborted.text());
    assert_eq!(
        aborted.json()["error"]["code"],
        "aborted",
        "{}",
        aborted.text()
    );
    assert!(aborted.header("retry-after").is_some());
    // Back on the start's weights: the same logprobs, bit for bit; the version counts updates.
    assert_eq!(logprobs(&server), base);
    assert_eq!(weight_version(&server), "2");

    // Pause in place: a request waits, then continues after `continue_generation`.
    let reply = admin(&server, "/pause_generation", &json!({}));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = admin(&server, "/pause_generation", &json!({"mode": "retract"}));
    assert_error(&reply, 400, Some("mode"), "retract");
    let addr = server.addr.clone();
    let waiting = std::thread::spawn(move || completion(&addr, 4));
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(!waiting.is_finished(), "a paused engine does not generate");
    assert_eq!(
        call(&server, "GET", "/health/ready", None, None).status,
        200
    );
    let reply = call(
        &server,
        "POST",
        "/continue_generation",
        Some(ADMIN_KEY),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let done = waiting.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
}
