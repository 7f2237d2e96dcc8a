//! Mailgun's Messages API: `POST /v3/{domain}/messages`, `multipart/form-data`,
//! HTTP Basic `api:<key>`, on the host of the domain's region
//! (https://documentation.mailgun.com/docs/mailgun/api-reference). A stored
//! template (`template`) filled from the payload (`t:variables`, JSON)
//! (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-templates),
//! or a subject and text. The returned `id` is recorded.
//!
//! Mailgun has no idempotency key on sending: a re-send after a crash can
//! reach the inbox twice, and is counted. The delivery key travels as the
//! custom variable `v:outbox_relay_key`, which Mailgun's events and webhooks echo.

use std::time::Duration;

use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::template::TemplateId;
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{MailgunConfig, Region, PROFILE};
use crate::secret::Secret;

/// Mailgun's maximum message size, 25 MB; the request is what is counted
/// here (a little over the message): a bigger one is refused without a call.
pub const MAX_REQUEST_BYTES: usize = 25 * 1024 * 1024;

/// Custom variable carrying the ledger's delivery key.
pub const KEY_VARIABLE: &str = "v:outbox_relay_key";

#[derive(Clone, Debug)]
pub struct Mailgun {
    http: reqwest::Client,
    url: String,
    api_key: Secret,
    from: String,
    timeout: Duration,
}

impl Mailgun {
    pub fn build(cfg: &MailgunConfig, ctx: &super::BuildContext) -> Result<Mailgun, ProviderError> {
        Ok(Mailgun::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &MailgunConfig, http: reqwest::Client) -> Mailgun {
        Mailgun {
            http,
            url: format!("{}/v3/{}/messages", cfg.endpoint(), cfg.domain),
            api_key: cfg.api_key.clone(),
            from: cfg.from.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One API call per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    /// The form fields for `m`, in order.
    pub fn fields(&self, m: &OutboundMessage) -> Result<Vec<(&'static str, String)>, ProviderError> {
        let Some(contact) = &m.contact else {
            return Err(ProviderError::Permanent { reason: "mailgun: no address for this delivery".into() });
        };
        let mut fields = vec![
            ("from", self.from.clone()),
            ("to", contact.address.clone()),
            ("subject", contact.subject.clone()),
            (KEY_VARIABLE, m.idempotency_key.clone()),
        ];
        match &contact.template {
            Some(TemplateId::Name(name)) => {
                fields.push(("template", name.clone()));
                fields.push(("t:variables", m.payload.to_string()));
            }
            Some(TemplateId::Number(n)) => {
                return Err(ProviderError::Permanent {
                    reason: format!("mailgun: template {n} is not a Mailgun template name"),
                })
            }
            None => fields.push(("text", contact.body.clone())),
        }
        Ok(fields)
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let fields = self.fields(m)?;
        let boundary = format!("outbox-relay-{}", uuid::Uuid::new_v4().simple());
        let body = multipart(&boundary, &fields);
        if body.len() > MAX_REQUEST_BYTES {
            return Err(ProviderError::Permanent {
                reason: format!("mailgun: message of {} bytes exceeds Mailgun's 25 MB limit", body.len()),
            });
        }
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .basic_auth("api", Some(self.api_key.expose()))
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("mailgun", e, self.timeout))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if (200..300).contains(&status) {
            let id = json.get("id").and_then(|i| i.as_str()).map(str::to_string);
            return Ok(Accepted { provider_message_id: id });
        }
        let message = json.get("message").and_then(|m| m.as_str()).map(str::to_string);
        let reason = format!("mailgun answered {status}: {}", truncate(&message.unwrap_or(text), MAX_REASON_BODY));
        // https://documentation.mailgun.com/docs/mailgun/api-reference/api-overview (response codes)
        Err(match status {
            401 | 403 => ProviderError::Unauthorized { reason },
            408 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after: wait },
            // 400 bad parameters or unknown template, 404 unknown domain, 413 too large.
            _ => ProviderError::Permanent { reason },
        })
    }
}

/// `multipart/form-data` (RFC 7578) of text fields: Mailgun's documented
/// encoding for this endpoint. The boundary is random, so no value holds it.
pub fn multipart(boundary: &str, fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
        );
        out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n\r\n");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_pick_the_host() {
        let mut cfg = MailgunConfig {
            api_key: Secret::new("key"),
            domain: "mg.example.com".into(),
            from: "Alerts <alerts@mg.example.com>".into(),
            region: Region::Us,
            base_url: None,
            timeout_ms: 1000,
        };
        assert_eq!(cfg.endpoint(), "https://api.mailgun.net");
        cfg.region = Region::Eu;
        assert_eq!(cfg.endpoint(), "https://api.eu.mailgun.net");
        let client = Mailgun::new(&cfg, reqwest::Client::new());
        assert_eq!(client.url, "https://api.eu.mailgun.net/v3/mg.example.com/messages");
        cfg.base_url = Some("http://127.0.0.1:9/".into());
        assert_eq!(cfg.endpoint(), "http://127.0.0.1:9");
    }

    #[test]
    fn multipart_frames_each_field() {
        let body = multipart("b", &[("to", "a@b.c".into()), ("t:variables", "{\"x\":1}".into())]);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "--b\r\nContent-Disposition: form-data; name=\"to\"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\na@b.c\r\n\
             --b\r\nContent-Disposition: form-data; name=\"t:variables\"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{\"x\":1}\r\n--b--\r\n"
        );
    }
}
