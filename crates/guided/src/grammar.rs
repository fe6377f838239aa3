//! Turning [`GuidedDecodingParams`] into an llguidance [`TopLevelGrammar`], one mode at a time.

use infermux_core::{GuidedDecodingParams, GuidedError, GuidedMode};
use llguidance::api::TopLevelGrammar;
use serde_json::{Map, Value, json};

/// Schema keywords whose values are data, not subschemas: the `additionalProperties` rewrite
/// must not descend into them.
const DATA_KEYWORDS: &[&str] = &["enum", "const", "default", "examples", "x-guidance"];

/// The grammar for `params` in `mode` (the mode `params.mode()` returned).
pub(crate) fn build_grammar(
    params: &GuidedDecodingParams,
    mode: GuidedMode,
) -> Result<TopLevelGrammar, GuidedError> {
    let invalid = |reason: String| GuidedError::Invalid { mode, reason };
    match mode {
        GuidedMode::JsonSchema => {
            let raw = params
                .json
                .as_ref()
                .ok_or_else(|| invalid("json is not set".into()))?;
            let mut schema = parse_schema(raw).map_err(invalid)?;
            if params.disable_additional_properties {
                forbid_additional_properties(&mut schema);
            }
            apply_json_options(&mut schema, params);
            Ok(TopLevelGrammar::from_json_schema(schema))
        }
        GuidedMode::JsonObject => {
            let mut schema = json!({ "type": "object" });
            apply_json_options(&mut schema, params);
            Ok(TopLevelGrammar::from_json_schema(schema))
        }
        GuidedMode::Regex => {
            let rx = params
                .regex
                .as_deref()
                .ok_or_else(|| invalid("regex is not set".into()))?;
            Ok(TopLevelGrammar::from_regex(rx))
        }
        GuidedMode::Choice => {
            let options = params
                .choice
                .as_deref()
                .ok_or_else(|| invalid("choice is not set".into()))?;
            Ok(TopLevelGrammar::from_lark(choice_to_lark(options)))
        }
        GuidedMode::Grammar => {
            let lark = params
                .grammar
                .as_deref()
                .ok_or_else(|| invalid("grammar is not set".into()))?;
            if lark.trim().is_empty() {
                return Err(invalid("the grammar is empty".into()));
            }
            Ok(TopLevelGrammar::from_lark(lark.to_owned()))
        }
    }
}

/// The schema as a JSON object: a string holding JSON is parsed, `true` means "anything".
fn parse_schema(raw: &Value) -> Result<Value, String> {
    let value = match raw {
        Value::String(text) => serde_json::from_str::<Value>(text)
            .map_err(|e| format!("the schema string is not JSON: {e}"))?,
        other => other.clone(),
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Bool(true) => Ok(Value::Object(Map::new())),
        Value::Bool(false) => Err("the schema `false` matches nothing".into()),
        other => Err(format!(
            "a JSON schema must be an object, got {}",
            kind_name(&other)
        )),
    }
}

fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `disable_additional_properties`: every object schema that does not say otherwise gets
/// `"additionalProperties": false` (as vLLM does), so only the listed keys may appear.
pub(crate) fn forbid_additional_properties(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object = map.get("type").is_some_and(|t| match t {
                Value::String(s) => s == "object",
                Value::Array(types) => types.iter().any(|t| t == "object"),
                _ => false,
            }) || map.contains_key("properties");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, value) in map.iter_mut() {
                if !DATA_KEYWORDS.contains(&key.as_str()) {
                    forbid_additional_properties(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(forbid_additional_properties),
        _ => {}
    }
}

/// The whitespace options, as llguidance's `x-guidance` schema extension. Options the schema
/// sets itself in `x-guidance` are kept unless the request overrides them.
fn apply_json_options(schema: &mut Value, params: &GuidedDecodingParams) {
    let Value::Object(map) = schema else { return };
    let entry = map
        .entry("x-guidance")
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    let Value::Object(options) = entry else {
        return;
    };
    if params.disable_any_whitespace {
        options.insert("whitespace_flexible".into(), Value::Bool(false));
    }
    if let Some(pattern) = &params.whitespace_pattern {
        options.insert("whitespace_pattern".into(), Value::String(pattern.clone()));
    }
    if options.is_empty() {
        map.remove("x-guidance");
    }
}

/// A Lark grammar whose language is exactly the given strings.
pub(crate) fn choice_to_lark(options: &[String]) -> String {
    let mut alternatives: Vec<String> = options.iter().map(|s| lark_literal(s)).collect();
    alternatives.sort();
    alternatives.dedup();
    format!("start: {}\n", alternatives.join(" | "))
}

/// A Lark string literal for `s`: JSON quoting (which llguidance's Lark lexer decodes), plus
/// `\u007f`, which JSON leaves raw but the lexer rejects.
fn lark_literal(s: &str) -> String {
    let quoted = serde_json::to_string(s).expect("a string always serializes");
    quoted.replace('\u{7f}', "\\u007f")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_literals_are_escaped() {
        let lark = choice_to_lark(&["a\"b".into(), "x\\y\n".into(), "\u{7f}".into()]);
        assert_eq!(lark, "start: \"\\u007f\" | \"a\\\"b\" | \"x\\\\y\\n\"\n");
    }

    #[test]
    fn additional_properties_rewrite_skips_data() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "inner": { "type": "object", "properties": { "a": { "type": "string" } } },
                "open": { "type": "object", "additionalProperties": true },
                "k": { "const": { "type": "object" } }
            }
        });
        forbid_additional_properties(&mut schema);
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(
            schema["properties"]["inner"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            schema["properties"]["open"]["additionalProperties"],
            json!(true)
        );
        assert_eq!(
            schema["properties"]["k"]["const"],
            json!({ "type": "object" })
        );
    }

    #[test]
    fn whitespace_options_go_to_x_guidance() {
        let params = GuidedDecodingParams {
            disable_any_whitespace: true,
            whitespace_pattern: Some("[ ]?".into()),
            ..GuidedDecodingParams::json_schema(json!({ "type": "object" }))
        };
        let mut schema = json!({ "type": "object", "x-guidance": { "lenient": true } });
        apply_json_options(&mut schema, &params);
        assert_eq!(
            schema["x-guidance"],
            json!({ "lenient": true, "whitespace_flexible": false, "whitespace_pattern": "[ ]?" })
        );
        let mut plain = json!({ "type": "object" });
        apply_json_options(&mut plain, &GuidedDecodingParams::default());
        assert!(plain.get("x-guidance").is_none());
    }

    #[test]
    fn schema_forms() {
        assert!(parse_schema(&json!("{\"type\":\"string\"}")).is_ok());
        assert_eq!(parse_schema(&json!(true)), Ok(json!({})));
        assert!(parse_schema(&json!(false)).is_err());
        assert!(parse_schema(&json!([1])).is_err());
        assert!(parse_schema(&json!("not json")).is_err());
    }
}
