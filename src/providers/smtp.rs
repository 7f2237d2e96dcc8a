//! E-mail over SMTP with lettre: `smtp://host:port` (plain, for a local relay
//! or sink), `smtp://host:port?tls=required` (STARTTLS), `smtps://host:port`
//! (implicit TLS); credentials in the URL or in `username`/`password`. The
//! Message-ID derives from the ledger's idempotency key, so a re-send after a
//! crash is recognisable as the same message.

use std::fmt;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Deserialize;

use super::{Accepted, OutboundMessage, ProviderError};
use crate::config::{redact_url, Secret};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// May carry credentials: never logged in clear.
    pub url: String,
    /// `Alerts <alerts@example.com>`.
    pub from: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("url", &redact_url(&self.url))
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Clone)]
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp").field("from", &self.from).finish_non_exhaustive()
    }
}

impl Smtp {
    pub fn new(cfg: &SmtpConfig) -> Result<Smtp, ProviderError> {
        let bad = |what: String| ProviderError::Permanent { reason: what };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&cfg.url)
            .map_err(|e| bad(format!("providers.smtp.url {}: {e}", redact_url(&cfg.url))))?
            .timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.expose().to_string()));
        }
        let from = cfg.from.parse().map_err(|e| bad(format!("providers.smtp.from {:?}: {e}", cfg.from)))?;
        Ok(Smtp { transport: builder.build(), from })
    }

    pub async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let Some(contact) = &m.contact else {
            return Err(ProviderError::Permanent { reason: "smtp: no address for this delivery".into() });
        };
        let to: Mailbox = contact
            .address
            .parse()
            .map_err(|e| ProviderError::Permanent { reason: format!("not an e-mail address: {e}") })?;
        let message_id = format!("<{}@outbox-relay>", m.idempotency_key);
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(contact.subject.clone())
            .message_id(Some(message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(contact.body.clone())
            .map_err(|e| ProviderError::Permanent { reason: format!("building the e-mail: {e}") })?;
        match self.transport.send(email).await {
            Ok(_) => Ok(Accepted { provider_message_id: Some(message_id) }),
            // 5xx: the server refuses this message for good (RFC 5321 §4.2.1).
            Err(e) if e.is_permanent() => Err(ProviderError::Permanent { reason: format!("smtp: {e}") }),
            // 4xx, connection, TLS, timeout: try again later.
            Err(e) => Err(ProviderError::Retryable { reason: format!("smtp: {e}"), retry_after: None }),
        }
    }
}
