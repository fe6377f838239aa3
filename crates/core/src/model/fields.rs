//! Typed reads of a config file's JSON fields: each error names the field and the value found,
//! so a lying `config.json` says what lies.

use crate::TokenId;

/// Typed reads of one JSON object's fields; each error names the field (`prefix` + key) and
/// the value found, so a lying config says what lies.
pub(crate) struct Fields<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
    pub(crate) prefix: &'static str,
}

/// A number for an error message, as a config would write it: `0`, `-1`, `0.5`, `1e-300`.
pub(crate) fn num(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else if (1e-4..1e15).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// A JSON value for an error message, cut short when long.
pub(crate) fn shown(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 60 {
        let cut = (0..=57).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

impl<'a> Fields<'a> {
    pub(crate) fn of(
        value: &'a serde_json::Value,
        what: &str,
        prefix: &'static str,
    ) -> Result<Self, String> {
        match value.as_object() {
            Some(map) => Ok(Self { map, prefix }),
            None => Err(format!(
                "{what} must be a JSON object, got {}",
                shown(value)
            )),
        }
    }

    /// The field, `None` when absent or `null`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A whole number in `1..=max`, if present.
    pub(crate) fn count(&self, key: &str, max: usize) -> Result<Option<usize>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let name = self.name(key);
        match v.as_u64() {
            Some(n) if n >= 1 && n <= max as u64 => Ok(Some(n as usize)),
            Some(n) => Err(format!("{name} is {n}, outside 1..={max}")),
            None if v.as_i64().is_some() => Err(format!("{name} is {v}, it must be positive")),
            None => Err(format!(
                "{name} must be a positive whole number, got {}",
                shown(v)
            )),
        }
    }

    /// A whole number in `1..=max` that must be present.
    pub(crate) fn required_count(&self, key: &str, max: usize) -> Result<usize, String> {
        self.count(key, max)?
            .ok_or_else(|| format!("missing field {} (a positive whole number)", self.name(key)))
    }

    /// A finite number, if present (JSON has no NaN or infinity; a string is an error).
    pub(crate) fn number(&self, key: &str) -> Result<Option<f64>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!(
                "{} must be a finite number, got {}",
                self.name(key),
                shown(v)
            )),
        }
    }

    /// A number in `(0, max]`, if present.
    pub(crate) fn positive(&self, key: &str, max: f64) -> Result<Option<f64>, String> {
        match self.number(key)? {
            Some(x) if x > 0.0 && x <= max => Ok(Some(x)),
            Some(x) => Err(format!(
                "{} is {}, it must be positive and at most {max:e}",
                self.name(key),
                num(x)
            )),
            None => Ok(None),
        }
    }

    pub(crate) fn flag(&self, key: &str) -> Result<Option<bool>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| format!("{} must be true or false, got {}", self.name(key), shown(v)))
    }

    pub(crate) fn text(&self, key: &str) -> Result<Option<&'a str>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| format!("{} must be a string, got {}", self.name(key), shown(v)))
    }

    /// A token id or a list of them, each below `vocab_size`.
    pub(crate) fn token_ids(
        &self,
        key: &str,
        vocab_size: usize,
    ) -> Result<Option<Vec<TokenId>>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let name = self.name(key);
        let one = |x: &serde_json::Value| -> Result<TokenId, String> {
            match x.as_u64() {
                Some(id) if id < vocab_size as u64 => Ok(id as TokenId),
                Some(id) => Err(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {vocab_size})"
                )),
                None => Err(format!(
                    "{name} must be a token id or a list of them, got {}",
                    shown(x)
                )),
            }
        };
        match v.as_array() {
            Some(list) => list.iter().map(one).collect::<Result<_, _>>().map(Some),
            None => one(v).map(|id| Some(vec![id])),
        }
    }
}
