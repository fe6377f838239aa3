//! LoRA adapters through `infermux serve` with the real model: `--lora-modules` at start,
//! `/v1/models` listing them, the OpenAI `model` field choosing base or adapter (the adapter
//! changes the logprobs; its replies carry `weight_version` `0+NAME#ID`), adapter and base
//! requests sent together equal the same requests sent alone (mixed batches change no
//! number), vLLM's load/unload routes behind the admin key and `--allowed-model-dir`, typed
//! 400/404s for bad names, paths and adapters; `/v1/sample` and `/v1/compute_logprobs` take
//! the adapter as `model` too.

mod server_support;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use server_support::{Reply, Server};

const ADMIN_KEY: &str = "adm-lora-7f";

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a PEFT adapter for SmolLM2-135M (hidden 576, k/v 192, 30 layers): rank 4 on q and v.
fn write_adapter(dir: &Path, salt: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut state = 0x9E37_79B9u32.wrapping_mul(salt + 1);
    let mut add = |name: String, shape: [usize; 2]| {
        let begin = data.len();
        for _ in 0..shape[0] * shape[1] {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let v = (state as f32 / u32::MAX as f32 - 0.5) * 0.15;
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name,
            json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    };
    for layer in 0..30 {
        for (module, out) in [("q_proj", 576), ("v_proj", 192)] {
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            add(format!("{base}.lora_A.weight"), [4, 576]);
            add(format!("{base}.lora_B.weight"), [out, 4]);
        }
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("adapter_model.safetensors"), file).unwrap();
    let config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none"});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
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
