//! HTTP plumbing the provider clients share: turning transport errors and
//! `Retry-After` headers into [`ProviderError`]s the dispatcher can act on.

use std::error::Error as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::ProviderError;

/// Error bodies go into the ledger and logs: long enough to diagnose, short
/// enough that an HTML error page from a proxy does not bloat every row.
pub(crate) const MAX_REASON_BODY: usize = 300;

/// `Retry-After` is either delta-seconds or an HTTP date
/// (https://www.rfc-editor.org/rfc/rfc9110#field.retry-after).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, Utc::now())
}

/// Brevo sends no `Retry-After` on 429 but `x-sib-ratelimit-reset`, the seconds
/// until its window resets (https://developers.brevo.com/docs/limit-headers).
pub(crate) fn brevo_reset(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get("x-sib-ratelimit-reset")?.to_str().ok()?.trim().parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// SendGrid answers 429 with `X-RateLimit-Reset`, the Unix time (seconds) at
/// which its window resets
/// (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits):
/// the wait until then, capped at an hour.
pub(crate) fn reset_at_epoch(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let at = headers.get(name)?.to_str().ok()?.trim().parse::<i64>().ok()?;
    Some(wait_until_epoch(at, Utc::now().timestamp()))
}

pub(crate) fn wait_until_epoch(at: i64, now: i64) -> Duration {
    Duration::from_secs(at.saturating_sub(now).clamp(0, 3600) as u64)
}

pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is a subset of RFC 2822.
    let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    // A date already past means "now": zero, not "no hint".
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// A refused call classed by its HTTP status alone, for providers whose
/// reference says no more (Pusher, Ably): 401/403 are credentials or quota and
/// need a human; 408, 429 and 5xx may pass later; any other 4xx fails the same
/// way again.
pub(crate) fn by_status(status: u16, reason: String, retry_after: Option<Duration>) -> ProviderError {
    match status {
        401 | 403 => ProviderError::Unauthorized { reason },
        408 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after },
        _ => ProviderError::Permanent { reason },
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters
/// (`0-9 a-z A-Z - _ . ~`), escapes in upper case: a URL path segment that
/// stays one segment whatever the name holds (':', '/', '?', spaces), and
/// SigV4's `UriEncode`.
pub(crate) fn uri_encode(s: &str) -> String {
    encode_except(s, b"-_.~")
}

/// As [`uri_encode`], but `~` escaped too, and `%20` for space: PubNub's
/// signature rules prescribe exactly this (and the query is sent as signed).
pub(crate) fn percent_encode(s: &str) -> String {
    encode_except(s, b"-_.")
}

fn encode_except(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// No answer at all (timeout, refused, reset): the provider may or may not
/// have taken the message, and the same request may work later, so retry.
/// The URL is left out of the reason: Pusher's carries the request signature.
pub(crate) fn transport_error(provider: &str, err: reqwest::Error, timeout: Duration) -> ProviderError {
    let err = err.without_url();
    let reason = if err.is_timeout() {
        format!("{provider}: no answer within {} ms", timeout.as_millis())
    } else {
        let mut reason = format!("{provider}: {err}");
        let mut source = err.source();
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        reason
    };
    ProviderError::Retryable { reason, retry_after: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn epoch_resets_are_waits_from_now() {
        assert_eq!(wait_until_epoch(1_700_000_030, 1_700_000_000), Duration::from_secs(30));
        assert_eq!(wait_until_epoch(1_699_999_000, 1_700_000_000), Duration::ZERO, "already past");
        assert_eq!(wait_until_epoch(1_800_000_000, 1_700_000_000), Duration::from_secs(3600), "capped");
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }
}
