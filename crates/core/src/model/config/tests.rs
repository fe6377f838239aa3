//! `config.json` parsing and checks: real configs accepted, each lying field named.

use super::*;

const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
    "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
    "rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,
    "tie_word_embeddings":true,"eos_token_id":2}"#;

#[test]
fn parses_a_llama_config() {
    let c = ModelConfig::from_json(Path::new("config.json"), SMOL).unwrap();
    assert_eq!(
        (c.architecture, c.head_dim, c.num_kv_heads),
        (Architecture::Llama, 64, 3)
    );
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
    assert_eq!(c.eos_token_ids, vec![2]);
    let f = c.rope_inv_freq();
    assert_eq!(f.len(), 32);
    assert!((f[1] - 100000f64.powf(-2.0 / 64.0) as f32).abs() < 1e-9);
}

#[test]
fn unknown_architecture_names_the_supported_ones() {
    let json = SMOL.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    let err = ModelConfig::from_json(Path::new("config.json"), &json)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPTNeoXForCausalLM") && err.contains("Qwen3ForCausalLM"),
        "{err}"
    );
}

#[test]
fn llama3_scaling_matches_the_reference_rule() {
    let json = SMOL.replace(
        "\"rope_theta\":100000.0",
        "\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\
         \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}",
    );
    let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
    let f = c.rope_inv_freq();
    let base = |i: usize| 500000f64.powf(-2.0 * i as f64 / 64.0);
    // Highest frequency is untouched, lowest is divided by the factor.
    assert!((f[0] as f64 - base(0)).abs() < 1e-7);
    assert!((f[31] as f64 - base(31) / 8.0).abs() < 1e-12);
}

/// `SMOL` with `key` set to the JSON `value` (`None`: removed).
fn smol_with(key: &str, value: Option<&str>) -> String {
    let mut v: serde_json::Value = serde_json::from_str(SMOL).unwrap();
    let map = v.as_object_mut().unwrap();
    match value {
        Some(x) => map.insert(key.into(), serde_json::from_str(x).unwrap()),
        None => map.remove(key),
    };
    v.to_string()
}

#[test]
fn lying_fields_are_errors_naming_the_field_and_value() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "num_hidden_layers",
            Some("1e9"),
            "num_hidden_layers must be a positive whole number, got 1000000000.0",
        ),
        (
            "num_hidden_layers",
            Some("1000000000"),
            "num_hidden_layers is 1000000000, outside 1..=1024",
        ),
        ("num_hidden_layers", Some("0"), "num_hidden_layers is 0"),
        (
            "num_hidden_layers",
            Some("-3"),
            "num_hidden_layers is -3, it must be positive",
        ),
        (
            "max_position_embeddings",
            Some("1e12"),
            "max_position_embeddings must be a positive whole number",
        ),
        (
            "max_position_embeddings",
            Some("1000000000000"),
            "max_position_embeddings is 1000000000000, outside 1..=2097152",
        ),
        ("hidden_size", None, "missing field hidden_size"),
        (
            "hidden_size",
            Some("\"576\""),
            "hidden_size must be a positive whole number, got \"576\"",
        ),
        (
            "hidden_size",
            Some("576.5"),
            "hidden_size must be a positive whole number, got 576.5",
        ),
        (
            "hidden_size",
            Some("1e30"),
            "hidden_size must be a positive whole number",
        ),
        (
            "intermediate_size",
            Some("null"),
            "missing field intermediate_size",
        ),
        ("vocab_size", Some("-5"), "vocab_size is -5"),
        (
            "vocab_size",
            Some("[49152]"),
            "vocab_size must be a positive whole number",
        ),
        ("num_attention_heads", Some("0"), "num_attention_heads is 0"),
        (
            "num_key_value_heads",
            Some("4"),
            "must be a multiple of num_key_value_heads (4)",
        ),
        ("num_key_value_heads", Some("0"), "num_key_value_heads is 0"),
        (
            "num_key_value_heads",
            Some("18"),
            "must be a multiple of num_key_value_heads (18)",
        ),
        ("head_dim", Some("0"), "head_dim is 0"),
        ("head_dim", Some("63"), "head_dim must be even"),
        (
            "head_dim",
            Some("4096"),
            "head_dim is 4096, outside 1..=1024",
        ),
        (
            "rope_theta",
            Some("0"),
            "rope_theta is 0, it must be positive",
        ),
        (
            "rope_theta",
            Some("-1"),
            "rope_theta is -1, it must be positive",
        ),
        (
            "rope_theta",
            Some("\"1e4\""),
            "rope_theta must be a finite number, got \"1e4\"",
        ),
        ("rope_theta", Some("1e-300"), "rope_theta 1e-300"),
        (
            "rms_norm_eps",
            Some("-1"),
            "rms_norm_eps is -1, it must be positive",
        ),
        (
            "rms_norm_eps",
            Some("0"),
            "rms_norm_eps is 0, it must be positive",
        ),
        (
            "rms_norm_eps",
            Some("\"NaN\""),
            "rms_norm_eps must be a finite number, got \"NaN\"",
        ),
        ("rms_norm_eps", Some("1e-300"), "rms_norm_eps is 1e-300"),
        ("rms_norm_eps", Some("5"), "rms_norm_eps is 5"),
        (
            "tie_word_embeddings",
            Some("\"yes\""),
            "tie_word_embeddings must be true or false",
        ),
        (
            "attention_bias",
            Some("1"),
            "attention_bias must be true or false",
        ),
        (
            "eos_token_id",
            Some("49152"),
            "eos_token_id 49152 is outside the vocabulary (vocab_size 49152)",
        ),
        (
            "eos_token_id",
            Some("[2, -1]"),
            "eos_token_id must be a token id",
        ),
        (
            "bos_token_id",
            Some("1e9"),
            "bos_token_id must be a token id",
        ),
        (
            "torch_dtype",
            Some("\"int8\""),
            "torch_dtype \"int8\" is not supported",
        ),
        ("dtype", Some("7"), "dtype must be a string"),
        (
            "hidden_act",
            Some("\"gelu\""),
            "hidden_act \"gelu\" is not supported",
        ),
        ("sliding_window", Some("0"), "sliding_window is 0"),
        (
            "use_sliding_window",
            Some("\"no\""),
            "use_sliding_window must be true or false",
        ),
        (
            "architectures",
            Some("\"LlamaForCausalLM\""),
            "architectures must be a list of strings",
        ),
        (
            "rope_scaling",
            Some("5"),
            "rope_scaling must be a JSON object, got 5",
        ),
        (
            "rope_scaling",
            Some(r#"{"rope_type":"yarn","factor":4}"#),
            "rope_scaling.rope_type \"yarn\" is not supported",
        ),
        (
            "rope_scaling",
            Some(r#"{"rope_type":"linear","factor":0}"#),
            "rope_scaling.factor is 0",
        ),
        (
            "rope_scaling",
            Some(r#"{"type":"linear","factor":"2"}"#),
            "rope_scaling.factor must be a finite number",
        ),
        (
            "rope_scaling",
            Some(r#"{"rope_type":"linear"}"#),
            "needs a numeric rope_scaling.factor",
        ),
        (
            "rope_scaling",
            Some(
                r#"{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
            ),
            "rope_scaling.high_freq_factor (4) must be greater than rope_scaling.low_freq_factor (4)",
        ),
        (
            "rope_scaling",
            Some(
                r#"{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":-1}"#,
            ),
            "rope_scaling.original_max_position_embeddings is -1",
        ),
        (
            "rope_parameters",
            Some(r#"{"rope_type":"default","rope_theta":0}"#),
            "rope_parameters.rope_theta is 0",
        ),
    ];
    for (key, value, expected) in cases {
        let json = if *key == "rope_parameters" {
            smol_with("rope_theta", None)
                .replace('}', &format!(",\"rope_parameters\":{}}}", value.unwrap()))
        } else {
            smol_with(key, *value)
        };
        let err = ModelConfig::from_json(Path::new("dir/config.json"), &json)
            .expect_err(&format!("{key} = {value:?} was accepted"));
        let text = err.to_string();
        assert!(matches!(err, ModelError::InvalidConfig { .. }), "{text}");
        assert!(
            text.starts_with("dir/config.json: ") && text.contains(expected),
            "{key} = {value:?}: expected {expected:?} in {text:?}"
        );
    }
}

#[test]
fn config_files_that_are_not_json_objects_are_errors() {
    for body in [
        "",
        "{",
        "not json",
        "[1, 2]",
        "null",
        "{\"hidden_size\": NaN}",
    ] {
        let err = ModelConfig::from_json(Path::new("config.json"), body)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not valid JSON") || err.contains("must be a JSON object"),
            "{body:?}: {err}"
        );
    }
}

#[test]
fn large_but_real_values_are_accepted() {
    // A million-position context (Qwen2.5-1M's 1010000) with head_dim 128 fits the caps.
    let json = smol_with("max_position_embeddings", Some("1010000")).replace(
        "\"num_attention_heads\":9",
        "\"num_attention_heads\":9,\"head_dim\":128",
    );
    let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
    assert_eq!((c.max_position_embeddings, c.head_dim), (1_010_000, 128));
    // The cap is a limit, not a default: past it, the RoPE table bound names both fields.
    let json = smol_with("max_position_embeddings", Some("2097152")).replace(
        "\"num_attention_heads\":9",
        "\"num_attention_heads\":9,\"head_dim\":256",
    );
    let err = ModelConfig::from_json(Path::new("config.json"), &json)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_position_embeddings 2097152 with head_dim 256"),
        "{err}"
    );
    // Mistral's sliding window caps the context.
    let json =
        smol_with("sliding_window", Some("4096")).replace("LlamaForCausalLM", "MistralForCausalLM");
    let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
    assert_eq!(c.max_position_embeddings, 4096);
}

#[test]
fn generation_config_eos_ids_are_checked_against_the_vocabulary() {
    let dir = std::env::temp_dir().join(format!("infermux-gen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), SMOL).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 7]}"#,
    )
    .unwrap();
    assert_eq!(read_config(&dir).unwrap().1, vec![2, 7]);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": 99999}"#,
    )
    .unwrap();
    let err = read_config(&dir).unwrap_err().to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("eos_token_id 99999"),
        "{err}"
    );
    std::fs::write(dir.join("generation_config.json"), "{").unwrap();
    let err = read_config(&dir).unwrap_err().to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("not valid JSON"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_folder_files_are_named() {
    let dir = std::env::temp_dir().join(format!("infermux-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = ModelDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), SMOL).unwrap();
    let err = ModelDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
