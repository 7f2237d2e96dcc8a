//! Brevo transactional e-mail: `POST /v3/smtp/email` with the `api-key` header
//! (https://developers.brevo.com/reference/sendtransacemail). A template id per
//! event with the payload as `params`, or a subject and text built from the payload.

use std::time::Duration;

use serde_json::json;

use super::http::{brevo_reset, retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::template::TemplateId;
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{BrevoConfig, PROFILE};
use crate::secret::Secret;

#[derive(Clone, Debug)]
pub struct Brevo {
    http: reqwest::Client,
    url: String,
    api_key: Secret,
    sender: serde_json::Value,
    timeout: Duration,
}

impl Brevo {
    pub fn build(cfg: &BrevoConfig, ctx: &super::BuildContext) -> Result<Brevo, ProviderError> {
        Ok(Brevo::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &BrevoConfig, http: reqwest::Client) -> Brevo {
        let base = cfg.base_url.as_deref().unwrap_or("https://api.brevo.com").trim_end_matches('/');
        let mut sender = json!({"email": cfg.sender_email});
        if let Some(name) = &cfg.sender_name {
            sender["name"] = json!(name);
        }
        Brevo {
            http,
            url: format!("{base}/v3/smtp/email"),
            api_key: cfg.api_key.clone(),
            sender,
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One API call (SMTP transaction) per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let Some(contact) = &m.contact else {
            return Err(ProviderError::Permanent { reason: "brevo: no address for this delivery".into() });
        };
        let mut body = json!({
            "sender": self.sender,
            "to": [{"email": contact.address}],
            // Brevo sends a repeated idempotencyKey only once (within its TTL, 15-30 min) and
            // wants a UUID: https://developers.brevo.com/docs/heterogenous-versions-batch-emails
            "headers": {"idempotencyKey": idempotency_uuid(&m.idempotency_key)},
        });
        // Brevo's `headers` are custom headers sent along with the e-mail
        // (https://developers.brevo.com/reference/sendtransacemail): the
        // correlation value rides in one, so a bounce or a reply quoting the
        // headers leads back to the request that wrote the row.
        if let Some(value) = m.correlation.as_deref() {
            body["headers"]["X-Correlation-Id"] = json!(value);
        }
        match &contact.template {
            Some(TemplateId::Number(id)) => {
                body["templateId"] = json!(id);
                body["params"] = m.payload.clone();
            }
            // Config validation keeps names away from Brevo; say so if one slips through.
            Some(TemplateId::Name(name)) => {
                return Err(ProviderError::Permanent {
                    reason: format!("brevo: template {name:?} is not a Brevo template id (a number)"),
                })
            }
            None => {
                body["subject"] = json!(contact.subject);
                body["textContent"] = json!(contact.body);
            }
        }
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header("api-key", self.api_key.expose())
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| transport_error("brevo", e, self.timeout))?;
        let status = response.status();
        let wait = retry_after(response.headers()).or_else(|| brevo_reset(response.headers()));
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            let id = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("messageId").and_then(|i| i.as_str()).map(str::to_string));
            return Ok(Accepted { provider_message_id: id });
        }
        let reason = format!("brevo answered {}: {}", status.as_u16(), truncate(&text, MAX_REASON_BODY));
        Err(match status.as_u16() {
            401 | 403 => ProviderError::Unauthorized { reason },
            429 | 500..=599 => ProviderError::Retryable { reason, retry_after: wait },
            // 400 invalid_parameter / missing_parameter, unknown template: the same request fails again.
            _ => ProviderError::Permanent { reason },
        })
    }
}

/// The ledger's key as the UUID Brevo asks for: the same delivery always maps to
/// the same UUID, so a re-send after a crash is dropped by Brevo.
pub fn idempotency_uuid(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::idempotency_uuid;

    #[test]
    fn idempotency_key_maps_to_one_stable_uuid() {
        let a = idempotency_uuid("or1-3daad20ba81cd204336f2424af73d6a2");
        assert_eq!(a, idempotency_uuid("or1-3daad20ba81cd204336f2424af73d6a2"), "same delivery, same key");
        assert_ne!(a, idempotency_uuid("or1-ee7bb8b94ec09beef0ec1553bee9a878"));
        let parsed = uuid::Uuid::parse_str(&a).expect("a UUID, as Brevo requires");
        assert_eq!(parsed.get_version_num(), 4);
    }
}
