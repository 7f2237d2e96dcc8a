//! OneSignal push: `POST /notifications` (https://documentation.onesignal.com/reference/push-notification)
//! with `Authorization: Key <REST API key>`, one notification per delivery,
//! targeted at the user by External ID (`include_aliases.external_id` = the
//! channel's `channel_name`, `{recipient}` filled in), `target_channel: "push"`.
//! OneSignal holds the user's devices: the relay sends no tokens.
//!
//! `idempotency_key` = a UUID derived from the delivery key: OneSignal answers
//! a repeated key with the first call's result and sends nothing more, for
//! 30 days (https://documentation.onesignal.com/reference/idempotent-notification-requests),
//! so a re-send after a crash reaches nobody twice.

pub mod config;

use std::time::Duration;

use serde_json::{json, Value};

pub use self::config::{OneSignalConfig, PROFILE};
use super::brevo::idempotency_uuid;
use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::template::push_text;
use super::{Accepted, OutboundMessage, ProviderError};
use crate::secret::Secret;

#[derive(Clone, Debug)]
pub struct OneSignal {
    http: reqwest::Client,
    url: String,
    app_id: String,
    api_key: Secret,
    timeout: Duration,
}

impl OneSignal {
    pub fn build(cfg: &OneSignalConfig, ctx: &super::BuildContext) -> Result<OneSignal, ProviderError> {
        Ok(OneSignal::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &OneSignalConfig, http: reqwest::Client) -> OneSignal {
        let base = cfg.base_url.as_deref().unwrap_or("https://api.onesignal.com").trim_end_matches('/');
        OneSignal {
            http,
            url: format!("{base}/notifications"),
            app_id: cfg.app_id.clone(),
            api_key: cfg.api_key.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One call per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    /// The request body for `m`.
    pub fn body(&self, m: &OutboundMessage) -> Result<Value, ProviderError> {
        let external_id = m.channel_name.trim();
        if external_id.is_empty() {
            return Err(ProviderError::Permanent { reason: "onesignal: empty external id (no recipient)".into() });
        }
        let (title, text) = push_text(&m.event, &m.payload);
        Ok(json!({
            "app_id": self.app_id,
            "target_channel": "push",
            "include_aliases": {"external_id": [external_id]},
            "headings": {"en": title},
            "contents": {"en": text},
            "data": m.payload,
            "idempotency_key": idempotency_uuid(&m.idempotency_key),
        }))
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let body = self.body(m)?;
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header(reqwest::header::AUTHORIZATION, format!("Key {}", self.api_key.expose()))
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| transport_error("onesignal", e, self.timeout))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        classify(status, &text, wait)
    }
}

/// OneSignal's answers: 200 with a notification `id` is sent. 200 with an
/// empty `id` and `errors` (`invalid_aliases`, "All included players are not
/// subscribed") means nobody to send to: the user has no push subscription,
/// which retrying does not change. 400 refuses the request; 401/403 the key;
/// 429 and 5xx pass later.
fn classify(status: u16, body: &str, wait: Option<Duration>) -> Result<Accepted, ProviderError> {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let reason = || format!("onesignal answered {status}: {}", truncate(body, MAX_REASON_BODY));
    match status {
        200..=299 => {
            let id = parsed.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
            match id {
                Some(id) => Ok(Accepted { provider_message_id: Some(id.to_string()) }),
                None => Err(ProviderError::Permanent {
                    // The errors quote the external id: the recipient, not a secret, but kept short.
                    reason: format!(
                        "onesignal: no push subscription for this user ({})",
                        truncate(&parsed.get("errors").map(Value::to_string).unwrap_or_default(), 120)
                    ),
                }),
            }
        }
        401 | 403 => Err(ProviderError::Unauthorized { reason: reason() }),
        408 | 429 | 500..=599 => Err(ProviderError::Retryable { reason: reason(), retry_after: wait }),
        _ => Err(ProviderError::Permanent { reason: reason() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classed() {
        let ok = classify(200, r#"{"id":"b98881cc-1e94-4366-bbd9-db8f3429292b","external_id":null}"#, None);
        assert_eq!(ok.unwrap().provider_message_id.as_deref(), Some("b98881cc-1e94-4366-bbd9-db8f3429292b"));
        let nobody = classify(200, r#"{"id":"","errors":{"invalid_aliases":{"external_id":["42"]}}}"#, None);
        assert!(matches!(nobody, Err(ProviderError::Permanent { reason }) if reason.contains("no push subscription")));
        assert!(matches!(
            classify(400, r#"{"errors":["app_id not found"]}"#, None),
            Err(ProviderError::Permanent { .. })
        ));
        assert!(matches!(classify(403, "", None), Err(ProviderError::Unauthorized { .. })));
        let limited = classify(429, "", Some(Duration::from_secs(5))).unwrap_err();
        assert_eq!(
            limited,
            ProviderError::Retryable { reason: limited.to_string(), retry_after: Some(Duration::from_secs(5)) }
        );
        assert!(classify(503, "", None).unwrap_err().is_retryable());
    }
}
