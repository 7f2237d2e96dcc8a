//! Ably through its REST API: one idempotent publish per message.
//!
//! Reference: https://ably.com/docs/api/rest-api#message-publish
//!
//! Each message carries `id` = the delivery's idempotency key, so a re-send
//! after a crash or an unanswered call is dropped by Ably
//! (https://ably.com/docs/pub-sub/advanced#idempotency). That only holds one
//! message per publish: Ably treats a multi-message publish as one unit with
//! one idempotency key and refuses unrelated ids in it (error 40031,
//! https://ably.com/docs/platform/errors/codes/40031-invalid-client-specified-message-id),
//! so grouping a channel's messages into one array would trade away the
//! per-message deduplication the ledger relies on. Publishes to the same
//! channel still share pooled connections and run several at a time.

use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{self, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Serialize;

use super::http::{by_status, retry_after, transport_error, truncate, uri_encode, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{AblyConfig, PROFILE};
use crate::secret::Secret;

/// Default maximum message size; the size counts name, clientId, data and
/// extras. https://ably.com/docs/platform/errors/codes/40009-max-message-size-exceeded
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Publishes in flight at once for one `send_batch`.
const MAX_IN_FLIGHT: usize = 16;

#[derive(Clone, Debug)]
pub struct Ably {
    http: reqwest::Client,
    endpoint: String,
    /// `Basic base64(keyName:keySecret)`, or why the key cannot be used.
    auth: Result<Secret, String>,
    timeout: Duration,
}

#[derive(Serialize)]
struct PublishBody<'a> {
    id: &'a str,
    name: &'a str,
    data: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    extras: Option<serde_json::Value>,
}

/// The correlation value as Ably message metadata: `extras.headers`, Ably's
/// "map of strings to strings for arbitrary customer-supplied metadata"
/// (https://ably.com/docs/api/rest-sdk/messages#extras). A W3C traceparent
/// under `traceparent`, anything else under `x-correlation-id`.
fn extras(m: &OutboundMessage) -> Option<serde_json::Value> {
    let value = m.correlation.as_deref()?;
    let name = if crate::telemetry::correlation::TraceParent::parse(value).is_some() {
        "traceparent"
    } else {
        "x-correlation-id"
    };
    Some(serde_json::json!({"headers": {name: value}}))
}

/// Ably's error body: `{"error": {"message", "code", "statusCode", "href"}}`.
/// https://ably.com/docs/platform/errors/codes
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorInfo,
}

#[derive(serde::Deserialize)]
struct ErrorInfo {
    #[serde(default)]
    code: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

impl Ably {
    pub fn build(cfg: &AblyConfig, ctx: &super::BuildContext) -> Result<Ably, ProviderError> {
        Ok(Ably::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &AblyConfig, http: reqwest::Client) -> Ably {
        Ably {
            http,
            endpoint: cfg.endpoint(),
            auth: basic_auth(&cfg.api_key),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One result per message, same order; each message is its own publish.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        // Futures collected first: see the note in pusher.rs.
        let publishes: Vec<_> = messages.iter().map(|m| self.publish(m)).collect();
        stream::iter(publishes).buffered(MAX_IN_FLIGHT).collect().await
    }

    async fn publish(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let auth = self.auth.as_ref().map_err(|why| ProviderError::Unauthorized { reason: why.clone() })?;
        let permanent = |reason: String| ProviderError::Permanent { reason };
        if let Some(why) = invalid_channel(&m.channel_name) {
            return Err(permanent(format!("ably: channel {:?} {why}", m.channel_name)));
        }
        let extras = extras(m);
        let extras_len = extras.as_ref().map_or(0, |e| e.to_string().len());
        let body =
            serde_json::to_vec(&PublishBody { id: &m.idempotency_key, name: &m.event, data: &m.payload, extras })
                .map_err(|e| permanent(format!("ably: cannot encode payload: {e}")))?;
        let size = message_size(&m.event, &m.payload) + extras_len;
        if size > MAX_MESSAGE_BYTES {
            return Err(permanent(format!("payload of {size} bytes exceeds Ably's 64 KiB message limit")));
        }

        let url = format!("{}/channels/{}/messages", self.endpoint, uri_encode(&m.channel_name));
        let response = self
            .http
            .post(url)
            .header(AUTHORIZATION, sensitive(auth))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error("ably", e, self.timeout))?;

        let status = response.status();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        classify(status, wait, &text)
    }
}

/// Marked sensitive so that no debug or trace output prints the key.
fn sensitive(auth: &Secret) -> HeaderValue {
    let mut value = HeaderValue::from_str(auth.expose()).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

fn basic_auth(api_key: &Secret) -> Result<Secret, String> {
    // Keys look like `appId.keyId:keySecret`; the part before ':' is the key
    // name, the rest the secret. https://ably.com/docs/auth/basic
    match api_key.expose().split_once(':') {
        Some((name, secret)) if !name.is_empty() && !secret.is_empty() => {
            let token = base64::engine::general_purpose::STANDARD.encode(api_key.expose());
            Ok(Secret::new(format!("Basic {token}")))
        }
        _ => Err("ably: api_key is not of the form keyName:keySecret (copy it whole from the Ably dashboard)".into()),
    }
}

/// Ably's message size: name + data (+ clientId, which we never send, and
/// extras, added by the caller); JSON data counts as its encoded string.
fn message_size(name: &str, data: &serde_json::Value) -> usize {
    let data_len = match data {
        serde_json::Value::String(s) => s.len(),
        other => other.to_string().len(),
    };
    name.len() + data_len
}

/// https://ably.com/docs/channels#use: "can't start with [ or :", "can't be
/// empty", "can't contain newline characters".
fn invalid_channel(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.starts_with('[') || name.starts_with(':') {
        Some("starts with '[' or ':', which Ably reserves")
    } else if name.contains(['\n', '\r']) {
        Some("contains a newline")
    } else {
        None
    }
}

fn classify(status: StatusCode, wait: Option<Duration>, body: &str) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        // 201 with `{"channel", "messageId"}`; keep the id when there is one.
        let id = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("messageId").and_then(|id| id.as_str()).map(str::to_string));
        return Ok(Accepted { provider_message_id: id });
    }
    let detail = match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => format!(
            "error {}: {}",
            error.code.map_or_else(|| "?".to_string(), |c| c.to_string()),
            truncate(error.message.as_deref().unwrap_or(""), MAX_REASON_BODY)
        ),
        Err(_) => truncate(body, MAX_REASON_BODY),
    };
    let reason = format!("ably answered {} ({detail})", status.as_u16());
    // 401: 40101 bad key, 4014x token problems; 403: 40160 capability.
    Err(by_status(status.as_u16(), reason, wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn basic_auth_encodes_the_whole_key() {
        let auth = basic_auth(&Secret::new("app.key:sec")).unwrap();
        assert_eq!(auth.expose(), "Basic YXBwLmtleTpzZWM=");
        assert!(basic_auth(&Secret::new("no-colon")).is_err());
        assert!(basic_auth(&Secret::new("app.key:")).is_err());
    }

    #[test]
    fn channel_names_become_one_path_segment() {
        assert_eq!(uri_encode("private:user-42"), "private%3Auser-42");
        assert_eq!(uri_encode("a b/c?d#é"), "a%20b%2Fc%3Fd%23%C3%A9");
    }

    #[test]
    fn reserved_channel_names_are_refused() {
        assert!(invalid_channel("[meta]log").is_some());
        assert!(invalid_channel(":x").is_some());
        assert!(invalid_channel("").is_some());
        assert!(invalid_channel("a\nb").is_some());
        assert!(invalid_channel("user:42").is_none());
    }

    #[test]
    fn size_counts_name_and_encoded_data() {
        assert_eq!(message_size("ev", &json!({"a": 1})), 2 + 7);
        assert_eq!(message_size("ev", &json!("abc")), 5);
    }

    #[test]
    fn errors_carry_ablys_code_and_message() {
        let body = r#"{"error":{"message":"Invalid credentials","code":40101,"statusCode":401}}"#;
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, None, body),
            Err(ProviderError::Unauthorized { reason: "ably answered 401 (error 40101: Invalid credentials)".into() })
        );
        let body = r#"{"error":{"message":"Rate limit exceeded","code":42910,"statusCode":429}}"#;
        assert!(matches!(classify(StatusCode::TOO_MANY_REQUESTS, None, body), Err(ProviderError::Retryable { .. })));
        assert!(matches!(classify(StatusCode::BAD_REQUEST, None, "oops"), Err(ProviderError::Permanent { .. })));
        let ok = classify(StatusCode::CREATED, None, r#"{"channel":"c","messageId":"abc"}"#).unwrap();
        assert_eq!(ok.provider_message_id.as_deref(), Some("abc"));
    }
}
