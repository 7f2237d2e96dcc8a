//! Firebase Cloud Messaging, HTTP v1: `POST /v1/projects/{project}/messages:send`
//! (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send)
//! with a bearer token from the service account ([`super::google_auth`]),
//! one call per device token ([`Reach::Devices`](super::Reach::Devices)).
//!
//! Each call's answer is that device's ([`DeviceResult`]): `UNREGISTERED`
//! (404), or `INVALID_ARGUMENT` about the token itself, means the token is
//! dead ([`DeviceError::Gone`]: dispatch runs the channel's
//! `on_invalid_token`); 429 `QUOTA_EXCEEDED`, 503 `UNAVAILABLE` and 500
//! `INTERNAL` are retried (only for that device) after their `Retry-After`;
//! the rest fails for that device
//! (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode).
//!
//! FCM has no idempotency key: a device whose answer was lost in a crash
//! gets the message again on the retry (counted); `data.outbox_key` carries
//! the delivery key for an app that wants to drop repeats.

pub mod config;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

pub use self::config::{FcmConfig, PROFILE};
use super::devices::{fan_out, fold, Device, DeviceError, DeviceResult};
use super::google_auth::{GoogleAuth, ServiceAccountKey};
use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::template::push_text;
use super::{Accepted, BuildContext, OutboundMessage, ProviderError};

/// The OAuth scope sending needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// "4096 bytes for most messages" (data and notification, keys and values):
/// ErrorCode `INVALID_ARGUMENT`, "Message too big".
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// Data keys FCM keeps for itself (ErrorCode `INVALID_ARGUMENT`, "Invalid data key").
const RESERVED_KEYS: [&str; 3] = ["from", "notification", "message_type"];
const RESERVED_PREFIXES: [&str; 2] = ["google", "gcm"];

#[derive(Clone, Debug)]
pub struct Fcm {
    http: reqwest::Client,
    auth: GoogleAuth,
    url: String,
    timeout: Duration,
}

impl Fcm {
    pub fn build(cfg: &FcmConfig, ctx: &BuildContext) -> Result<Fcm, ProviderError> {
        let key = ServiceAccountKey::load(cfg.service_account_file.as_deref(), cfg.service_account_json.as_ref())?;
        Fcm::new(cfg, key, ctx.http.clone())
    }

    pub fn new(cfg: &FcmConfig, key: ServiceAccountKey, http: reqwest::Client) -> Result<Fcm, ProviderError> {
        let project = cfg.project.clone().or_else(|| key.project_id.clone()).ok_or_else(|| {
            ProviderError::Permanent { reason: "providers.fcm.project is not set and the key has no project_id".into() }
        })?;
        let base = cfg.base_url.as_deref().unwrap_or("https://fcm.googleapis.com").trim_end_matches('/');
        let timeout = Duration::from_millis(cfg.timeout_ms);
        Ok(Fcm {
            auth: GoogleAuth::new(key, SCOPE, http.clone(), timeout),
            http,
            url: format!("{base}/v1/projects/{project}/messages:send"),
            timeout,
        })
    }

    /// One result per message: its devices' answers folded (see
    /// [`super::devices::fold`]). Dispatch calls [`Fcm::send_devices`] for
    /// push channels; this serves callers that want one answer per message.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let answers = self.send_devices(messages).await;
        messages.iter().zip(answers).map(|(m, a)| fold(0, &a, &m.devices)).collect()
    }

    /// Every message to each of its devices, all at once: one vector per
    /// message, one answer per device, in order.
    pub async fn send_devices(&self, messages: &[OutboundMessage]) -> Vec<Vec<DeviceResult>> {
        fan_out(messages, |m, device| async move {
            match content(m) {
                Ok(content) => self.send(content, device).await,
                Err(e) => Err(DeviceError::Provider(e)),
            }
        })
        .await
    }

    async fn send(&self, mut message: Value, device: &Device) -> DeviceResult {
        message["token"] = json!(device.token);
        let body = json!({ "message": message });
        let mut refreshed = false;
        loop {
            let token = self.auth.token().await?;
            let response = self
                .http
                .post(&self.url)
                .timeout(self.timeout)
                .bearer_auth(token.expose())
                .json(&body)
                .send()
                .await
                .map_err(|e| transport_error("fcm", e, self.timeout))?;
            let status = response.status().as_u16();
            let wait = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            if status == 401 && !refreshed && fcm_error_code(&text).is_none() {
                // The bearer token was refused (revoked, key rotated): mint another once.
                self.auth.forget(&token).await;
                refreshed = true;
                continue;
            }
            return classify(status, &text, wait);
        }
    }
}

/// The message for one delivery, without its token: `notification` (title
/// and body from the payload) and `data` (the payload's fields as strings,
/// FCM takes no other type, plus `outbox_event` and `outbox_key`).
fn content(m: &OutboundMessage) -> Result<Value, ProviderError> {
    let (title, body) = push_text(&m.event, &m.payload);
    let mut data = BTreeMap::new();
    if let Some(fields) = m.payload.as_object() {
        for (k, v) in fields {
            let reserved = RESERVED_KEYS.contains(&k.as_str()) || RESERVED_PREFIXES.iter().any(|p| k.starts_with(p));
            if reserved {
                return Err(ProviderError::Permanent { reason: format!("fcm: payload key {k:?} is reserved by FCM") });
            }
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            data.insert(k.clone(), text);
        }
    }
    data.insert("outbox_event".into(), m.event.clone());
    data.insert("outbox_key".into(), m.idempotency_key.clone());
    let size = title.len() + body.len() + data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > MAX_PAYLOAD_BYTES {
        return Err(ProviderError::Permanent {
            reason: format!("fcm: notification and data of {size} bytes exceed FCM's {MAX_PAYLOAD_BYTES}"),
        });
    }
    Ok(json!({"notification": {"title": title, "body": body}, "data": data}))
}

/// The FCM-specific `errorCode` of an error answer, if it has one
/// (`details[]` of type `google.firebase.fcm.v1.FcmError`).
fn fcm_error_code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["error"]["details"].as_array()?.iter().find_map(|d| {
        let fcm = d["@type"].as_str().is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"));
        fcm.then(|| d["errorCode"].as_str().map(str::to_string)).flatten()
    })
}

/// Whether a 400 is about the registration token rather than the message:
/// a `BadRequest` field violation on `message.token`, or Google's wording
/// "not a valid FCM registration token".
fn token_is_invalid(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(body) else { return false };
    let on_token = v["error"]["details"].as_array().is_some_and(|ds| {
        ds.iter()
            .any(|d| d["fieldViolations"].as_array().is_some_and(|fs| fs.iter().any(|f| f["field"] == "message.token")))
    });
    on_token || v["error"]["message"].as_str().is_some_and(|m| m.contains("registration token"))
}

fn classify(status: u16, body: &str, wait: Option<Duration>) -> DeviceResult {
    if (200..300).contains(&status) {
        let name = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string));
        return Ok(Accepted { provider_message_id: name });
    }
    let code = fcm_error_code(body).unwrap_or_default();
    let reason = format!("fcm answered {status} {code}: {}", truncate(body, MAX_REASON_BODY));
    match (status, code.as_str()) {
        (_, "UNREGISTERED") | (404, _) => Err(DeviceError::Gone { reason }),
        (400, _) if token_is_invalid(body) => Err(DeviceError::Gone { reason }),
        // A token of another Firebase project: this project's key cannot
        // reach it; not dead for its own app, so not forgotten.
        (403, "SENDER_ID_MISMATCH") => Err(ProviderError::Permanent { reason }.into()),
        // APNs or Web Push credentials refused (THIRD_PARTY_AUTH_ERROR), our own key refused.
        (401 | 403, _) => Err(ProviderError::Unauthorized { reason }.into()),
        (408 | 429 | 500..=599, _) => Err(ProviderError::Retryable { reason, retry_after: wait }.into()),
        _ => Err(ProviderError::Permanent { reason }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: u16, status: &str, fcm: Option<&str>, message: &str) -> String {
        let mut details = vec![];
        if let Some(c) = fcm {
            details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}));
        }
        json!({"error": {"code": code, "message": message, "status": status, "details": details}}).to_string()
    }

    #[test]
    fn answers_are_classed_per_device() {
        let ok = classify(200, r#"{"name":"projects/p/messages/0:15004%31bd"}"#, None).unwrap();
        assert_eq!(ok.provider_message_id.as_deref(), Some("projects/p/messages/0:15004%31bd"));
        let gone = classify(404, &err(404, "NOT_FOUND", Some("UNREGISTERED"), "Requested entity was not found."), None);
        assert!(matches!(gone, Err(DeviceError::Gone { .. })));
        let bad_token = err(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "The registration token is not a valid FCM registration token",
        );
        assert!(matches!(classify(400, &bad_token, None), Err(DeviceError::Gone { .. })));
        let bad_data = err(400, "INVALID_ARGUMENT", None, "Invalid value at 'message.data[0].value' (TYPE_STRING), 12");
        assert!(matches!(classify(400, &bad_data, None), Err(DeviceError::Provider(ProviderError::Permanent { .. }))));
        let quota = classify(
            429,
            &err(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"), "quota"),
            Some(Duration::from_secs(9)),
        );
        assert!(
            matches!(quota, Err(DeviceError::Provider(ProviderError::Retryable { retry_after: Some(d), .. })) if d == Duration::from_secs(9))
        );
        assert!(matches!(classify(503, "", None), Err(DeviceError::Provider(ProviderError::Retryable { .. }))));
        let mismatch = classify(403, &err(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"), "x"), None);
        assert!(matches!(mismatch, Err(DeviceError::Provider(ProviderError::Permanent { .. }))), "never forgotten");
        let third = classify(401, &err(401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR"), "x"), None);
        assert!(matches!(third, Err(DeviceError::Provider(ProviderError::Unauthorized { .. }))));
    }

    #[test]
    fn content_is_strings_and_refuses_reserved_keys_and_oversize() {
        let m = |payload: Value| OutboundMessage {
            delivery_id: 1,
            idempotency_key: "k".into(),
            channel_name: String::new(),
            event: "order_shipped".into(),
            payload,
            contact: None,
            bus: None,
            devices: vec![],
            correlation: None,
        };
        let c = content(&m(json!({"title": "Shipped", "id": 7, "gone": null}))).unwrap();
        assert_eq!(c["notification"], json!({"title": "Shipped", "body": "Shipped"}));
        assert_eq!(
            c["data"],
            json!({"title": "Shipped", "id": "7", "outbox_event": "order_shipped", "outbox_key": "k"})
        );
        assert!(content(&m(json!({"google.x": 1}))).unwrap_err().to_string().contains("reserved"));
        assert!(content(&m(json!({"from": "me"}))).is_err());
        assert!(content(&m(json!({"blob": "x".repeat(4100)}))).unwrap_err().to_string().contains("4096"));
    }
}
