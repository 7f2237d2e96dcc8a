//! Native Web Push: one encrypted POST per browser subscription, straight to
//! its push service (Mozilla autopush, Google's FCM endpoint for Chrome,
//! Apple's for Safari, ...), no vendor SDK or account.
//!
//! - RFC 8030 (https://www.rfc-editor.org/rfc/rfc8030): the request — `POST`
//!   to the subscription's endpoint, `TTL` (§5.2), `Urgency` (§5.4); `201
//!   Created` is acceptance (§5); 404/410 mean the subscription is gone
//!   (§7.3, §8.4), 413 a payload too large (§7.2), 429 too many (§8.4).
//! - RFC 8291 (https://www.rfc-editor.org/rfc/rfc8291): the payload,
//!   encrypted to the subscription's `p256dh` and `auth` ([`ece`]).
//! - RFC 8292 (https://www.rfc-editor.org/rfc/rfc8292): the sender's
//!   identity, a signed token per request ([`vapid`]).
//!
//! The payload the service worker's `push` event gets (`event.data.json()`):
//! `{"event": ..., "data": <the delivery's payload>, "key": <idempotency
//! key>}`; `key` lets the worker drop a message a push service delivered twice.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use ring::rand::SystemRandom;

use super::devices::{fan_out, fold, Device, DeviceError, DeviceResult};
use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};

pub mod config;
pub mod ece;
pub mod vapid;

pub use self::config::{Urgency, WebpushConfig, PROFILE};
use self::vapid::Vapid;

#[derive(Clone)]
pub struct Webpush {
    http: reqwest::Client,
    /// Shared by every clone: ring's key pair is not `Clone`, and one key signs everything.
    vapid: Arc<Vapid>,
    ttl_s: u32,
    urgency: Option<Urgency>,
    timeout: Duration,
    rng: SystemRandom,
}

impl std::fmt::Debug for Webpush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webpush").field("vapid", &self.vapid).field("ttl_s", &self.ttl_s).finish_non_exhaustive()
    }
}

/// What the service worker receives, decrypted.
#[derive(serde::Serialize)]
struct Payload<'a> {
    event: &'a str,
    data: &'a serde_json::Value,
    key: &'a str,
}

impl Webpush {
    pub fn build(cfg: &WebpushConfig, ctx: &super::BuildContext) -> Result<Webpush, ProviderError> {
        let rng = SystemRandom::new();
        let vapid = Vapid::new(cfg.private_key.expose(), cfg.public_key.as_deref(), &cfg.subject, &rng)
            .map_err(|e| ProviderError::Permanent { reason: e.to_string() })?;
        Ok(Webpush {
            http: ctx.http.clone(),
            vapid: Arc::new(vapid),
            ttl_s: cfg.ttl_s,
            urgency: cfg.urgency,
            timeout: Duration::from_millis(cfg.timeout_ms),
            rng,
        })
    }

    /// The browser's `applicationServerKey`.
    pub fn public_key(&self) -> &str {
        self.vapid.public_key()
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let answers = self.send_devices(messages).await;
        messages.iter().zip(answers).map(|(m, a)| fold(0, &a, &m.devices)).collect()
    }

    /// One POST per device, all at once; one answer per device.
    pub async fn send_devices(&self, messages: &[OutboundMessage]) -> Vec<Vec<DeviceResult>> {
        fan_out(messages, |m, d| self.push(m, d)).await
    }

    async fn push(&self, m: &OutboundMessage, device: &Device) -> DeviceResult {
        let permanent = |reason: String| Err(DeviceError::Provider(ProviderError::Permanent { reason }));
        let url = match endpoint(&device.token) {
            Ok(url) => url,
            Err(reason) => return permanent(reason),
        };
        let (Some(p256dh), Some(auth)) = (&device.p256dh, &device.auth) else {
            return permanent(
                "subscription without keys: tokens_query must return columns named p256dh and auth".into(),
            );
        };
        let (Ok(p256dh), Ok(auth)) = (vapid::decode(p256dh), vapid::decode(auth)) else {
            return permanent("subscription keys p256dh/auth are not base64url".into());
        };
        let plaintext =
            match serde_json::to_vec(&Payload { event: &m.event, data: &m.payload, key: &m.idempotency_key }) {
                Ok(p) => p,
                Err(e) => return permanent(format!("payload: {e}")),
            };
        let body = match ece::encrypt(&plaintext, &p256dh, &auth, &self.rng) {
            Ok(body) => body,
            Err(e @ ece::EceError::Crypto(_)) => {
                return Err(DeviceError::Provider(ProviderError::Retryable {
                    reason: e.to_string(),
                    retry_after: None,
                }))
            }
            Err(e) => return permanent(e.to_string()),
        };
        let origin = url.origin().ascii_serialization();
        let authorization = match self.vapid.authorization(&origin, SystemTime::now(), &self.rng) {
            Ok(a) => a,
            Err(e) => return permanent(e.to_string()),
        };
        let mut request = self
            .http
            .post(url)
            .timeout(self.timeout)
            .header(AUTHORIZATION, authorization)
            .header(CONTENT_ENCODING, "aes128gcm")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("TTL", self.ttl_s.to_string());
        if let Some(u) = self.urgency {
            request = request.header("Urgency", u.as_str());
        }
        let response = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => return Err(DeviceError::Provider(transport_error("webpush", e, self.timeout))),
        };
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        if response.status().is_success() {
            // The Location (RFC 8030 §5) names the message at the push
            // service by a URL derived from the subscription: not kept.
            return Ok(Accepted::default());
        }
        let text = response.text().await.unwrap_or_default();
        let reason = format!("webpush {status}: {}", truncate(&text, MAX_REASON_BODY));
        Err(classify(status, reason, wait))
    }
}

/// A refused push, by status (RFC 8030 §7.2, §7.3, §8.4; RFC 8292 §4).
fn classify(status: u16, reason: String, retry_after: Option<Duration>) -> DeviceError {
    match status {
        // The subscription expired or was unsubscribed: the device is gone.
        404 | 410 => DeviceError::Gone { reason },
        // The VAPID token or key refused (RFC 8292 §4.1: 401 for a bad
        // token, 403 for a key that is not the subscription's).
        401 | 403 => DeviceError::Provider(ProviderError::Unauthorized { reason }),
        408 | 429 | 500..=599 => DeviceError::Provider(ProviderError::Retryable { reason, retry_after }),
        // 413 (too large), 400 (bad headers) and the rest: the same request fails again.
        _ => DeviceError::Provider(ProviderError::Permanent { reason }),
    }
}

/// The subscription's endpoint, if the relay will post to it: `https`, or
/// `http` to a loopback address (a local push service in tests and the
/// demo). Endpoints come from browsers through the application, so a plain
/// `http` one elsewhere is refused rather than sent in clear.
fn endpoint(token: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(token).map_err(|_| "subscription endpoint is not a URL".to_string())?;
    let host = url.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        other => Err(format!("subscription endpoint scheme {other:?}: only https is sent to")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_status() {
        let c = |s| classify(s, format!("{s}"), Some(Duration::from_secs(9)));
        assert!(matches!(c(410), DeviceError::Gone { .. }));
        assert!(matches!(c(404), DeviceError::Gone { .. }));
        assert!(matches!(c(413), DeviceError::Provider(ProviderError::Permanent { .. })));
        assert!(matches!(c(400), DeviceError::Provider(ProviderError::Permanent { .. })));
        assert!(matches!(c(403), DeviceError::Provider(ProviderError::Unauthorized { .. })));
        for s in [429, 500, 503] {
            assert!(matches!(c(s), DeviceError::Provider(ProviderError::Retryable { retry_after: Some(_), .. })));
        }
    }

    #[test]
    fn endpoints_are_https_or_loopback() {
        assert!(endpoint("https://updates.push.services.mozilla.com/wpush/v2/abc").is_ok());
        assert!(endpoint("http://127.0.0.1:8080/push/1").is_ok());
        assert!(endpoint("http://localhost/push/1").is_ok());
        assert!(endpoint("http://push.example.net/push/1").is_err());
        assert!(endpoint("ftp://push.example.net/").is_err());
        assert!(endpoint("not a url").is_err());
    }
}
