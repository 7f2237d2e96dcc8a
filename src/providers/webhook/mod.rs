//! Signed webhooks to any HTTPS endpoint, the Standard Webhooks way
//! (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md):
//! one `POST` per delivery with
//! - `webhook-id`: the delivery's idempotency key, the same on every attempt,
//!   so the receiver drops a re-send (the spec asks receivers to dedupe on it);
//! - `webhook-timestamp`: the attempt's time, unix seconds;
//! - `webhook-signature`: `v1,` + base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`,
//!   keyed with the base64-decoded `whsec_` secret.
//!
//! Body (JSON): `{"type": event, "recipient": channel_name, "key": idempotency_key, "data": payload}`.
//!
//! Answers, per the spec's "Delivery success and failure": 2xx sent; 410 Gone
//! "stop": the delivery fails for good, `outbox_relay_webhook_endpoint_gone_total`
//! counts it, and that URL is not called again until the relay restarts
//! (every later delivery to it fails at once, saying so); 3xx fails for good
//! (redirects are not followed: update `url`); 401/403 the receiver refused
//! our signature (unauthorized: fix the secret); 408, 429, 5xx retried after
//! any Retry-After; other 4xx fail for good.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use sha2::Sha256;
use tracing::error;

use super::http::{percent_encode, retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{WebhookConfig, PROFILE};
use crate::telemetry::metric;

/// "Signing secret: Random. At least 24 bytes (192 bits, 512 maximum)" (the spec's table).
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// URLs remembered as gone: more than this many distinct gone URLs (a
/// `{channel}` URL per recipient) are still refused when they answer 410,
/// just called once more each.
const MAX_GONE_REMEMBERED: usize = 10_000;

#[derive(Clone, Debug)]
pub struct Webhook {
    http: reqwest::Client,
    url: String,
    /// The HMAC key: the secret's base64 part, decoded.
    key: Arc<Vec<u8>>,
    timeout: Duration,
    /// URLs that answered 410 Gone since start: not called again. Shared by
    /// every clone of the client (all dispatch workers).
    gone: Arc<Mutex<HashSet<String>>>,
}

/// Why the section cannot be used; names the key, never the secret's value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("[providers.webhook] secret must be whsec_ followed by base64: {0}")]
    SecretEncoding(String),
    #[error("[providers.webhook] secret decodes to {0} bytes; Standard Webhooks keys are 24 to 64")]
    SecretLength(usize),
    #[error("[providers.webhook] url must start with https:// (or http:// with allow_http = true)")]
    Scheme,
    #[error("[providers.webhook] url has placeholder {{{0}}}; only {{channel}} and {{event}} exist")]
    Placeholder(String),
}

impl From<WebhookConfigError> for ProviderError {
    fn from(e: WebhookConfigError) -> ProviderError {
        ProviderError::Permanent { reason: e.to_string() }
    }
}

impl Webhook {
    pub fn build(cfg: &WebhookConfig, ctx: &super::BuildContext) -> Result<Webhook, ProviderError> {
        Ok(Webhook::new(cfg, ctx.http.clone())?)
    }

    pub fn new(cfg: &WebhookConfig, http: reqwest::Client) -> Result<Webhook, WebhookConfigError> {
        let key = decode_secret(cfg.secret.expose())?;
        let lower = cfg.url.to_ascii_lowercase();
        if !(lower.starts_with("https://") || (cfg.allow_http && lower.starts_with("http://"))) {
            return Err(WebhookConfigError::Scheme);
        }
        check_placeholders(&cfg.url)?;
        Ok(Webhook {
            http,
            url: cfg.url.clone(),
            key: Arc::new(key),
            timeout: Duration::from_millis(cfg.timeout_ms),
            gone: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// One POST per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let permanent = |reason: String| Err(ProviderError::Permanent { reason });
        // The spec: the id must not be able to hold `.`, the signed string's delimiter.
        if m.idempotency_key.is_empty() || m.idempotency_key.contains('.') {
            return permanent(format!("webhook: id {:?} is empty or holds a '.'", m.idempotency_key));
        }
        let url = match render_url(&self.url, &m.channel_name, &m.event) {
            Ok(url) => url,
            Err(why) => return permanent(why),
        };
        if self.gone.lock().unwrap_or_else(|p| p.into_inner()).contains(&url) {
            return permanent(
                "webhook: the endpoint answered 410 Gone earlier; not called again until the relay restarts".into(),
            );
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "type": m.event,
            "recipient": m.channel_name,
            "key": m.idempotency_key,
            "data": m.payload,
        }))
        .map_err(|e| ProviderError::Permanent { reason: format!("webhook: cannot encode body: {e}") })?;
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(&self.key, &m.idempotency_key, timestamp, &body);

        let response = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &m.idempotency_key)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error("webhook", e, self.timeout))?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let outcome = classify(status, wait, &text);
        if status == StatusCode::GONE {
            metrics::counter!(metric::WEBHOOK_ENDPOINT_GONE).increment(1);
            let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
            if gone.len() < MAX_GONE_REMEMBERED && gone.insert(url) {
                // The URL may carry a token: the channel says which endpoint it was.
                error!(channel = %m.channel_name, "webhook endpoint answered 410 Gone: no more deliveries to it until the relay restarts; fix [providers.webhook] url or the receiver");
            }
        }
        outcome
    }
}

/// The HMAC key from a `whsec_<base64>` secret (prefix optional, as in the
/// spec's reference libraries).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, WebhookConfigError> {
    let b64 = secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim());
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| WebhookConfigError::SecretEncoding(e.to_string()))?;
    if !KEY_BYTES.contains(&key.len()) {
        return Err(WebhookConfigError::SecretLength(key.len()));
    }
    Ok(key)
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC takes keys of any length; this arm cannot be reached.
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

fn check_placeholders(url: &str) -> Result<(), WebhookConfigError> {
    let mut rest = url;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start + 1..];
        let end = tail.find('}').ok_or_else(|| WebhookConfigError::Placeholder(tail.to_string()))?;
        let name = &tail[..end];
        if name != "channel" && name != "event" {
            return Err(WebhookConfigError::Placeholder(name.to_string()));
        }
        rest = &tail[end + 1..];
    }
    Ok(())
}

/// `url` with `{channel}` and `{event}` filled in, percent-encoded; a value
/// that would be empty or a `.`/`..` path step is refused (it would change
/// which path the URL names).
fn render_url(url: &str, channel: &str, event: &str) -> Result<String, String> {
    let mut out = url.to_string();
    for (name, value) in [("{channel}", channel), ("{event}", event)] {
        if !out.contains(name) {
            continue;
        }
        if value.is_empty() || value.chars().all(|c| c == '.') {
            return Err(format!("webhook: {name} would be {value:?} in the URL"));
        }
        out = out.replace(name, &percent_encode(value));
    }
    Ok(out)
}

fn classify(status: StatusCode, wait: Option<Duration>, body: &str) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        return Ok(Accepted { provider_message_id: None });
    }
    let code = status.as_u16();
    let reason = format!("webhook endpoint answered {code}: {}", truncate(body, MAX_REASON_BODY));
    Err(match code {
        410 => ProviderError::Permanent {
            reason: format!(
                "webhook endpoint is gone (410): sending to it stopped until the relay restarts: {}",
                truncate(body, MAX_REASON_BODY)
            ),
        },
        300..=399 => ProviderError::Permanent {
            reason: format!("webhook endpoint answered {code} (a redirect, not followed: set url to the new address)"),
        },
        401 | 403 => ProviderError::Unauthorized { reason },
        408 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after: wait },
        _ => ProviderError::Permanent { reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The vector the spec's reference libraries test against.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(), key, "prefix optional");
    }

    #[test]
    fn secrets_must_be_base64_of_24_to_64_bytes() {
        assert!(matches!(decode_secret("whsec_not base64!"), Err(WebhookConfigError::SecretEncoding(_))));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 23]);
        assert_eq!(decode_secret(&format!("whsec_{short}")), Err(WebhookConfigError::SecretLength(23)));
        let long = base64::engine::general_purpose::STANDARD.encode([7u8; 65]);
        assert_eq!(decode_secret(&long), Err(WebhookConfigError::SecretLength(65)));
    }

    #[test]
    fn url_placeholders_are_checked_and_filled_encoded() {
        assert!(check_placeholders("https://h/x/{channel}/{event}").is_ok());
        assert_eq!(
            check_placeholders("https://h/{recipient}"),
            Err(WebhookConfigError::Placeholder("recipient".into()))
        );
        assert_eq!(
            render_url("https://h/u/{channel}?e={event}", "user 42/x", "a.b").unwrap(),
            "https://h/u/user%2042%2Fx?e=a.b"
        );
        assert!(render_url("https://h/u/{channel}", "..", "e").is_err());
        assert!(render_url("https://h/u/{channel}", "", "e").is_err());
        assert_eq!(
            render_url("https://h/fixed", "", "").unwrap(),
            "https://h/fixed",
            "unused placeholders need no value"
        );
    }

    #[test]
    fn answers_follow_the_specs_status_handling() {
        let wait = Some(Duration::from_secs(3));
        assert!(classify(StatusCode::NO_CONTENT, None, "").is_ok());
        assert!(
            matches!(classify(StatusCode::GONE, None, ""), Err(ProviderError::Permanent { reason }) if reason.contains("gone"))
        );
        assert!(
            matches!(classify(StatusCode::FOUND, None, ""), Err(ProviderError::Permanent { reason }) if reason.contains("redirect"))
        );
        assert!(matches!(classify(StatusCode::UNAUTHORIZED, None, ""), Err(ProviderError::Unauthorized { .. })));
        assert!(matches!(classify(StatusCode::NOT_FOUND, None, ""), Err(ProviderError::Permanent { .. })));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, wait, "slow"),
            Err(ProviderError::Retryable { reason: "webhook endpoint answered 429: slow".into(), retry_after: wait })
        );
        for s in [
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::REQUEST_TIMEOUT,
        ] {
            assert!(matches!(classify(s, None, ""), Err(ProviderError::Retryable { .. })), "{s}");
        }
    }
}
