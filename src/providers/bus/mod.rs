//! Event-bus sinks: RabbitMQ, Redis Streams, NATS JetStream and Kafka.
//!
//! A bus channel does not reach a person: it puts each delivery on the team's
//! bus once, as one CloudEvents 1.0 event, for their own consumers. Each sink
//! lives in its own folder (config, client, limits); what they share is here:
//! the channel's `[channels.<name>.bus]` route, placeholders, the envelope and
//! a lazily (re)made connection.
//!
//! "Exactly once" is the bus's to keep, and only some can: JetStream drops a
//! repeated `Nats-Msg-Id` within its window, the Redis sink adds under a
//! script that refuses a key already added. Elsewhere the CloudEvents `id`
//! (= the delivery key) lets consumers drop repeats. docs/providers.md says
//! what each sink guarantees and which test shows it.

pub mod envelope;
pub mod kafka;
pub mod nats;
pub mod pubsub;
pub mod rabbitmq;
pub mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::ProviderError;

/// `[channels.<name>.bus]`: where and how a bus channel's deliveries go.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BusRoute {
    /// Topic (Kafka), routing key (RabbitMQ), stream key (Redis), subject
    /// (NATS); `{event}` and `{recipient}` are filled in per delivery.
    pub destination: String,
    /// RabbitMQ only: the exchange; empty = the default exchange, which routes
    /// to the queue named by the routing key.
    #[serde(default)]
    pub exchange: String,
    /// Message key: Kafka's partitioning key and the CloudEvents
    /// `partitionkey` everywhere. Default: the recipient, so one person's
    /// events stay in order.
    #[serde(default = "default_key")]
    pub key: String,
    /// Fixed headers on every message (same placeholders).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: EnvelopeMode,
    /// CloudEvents `source` before `/<schema.table>`. Default: `/<database>`.
    #[serde(default)]
    pub source: Option<String>,
    /// Per event: a different destination, key, exchange or more headers.
    #[serde(default)]
    pub events: BTreeMap<String, EventRoute>,
    /// Pub/Sub only: publish with `orderingKey` = the message key, so that a
    /// subscription with message ordering gets one key's (one person's)
    /// messages in order. Off by default: ordered publishing is slower and
    /// needs ordering enabled on the subscription.
    #[serde(default)]
    pub ordering: bool,
}

fn default_key() -> String {
    "{recipient}".into()
}

/// `[channels.<name>.bus.events.<event>]`: overrides for one event.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventRoute {
    #[serde(default)]
    pub destination: Option<String>,
    #[serde(default)]
    pub exchange: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// Added to (and overriding) the channel's headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// CloudEvents content modes (https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md#message).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EnvelopeMode {
    /// The whole event as one JSON body, `application/cloudevents+json`.
    #[default]
    Structured,
    /// The payload as body, the attributes as `ce` headers.
    Binary,
}

impl BusRoute {
    /// CloudEvents `source` before `/<schema.table>`: `bus.source`, else `/<database>`.
    pub fn source_prefix(&self, database: &str) -> String {
        self.source.clone().unwrap_or_else(|| format!("/{database}"))
    }

    /// Config check, with the key to fix in the message.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.destination.trim().is_empty() {
            return Err(format!("{at}.bus.destination is empty: name the topic, routing key, stream or subject"));
        }
        for (event, r) in &self.events {
            if r.destination.as_deref().is_some_and(|d| d.trim().is_empty()) {
                return Err(format!("{at}.bus.events.{event}.destination is empty"));
            }
        }
        Ok(())
    }
}

/// What a bus sink needs beyond the generic message: the channel's route and
/// what the envelope says about the change.
#[derive(Clone, Debug, PartialEq)]
pub struct BusMessage {
    pub route: Arc<BusRoute>,
    /// CloudEvents `source`: `/<database>/<schema.table>` by default.
    pub source: String,
    pub recipient: Option<String>,
    /// The source transaction's commit time: CloudEvents `time`.
    pub time: DateTime<Utc>,
}

/// Fills `{event}` and `{recipient}`.
pub fn fill(template: &str, event: &str, recipient: &str) -> String {
    template.replace("{event}", event).replace("{recipient}", recipient)
}

/// A connection made on first use and again after it broke. Sinks keep one
/// per client: reconnecting per message would cost a handshake each time,
/// never reconnecting would make a broker restart permanent.
pub(crate) struct Lazy<T: Clone> {
    slot: tokio::sync::Mutex<Option<T>>,
}

impl<T: Clone> Default for Lazy<T> {
    fn default() -> Self {
        Lazy { slot: tokio::sync::Mutex::new(None) }
    }
}

impl<T: Clone> Lazy<T> {
    /// The live connection, or a new one from `connect`. The lock is held while
    /// connecting so that a burst of workers after an outage makes one
    /// connection, not one each.
    pub(crate) async fn get<F, Fut>(&self, connect: F) -> Result<T, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = connect().await?;
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Forgets the connection after a transport error: the next call reconnects.
    pub(crate) async fn reset(&self) {
        *self.slot.lock().await = None;
    }
}

/// A sink refused a message it cannot take: the reason for the ledger.
pub(crate) fn too_large(sink: &str, size: usize, max: usize) -> ProviderError {
    ProviderError::Permanent { reason: format!("{sink}: message of {size} bytes exceeds the limit of {max} bytes") }
}

pub(crate) fn retryable(reason: String) -> ProviderError {
    ProviderError::Retryable { reason, retry_after: None }
}

/// Stays within one limit so that a broker's long error text does not bloat ledger rows.
pub(crate) fn short(s: impl std::fmt::Display) -> String {
    let s = s.to_string();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(fill("user.{recipient}.{event}", "order_shipped", "42"), "user.42.order_shipped");
    }

    #[test]
    fn route_defaults_and_overrides_parse() {
        let r: BusRoute = toml_route(
            r#"destination = "n.{event}"
               mode = "binary"
               headers = { team = "growth" }
               events.order_shipped = { destination = "orders", key = "{event}" }"#,
        );
        assert_eq!(r.key, "{recipient}");
        assert_eq!(r.mode, EnvelopeMode::Binary);
        assert_eq!(r.events["order_shipped"].destination.as_deref(), Some("orders"));
        assert!(r.validate("channels.x").is_ok());
        assert_eq!(r.source_prefix("app"), "/app");
        let named: BusRoute = toml_route(
            r#"destination = "x"
               source = "//db.example.com/app""#,
        );
        assert_eq!(named.source_prefix("app"), "//db.example.com/app");
        let empty: BusRoute = toml_route(r#"destination = " ""#);
        assert!(empty.validate("channels.x").unwrap_err().contains("destination"));
    }

    fn toml_route(s: &str) -> BusRoute {
        config::Config::builder()
            .add_source(config::File::from_str(s, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }
}
