//! RabbitMQ (AMQP 0-9-1) sink: persistent, mandatory publishes under
//! publisher confirms.
//!
//! A message is `sent` only once the broker acknowledged it (a confirm: the
//! broker has it, on disk for a persistent message in a durable queue). A
//! message no queue takes comes back (`basic.return`, thanks to `mandatory`)
//! and fails permanently rather than vanishing. `message_id` carries the
//! delivery key so consumers can drop the re-sends a crash between the
//! broker's confirm and the ledger's write may cause: AMQP has no publisher
//! de-duplication, so those are counted (`resends_after_restart`), not avoided.
//! https://www.rabbitmq.com/docs/confirms#publisher-confirms

mod config;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};

pub use self::config::{RabbitmqConfig, PROFILE};
use super::envelope::{self, Outgoing};
use super::{retryable, short, too_large, Lazy};
use crate::providers::{Accepted, OutboundMessage, ProviderError};

/// AMQP binding of CloudEvents: application properties prefixed `cloudEvents:`.
/// https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/amqp-protocol-binding.md
const CE_PREFIX: &str = "cloudEvents:";

#[derive(Clone)]
struct Link {
    /// Kept so the connection lives as long as its channel is in use.
    _connection: Arc<Connection>,
    channel: Channel,
}

#[derive(Clone)]
pub struct Rabbitmq {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RabbitmqConfig,
    link: Lazy<Link>,
}

impl std::fmt::Debug for Rabbitmq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rabbitmq").field("url", &crate::secret::redact_url(self.inner.cfg.url.expose())).finish()
    }
}

impl Rabbitmq {
    pub fn build(cfg: &RabbitmqConfig, _: &crate::providers::BuildContext) -> Result<Rabbitmq, ProviderError> {
        Ok(Rabbitmq::new(cfg))
    }

    pub fn new(cfg: &RabbitmqConfig) -> Rabbitmq {
        Rabbitmq { inner: Arc::new(Inner { cfg: cfg.clone(), link: Lazy::default() }) }
    }

    /// One result per message, same order; all published at once on one
    /// channel, each waiting for its own confirm.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        join_all(messages.iter().map(|m| self.send(m))).await
    }

    async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let out = envelope::build(m, CE_PREFIX)?;
        let size = envelope::size(&out);
        if size > self.inner.cfg.max_message_bytes {
            return Err(too_large("rabbitmq", size, self.inner.cfg.max_message_bytes));
        }
        let timeout = Duration::from_millis(self.inner.cfg.timeout_ms);
        let attempt = async {
            match self.publish(&out).await {
                Err(Failure::NotFound(_)) if self.inner.cfg.create_missing && !out.exchange.is_empty() => {
                    self.declare(&out.exchange).await?;
                    self.publish(&out).await.map_err(|f| f.into_error())
                }
                other => other.map_err(|f| f.into_error()),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => {
                // The confirm may still come, on a channel we no longer trust.
                self.inner.link.reset().await;
                Err(retryable(format!("rabbitmq: no confirm within {} ms", timeout.as_millis())))
            }
        }
    }

    async fn link(&self) -> Result<Link, ProviderError> {
        let url = self.inner.cfg.url.expose().to_string();
        self.inner
            .link
            .get(|| async move {
                let connection = Connection::connect(&url, ConnectionProperties::default()).await.map_err(classify)?;
                let channel = connection.create_channel().await.map_err(classify)?;
                channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(classify)?;
                Ok(Link { _connection: Arc::new(connection), channel })
            })
            .await
    }

    async fn publish(&self, out: &Outgoing) -> Result<Accepted, Failure> {
        let link = self.link().await.map_err(Failure::Other)?;
        let result = async {
            let confirm = link
                .channel
                .basic_publish(
                    &out.exchange,
                    &out.destination,
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &out.body,
                    properties(out),
                )
                .await?;
            confirm.await
        }
        .await;
        match result {
            Ok(Confirmation::Ack(None)) => Ok(Accepted { provider_message_id: None }),
            Ok(Confirmation::Ack(Some(returned))) => Err(Failure::Other(ProviderError::Permanent {
                reason: format!(
                    "rabbitmq: returned unroutable ({} {}): no queue is bound for exchange {:?}, routing key {:?}",
                    returned.reply_code, returned.reply_text, out.exchange, out.destination
                ),
            })),
            Ok(Confirmation::Nack(_)) => {
                Err(Failure::Other(retryable("rabbitmq: the broker nacked the message (it could not store it)".into())))
            }
            Ok(Confirmation::NotRequested) => {
                self.inner.link.reset().await;
                Err(Failure::Other(retryable("rabbitmq: channel not in confirm mode; reconnecting".into())))
            }
            Err(e) => {
                // A channel error closes the channel (404, 406): start over on a new one.
                self.inner.link.reset().await;
                if amqp_code(&e) == Some(404) {
                    return Err(Failure::NotFound(format!("rabbitmq: exchange {:?} does not exist", out.exchange)));
                }
                Err(Failure::Other(classify(e)))
            }
        }
    }

    async fn declare(&self, exchange: &str) -> Result<(), ProviderError> {
        let link = self.link().await?;
        let kind = match self.inner.cfg.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            "topic" => ExchangeKind::Topic,
            other => ExchangeKind::Custom(other.to_string()),
        };
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let declared = link.channel.exchange_declare(exchange, kind, options, FieldTable::default()).await;
        if declared.is_err() {
            self.inner.link.reset().await;
        }
        declared.map_err(classify)
    }
}

/// A missing exchange is told apart so that `create_missing` can act on it.
enum Failure {
    NotFound(String),
    Other(ProviderError),
}

impl Failure {
    /// Missing exchange, refused by config: retryable, so the deliveries wait
    /// (until `max_attempts` / `max_age_s`) for someone to declare it.
    fn into_error(self) -> ProviderError {
        match self {
            Failure::NotFound(reason) => retryable(format!("{reason} (providers.rabbitmq.create_missing = false)")),
            Failure::Other(e) => e,
        }
    }
}

fn properties(out: &Outgoing) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &out.headers {
        headers.insert(ShortString::from(k.as_str()), AMQPValue::LongString(LongString::from(v.as_bytes())));
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(out.id.as_str()))
        .with_content_type(ShortString::from(out.content_type))
        // 2 = persistent: written to disk in a durable queue before the confirm.
        .with_delivery_mode(2)
        .with_app_id(ShortString::from("outbox-relay"))
        .with_headers(headers)
}

fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// 403 (credentials, vhost permissions) needs a human; 311/406 (too large,
/// precondition) refuse the same message again; the rest (I/O, a closed
/// connection, 320 broker shutting down, 5xx) may pass on a new connection.
fn classify(e: lapin::Error) -> ProviderError {
    let text = e.to_string();
    let reason = short(format!("rabbitmq: {text}"));
    match amqp_code(&e) {
        Some(403) | Some(530) => ProviderError::Unauthorized { reason },
        Some(311) | Some(406) => ProviderError::Permanent { reason },
        // RabbitMQ closes the socket after a failed login rather than always
        // sending connection.close; the handshake error says so in words.
        _ if text.contains("ACCESS_REFUSED") || text.contains("ACCESS-REFUSED") || text.contains("authentication") => {
            ProviderError::Unauthorized { reason }
        }
        _ => retryable(reason),
    }
}
