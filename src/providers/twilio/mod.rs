//! Twilio Messages API for SMS and WhatsApp
//! (https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource):
//! form-encoded POST, HTTP Basic auth with the account SID and auth token, `To`
//! in E.164 (`whatsapp:` prefixed on both ends for WhatsApp), `StatusCallback`
//! for delivery reports, and the returned `sid` recorded.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{TwilioConfig, PROFILE};

#[derive(Clone, Debug)]
pub struct Twilio {
    http: reqwest::Client,
    url: String,
    cfg: TwilioConfig,
    timeout: Duration,
}

/// E.164: `+`, then 8 to 15 digits, the first not zero.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else { return false };
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0')
}

pub const MAX_BODY_CHARS: usize = 1600;

impl Twilio {
    pub fn build(cfg: &TwilioConfig, ctx: &super::BuildContext) -> Result<Twilio, ProviderError> {
        Ok(Twilio::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &TwilioConfig, http: reqwest::Client) -> Twilio {
        let base = cfg.base_url.as_deref().unwrap_or("https://api.twilio.com").trim_end_matches('/');
        Twilio {
            http,
            url: format!("{base}/2010-04-01/Accounts/{}/Messages.json", cfg.account_sid),
            cfg: cfg.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One API call (SMTP transaction) per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let Some(contact) = &m.contact else {
            return Err(ProviderError::Permanent { reason: "twilio: no address for this delivery".into() });
        };
        let number = contact.address.trim();
        if !is_e164(number) {
            // Twilio would refuse it (21211); say so without a call.
            return Err(ProviderError::Permanent {
                reason: "recipient number is not in E.164 form (+ and 8-15 digits)".into(),
            });
        }
        // Twilio takes up to 1,600 characters and counts an emoji as more than one
        // (https://www.twilio.com/docs/api/errors/21617): UTF-16 units are that count.
        let length = contact.body.encode_utf16().count();
        if length > MAX_BODY_CHARS {
            return Err(ProviderError::Permanent {
                reason: format!(
                    "message body is {length} characters; Twilio takes at most {MAX_BODY_CHARS} (error 21617)"
                ),
            });
        }
        let mut form: Vec<(&str, String)> = vec![("Body", contact.body.clone())];
        if contact.whatsapp {
            let Some(from) = &self.cfg.whatsapp_from else {
                return Err(ProviderError::Permanent { reason: "providers.twilio.whatsapp_from is not set".into() });
            };
            form.push(("To", format!("whatsapp:{number}")));
            form.push(("From", from.clone()));
        } else {
            form.push(("To", number.to_string()));
            match (&self.cfg.messaging_service_sid, &self.cfg.from) {
                (Some(service), _) => form.push(("MessagingServiceSid", service.clone())),
                (None, Some(from)) => form.push(("From", from.clone())),
                (None, None) => {
                    return Err(ProviderError::Permanent {
                        reason: "providers.twilio needs from or messaging_service_sid".into(),
                    })
                }
            }
        }
        if let Some(cb) = &self.cfg.status_callback_url {
            form.push(("StatusCallback", cb.clone()));
        }
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .basic_auth(&self.cfg.account_sid, Some(self.cfg.auth_token.expose()))
            .form(&form)
            .send()
            .await
            .map_err(|e| transport_error("twilio", e, self.timeout))?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if status.is_success() {
            let sid = json.get("sid").and_then(|s| s.as_str()).map(str::to_string);
            return Ok(Accepted { provider_message_id: sid });
        }
        // https://www.twilio.com/docs/api/errors
        let code = json.get("code").and_then(|c| c.as_i64());
        let message = json.get("message").and_then(|c| c.as_str()).map(str::to_string);
        let reason = format!(
            "twilio answered {}{}: {}",
            status.as_u16(),
            code.map(|c| format!(" (error {c})")).unwrap_or_default(),
            message.unwrap_or_else(|| truncate(&text, MAX_REASON_BODY))
        );
        Err(match (status.as_u16(), code) {
            (_, Some(20003)) | (401 | 403, _) => ProviderError::Unauthorized { reason },
            (429, _) | (_, Some(20429)) | (500..=599, _) => ProviderError::Retryable { reason, retry_after: wait },
            // 21211 invalid To, 21610 unsubscribed, 21614 not a mobile number, ...
            _ => ProviderError::Permanent { reason },
        })
    }
}

/// Checks `X-Twilio-Signature`: base64 HMAC-SHA1, keyed with the auth token, of
/// the full URL followed by each POST parameter's name and value, sorted by name
/// (https://www.twilio.com/docs/usage/security#validating-requests).
pub fn verify_signature(auth_token: &str, full_url: &str, params: &[(String, String)], header: &str) -> bool {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(full_url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(header.trim()) else { return false };
    // verify_slice compares in constant time.
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        assert!(is_e164("+33612345678"));
        assert!(!is_e164("0612345678"));
        assert!(!is_e164("+33 6 12 34 56 78"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1234567"));
    }

    /// The worked example of https://www.twilio.com/docs/usage/security#validating-requests.
    #[test]
    fn signature_matches_twilios_worked_example() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(verify_signature("12345", url, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        assert!(!verify_signature("12346", url, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        assert!(!verify_signature("12345", url, &params[1..], "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        assert!(!verify_signature("12345", url, &params, "not base64!"));
    }
}
