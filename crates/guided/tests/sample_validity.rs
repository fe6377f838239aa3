//! 50 random outputs per constraint over the real SmolLM2 tokenizer, all of them valid.

mod common;

use common::sample_many;
use infermux_guided::GuidedDecodingParams;
use serde_json::{Value, json};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "minLength": 1, "maxLength": 10 },
            "age": { "type": "integer", "minimum": 0, "maximum": 120 },
            "role": { "enum": ["admin", "user", "guest"] },
            "tags": {
                "type": "array",
                "items": { "type": "string", "maxLength": 6 },
                "maxItems": 3
            },
            "address": { "$ref": "#/$defs/address" },
            "active": { "type": "boolean" }
        },
        "required": ["name", "age", "role", "tags", "address"],
        "additionalProperties": false,
        "$defs": {
            "address": {
                "type": "object",
                "properties": {
                    "city": { "type": "string", "maxLength": 8 },
                    "zip": { "type": "string", "pattern": "^[0-9]{5}$" },
                    "kind": { "enum": ["home", "work", null] }
                },
                "required": ["city", "zip"]
            }
        }
    })
}

fn check_keys(obj: &serde_json::Map<String, Value>, allowed: &[&str], required: &[&str]) {
    for key in obj.keys() {
        assert!(
            allowed.contains(&key.as_str()),
            "unexpected key {key:?} in {obj:?}"
        );
    }
    for key in required {
        assert!(obj.contains_key(*key), "missing {key:?} in {obj:?}");
    }
}

fn check_str(v: &Value, min: usize, max: usize) -> &str {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let n = s.chars().count();
    assert!(
        (min..=max).contains(&n),
        "length {n} of {s:?} not in {min}..={max}"
    );
    s
}

/// A hand-written check of `person_schema` (with `additionalProperties: false` everywhere).
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let obj = v.as_object().expect("an object");
    check_keys(
        obj,
        &["name", "age", "role", "tags", "address", "active"],
        &["name", "age", "role", "tags", "address"],
    );
    check_str(&obj["name"], 1, 10);
    let age = obj["age"].as_i64().expect("an integer age");
    assert!((0..=120).contains(&age), "age {age}");
    assert!(["admin", "user", "guest"].contains(&obj["role"].as_str().expect("role")));
    let tags = obj["tags"].as_array().expect("tags array");
    assert!(tags.len() <= 3);
    tags.iter().for_each(|t| {
        check_str(t, 0, 6);
    });
    if let Some(active) = obj.get("active") {
        assert!(active.is_boolean(), "active {active}");
    }
    let addr = obj["address"].as_object().expect("address object");
    check_keys(addr, &["city", "zip", "kind"], &["city", "zip"]);
    check_str(&addr["city"], 0, 8);
    let zip = check_str(&addr["zip"], 5, 5);
    assert!(zip.bytes().all(|b| b.is_ascii_digit()), "zip {zip:?}");
    if let Some(kind) = addr.get("kind") {
        assert!(
            [json!("home"), json!("work"), Value::Null].contains(kind),
            "kind {kind}"
        );
    }
}

/// Whether `text` has whitespace outside JSON strings.
fn whitespace_outside_strings(text: &str) -> bool {
    let (mut in_str, mut escaped) = (false, false);
    for c in text.chars() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
        } else if c.is_whitespace() {
            return true;
        }
    }
    false
}

#[test]
fn json_schema_outputs_are_valid() {
    let params = GuidedDecodingParams {
        disable_additional_properties: true,
        ..GuidedDecodingParams::json_schema(person_schema())
    };
    let outputs = sample_many(&params, 50, 1);
    for text in &outputs {
        check_person(text);
    }
    // Flexible whitespace is on by default, and random sampling uses it.
    assert!(outputs.iter().any(|t| whitespace_outside_strings(t)));
}

#[test]
fn json_schema_without_whitespace() {
    let params = GuidedDecodingParams {
        disable_any_whitespace: true,
        disable_additional_properties: true,
        json: Some(Value::String(person_schema().to_string())),
        ..Default::default()
    };
    for text in sample_many(&params, 50, 2) {
        check_person(&text);
        assert!(!whitespace_outside_strings(&text), "whitespace in {text:?}");
    }
}

#[test]
fn json_schema_whitespace_pattern() {
    let params = GuidedDecodingParams {
        whitespace_pattern: Some("[ ]?".into()),
        disable_additional_properties: true,
        ..GuidedDecodingParams::json_schema(person_schema())
    };
    for text in sample_many(&params, 50, 3) {
        check_person(&text);
        let mut in_str = false;
        let mut prev = ' ';
        let mut escaped = false;
        for c in text.chars() {
            if in_str {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_str = false;
                }
            } else if c == '"' {
                in_str = true;
            } else {
                assert!(c != '\n' && c != '\t' && c != '\r', "{text:?}");
                assert!(!(c == ' ' && prev == ' '), "two spaces in {text:?}");
            }
            prev = if in_str { 'x' } else { c };
        }
    }
}

#[test]
fn json_object_outputs_are_objects() {
    let params = GuidedDecodingParams {
        json_object: Some(true),
        disable_any_whitespace: true,
        ..Default::default()
    };
    let dec = common::decoder();
    let mut rng = infermux_core::sampling::SeqRng::new(4, 0);
    let mut done = 0;
    // Any-JSON is unbounded under uniform sampling: keep the outputs that end in time.
    for _ in 0..200 {
        let mut c = dec.constraint(&params).expect("compiles");
        let s = common::sample(&mut c, &mut rng, 200);
        if s.finished {
            let v: Value =
                serde_json::from_str(&s.text).unwrap_or_else(|e| panic!("{e}: {:?}", s.text));
            assert!(v.is_object(), "{}", s.text);
            done += 1;
        } else {
            assert!(s.text.starts_with('{'), "{:?}", s.text);
        }
        if done == 50 {
            break;
        }
    }
    assert!(done >= 10, "only {done} objects finished");
}

#[test]
fn regex_outputs_match() {
    let pattern =
        r"[a-z]{1,8}(\.[a-z]{1,6})?@[a-z0-9-]{1,10}\.(com|org|net)|\+?[0-9]{2,4}-[0-9]{3}";
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    for text in sample_many(&GuidedDecodingParams::regex(pattern), 50, 5) {
        assert!(re.is_match(&text), "{text:?} does not match");
    }
}

#[test]
fn choice_outputs_are_options() {
    let options = [
        "yes",
        "no",
        "maybe not",
        "a",
        "ab",
        "quote\"and\\backslash",
        "ünïcödé ✓ 日本",
        "line\nbreak\ttab",
        "(x|y)*.+?",
    ];
    let outputs = sample_many(&GuidedDecodingParams::choice(options), 50, 6);
    for text in &outputs {
        assert!(
            options.contains(&text.as_str()),
            "{text:?} is not an option"
        );
    }
    let distinct: std::collections::HashSet<_> = outputs.iter().collect();
    assert!(distinct.len() >= 5, "only {distinct:?}");
}

/// Arithmetic with parentheses nested at most two deep (unbounded nesting makes a random
/// walk that need not end).
const ARITHMETIC: &str = r#"
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "-" NUMBER | "(" expr1 ")"
expr1: term1 (("+" | "-") term1)*
term1: factor1 (("*" | "/") factor1)*
factor1: NUMBER | "-" NUMBER | "(" expr2 ")"
expr2: NUMBER (("+" | "-" | "*" | "/") NUMBER)*
NUMBER: /[0-9]{1,3}(\.[0-9]{1,2})?/
"#;

/// A recursive-descent recognizer for `ARITHMETIC`.
struct Arith<'a> {
    s: &'a [u8],
    i: usize,
}

impl Arith<'_> {
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&c);
        self.i += hit as usize;
        hit
    }
    /// `expr` (depth 0), `expr1` (depth 1) or `expr2` (depth 2).
    fn expr(&mut self, depth: usize) -> bool {
        if depth == 2 {
            if !self.number() {
                return false;
            }
            while self.eat(b'+') || self.eat(b'-') || self.eat(b'*') || self.eat(b'/') {
                if !self.number() {
                    return false;
                }
            }
            return true;
        }
        if !self.term(depth) {
            return false;
        }
        while self.eat(b'+') || self.eat(b'-') {
            if !self.term(depth) {
                return false;
            }
        }
        true
    }
    fn term(&mut self, depth: usize) -> bool {
        if !self.factor(depth) {
            return false;
        }
        while self.eat(b'*') || self.eat(b'/') {
            if !self.factor(depth) {
                return false;
            }
        }
        true
    }
    fn factor(&mut self, depth: usize) -> bool {
        if self.eat(b'(') {
            return self.expr(depth + 1) && self.eat(b')');
        }
        self.eat(b'-');
        self.number()
    }
    fn digits(&mut self, max: usize) -> usize {
        let start = self.i;
        while self.i - start < max && self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }
    fn number(&mut self) -> bool {
        if self.digits(3) == 0 || self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            return false;
        }
        if self.eat(b'.') {
            return self.digits(2) > 0 && !self.s.get(self.i).is_some_and(u8::is_ascii_digit);
        }
        true
    }
    fn accepts(text: &str) -> bool {
        let mut p = Arith {
            s: text.as_bytes(),
            i: 0,
        };
        p.expr(0) && p.i == p.s.len()
    }
}

#[test]
fn lark_outputs_parse() {
    assert!(Arith::accepts("1+(2.5*-3)/45-((1+2)*3)"));
    for bad in ["1+", "1234", "(1", "(((1)))", "((-1))", "--1", "1.234"] {
        assert!(!Arith::accepts(bad), "{bad}");
    }
    let outputs = sample_many(&GuidedDecodingParams::grammar(ARITHMETIC), 50, 7);
    for text in &outputs {
        assert!(Arith::accepts(text), "{text:?} is not an expression");
    }
    assert!(outputs.iter().any(|t| t.contains('(')), "{outputs:?}");
}
