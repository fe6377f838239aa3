//! Guided decoding on the real model (candle, CPU, temperature 1.0): every one of 50 samples
//! must satisfy its constraint.

use std::sync::OnceLock;

use infermux::{GuidedDecodingParams, ModelInput, SamplingClient, SamplingParams, ServiceClient};
use infermux_core::FinishReason;
use infermux_tests::model_dir;
use serde_json::{Value, json};

const SAMPLES: usize = 50;

fn client() -> &'static SamplingClient {
    static CLIENT: OnceLock<SamplingClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        ServiceClient::new()
            .create_sampling_client(model_dir())
            .unwrap()
    })
}

/// 50 samples at temperature 1.0 of a chat prompt under `guided`; returns their texts.
fn sample(question: &str, guided: GuidedDecodingParams, max_tokens: usize) -> Vec<String> {
    let tokenizer = client().get_tokenizer();
    let chat = tokenizer
        .apply_chat_template(&[infermux::ChatMessage::user(question)], true)
        .unwrap();
    let prompt = ModelInput::from_ints(tokenizer.encode(&chat, false).unwrap());
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(2026),
        max_tokens: Some(max_tokens),
        guided_decoding: Some(guided),
        ..SamplingParams::default()
    };
    let out = client()
        .sample(prompt, SAMPLES, params, false, 0)
        .wait()
        .unwrap();
    assert_eq!(out.sequences.len(), SAMPLES);
    out.sequences
        .iter()
        .map(|s| {
            assert_eq!(
                s.finish_reason,
                FinishReason::Eos,
                "a sample did not complete: {:?}",
                s.text
            );
            s.text.clone().unwrap()
        })
        .collect()
}

fn check_person(v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("not an object")?;
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    for k in &keys {
        if !["name", "age", "role", "address", "tags"].contains(k) {
            return Err(format!("unexpected key {k}"));
        }
    }
    let name = obj["name"].as_str().ok_or("name")?;
    if name.chars().count() > 12 {
        return Err("name too long".into());
    }
    let age = obj["age"].as_i64().ok_or("age")?;
    if !(0..=120).contains(&age) {
        return Err(format!("age {age}"));
    }
    if !["admin", "user", "guest"].contains(&obj["role"].as_str().ok_or("role")?) {
        return Err("role".into());
    }
    let address = obj["address"].as_object().ok_or("address")?;
    if address.len() != 2
        || address["city"]
            .as_str()
            .is_none_or(|c| c.chars().count() > 12)
    {
        return Err("address.city".into());
    }
    let zip = address["zip"].as_str().ok_or("zip")?;
    if zip.len() != 5 || !zip.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("zip {zip}"));
    }
    let tags = obj["tags"].as_array().ok_or("tags")?;
    if tags.len() > 3
        || !tags
            .iter()
            .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or("")))
    {
        return Err("tags".into());
    }
    Ok(())
}

#[test]
fn json_schema_samples_all_validate() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"]
            },
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "tags"]
    });
    let guided = GuidedDecodingParams {
        disable_any_whitespace: true,
        disable_additional_properties: true,
        ..GuidedDecodingParams::json_schema(schema)
    };
    for text in sample("Describe a user as JSON.", guided, 120) {
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        check_person(&v).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

#[test]
fn regex_choice_and_grammar_samples_all_match() {
    let re = regex::Regex::new(r"^[A-Z][a-z]{1,8} [0-9]{1,3}$").unwrap();
    for text in sample(
        "Give a name and a number.",
        GuidedDecodingParams::regex(r"[A-Z][a-z]{1,8} [0-9]{1,3}"),
        24,
    ) {
        assert!(re.is_match(&text), "{text:?}");
    }
    let options = ["red", "green", "dark blue"];
    for text in sample("Pick a color.", GuidedDecodingParams::choice(options), 8) {
        assert!(options.contains(&text.as_str()), "{text:?}");
    }
    let grammar = r#"
start: expr
expr: term (OP term)? (OP term)?
OP: "+" | "-"
term: NUMBER | "(" NUMBER ("*" NUMBER)? ")"
NUMBER: /[0-9]{1,3}/
"#;
    for text in sample("Write a sum.", GuidedDecodingParams::grammar(grammar), 40) {
        assert!(is_expr(&text), "{text:?}");
    }
}

/// A tiny parser for the grammar above (at most three terms).
fn is_expr(text: &str) -> bool {
    fn number(s: &[u8], i: &mut usize) -> bool {
        let start = *i;
        while *i < s.len() && s[*i].is_ascii_digit() && *i - start < 3 {
            *i += 1;
        }
        *i > start
    }
    fn term(s: &[u8], i: &mut usize) -> bool {
        if s.get(*i) == Some(&b'(') {
            *i += 1;
            if !number(s, i) {
                return false;
            }
            if s.get(*i) == Some(&b'*') {
                *i += 1;
                if !number(s, i) {
                    return false;
                }
            }
            if s.get(*i) != Some(&b')') {
                return false;
            }
            *i += 1;
            true
        } else {
            number(s, i)
        }
    }
    let s = text.as_bytes();
    let mut i = 0;
    if !term(s, &mut i) {
        return false;
    }
    let mut ops = 0;
    while i < s.len() && (s[i] == b'+' || s[i] == b'-') && ops < 2 {
        ops += 1;
        i += 1;
        if !term(s, &mut i) {
            return false;
        }
    }
    i == s.len()
}
