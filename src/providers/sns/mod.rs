//! Amazon SNS, through its Query API: `Action=Publish&Version=2010-03-31`,
//! form-encoded POST, AWS Signature Version 4 ([`sigv4`]), XML answers
//! (https://docs.aws.amazon.com/sns/latest/api/API_Publish.html).
//!
//! Two uses, per channel:
//! - **SMS**: a channel with an `address_query` (like Twilio's) publishes to
//!   `PhoneNumber` (E.164) with the rendered `body`.
//! - **Topics**: a channel with a `[channels.<name>.bus]` route publishes the
//!   delivery's CloudEvents event (as the buses do, structured mode) to the
//!   topic ARN its `destination` names. A FIFO topic (`.fifo`) gets
//!   `MessageGroupId` = the route's key (the recipient by default: one
//!   person's events in order) and `MessageDeduplicationId` = the delivery
//!   key, so SNS drops a re-send within its 5-minute de-duplication interval
//!   (https://docs.aws.amazon.com/sns/latest/dg/fifo-message-dedup.html).
//!   A standard topic has no such id: a re-send is counted, as for Twilio.
//!
//! The returned `MessageId` is recorded.

pub mod config;
pub mod sigv4;

use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};

pub use self::config::{SnsConfig, PROFILE};
use super::bus::{envelope, BusRoute, EnvelopeMode};
use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};

/// "The total size limit for a single SMS Publish action is 1,600
/// characters" (Publish, `Message`); counted in UCS-2 units, as SMS encodes
/// text that is not GSM 03.38.
pub const MAX_SMS_CHARS: usize = 1600;
/// Other messages: "at most 256 KB in size (262,144 bytes, not 262,144
/// characters)" (Publish, `Message`), message attributes included.
pub const MAX_MESSAGE_BYTES: usize = 262_144;
/// "Amazon SNS supports up to 10 message attributes" per message.
pub const MAX_ATTRIBUTES: usize = 10;
/// `MessageGroupId` and `MessageDeduplicationId`: up to 128 characters.
pub const MAX_ID_CHARS: usize = 128;

#[derive(Clone, Debug)]
pub struct Sns {
    http: reqwest::Client,
    url: String,
    /// The `Host` header as sent, which is what is signed.
    host: String,
    creds: sigv4::Credentials,
    region: String,
    timeout: Duration,
}

impl Sns {
    pub fn build(cfg: &SnsConfig, ctx: &super::BuildContext) -> Result<Sns, ProviderError> {
        Sns::new(cfg, ctx.http.clone())
    }

    pub fn new(cfg: &SnsConfig, http: reqwest::Client) -> Result<Sns, ProviderError> {
        let endpoint = cfg.endpoint();
        let bad =
            |why: &str| ProviderError::Permanent { reason: format!("providers.sns.base_url {endpoint:?}: {why}") };
        let url = reqwest::Url::parse(&endpoint).map_err(|e| bad(&e.to_string()))?;
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        // reqwest sends `host:port` for a port that is not the scheme's default.
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Sns {
            http,
            url: format!("{endpoint}/"),
            host,
            creds: sigv4::Credentials {
                access_key_id: cfg.access_key_id.clone(),
                secret_access_key: cfg.secret_access_key.expose().to_string(),
                session_token: cfg.session_token.as_ref().map(|t| t.expose().to_string()),
            },
            region: cfg.region.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    /// One Publish per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let params = publish_params(m)?;
        let body = form_encode(&params);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let req = sigv4::Request {
            method: "POST",
            host: &self.host,
            path: "/",
            query: &[],
            headers: &[("content-type", content_type)],
            body: body.as_bytes(),
        };
        let signed = sigv4::sign(&self.creds, &self.region, "sns", &req, Utc::now());
        let mut request = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header("content-type", content_type)
            .header("x-amz-date", &signed.amz_date)
            .header("authorization", &signed.authorization)
            .body(body);
        if let Some(token) = &signed.security_token {
            request = request.header("x-amz-security-token", token);
        }
        let response = request.send().await.map_err(|e| transport_error("sns", e, self.timeout))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            return match xml_text(&text, "MessageId") {
                Some(id) => Ok(Accepted { provider_message_id: Some(id) }),
                // A 200 without a MessageId is not a Publish answer (a proxy's page).
                None => Err(ProviderError::Retryable {
                    reason: format!("sns answered {status} without a MessageId: {}", truncate(&text, MAX_REASON_BODY)),
                    retry_after: wait,
                }),
            };
        }
        Err(classify(status, &text, wait))
    }
}

/// The Publish parameters for `m`: SMS when it has a contact, a topic when it
/// has a bus route. Limits are checked here, before any call.
pub fn publish_params(m: &OutboundMessage) -> Result<Vec<(String, String)>, ProviderError> {
    let permanent = |reason: String| ProviderError::Permanent { reason };
    let mut params = vec![("Action".to_string(), "Publish".to_string()), ("Version".into(), "2010-03-31".into())];
    if let Some(contact) = &m.contact {
        let number = contact.address.trim();
        if !super::twilio::is_e164(number) {
            return Err(permanent("recipient number is not in E.164 form (+ and 8-15 digits)".into()));
        }
        let length = contact.body.encode_utf16().count();
        if length > MAX_SMS_CHARS {
            return Err(permanent(format!(
                "sns: SMS of {length} characters; one Publish takes at most {MAX_SMS_CHARS}"
            )));
        }
        params.push(("PhoneNumber".into(), number.to_string()));
        params.push(("Message".into(), contact.body.clone()));
        return Ok(params);
    }
    if m.bus.as_ref().is_some_and(|b| b.route.mode == EnvelopeMode::Binary) {
        return Err(permanent("sns: topics take structured CloudEvents only (bus.mode = \"structured\")".into()));
    }
    let out = envelope::build(m, "")
        .map_err(|_| permanent("sns: no phone number and no topic ([channels.<name>.bus]) for this delivery".into()))?;
    let message = String::from_utf8(out.body).map_err(|e| permanent(format!("sns: message is not UTF-8: {e}")))?;
    if out.headers.len() > MAX_ATTRIBUTES {
        return Err(permanent(format!(
            "sns: {} message attributes (bus.headers); SNS takes at most {MAX_ATTRIBUTES}",
            out.headers.len()
        )));
    }
    let size = message.len() + out.headers.iter().map(|(k, v)| k.len() + "String".len() + v.len()).sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(permanent(format!("sns: message of {size} bytes exceeds SNS's {MAX_MESSAGE_BYTES}")));
    }
    params.push(("TopicArn".into(), out.destination.clone()));
    params.push(("Message".into(), message));
    if out.destination.ends_with(".fifo") {
        if out.key.is_empty() || out.key.chars().count() > MAX_ID_CHARS {
            return Err(permanent(format!(
                "sns: a FIFO topic needs a MessageGroupId of 1 to {MAX_ID_CHARS} characters; bus.key gave {} characters",
                out.key.chars().count()
            )));
        }
        params.push(("MessageGroupId".into(), out.key.clone()));
        params.push(("MessageDeduplicationId".into(), deduplication_id(&out.id)));
    }
    for (i, (name, value)) in out.headers.iter().enumerate() {
        let n = i + 1;
        params.push((format!("MessageAttributes.entry.{n}.Name"), name.clone()));
        params.push((format!("MessageAttributes.entry.{n}.Value.DataType"), "String".into()));
        params.push((format!("MessageAttributes.entry.{n}.Value.StringValue"), value.clone()));
    }
    Ok(params)
}

/// The delivery key as a `MessageDeduplicationId`: itself when it fits (up
/// to 128 alphanumeric and punctuation characters), else its SHA-256 in hex
/// — stable either way, which is what de-duplication needs.
pub fn deduplication_id(key: &str) -> String {
    let fits = !key.is_empty() && key.len() <= MAX_ID_CHARS && key.bytes().all(|b| b.is_ascii_graphic());
    if fits {
        key.to_string()
    } else {
        hex::encode(Sha256::digest(key.as_bytes()))
    }
}

/// `application/x-www-form-urlencoded`, RFC 3986 style (`%20`, not `+`).
pub fn form_encode(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", super::http::uri_encode(k), super::http::uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The text of the first `<tag>...</tag>`, XML entities decoded: all the
/// relay reads of SNS's answers (`MessageId`, an error's `Code` and `Message`).
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let raw = &xml[start..end];
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// An SNS error answer (`<ErrorResponse><Error><Code>...`) as a
/// [`ProviderError`], by its code first
/// (https://docs.aws.amazon.com/sns/latest/api/CommonErrors.html and Publish's errors).
pub fn classify(status: u16, xml: &str, retry_after: Option<Duration>) -> ProviderError {
    let code = xml_text(xml, "Code").unwrap_or_default();
    let message = xml_text(xml, "Message").unwrap_or_else(|| truncate(xml, MAX_REASON_BODY));
    let reason = format!(
        "sns answered {status}{}: {}",
        if code.is_empty() { String::new() } else { format!(" ({code})") },
        truncate(&message, MAX_REASON_BODY)
    );
    match code.as_str() {
        // Throttling is a 400 in the Query API, and retryable.
        "Throttling" | "ThrottlingException" | "ThrottledException" | "RequestThrottled" | "KMSThrottling"
        | "ServiceUnavailable" | "InternalFailure" | "InternalError"
        // The signature's time is over 15 minutes off: a fresh one may pass
        // (a paused process); a skewed clock keeps failing until `dead`.
        | "RequestExpired" => ProviderError::Retryable { reason, retry_after },
        "SignatureDoesNotMatch" | "InvalidClientTokenId" | "IncompleteSignature" | "MissingAuthenticationToken"
        | "AccessDenied" | "AccessDeniedException" | "AuthorizationError" | "ExpiredToken" | "InvalidSecurity"
        | "UnrecognizedClientException" | "OptInRequired" | "KMSAccessDenied" => {
            ProviderError::Unauthorized { reason }
        }
        _ => match status {
            401 | 403 => ProviderError::Unauthorized { reason },
            408 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after },
            // InvalidParameter, InvalidParameterValue, NotFound, EndpointDisabled, ...
            _ => ProviderError::Permanent { reason },
        },
    }
}

/// Config check of an SNS topic channel's route, with the key to fix.
pub fn validate_route(route: &BusRoute, at: &str) -> Result<(), String> {
    let destinations = std::iter::once(&route.destination).chain(route.events.values().flat_map(|e| &e.destination));
    for d in destinations {
        if !d.starts_with("arn:") || !d.contains(":sns:") {
            return Err(format!(
                "{at}.bus.destination {d:?}: an SNS topic ARN (arn:aws:sns:<region>:<account>:<topic>)"
            ));
        }
    }
    if route.mode == EnvelopeMode::Binary {
        return Err(format!("{at}.bus.mode: SNS topics take structured CloudEvents only"));
    }
    if !route.exchange.is_empty() || route.events.values().any(|e| e.exchange.is_some()) {
        return Err(format!("{at}.bus.exchange is RabbitMQ's; SNS has none"));
    }
    if route.headers.len() > MAX_ATTRIBUTES {
        return Err(format!("{at}.bus.headers: SNS takes at most {MAX_ATTRIBUTES} message attributes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use serde_json::json;

    use super::*;
    use crate::providers::bus::BusMessage;
    use crate::providers::Contact;

    fn topic(destination: &str) -> OutboundMessage {
        OutboundMessage {
            delivery_id: 1,
            idempotency_key: "or1-abc".into(),
            channel_name: String::new(),
            event: "order_shipped".into(),
            payload: json!({"order": 7}),
            contact: None,
            bus: Some(BusMessage {
                route: Arc::new(BusRoute {
                    destination: destination.into(),
                    exchange: String::new(),
                    key: "{recipient}".into(),
                    headers: [("team".to_string(), "ops".to_string())].into(),
                    mode: EnvelopeMode::Structured,
                    source: None,
                    events: Default::default(),
                    ordering: false,
                }),
                source: "/app/public.orders".into(),
                recipient: Some("42".into()),
                time: Utc.with_ymd_and_hms(2026, 11, 27, 3, 0, 0).unwrap(),
            }),
            correlation: None,
            devices: Vec::new(),
        }
    }

    fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
        p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn fifo_topics_get_a_group_and_the_delivery_key_as_deduplication_id() {
        let p = publish_params(&topic("arn:aws:sns:eu-west-3:123456789012:orders.fifo")).unwrap();
        assert_eq!(get(&p, "TopicArn"), Some("arn:aws:sns:eu-west-3:123456789012:orders.fifo"));
        assert_eq!(get(&p, "MessageGroupId"), Some("42"));
        assert_eq!(get(&p, "MessageDeduplicationId"), Some("or1-abc"));
        assert_eq!(get(&p, "MessageAttributes.entry.1.Name"), Some("team"));
        assert_eq!(get(&p, "MessageAttributes.entry.1.Value.StringValue"), Some("ops"));
        let event: serde_json::Value = serde_json::from_str(get(&p, "Message").unwrap()).unwrap();
        assert_eq!((event["id"].clone(), event["data"].clone()), (json!("or1-abc"), json!({"order": 7})));
        let standard = publish_params(&topic("arn:aws:sns:eu-west-3:123456789012:orders")).unwrap();
        assert_eq!(get(&standard, "MessageGroupId"), None);
        assert_eq!(get(&standard, "MessageDeduplicationId"), None);
    }

    #[test]
    fn sms_checks_the_number_and_the_length_before_any_call() {
        let mut m = topic("unused");
        m.bus = None;
        m.contact = Some(Contact {
            address: "+33612345678".into(),
            subject: String::new(),
            body: "Commande 7".into(),
            template: None,
            whatsapp: false,
        });
        let p = publish_params(&m).unwrap();
        assert_eq!((get(&p, "PhoneNumber"), get(&p, "Message")), (Some("+33612345678"), Some("Commande 7")));
        assert_eq!(get(&p, "Action"), Some("Publish"));
        m.contact.as_mut().unwrap().body = "é".repeat(MAX_SMS_CHARS + 1);
        assert!(matches!(publish_params(&m), Err(ProviderError::Permanent { .. })));
        m.contact.as_mut().unwrap().address = "0612345678".into();
        assert!(matches!(publish_params(&m), Err(ProviderError::Permanent { .. })));
    }

    #[test]
    fn deduplication_ids_are_stable_and_fit() {
        assert_eq!(deduplication_id("or1-abc"), "or1-abc");
        let long = "x".repeat(200);
        assert_eq!(deduplication_id(&long).len(), 64);
        assert_eq!(deduplication_id(&long), deduplication_id(&long));
        assert_eq!(deduplication_id("with space").len(), 64);
    }

    #[test]
    fn errors_are_classed_by_code() {
        let xml = |code: &str| {
            format!("<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>m &amp; n</Message></Error></ErrorResponse>")
        };
        let throttled = classify(400, &xml("Throttling"), None);
        assert_eq!(
            throttled,
            ProviderError::Retryable { reason: "sns answered 400 (Throttling): m & n".into(), retry_after: None }
        );
        assert!(matches!(classify(403, &xml("SignatureDoesNotMatch"), None), ProviderError::Unauthorized { .. }));
        assert!(matches!(classify(400, &xml("InvalidParameter"), None), ProviderError::Permanent { .. }));
        assert!(classify(503, "<html>busy</html>", None).is_retryable());
        assert_eq!(xml_text("<a><MessageId>m-1</MessageId></a>", "MessageId").as_deref(), Some("m-1"));
    }

    #[test]
    fn routes_must_name_sns_topics() {
        let route = |d: &str| BusRoute { destination: d.into(), ..topic("x").bus.unwrap().route.as_ref().clone() };
        assert!(validate_route(&route("arn:aws:sns:eu-west-3:1:t"), "channels.t").is_ok());
        assert!(validate_route(&route("notifications"), "channels.t").unwrap_err().contains("topic ARN"));
        let binary = BusRoute { mode: EnvelopeMode::Binary, ..route("arn:aws:sns:eu-west-3:1:t") };
        assert!(validate_route(&binary, "channels.t").unwrap_err().contains("structured"));
    }
}
