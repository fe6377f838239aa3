//! LoRA adapters through the engine on the fake backend (whose adapter rows are shifted as if
//! by other weights): load, name checks and `max_loras`; a handle bound to an adapter samples
//! from it and reports `BASE+NAME#ID`; the prefix cache never hands one adapter's KV to the
//! base or another adapter; an unloaded adapter's handle gets a typed error; ids never repeat.

use super::*;
use crate::model::lora::tests::write_safetensors;
use crate::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::{AdapterError, ModelDir, WeightPlan};

fn adapter_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("infermux-fake-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["down_proj"]}"#,
    )
    .unwrap();
    write_safetensors(
        &dir.join(ADAPTER_WEIGHTS),
        &[
            (
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into(),
                vec![2, 96],
                vec![0.5; 192],
            ),
            (
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight".into(),
                vec![64, 2],
                vec![0.25; 128],
            ),
        ],
    );
    dir
}

fn lora_engine(max_loras: usize) -> Engine {
    let (mut backend, _) = FakeBackend::new(256);
    let md = ModelDir::open(crate::model::checkpoint::tests::tiny("qwen2")).unwrap();
    backend.plan = Some(WeightPlan::new(&md.config, |n| md.checkpoint.contains(n)));
    let config = EngineConfig {
        max_loras,
        ..EngineConfig::default()
    };
    Engine::start(backend, config).unwrap()
}

#[test]
fn adapters_load_bind_version_and_unload_with_typed_errors() {
    let dir = adapter_dir();
    let e = lora_engine(2);
    let a = e.load_adapter("a", &dir).wait().unwrap();
    assert_eq!((a.id.0, a.version.as_str(), a.rank), (0, "a#0", 2));
    assert!(matches!(
        e.load_adapter("a", &dir).wait(),
        Err(AdapterError::AlreadyLoaded(_))
    ));
    assert!(matches!(
        e.load_adapter("", &dir).wait(),
        Err(AdapterError::InvalidName { .. })
    ));
    e.load_adapter("b", &dir).wait().unwrap();
    assert!(matches!(
        e.load_adapter("c", &dir).wait(),
        Err(AdapterError::TooMany { max: 2 })
    ));
    assert_eq!(e.adapters().len(), 2);

    let prompt: Vec<TokenId> = (0..40).map(|i| 1 + i % 25).collect();
    let run = |h: &Engine| {
        h.generate(GenerateRequest::new(
            prompt.clone(),
            SamplingParams::greedy(6),
        ))
        .wait()
        .unwrap()
    };
    let on_a = e.with_adapter("a").unwrap();
    let base = run(&e);
    let first = run(&on_a);
    assert_eq!(first.weight_version, "0+a#0");
    assert_eq!(base.weight_version, "0");
    assert_ne!(
        first.sequences[0].tokens, base.sequences[0].tokens,
        "the adapter changes rows"
    );
    // The base's cached prompt is not the adapter's (and vice versa); the adapter's own is.
    assert_eq!(first.cached_prompt_tokens, 0);
    let again = run(&on_a);
    assert_eq!(again.cached_prompt_tokens, 32);
    assert_eq!(again.sequences[0].tokens, first.sequences[0].tokens);
    let on_b = e.with_adapter("b").unwrap();
    assert_eq!(run(&on_b).cached_prompt_tokens, 0);

    // Unloaded: the bound handle's requests fail naming `model`; the name is free again and a
    // reload gets a new id.
    let cached = e.stats().unwrap().prefix_cache_entries;
    e.unload_adapter("a").wait().unwrap();
    let left = e.stats().unwrap().prefix_cache_entries;
    assert!(
        left < cached,
        "the adapter's prefixes are dropped: {cached} -> {left}"
    );
    match on_a
        .generate(GenerateRequest::new(
            prompt.clone(),
            SamplingParams::greedy(2),
        ))
        .wait()
    {
        Err(EngineError::Invalid(ValidationError::InvalidField { field: "model", .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.with_adapter("a"),
        Err(AdapterError::NotFound(_))
    ));
    assert!(matches!(
        e.unload_adapter("a").wait(),
        Err(AdapterError::NotFound(_))
    ));
    let reloaded = e.load_adapter("a", &dir).wait().unwrap();
    assert_eq!(reloaded.id.0, 2);
    let fresh = run(&e.with_adapter("a").unwrap());
    assert_eq!(fresh.weight_version, "0+a#2");
    assert_eq!(fresh.cached_prompt_tokens, 0, "a new id shares no prefix");
    // The base serves on as before.
    assert_eq!(run(&e).sequences[0].tokens, base.sequences[0].tokens);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_backend_without_adapters_says_so() {
    let (e, _) = engine(EngineConfig::default());
    let err = e
        .load_adapter("a", std::path::Path::new("/nonexistent"))
        .wait()
        .unwrap_err();
    assert!(matches!(err, AdapterError::BackendUnsupported), "{err}");
}
