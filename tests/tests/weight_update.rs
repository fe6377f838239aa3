//! Weight updates from disk on every installed backend, through the public API, on the tiny
//! llama: after an update the engine scores exactly as a fresh load of the new folder does,
//! a checkpoint of another model is refused naming the field while the old weights keep
//! serving, and updating back to the start's folder gives the start's logprobs bit for bit.

use std::path::{Path, PathBuf};

use infermux::core::backend::WeightUpdateError;
use infermux::core::engine::UpdateMode;
use infermux::{BackendKind, LoadOptions, ModelInput, SamplingClient, ServiceClient};
use infermux_tests::{TINY_FILES, tiny_model_dir};

const TOKENS: [u32; 7] = [1, 17, 42, 99, 7, 3, 64];

fn client(backend: BackendKind, dir: &Path) -> SamplingClient {
    let options = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    ServiceClient::with_options(options)
        .create_sampling_client(dir)
        .unwrap_or_else(|e| panic!("{backend}: loading {}: {e}", dir.display()))
}

fn score(client: &SamplingClient) -> Vec<Option<f32>> {
    client
        .compute_logprobs(ModelInput::from_ints(TOKENS.to_vec()))
        .wait()
        .unwrap()
}

/// A copy of `src` with `model.norm.weight` scaled (every logprob moves) under `name`.
fn scaled_copy(src: &Path, name: &str, scale: f32) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("infermux-wu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for file in TINY_FILES {
        if file != "model.safetensors" {
            std::fs::copy(src.join(file), dst.join(file)).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let norm = st.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.dtype(), safetensors::Dtype::F32);
    let scaled: Vec<u8> = norm
        .data()
        .chunks_exact(4)
        .flat_map(|x| (f32::from_le_bytes(x.try_into().unwrap()) * scale).to_le_bytes())
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for name in st.names() {
        let view = if name == "model.norm.weight" {
            safetensors::tensor::TensorView::new(norm.dtype(), norm.shape().to_vec(), &scaled)
                .unwrap()
        } else {
            st.tensor(name).unwrap()
        };
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    dst
}

fn updates_swap_weights_and_refuse_other_models(backend: BackendKind) {
    let base = tiny_model_dir("llama3", backend);
    let served = client(backend, &base);
    let start = score(&served);
    let stepped_dir = scaled_copy(&base, &format!("{backend}-step"), 0.5);
    // Updated first: the ONNX backend exports the new folder's graph as it updates, which a
    // fresh load then opens.
    let report = served
        .update_weights_from_disk(&stepped_dir, UpdateMode::Drain)
        .wait()
        .unwrap_or_else(|e| panic!("{backend}: update: {e}"));
    assert_eq!(report.weight_version, "1");
    let expected = score(&client(backend, &stepped_dir));
    assert_ne!(
        expected, start,
        "{backend}: the scaled norm moves the logprobs"
    );
    assert_eq!(
        score(&served),
        expected,
        "{backend}: as a fresh load of the new folder"
    );

    // Another model: the config says another layer count.
    let other = scaled_copy(&base, &format!("{backend}-other"), 1.0);
    let config_path = other.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    config["num_hidden_layers"] = serde_json::json!(layers + 1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = served
        .update_weights_from_disk(&other, UpdateMode::Abort)
        .wait()
        .unwrap_err();
    assert!(
        matches!(&err, WeightUpdateError::Mismatch { differences, .. }
            if differences.iter().any(|d| d.starts_with("num_hidden_layers"))),
        "{backend}: {err}"
    );
    assert_eq!(
        score(&served),
        expected,
        "{backend}: the old weights keep serving"
    );

    served
        .update_weights_from_disk(&base, UpdateMode::Abort)
        .wait()
        .unwrap_or_else(|e| panic!("{backend}: update back: {e}"));
    assert_eq!(
        score(&served),
        start,
        "{backend}: back to the start's weights"
    );
    assert_eq!(served.weight_version(), "2");
    for dir in [stepped_dir, other] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn candle_updates_weights_from_disk() {
    updates_swap_weights_and_refuse_other_models(BackendKind::Candle);
}

#[cfg(feature = "torch")]
#[test]
fn torch_updates_weights_from_disk() {
    updates_swap_weights_and_refuse_other_models(BackendKind::Torch);
}

#[cfg(feature = "onnx")]
#[test]
fn onnx_updates_weights_from_disk() {
    updates_swap_weights_and_refuse_other_models(BackendKind::Onnx);
}
