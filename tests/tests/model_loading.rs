//! Loading: sharded checkpoints, precisions, and folders that cannot be served.

use std::collections::BTreeMap;
use std::path::Path;

use infermux::{BackendKind, DType, LoadOptions, ModelInput, ServiceClient};
use infermux_tests::model_dir;

/// Copies the reference model into `dst` with its weights split over two shards and an index.
fn write_sharded_copy(dst: &Path) {
    let src = model_dir();
    std::fs::create_dir_all(dst).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = BTreeMap::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dst.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn score(options: LoadOptions, dir: &Path, tokens: &[u32]) -> Vec<f64> {
    let client = ServiceClient::with_options(options)
        .create_sampling_client(dir)
        .unwrap();
    let lps = client
        .compute_logprobs(ModelInput::from_ints(tokens.to_vec()))
        .wait()
        .unwrap();
    lps[1..].iter().map(|x| x.unwrap() as f64).collect()
}

const TOKENS: [u32; 8] = [504, 3575, 282, 4649, 314, 7042, 30, 198];

#[test]
fn sharded_checkpoint_gives_identical_logprobs() {
    let dir = std::env::temp_dir().join(format!("infermux-sharded-{}", std::process::id()));
    write_sharded_copy(&dir);
    let single = score(LoadOptions::default(), &model_dir(), &TOKENS);
    let sharded = score(LoadOptions::default(), &dir, &TOKENS);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(single, sharded);
}

#[test]
fn bf16_runs_and_stays_close_to_f32() {
    let f32 = score(LoadOptions::default(), &model_dir(), &TOKENS);
    let options = LoadOptions {
        backend: BackendKind::Candle,
        dtype: DType::Bf16,
        ..LoadOptions::default()
    };
    let bf16 = score(options, &model_dir(), &TOKENS);
    let worst = f32
        .iter()
        .zip(&bf16)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst > 0.0, "bf16 must actually run in reduced precision");
    assert!(
        worst < 0.5,
        "bf16 drifted too far from f32: max |Δ logprob| = {worst}"
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("infermux-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    let err = ServiceClient::new()
        .create_sampling_client(&dir)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn sampling_client_is_shareable() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<infermux::SamplingClient>();
}
