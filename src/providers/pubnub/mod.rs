//! PubNub through its REST API: one publish per message,
//! `POST /publish/{pub_key}/{sub_key}/0/{channel}/0` with the payload as the
//! JSON body (https://www.pubnub.com/docs/sdks/rest-api/publish-message-to-channel-1).
//! POST rather than GET: the message is not URL-encoded into the path, so
//! the 32 KiB limit counts the JSON itself.
//!
//! The event name travels twice: in `meta` (`{"event": ..., "key": ...}`,
//! which PubNub delivers with the message and subscribers can filter on) and,
//! when it fits PubNub's rule for it, as `custom_message_type`. `meta.key` is
//! the delivery's idempotency key, for subscribers that drop a re-send.
//!
//! With a `secret_key`, each call carries `timestamp` and a v2 `signature`
//! (see [`signature_v2`]). PubNub has no idempotency key: a re-send after a
//! crash reaches subscribers twice, counted like Pusher's.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use sha2::Sha256;

use super::http::{percent_encode as encode, retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{PubnubConfig, PROFILE};
use crate::secret::Secret;

/// "Payload size cannot be more than 32KiB."
/// https://www.pubnub.com/docs/sdks/rest-api/publish-message-to-channel
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// "Channel names are UTF-8 compatible and can be up to 92 characters."
/// https://support.pubnub.com/hc/en-us/articles/360051496632-What-are-valid-channel-names
pub const MAX_CHANNEL_CHARS: usize = 92;

/// `uuid`: "A UTF-8 encoded string of up to 92 characters" (https://www.pubnub.com/docs/sdks/rest-api).
pub const MAX_UUID_CHARS: usize = 92;

/// `custom_message_type`: 3 to 50 characters of `[a-zA-Z0-9_-]`.
const CUSTOM_TYPE_CHARS: std::ops::RangeInclusive<usize> = 3..=50;

/// Identifies the client to PubNub (`CompanyName-Language/Version`, per the REST API's common parameters).
const PNSDK: &str = concat!("outbox-relay-Rust/", env!("CARGO_PKG_VERSION"));

#[derive(Clone, Debug)]
pub struct Pubnub {
    http: reqwest::Client,
    endpoint: String,
    publish_key: String,
    subscribe_key: String,
    /// `None`: publishes go unsigned (a keyset without Access Manager).
    secret_key: Option<Secret>,
    uuid: String,
    timeout: Duration,
}

impl Pubnub {
    pub fn build(cfg: &PubnubConfig, ctx: &super::BuildContext) -> Result<Pubnub, ProviderError> {
        let permanent = |reason: String| Err(ProviderError::Permanent { reason });
        if cfg.uuid.is_empty() || cfg.uuid.chars().count() > MAX_UUID_CHARS {
            return permanent(format!("[providers.pubnub] uuid must be 1 to {MAX_UUID_CHARS} characters"));
        }
        if cfg.publish_key.is_empty() || cfg.subscribe_key.is_empty() {
            return permanent("[providers.pubnub] publish_key and subscribe_key must not be empty".into());
        }
        Ok(Pubnub::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &PubnubConfig, http: reqwest::Client) -> Pubnub {
        Pubnub {
            http,
            endpoint: cfg.endpoint(),
            publish_key: cfg.publish_key.clone(),
            subscribe_key: cfg.subscribe_key.clone(),
            secret_key: cfg.secret_key.clone().filter(|s| !s.expose().is_empty()),
            uuid: cfg.uuid.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One publish per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let body = prepare(m)?;
        let path = format!(
            "/publish/{}/{}/0/{}/0",
            encode(&self.publish_key),
            encode(&self.subscribe_key),
            encode(&m.channel_name)
        );
        let mut params: Vec<(&str, String)> = vec![
            ("meta", serde_json::json!({ "event": m.event, "key": m.idempotency_key }).to_string()),
            ("pnsdk", PNSDK.to_string()),
            ("uuid", self.uuid.clone()),
        ];
        if is_custom_message_type(&m.event) {
            params.push(("custom_message_type", m.event.clone()));
        }
        if self.secret_key.is_some() {
            params.push(("timestamp", chrono::Utc::now().timestamp().to_string()));
        }
        let mut query = canonical_query(&params);
        if let Some(secret) = &self.secret_key {
            let signature = signature_v2(secret.expose(), &self.publish_key, &path, &query);
            query.push_str("&signature=");
            query.push_str(&signature);
        }

        let response = self
            .http
            .post(format!("{}{path}?{query}", self.endpoint))
            .header(CONTENT_TYPE, "application/json; charset=UTF-8")
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error("pubnub", e, self.timeout))?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        classify(status, wait, &text)
    }
}

/// The JSON body for one message, or why PubNub would refuse it.
fn prepare(m: &OutboundMessage) -> Result<Vec<u8>, ProviderError> {
    let permanent = |reason: String| Err(ProviderError::Permanent { reason });
    if let Some(why) = invalid_channel(&m.channel_name) {
        return permanent(format!("pubnub: channel {:?} {why}", m.channel_name));
    }
    let body = serde_json::to_vec(&m.payload)
        .map_err(|e| ProviderError::Permanent { reason: format!("pubnub: cannot encode payload: {e}") })?;
    if body.len() > MAX_MESSAGE_BYTES {
        return permanent(format!("payload of {} bytes exceeds PubNub's 32 KiB limit", body.len()));
    }
    Ok(body)
}

/// `None` if PubNub accepts the channel name, else why not: up to 92
/// characters, none of `, : * / \`, space, control characters or NUL.
/// https://support.pubnub.com/hc/en-us/articles/360051496632-What-are-valid-channel-names
pub fn invalid_channel(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.chars().count() > MAX_CHANNEL_CHARS {
        return Some(format!("is longer than PubNub's {MAX_CHANNEL_CHARS} characters"));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, ',' | ':' | '*' | '/' | '\\' | ' ') || c.is_control()) {
        return Some(format!("contains {c:?}, which PubNub does not allow in channel names"));
    }
    None
}

/// Whether `event` may go as `custom_message_type`: "3-50 case-sensitive
/// alphanumeric characters with only - and _ special characters".
pub fn is_custom_message_type(event: &str) -> bool {
    CUSTOM_TYPE_CHARS.contains(&event.len())
        && event.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parameters sorted by key (case-sensitive), values encoded, joined with `&`.
pub fn canonical_query(params: &[(&str, String)]) -> String {
    let mut sorted: Vec<&(&str, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    sorted.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect::<Vec<_>>().join("&")
}

/// PubNub's request signature v2 for a publish
/// (https://www.pubnub.com/docs/sdks/rest-api/access-manager-introduction):
/// HMAC-SHA256 with the secret key over `{method}\n{pub_key}\n{path}\n{query}\n{body}`,
/// base64 with `-` and `_` for `+` and `/`, trailing `=` removed, prefixed `v2.`.
///
/// For `/publish` paths PubNub checks the string as for a GET with an empty
/// body, whatever the method: its SDKs sign a POST publish that way (the
/// JavaScript SDK's `RequestSignature` maps every `/publish` path to `GET`;
/// the Python SDK leaves the body out of a POST publish's signature too).
pub fn signature_v2(secret: &str, publish_key: &str, path: &str, canonical_query: &str) -> String {
    let to_sign = format!("GET\n{publish_key}\n{path}\n{canonical_query}\n");
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        // HMAC takes keys of any length; this arm cannot be reached.
        return String::new();
    };
    mac.update(to_sign.as_bytes());
    format!("v2.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// PubNub's answers: `[1,"Sent","<timetoken>"]` on success, else a non-200
/// status with `[0,"<description>",...]` or, from Access Manager and the
/// rate limiter, `{"status":..,"error":true,"message":".."}`
/// (https://www.pubnub.com/docs/sdks/rest-api/introduction-1).
fn classify(status: StatusCode, wait: Option<Duration>, body: &str) -> Result<Accepted, ProviderError> {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let description = parsed
        .as_ref()
        .and_then(|v| v.get(1).or_else(|| v.get("message")))
        .and_then(|d| d.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| truncate(body, MAX_REASON_BODY));
    if status.is_success() {
        let receipt = parsed.as_ref().and_then(|v| v.as_array());
        return match receipt.map(|a| (a.first().and_then(|s| s.as_i64()), a.get(2))) {
            Some((Some(1), timetoken)) => Ok(Accepted {
                // The publish timetoken: where the message sits in the channel's history.
                provider_message_id: timetoken.and_then(|t| t.as_str().map(str::to_string).or(Some(t.to_string()))),
            }),
            Some((Some(0), _)) => Err(ProviderError::Permanent { reason: format!("pubnub refused: {description}") }),
            // A 200 without PubNub's receipt (a proxy's page): we cannot tell
            // whether PubNub took it, so try again rather than lose it.
            _ => Err(ProviderError::Retryable {
                reason: format!("pubnub answered 200 without a publish receipt: {}", truncate(body, MAX_REASON_BODY)),
                retry_after: wait,
            }),
        };
    }
    let code = status.as_u16();
    let reason = format!("pubnub answered {code}: {description}");
    Err(match code {
        // 400 "Invalid Key" (publish or subscribe key unknown), 403 Access
        // Manager (signature or permissions): the same call keeps failing
        // until someone fixes the keys.
        400 if description.to_ascii_lowercase().contains("invalid")
            && description.to_ascii_lowercase().contains("key") =>
        {
            ProviderError::Unauthorized { reason }
        }
        401 | 403 => ProviderError::Unauthorized { reason },
        408 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after: wait },
        // 400 invalid arguments, 413/414 too large: the same message fails again.
        _ => ProviderError::Permanent { reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(channel: &str, payload: serde_json::Value) -> OutboundMessage {
        OutboundMessage {
            delivery_id: 1,
            idempotency_key: "k".into(),
            channel_name: channel.into(),
            event: "created".into(),
            payload,
            contact: None,
            bus: None,
            devices: Vec::new(),
            correlation: None,
        }
    }

    #[test]
    fn encoding_follows_the_signature_rules() {
        // The documentation's own examples.
        assert_eq!(encode("~user/1_2.3-4"), "%7Euser%2F1_2.3-4");
        assert_eq!(encode("£13.37"), "%C2%A313.37");
        assert_eq!(encode("a b+c"), "a%20b%2Bc");
        let q = canonical_query(&[("timestamp", "1234567898".into()), ("PoundsSterling", "£13.37".into())]);
        assert_eq!(q, "PoundsSterling=%C2%A313.37&timestamp=1234567898", "sorted case-sensitively, upper case first");
    }

    /// The expected value was computed apart from this code (Python's hmac,
    /// hashlib and base64.urlsafe_b64encode over the documented string).
    #[test]
    fn signature_v2_is_urlsafe_base64_without_padding() {
        let sig = signature_v2(
            "sec-c-MTIzNDU2Nzg5MA",
            "pub-c-1234",
            "/publish/pub-c-1234/sub-c-5678/0/user-42/0",
            "meta=%7B%22event%22%3A%22created%22%7D&timestamp=1700000000&uuid=outbox-relay",
        );
        assert_eq!(sig, "v2.SsTU0N2AKq9QF6rSM_4EOTP9j9n3i8eq8WTAPWrwT4w");
    }

    #[test]
    fn channel_names_outside_pubnubs_rules_are_permanent() {
        for bad in ["", "a,b", "a:b", "a*", "a/b", "a\\b", "a b", "a\u{0}b", "a\nb"] {
            assert!(matches!(prepare(&msg(bad, json!({}))), Err(ProviderError::Permanent { .. })), "{bad:?}");
        }
        assert!(prepare(&msg(&"é".repeat(MAX_CHANNEL_CHARS), json!({}))).is_ok(), "92 characters, not bytes");
        assert!(prepare(&msg(&"a".repeat(MAX_CHANNEL_CHARS + 1), json!({}))).is_err());
        assert!(prepare(&msg("private-user-42.inbox", json!({}))).is_ok());
    }

    #[test]
    fn messages_over_32_kib_are_permanent_and_say_their_size() {
        // {"s":"…"} is 8 bytes of framing around the string.
        assert!(prepare(&msg("c", json!({ "s": "x".repeat(MAX_MESSAGE_BYTES - 8) }))).is_ok());
        match prepare(&msg("c", json!({ "s": "x".repeat(MAX_MESSAGE_BYTES - 7) }))) {
            Err(ProviderError::Permanent { reason }) => {
                assert_eq!(reason, "payload of 32769 bytes exceeds PubNub's 32 KiB limit")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn custom_message_type_only_when_the_event_fits() {
        assert!(is_custom_message_type("notification_created"));
        assert!(is_custom_message_type("order-shipped"));
        assert!(!is_custom_message_type("ab"));
        assert!(!is_custom_message_type("notification.created"));
        assert!(!is_custom_message_type(&"a".repeat(51)));
    }

    #[test]
    fn answers_map_to_retry_decisions() {
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            classify(StatusCode::OK, None, r#"[1,"Sent","17000000000000000"]"#),
            Ok(Accepted { provider_message_id: Some("17000000000000000".into()) })
        );
        assert!(matches!(classify(StatusCode::OK, None, "<html>"), Err(ProviderError::Retryable { .. })));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, r#"[0,"Invalid Key","1"]"#),
            Err(ProviderError::Unauthorized { .. })
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, None, r#"{"status":403,"error":true,"message":"Forbidden"}"#),
            Err(ProviderError::Unauthorized { reason }) if reason == "pubnub answered 403: Forbidden"
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, r#"[0,"Invalid JSON","1"]"#),
            Err(ProviderError::Permanent { .. })
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, None, r#"[0,"Message Too Large","1"]"#),
            Err(ProviderError::Permanent { reason }) if reason == "pubnub answered 413: Message Too Large"
        ));
        assert_eq!(
            classify(
                StatusCode::TOO_MANY_REQUESTS,
                wait,
                r#"{"status":429,"error":true,"message":"Too Many Requests"}"#
            ),
            Err(ProviderError::Retryable {
                reason: "pubnub answered 429: Too Many Requests".into(),
                retry_after: wait
            })
        );
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, None, ""), Err(ProviderError::Retryable { .. })));
    }
}
