//! Providers: the services that carry a delivery to a person.
//!
//! A closed enum rather than trait objects: the set is known at compile time,
//! `match` shows every provider at each decision, and adding one is a compile
//! error everywhere it must be handled.

pub mod ably;
pub mod brevo;
pub mod bus;
mod http;
pub mod log;
pub mod pusher;
pub mod smtp;
pub mod template;
pub mod twilio;

use std::time::Duration;

/// What a provider is asked to deliver: one event on one provider channel.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundMessage {
    /// Ledger row id; for logs and correlation only.
    pub delivery_id: i64,
    /// Stable across retries and restarts; providers that deduplicate (Ably's
    /// message `id`) get it so that a re-send after a crash is dropped there.
    pub idempotency_key: String,
    /// The provider-side channel, template already filled in (`private-user-42`).
    pub channel_name: String,
    pub event: String,
    /// A JSON object: the allow-listed columns or the row's payload.
    pub payload: serde_json::Value,
    /// E-mail, SMS, WhatsApp: where and what, looked up and rendered at send time.
    pub contact: Option<Contact>,
    /// Event-bus channels: the route and what the CloudEvents envelope says of the change.
    pub bus: Option<bus::BusMessage>,
}

/// A message to a person's address, prepared by dispatch just before sending.
#[derive(Clone, PartialEq)]
pub struct Contact {
    /// E-mail address or E.164 number. Personal data: never logged in clear.
    pub address: String,
    pub subject: String,
    pub body: String,
    /// Brevo template for the event, if the channel maps one.
    pub template_id: Option<i64>,
    /// Twilio: over WhatsApp rather than SMS.
    pub whatsapp: bool,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contact")
            .field("address", &template::mask_address(&self.address))
            .field("template_id", &self.template_id)
            .field("whatsapp", &self.whatsapp)
            .finish_non_exhaustive()
    }
}

/// The provider took the message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accepted {
    /// The provider's own id for it, when it returns one (recorded in the ledger).
    pub provider_message_id: Option<String>,
}

/// Why a provider did not take a message. Every variant says whether trying
/// again can help: the dispatcher decides retry-or-not from `is_retryable` alone.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Timeouts, connection resets, 5xx, 429: the same request may succeed later.
    #[error("{reason}")]
    Retryable {
        reason: String,
        /// The provider asked us to wait at least this long (Retry-After).
        retry_after: Option<Duration>,
    },
    /// The provider refused this message for good (4xx other than 429, a payload
    /// over its size limit): retrying sends the same refusal.
    #[error("{reason}")]
    Permanent { reason: String },
    /// The provider refused our credentials. Permanent for the message, and it
    /// needs a human: counted in its own metric for alerting.
    #[error("{reason}")]
    Unauthorized { reason: String },
}

impl ProviderError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }

    /// The same error with `address` masked wherever the provider echoed it
    /// (Twilio's 21211 message quotes the number): the reason goes to the
    /// ledger and the logs, which must not hold contact details.
    pub fn without_address(self, address: &str) -> ProviderError {
        let bare = address.strip_prefix("whatsapp:").unwrap_or(address);
        if bare.is_empty() {
            return self;
        }
        let hide = |r: String| r.replace(bare, &template::mask_address(bare));
        match self {
            ProviderError::Retryable { reason, retry_after } => {
                ProviderError::Retryable { reason: hide(reason), retry_after }
            }
            ProviderError::Permanent { reason } => ProviderError::Permanent { reason: hide(reason) },
            ProviderError::Unauthorized { reason } => ProviderError::Unauthorized { reason: hide(reason) },
        }
    }
}

/// The provider clients, built once from config and shared by dispatch workers.
#[derive(Clone, Debug)]
pub enum Provider {
    Pusher(pusher::Pusher),
    Ably(ably::Ably),
    Brevo(brevo::Brevo),
    Smtp(smtp::Smtp),
    Twilio(twilio::Twilio),
    Log(log::Log),
    Kafka(bus::kafka::Kafka),
    Rabbitmq(bus::rabbitmq::Rabbitmq),
    Redis(bus::redis::RedisStreams),
    Nats(bus::nats::Nats),
}

/// Sends one message at a time per provider call, all of a batch at once.
async fn each<'a, F, Fut>(messages: &'a [OutboundMessage], send: F) -> Vec<Result<Accepted, ProviderError>>
where
    F: Fn(&'a OutboundMessage) -> Fut,
    Fut: std::future::Future<Output = Result<Accepted, ProviderError>> + 'a,
{
    futures_util::future::join_all(messages.iter().map(send)).await
}

impl Provider {
    /// Stable name for the ledger, logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Pusher(_) => "pusher",
            Provider::Ably(_) => "ably",
            Provider::Brevo(_) => "brevo",
            Provider::Smtp(_) => "smtp",
            Provider::Twilio(_) => "twilio",
            Provider::Log(_) => "log",
            Provider::Kafka(_) => "kafka",
            Provider::Rabbitmq(_) => "rabbitmq",
            Provider::Redis(_) => "redis",
            Provider::Nats(_) => "nats",
        }
    }

    /// Messages per `send_batch` call that dispatch aims for: what the provider
    /// takes in one HTTP call. Each call's outcome is recorded as soon as it
    /// returns, so this also bounds the re-sends a crash can cause per call.
    pub fn batch_size(&self) -> usize {
        match self {
            Provider::Pusher(_) => pusher::MAX_EVENTS_PER_CALL,
            // Ably deduplicates re-sends by id; a few per call keeps statements few.
            Provider::Ably(_) => 10,
            // One HTTP call or SMTP transaction per message; a few per chunk.
            Provider::Brevo(_) | Provider::Smtp(_) | Provider::Twilio(_) => 10,
            Provider::Log(_) => 100,
            // Published at once and confirmed one by one: a batch is one round
            // trip's worth, and what a crash may re-send.
            Provider::Kafka(_) | Provider::Rabbitmq(_) | Provider::Redis(_) | Provider::Nats(_) => 50,
        }
    }

    /// Delivers `messages`, as few HTTP calls as the provider allows.
    ///
    /// Contract: returns exactly one result per message, in the same order. May
    /// be called concurrently from several workers. Calling it twice with the
    /// same message may deliver it twice, except where the provider deduplicates
    /// on `idempotency_key` (Ably, JetStream, the Redis sink). `Ok` means the provider accepted the message:
    /// it is the point after which the ledger marks it sent.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        match self {
            Provider::Pusher(p) => p.send_batch(messages).await,
            Provider::Ably(p) => p.send_batch(messages).await,
            Provider::Brevo(p) => each(messages, |m| p.send(m)).await,
            Provider::Smtp(p) => each(messages, |m| p.send(m)).await,
            Provider::Twilio(p) => each(messages, |m| p.send(m)).await,
            Provider::Log(p) => p.send_batch(messages).await,
            Provider::Kafka(p) => p.send_batch(messages).await,
            Provider::Rabbitmq(p) => p.send_batch(messages).await,
            Provider::Redis(p) => p.send_batch(messages).await,
            Provider::Nats(p) => p.send_batch(messages).await,
        }
    }
}

/// The HTTP client every provider shares, so connections (and TLS sessions)
/// to a provider stay open between batches instead of being set up per call.
/// Per-request timeouts come from each provider's config, not from here.
pub fn http_client() -> reqwest::Client {
    http_builder()
        .build()
        // Building only fails if the TLS backend cannot initialise; the
        // default client has the same backend, so this is a last resort that
        // keeps startup going rather than a silent downgrade.
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// [`http_client`], also trusting the CAs of `tls.ca_file` (an inspecting
/// proxy's, say). A bundle that cannot be read or parsed stops the start.
pub fn http_client_with(tls: &crate::config::TlsConfig) -> Result<reqwest::Client, ProviderError> {
    let mut builder = http_builder();
    if let Some(path) = &tls.ca_file {
        let bad = |e: String| ProviderError::Permanent { reason: format!("tls.ca_file {path}: {e}") };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in the file".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| ProviderError::Permanent { reason: format!("HTTP client: {e}") })
}

fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        // Never follow: a 302 would turn a POST into a GET that "succeeds" and
        // the message would be recorded sent. A redirect is the provider's
        // answer, classified like any other status.
        .redirect(reqwest::redirect::Policy::none())
}
