//! `RetryConfig`: how the remote client retries failed requests (Tinker's `retry_config`).
//!
//! A request is retried on a connection failure or timeout, and on the statuses a server sends
//! when a later try may succeed: 408, 429 and every 5xx. The wait before try `k` (from 0) is
//! `initial_backoff * backoff_multiplier^k`, capped at `max_backoff`, with up to `jitter` of it
//! drawn off at random; a `Retry-After` header (seconds or an HTTP date) replaces it, capped at
//! `max_retry_after`.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How failed requests are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first try (0: try once).
    pub max_retries: u32,
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any computed wait.
    pub max_backoff: Duration,
    /// Growth of the wait from one retry to the next.
    pub backoff_multiplier: f64,
    /// Fraction (0..=1) of each computed wait that may be drawn off at random, so that many
    /// clients do not retry in lockstep.
    pub jitter: f64,
    /// Whether a server's `Retry-After` header sets the wait.
    pub honor_retry_after: bool,
    /// Upper bound of a wait set by `Retry-After`.
    pub max_retry_after: Duration,
    /// Whether connection failures (refused, reset, timed out) are retried.
    pub retry_connect_errors: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 4,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            backoff_multiplier: 2.0,
            jitter: 0.2,
            honor_retry_after: true,
            max_retry_after: Duration::from_secs(60),
            retry_connect_errors: true,
        }
    }
}

impl RetryConfig {
    /// Never retry.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The default policy with `max_retries` retries.
    pub fn with_max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// The default policy with these backoff bounds.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Whether a reply with this HTTP status is worth another try.
    pub fn is_retryable_status(&self, status: u16) -> bool {
        matches!(status, 408 | 429) || (500..=599).contains(&status)
    }

    /// The computed wait before retry number `retry` (0 for the first), jitter not applied.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = self.backoff_multiplier.max(1.0).powi(retry.min(64) as i32);
        let secs = self.initial_backoff.as_secs_f64() * factor;
        let capped = secs.min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_backoff)
    }

    /// The wait before retry number `retry`, given the reply's `Retry-After` (if any).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if self.honor_retry_after
            && let Some(after) = retry_after
        {
            return after.min(self.max_retry_after);
        }
        let base = self.backoff(retry);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return base;
        }
        base.mul_f64(1.0 - jitter * random_unit())
    }
}

/// A uniform draw from [0, 1) off the process's hash seed and the clock (no RNG dependency).
fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Parses a `Retry-After` value: delay seconds, or an HTTP date (IMF-fixdate, e.g.
/// `Sun, 06 Nov 1994 08:49:37 GMT`) measured from now (a past date means no wait).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = parse_http_date(value)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch of an IMF-fixdate.
fn parse_http_date(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = s.split_once(", ")?.1;
    let mut parts = rest.split_ascii_whitespace();
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day as i64);
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = RetryConfig {
            jitter: 0.0,
            ..RetryConfig::default()
                .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
        };
        assert_eq!(c.delay(0, None), Duration::from_millis(100));
        assert_eq!(c.delay(1, None), Duration::from_millis(200));
        assert_eq!(c.delay(3, None), Duration::from_millis(800));
        assert_eq!(c.delay(4, None), Duration::from_secs(1));
        assert_eq!(c.delay(200, None), Duration::from_secs(1));
    }

    #[test]
    fn jitter_only_shortens() {
        let c = RetryConfig {
            jitter: 0.5,
            ..RetryConfig::default()
                .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
        };
        for _ in 0..100 {
            let d = c.delay(0, None);
            assert!(
                d <= Duration::from_millis(100) && d >= Duration::from_millis(50),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let c = RetryConfig::default();
        assert_eq!(
            c.delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            c.delay(0, Some(Duration::from_secs(3600))),
            c.max_retry_after
        );
        let ignore = RetryConfig {
            honor_retry_after: false,
            jitter: 0.0,
            ..RetryConfig::default()
        };
        assert_eq!(
            ignore.delay(0, Some(Duration::from_secs(3))),
            ignore.initial_backoff
        );
    }

    #[test]
    fn retryable_statuses() {
        let c = RetryConfig::default();
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(c.is_retryable_status(s), "{s}");
        }
        for s in [200, 400, 401, 404, 422] {
            assert!(!c.is_retryable_status(s), "{s}");
        }
    }

    #[test]
    fn parses_retry_after_forms() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-3"), None);
    }
}
