//! SendGrid (Twilio SendGrid) v3 Mail Send: `POST /v3/mail/send` with
//! `Authorization: Bearer <api_key>`
//! (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send).
//! A dynamic template (`template_id` "d-...") with the payload as
//! `dynamic_template_data`, or a subject and text. SendGrid answers 202 with
//! an empty body; the message id comes in the `X-Message-Id` header.
//!
//! SendGrid has no idempotency key on Mail Send: a re-send after a crash (the
//! window of docs/design.md) can reach the inbox twice, and is counted. The
//! delivery key travels in `custom_args`, so SendGrid's event webhook and
//! activity feed show which delivery a mail was.

use std::time::Duration;

use serde_json::json;

use super::http::{reset_at_epoch, retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::template::TemplateId;
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{SendgridConfig, PROFILE};
use crate::secret::Secret;

/// "The total size of your email, including attachments, must be less than
/// 30MB" (Mail Send reference, limitations). The JSON request is what is
/// counted here: a bigger one is refused without a call.
pub const MAX_REQUEST_BYTES: usize = 30 * 1024 * 1024;

/// `custom_args` key carrying the ledger's delivery key.
pub const KEY_ARG: &str = "outbox_relay_key";

#[derive(Clone, Debug)]
pub struct Sendgrid {
    http: reqwest::Client,
    url: String,
    api_key: Secret,
    /// `{"email": ..., "name": ...}`, the same for every mail.
    from: serde_json::Value,
    timeout: Duration,
}

impl Sendgrid {
    pub fn build(cfg: &SendgridConfig, ctx: &super::BuildContext) -> Result<Sendgrid, ProviderError> {
        Ok(Sendgrid::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &SendgridConfig, http: reqwest::Client) -> Sendgrid {
        let base = cfg.base_url.as_deref().unwrap_or("https://api.sendgrid.com").trim_end_matches('/');
        let mut from = json!({"email": cfg.sender_email});
        if let Some(name) = &cfg.sender_name {
            from["name"] = json!(name);
        }
        Sendgrid {
            http,
            url: format!("{base}/v3/mail/send"),
            api_key: cfg.api_key.clone(),
            from,
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One API call per message (one personalization each: one recipient's
    /// template data), the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    /// The request body for `m`.
    pub fn body(&self, m: &OutboundMessage) -> Result<serde_json::Value, ProviderError> {
        let Some(contact) = &m.contact else {
            return Err(ProviderError::Permanent { reason: "sendgrid: no address for this delivery".into() });
        };
        let mut personalization = json!({"to": [{"email": contact.address}]});
        let mut body = json!({
            "from": self.from,
            "custom_args": {KEY_ARG: m.idempotency_key},
        });
        match &contact.template {
            Some(TemplateId::Name(id)) => {
                body["template_id"] = json!(id);
                personalization["dynamic_template_data"] = m.payload.clone();
            }
            Some(TemplateId::Number(n)) => {
                return Err(ProviderError::Permanent {
                    reason: format!("sendgrid: template {n} is not a SendGrid dynamic template id (\"d-...\")"),
                })
            }
            None => {
                body["subject"] = json!(contact.subject);
                body["content"] = json!([{"type": "text/plain", "value": contact.body}]);
            }
        }
        body["personalizations"] = json!([personalization]);
        Ok(body)
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let body = serde_json::to_vec(&self.body(m)?)
            .map_err(|e| ProviderError::Permanent { reason: format!("sendgrid: cannot encode the mail: {e}") })?;
        if body.len() > MAX_REQUEST_BYTES {
            return Err(ProviderError::Permanent {
                reason: format!("sendgrid: mail of {} bytes exceeds SendGrid's 30 MB limit", body.len()),
            });
        }
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .bearer_auth(self.api_key.expose())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("sendgrid", e, self.timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        if status.is_success() {
            let id = headers.get("x-message-id").and_then(|v| v.to_str().ok()).map(str::to_string);
            return Ok(Accepted { provider_message_id: id });
        }
        let text = response.text().await.unwrap_or_default();
        Err(classify(status.as_u16(), &headers, &text))
    }
}

/// SendGrid's error answer as a [`ProviderError`]: `{"errors": [{"message",
/// "field"}]}` (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/errors).
pub fn classify(status: u16, headers: &reqwest::header::HeaderMap, text: &str) -> ProviderError {
    let messages: Vec<String> = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let message = e.get("message")?.as_str()?;
            Some(match e.get("field").and_then(|f| f.as_str()) {
                Some(field) if !field.is_empty() => format!("{field}: {message}"),
                _ => message.to_string(),
            })
        })
        .collect();
    let detail = if messages.is_empty() { truncate(text, MAX_REASON_BODY) } else { messages.join("; ") };
    let reason = format!("sendgrid answered {status}: {}", truncate(&detail, MAX_REASON_BODY));
    match status {
        // 401 bad key; 403 a key without the Mail Send scope, or a `from`
        // that is not a verified Sender Identity: both need a human.
        401 | 403 => ProviderError::Unauthorized { reason },
        // Retry-After if sent, else the end of the rate-limit window.
        429 => ProviderError::Retryable {
            reason,
            retry_after: retry_after(headers).or_else(|| reset_at_epoch(headers, "x-ratelimit-reset")),
        },
        408 | 500..=599 => ProviderError::Retryable { reason, retry_after: retry_after(headers) },
        // 400 a bad field or an unknown template, 413 too large: the same again.
        _ => ProviderError::Permanent { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Contact;

    fn client() -> Sendgrid {
        let cfg = SendgridConfig {
            api_key: Secret::new("SG.x"),
            sender_email: "alerts@example.com".into(),
            sender_name: Some("Alerts".into()),
            base_url: None,
            timeout_ms: 1000,
        };
        Sendgrid::new(&cfg, reqwest::Client::new())
    }

    fn message(template: Option<TemplateId>) -> OutboundMessage {
        OutboundMessage {
            delivery_id: 1,
            idempotency_key: "or1-abc".into(),
            channel_name: String::new(),
            event: "order_shipped".into(),
            payload: json!({"order": 7}),
            contact: Some(Contact {
                address: "jane@example.com".into(),
                subject: "Parti".into(),
                body: "Votre commande".into(),
                template,
                whatsapp: false,
            }),
            bus: None,
            correlation: None,
            devices: Vec::new(),
        }
    }

    #[test]
    fn templates_carry_the_payload_and_plain_mails_a_subject_and_text() {
        let t = client().body(&message(Some(TemplateId::Name("d-123".into())))).unwrap();
        assert_eq!(t["template_id"], "d-123");
        assert_eq!(t["personalizations"][0]["dynamic_template_data"], json!({"order": 7}));
        assert_eq!(t["personalizations"][0]["to"][0]["email"], "jane@example.com");
        assert_eq!(t["custom_args"][KEY_ARG], "or1-abc");
        assert!(t.get("subject").is_none());
        let p = client().body(&message(None)).unwrap();
        assert_eq!(p["subject"], "Parti");
        assert_eq!(p["content"], json!([{"type": "text/plain", "value": "Votre commande"}]));
        assert_eq!(p["from"], json!({"email": "alerts@example.com", "name": "Alerts"}));
        assert!(client().body(&message(Some(TemplateId::Number(12)))).is_err());
    }

    #[test]
    fn errors_name_their_fields_and_keep_their_class() {
        let h = reqwest::header::HeaderMap::new();
        let e = classify(
            400,
            &h,
            r#"{"errors":[{"message":"Does not contain a valid address.","field":"personalizations.0.to.0.email"}]}"#,
        );
        assert_eq!(
            e,
            ProviderError::Permanent {
                reason: "sendgrid answered 400: personalizations.0.to.0.email: Does not contain a valid address."
                    .into()
            }
        );
        assert!(matches!(classify(403, &h, "{}"), ProviderError::Unauthorized { .. }));
        assert!(classify(503, &h, "").is_retryable());
        assert!(matches!(classify(413, &h, ""), ProviderError::Permanent { .. }));
    }
}
