//! E-mail over SMTP with lettre: `smtp://host:port` (plain, for a local relay
//! or sink), `smtp://host:port?tls=required` (STARTTLS), `smtps://host:port`
//! (implicit TLS), `smtp://host:port?tls=opportunistic` (STARTTLS when the
//! server offers it); credentials in the URL or in `username`/`password`. The
//! Message-ID derives from the ledger's idempotency key, so a re-send after a
//! crash is recognisable as the same message.
//!
//! Credentials never cross an unencrypted connection unless the config says
//! `allow_insecure_auth = true` (a relay on localhost): a plain URL with
//! credentials is refused at start, and an opportunistic connection whose
//! server offers no STARTTLS — which is what an attacker stripping STARTTLS
//! looks like — is refused before AUTH. Without credentials such a message
//! goes out in clear, as opportunistic TLS allows, but never silently: a
//! warning and `outbox_relay_smtp_starttls_missing_total`. `tls.ca_file` adds
//! CAs to trust (an internal relay's).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{SmtpConfig, PROFILE};
use super::TlsConfig;
use crate::secret::redact_url;
use crate::telemetry::metric;

#[derive(Clone)]
pub struct Smtp {
    mode: Mode,
    from: Mailbox,
    /// Messages sent in clear because the server offered no STARTTLS.
    starttls_missing: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Mode {
    /// Plain (no credentials, or allowed), STARTTLS required, or implicit TLS:
    /// lettre's pooled transport, whose encryption is known in advance.
    Pooled(AsyncSmtpTransport<Tokio1Executor>),
    /// STARTTLS if offered: one connection per message, so that each one's
    /// encryption is seen before AUTH and counted when missing.
    Opportunistic(Box<Opportunistic>),
}

#[derive(Clone)]
struct Opportunistic {
    host: String,
    port: u16,
    tls: TlsParameters,
    hello: ClientId,
    credentials: Option<Credentials>,
    allow_insecure_auth: bool,
    timeout: Duration,
}

impl fmt::Debug for Smtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smtp").field("from", &self.from).finish_non_exhaustive()
    }
}

impl Smtp {
    pub fn build(cfg: &SmtpConfig, ctx: &super::BuildContext) -> Result<Smtp, ProviderError> {
        Smtp::with_tls(cfg, &ctx.tls)
    }

    pub fn new(cfg: &SmtpConfig) -> Result<Smtp, ProviderError> {
        Smtp::with_tls(cfg, &TlsConfig::default())
    }

    /// With `tls.ca_file`'s CAs trusted besides the usual roots.
    pub fn with_tls(cfg: &SmtpConfig, tls: &TlsConfig) -> Result<Smtp, ProviderError> {
        let bad = |what: String| ProviderError::Permanent { reason: what };
        let shown = redact_url(&cfg.url);
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| bad(format!("providers.smtp.url {shown}: {e}")))?;
        let host = url.host_str().ok_or_else(|| bad(format!("providers.smtp.url {shown}: no host")))?.to_string();
        let security = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        // Ports as lettre's from_url chooses them: 25, 587 with STARTTLS, 465 for smtps.
        let (port, wanted) = match (url.scheme(), security.as_deref()) {
            ("smtp", None) => (25, "plain"),
            ("smtp", Some("required")) => (587, "required"),
            ("smtp", Some("opportunistic")) => (587, "opportunistic"),
            ("smtps", _) => (465, "wrapper"),
            (scheme, t) => {
                return Err(bad(format!(
                "providers.smtp.url {shown}: scheme {scheme:?} with tls={t:?}: use smtp://, smtp://...?tls=required, \
                     smtp://...?tls=opportunistic or smtps://"
            )))
            }
        };
        let port = url.port().unwrap_or(port);
        let decode = |s: &str| form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
        let mut credentials = match (url.username(), url.password()) {
            ("", _) | (_, None) => None,
            (user, Some(pw)) => Some(Credentials::new(
                decode(user).unwrap_or_default(),
                decode(&pw.replace('+', "%2B")).unwrap_or_default(),
            )),
        };
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            credentials = Some(Credentials::new(user.clone(), password.expose().to_string()));
        }
        if credentials.is_some() && wanted == "plain" && !cfg.allow_insecure_auth {
            return Err(bad(format!(
                "providers.smtp: credentials over an unencrypted connection ({shown}): use smtps:// or \
                 ?tls=required, or set allow_insecure_auth = true for a relay on this machine"
            )));
        }
        let mut params = TlsParameters::builder(host.clone());
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path).map_err(|e| bad(format!("tls.ca_file {path}: {e}")))?;
            let certs = Certificate::from_pem(&pem).map_err(|e| bad(format!("tls.ca_file {path}: {e}")))?;
            params = params.add_root_certificate(certs);
        }
        let params = params.build().map_err(|e| bad(format!("providers.smtp TLS: {e}")))?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let hello = match url.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_string()),
        };
        let mode = match wanted {
            "opportunistic" => Mode::Opportunistic(Box::new(Opportunistic {
                host,
                port,
                tls: params,
                hello,
                credentials,
                allow_insecure_auth: cfg.allow_insecure_auth,
                timeout,
            })),
            _ => {
                let tls = match wanted {
                    "plain" => Tls::None,
                    "required" => Tls::Required(params),
                    _ => Tls::Wrapper(params),
                };
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .tls(tls)
                    .hello_name(hello)
                    .timeout(Some(timeout));
                if let Some(c) = credentials {
                    builder = builder.credentials(c);
                }
                Mode::Pooled(builder.build())
            }
        };
        let from = cfg.from.parse().map_err(|e| bad(format!("providers.smtp.from {:?}: {e}", cfg.from)))?;
        Ok(Smtp { mode, from, starttls_missing: Arc::new(AtomicU64::new(0)) })
    }

    /// Messages this client sent in clear because the server offered no STARTTLS.
    pub fn starttls_missing(&self) -> u64 {
        self.starttls_missing.load(Ordering::Relaxed)
    }

    /// One API call (SMTP transaction) per message, the batch's at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        super::each(messages, |m| self.send(m)).await
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
        let sent = match &self.mode {
            Mode::Pooled(transport) => transport.send(email).await.map(|_| ()),
            Mode::Opportunistic(o) => self.send_opportunistic(o, &email).await?,
        };
        match sent {
            Ok(()) => Ok(Accepted { provider_message_id: Some(message_id) }),
            Err(e) => Err(classify(e)),
        }
    }

    /// One connection for one message: STARTTLS when offered; when not, a
    /// warning and a count, and no AUTH in clear unless allowed. The outer
    /// error is our own refusal, the inner one lettre's.
    async fn send_opportunistic(
        &self,
        o: &Opportunistic,
        email: &Message,
    ) -> Result<Result<(), lettre::transport::smtp::Error>, ProviderError> {
        let connected =
            AsyncSmtpConnection::connect_tokio1((o.host.as_str(), o.port), Some(o.timeout), &o.hello, None, None).await;
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        if conn.can_starttls() {
            if let Err(e) = conn.starttls(o.tls.clone(), &o.hello).await {
                conn.abort().await;
                return Ok(Err(e));
            }
        } else {
            self.starttls_missing.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::SMTP_STARTTLS_MISSING).increment(1);
            tracing::warn!(host = %o.host, port = o.port,
                "the SMTP server offered no STARTTLS (tls=opportunistic): this message travels unencrypted; \
                 use ?tls=required if it must not");
        }
        if let Some(credentials) = &o.credentials {
            if !conn.is_encrypted() && !o.allow_insecure_auth {
                conn.abort().await;
                return Err(ProviderError::Retryable {
                    reason: format!(
                        "smtp: {}:{} offered no STARTTLS, and credentials are not sent in clear \
                         (allow_insecure_auth = false); a STARTTLS-stripping middlebox looks like this",
                        o.host, o.port
                    ),
                    retry_after: None,
                });
            }
            if let Err(e) = conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await {
                conn.abort().await;
                return Ok(Err(e));
            }
        }
        let sent = conn.send(email.envelope(), &email.formatted()).await.map(|_| ());
        if sent.is_ok() {
            // The message is accepted; a failed goodbye changes nothing.
            let _ = conn.quit().await;
        } else {
            conn.abort().await;
        }
        Ok(sent)
    }
}

fn classify(e: lettre::transport::smtp::Error) -> ProviderError {
    // 5xx: the server refuses this message for good (RFC 5321 §4.2.1).
    if e.is_permanent() {
        ProviderError::Permanent { reason: format!("smtp: {e}") }
    } else {
        // 4xx, connection, TLS, timeout: try again later.
        ProviderError::Retryable { reason: format!("smtp: {e}"), retry_after: None }
    }
}
