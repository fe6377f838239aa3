//! Stop strings and stop patterns over a growing text, matched across token boundaries.

use crate::error::ValidationError;
use crate::params::SamplingParams;

/// Where a stop matched, and the text to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopHit {
    /// Bytes of the text to keep (before the match, or through it when it is included).
    pub keep: usize,
    /// The text that matched.
    pub matched: String,
}

/// A request's stop strings and stop pattern.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    strings: Vec<String>,
    pattern: Option<regex::Regex>,
    include_in_output: bool,
    longest: usize,
}

impl StopMatcher {
    /// The matcher for `params`; `None` when the request has no stop strings or pattern.
    pub fn new(params: &SamplingParams) -> Result<Option<Self>, ValidationError> {
        if params.stop.is_empty() && params.stop_pattern.is_none() {
            return Ok(None);
        }
        let pattern = params
            .stop_pattern
            .as_deref()
            .map(crate::params::validate::compile_stop_pattern)
            .transpose()?;
        Ok(Some(Self {
            longest: params.stop.iter().map(String::len).max().unwrap_or(0),
            strings: params.stop.clone(),
            pattern,
            include_in_output: params.include_stop_str_in_output,
        }))
    }

    /// Checks `text`, of which the first `checked` bytes were checked before; the earliest
    /// match wins.
    pub fn find(&self, text: &str, checked: usize) -> Option<StopHit> {
        let mut from = checked.saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let string_hit = self
            .strings
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s.len())))
            .min_by_key(|&(start, len)| (start, std::cmp::Reverse(len)));
        let pattern_hit = self
            .pattern
            .as_ref()
            .and_then(|re| re.find(text))
            .map(|m| (m.start(), m.len()));
        let (start, len) = match (string_hit, pattern_hit) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(StopHit {
            keep: if self.include_in_output {
                start + len
            } else {
                start
            },
            matched: text[start..start + len].to_string(),
        })
    }

    /// Bytes at the end of `text` that could still grow into a stop string: a stream holds
    /// them back so it never shows text that a stop later removes.
    pub fn holdback(&self, text: &str) -> usize {
        if self.include_in_output {
            return 0;
        }
        let mut best = 0;
        for s in &self.strings {
            for k in (best + 1..s.len().min(text.len() + 1)).rev() {
                if text.is_char_boundary(text.len() - k) && s.starts_with(&text[text.len() - k..]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stop: &[&str], include: bool) -> StopMatcher {
        let p = SamplingParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop_str_in_output: include,
            ..SamplingParams::default()
        };
        StopMatcher::new(&p).unwrap().unwrap()
    }

    #[test]
    fn finds_a_stop_that_spans_the_previous_check() {
        let m = matcher(&["END", "\n\n"], false);
        assert_eq!(m.find("abc EN", 0), None);
        let hit = m.find("abc END more", 6).unwrap();
        assert_eq!((hit.keep, hit.matched.as_str()), (4, "END"));
        assert_eq!(matcher(&["END"], true).find("abc END", 6).unwrap().keep, 7);
    }

    #[test]
    fn earliest_match_wins() {
        let hit = matcher(&["b", "a"], false).find("xxab", 0).unwrap();
        assert_eq!(hit.matched, "a");
    }

    #[test]
    fn holdback_keeps_only_a_possible_prefix() {
        let m = matcher(&["STOP"], false);
        assert_eq!(m.holdback("hello ST"), 2);
        assert_eq!(m.holdback("hello S"), 1);
        assert_eq!(m.holdback("hello"), 0);
        assert_eq!(m.holdback("é"), 0);
        assert_eq!(matcher(&["STOP"], true).holdback("ST"), 0);
    }

    #[test]
    fn pattern_stops() {
        let p = SamplingParams {
            stop_pattern: Some(r"\d{3}".into()),
            ..SamplingParams::default()
        };
        let m = StopMatcher::new(&p).unwrap().unwrap();
        assert_eq!(m.find("ab12", 0), None);
        assert_eq!(m.find("ab123c", 4).unwrap().keep, 2);
    }
}
