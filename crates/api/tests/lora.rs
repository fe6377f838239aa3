//! LoRA adapters through `infermux serve` with the real model: `--lora-modules` at start,
//! `/v1/models` listing them, the OpenAI `model` field choosing base or adapter (the adapter
//! changes the logprobs; its replies carry `weight_version` `0+NAME#ID`), adapter and base
//! requests sent together equal the same requests sent alone (mixed batches change no
//! number), vLLM's load/unload routes behind the admin key and `--allowed-model-dir`, typed
//! 400/404s for bad names, paths and adapters; `/v1/sample` and `/v1/compute_logprobs` take
//! the adapter as `model` too.

mod server_support;

use std::path::PathBuf;

use serde_json::{Value, json};
use server_support::{Reply, Server, write_adapter};

const ADMIN_KEY: &str = "adm-lora-7f";

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn admin(server: &Server, path: &str, body: &Value) -> Reply {
    server.post_as(ADMIN_KEY, path, body)
}

fn completion(server: &Server, model: &str) -> Reply {
    server.post(
        "/v1/completions",
        &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, "logprobs": 1}),
    )
}

fn logprobs(reply: &Reply) -> Vec<f64> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn adapters_are_models_batched_with_the_base_and_loaded_at_run_time() {
    let root = Scratch(std::env::temp_dir().join(format!("infermux-lora-{}", std::process::id())));
    write_adapter(&root.0.join("ada"), 1);
    write_adapter(&root.0.join("second"), 2);
    let ada = format!("ada={}", root.0.join("ada").display());
    let allowed = root.0.display().to_string();
    let server = Server::start(&[
        "--lora-modules",
        &ada,
        "--enable-control-routes",
        "--admin-key",
        ADMIN_KEY,
        "--allowed-model-dir",
        &allowed,
    ]);
    let base_name = server.get("/v1/models").json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids: Vec<Value> = server.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!(base_name), json!("ada")]);

    // Alone: base and adapter differ, and say which weights they ran on.
    let base_alone = completion(&server, &base_name);
    let ada_alone = completion(&server, "ada");
    assert_eq!(base_alone.json()["weight_version"], "0");
    assert_eq!(ada_alone.json()["weight_version"], "0+ada#0");
    let (b, a) = (logprobs(&base_alone), logprobs(&ada_alone));
    let moved = b
        .iter()
        .zip(&a)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "the adapter changed nothing: {b:?} {a:?}");

    // Together (one engine, shared forwards): the same numbers as alone.
    let together: Vec<(String, Reply)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let model = if i % 2 == 0 {
                    base_name.clone()
                } else {
                    "ada".to_string()
                };
                let server = &server;
                s.spawn(move || (model.clone(), completion(server, &model)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (model, reply) in &together {
        let want = if *model == base_name { &b } else { &a };
        let got = logprobs(reply);
        let worst = got
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "{model}: {got:?} vs alone {want:?}");
    }

    // The native routes take the adapter as `model` too.
    let tokens =
        json!({"chunks": [{"type": "encoded_text", "tokens": [504, 3575, 282, 4649, 314, 260]}]});
    let scored = |model: Option<&str>| {
        let mut body = json!({"prompt": tokens});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let r = server.post("/v1/compute_logprobs", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let (plain, adapted) = (scored(None), scored(Some("ada")));
    assert_eq!(adapted["policy_version"], "0+ada#0");
    assert_ne!(plain["logprobs"], adapted["logprobs"]);
    let sampled = server.post(
        "/v1/sample",
        &json!({"prompt": tokens, "model": "ada", "num_samples": 2,
            "sampling_params": {"max_tokens": 3, "temperature": 1.0, "seed": 3}}),
    );
    assert_eq!(sampled.status, 200, "{}", sampled.text());
    assert_eq!(sampled.json()["policy_version"], "0+ada#0");
    let nope = server.post("/v1/sample", &json!({"prompt": tokens, "model": "nope"}));
    assert_eq!(nope.status, 404, "{}", nope.text());

    // Unknown names are 404s listing what is served.
    let unknown = completion(&server, "nope");
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(unknown.text().contains("ada"), "{}", unknown.text());

    // Run-time loading: admin key, allowed folder, typed errors.
    let body = json!({"lora_name": "second", "lora_path": "second"});
    let no_key = server.post("/v1/load_lora_adapter", &body);
    assert_eq!(no_key.status, 403, "{}", no_key.text());
    let outside = admin(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": "../x"}),
    );
    assert_eq!(outside.status, 400, "{}", outside.text());
    assert_eq!(outside.json()["error"]["param"], "lora_path");
    let taken = admin(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "ada", "lora_path": "second"}),
    );
    assert_eq!(taken.status, 400, "{}", taken.text());
    assert_eq!(taken.json()["error"]["param"], "lora_name");
    std::fs::create_dir_all(root.0.join("broken")).unwrap();
    std::fs::write(
        root.0.join("broken/adapter_config.json"),
        r#"{"r": 4, "target_modules": ["c_attn"]}"#,
    )
    .unwrap();
    std::fs::copy(
        root.0.join("ada/adapter_model.safetensors"),
        root.0.join("broken/adapter_model.safetensors"),
    )
    .unwrap();
    let broken = admin(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "broken", "lora_path": "broken"}),
    );
    assert_eq!(broken.status, 400, "{}", broken.text());
    assert!(broken.text().contains("c_attn"), "{}", broken.text());

    let loaded = admin(&server, "/v1/load_lora_adapter", &body);
    assert_eq!(loaded.status, 200, "{}", loaded.text());
    assert_eq!(loaded.json()["version"], "second#1");
    let second = completion(&server, "second");
    assert_eq!(second.json()["weight_version"], "0+second#1");
    let s = logprobs(&second);
    assert!(
        s.iter().zip(&a).any(|(x, y)| (x - y).abs() > 1e-3),
        "{s:?} {a:?}"
    );

    let unloaded = admin(
        &server,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "second"}),
    );
    assert_eq!(unloaded.status, 200, "{}", unloaded.text());
    assert_eq!(completion(&server, "second").status, 404);
    let again = admin(
        &server,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "second"}),
    );
    assert_eq!(again.status, 404, "{}", again.text());
    // The base and the other adapter serve on, unchanged.
    assert_eq!(logprobs(&completion(&server, "ada")), a);
    assert_eq!(logprobs(&completion(&server, &base_name)), b);
}

/// `infermux logprobs --lora DIR --json` on `backend`: each token's logprob.
fn cli_logprobs(backend: &str, lora: Option<&std::path::Path>) -> Vec<Option<f64>> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_infermux"));
    cmd.args(["logprobs", "--model"])
        .arg(server_support::model_dir())
        .args(["--backend", backend, "--json"])
        .args([
            "--prompt",
            "The capital of France is Paris, and the capital of Italy is",
        ]);
    if let Some(dir) = lora {
        cmd.arg("--lora").arg(dir);
    }
    let out = cmd.output().expect("running infermux");
    assert!(
        out.status.success(),
        "{backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// onnx runs an adapter by merging it into the weights at load (`W + B A`, exported beside
/// the adapter): its logprobs equal candle's, which applies the same adapter per row, within
/// the f32 tolerance, and differ from the base; `serve --lora-modules` on onnx is refused
/// with a message saying so. The build CI runs has onnx; a build without it has nothing here
/// to check.
#[test]
fn onnx_merges_an_adapter_at_load_and_agrees_with_candle() {
    if !cfg!(feature = "onnx") {
        return;
    }
    let root = Scratch(std::env::temp_dir().join(format!("infermux-merge-{}", std::process::id())));
    let dir = root.0.join("ada");
    write_adapter(&dir, 5);
    let candle = cli_logprobs("candle", Some(&dir));
    let onnx = cli_logprobs("onnx", Some(&dir));
    let base = cli_logprobs("onnx", None);
    assert_eq!(candle.len(), onnx.len());
    let gap = |a: &[Option<f64>], b: &[Option<f64>]| {
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).abs()))
            .fold(0.0, f64::max)
    };
    assert!(
        gap(&candle, &onnx) < 1e-3,
        "onnx merged vs candle: {}",
        gap(&candle, &onnx)
    );
    assert!(
        gap(&base, &onnx) > 1e-2,
        "the merged adapter changed nothing"
    );
    assert!(
        dir.join("onnx/model.onnx").is_file(),
        "the merged graph is beside the adapter"
    );

    let module = format!("ada={}", dir.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infermux"))
        .args(["serve", "--model"])
        .arg(server_support::model_dir())
        .args([
            "--backend",
            "onnx",
            "--port",
            "0",
            "--lora-modules",
            &module,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--lora-modules") && err.contains("merges"),
        "{err}"
    );
}

/// Tinker's `create_sampling_client(model_path=ADAPTER)` in Rust: a PEFT folder loads its base
/// (`base_model_name_or_path`) with the adapter, equal to loading the adapter into a client on
/// that base; without the field it is a typed error naming it.
#[test]
fn a_peft_folder_as_model_path_loads_its_base_with_the_adapter() {
    use infermux::{ModelInput, ServiceClient};
    let root = Scratch(std::env::temp_dir().join(format!("infermux-mp-{}", std::process::id())));
    let dir = root.0.join("ada");
    write_adapter(&dir, 7);
    let config_path = dir.join("adapter_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let service = ServiceClient::new();
    let missing = service
        .create_sampling_client(&dir)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("base_model_name_or_path"), "{missing}");

    config["base_model_name_or_path"] = json!(server_support::model_dir().display().to_string());
    std::fs::write(&config_path, config.to_string()).unwrap();
    let prompt = || ModelInput::from_ints(vec![504, 3575, 282, 4649, 314, 7042]);
    let by_path = service.create_sampling_client(&dir).unwrap();
    let base = service
        .create_sampling_client(server_support::model_dir())
        .unwrap();
    let loaded = base.create_lora_client(&dir).unwrap();
    let want = loaded.compute_logprobs(prompt()).wait().unwrap();
    assert_eq!(by_path.compute_logprobs(prompt()).wait().unwrap(), want);
    assert_ne!(base.compute_logprobs(prompt()).wait().unwrap(), want);
}
