//! Kafka sink: an idempotent producer, `acks=all`, the delivery key as the
//! CloudEvents `id`.
//!
//! librdkafka's idempotent producer numbers each message, so its own retries
//! (a lost acknowledgement, a leader change) never write a message twice, and
//! a message is `sent` only once every in-sync replica has it. A re-send after
//! the relay itself crashed comes from a new producer session, which Kafka
//! cannot tell from a new message short of transactions: those re-sends are
//! counted (`resends_after_restart`) and carry the same `id` for consumers.
//! https://kafka.apache.org/documentation/#producerconfigs_enable.idempotence

mod config;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub use self::config::{KafkaConfig, PROFILE};
use super::envelope;
use super::{retryable, short, too_large};
use crate::providers::{Accepted, OutboundMessage, ProviderError};

/// Kafka binding of CloudEvents: headers prefixed `ce_`.
/// https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md
const CE_PREFIX: &str = "ce_";

/// Properties that make "exactly once per producer session" hold; the
/// `properties` table may not weaken them. (`enable.gapless.guarantee` is
/// left off: it turns a failed batch into a fatal error that stops the
/// producer, while the ledger retries failures anyway.)
const FIXED: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KafkaConfig,
    /// The producer and its generation. An idempotent producer can hit a
    /// fatal error (librdkafka's `ERR__FATAL`: a sequence it cannot repair)
    /// after which it refuses everything; it is replaced by a new one, once
    /// per generation however many sends saw the error.
    producer: std::sync::Mutex<(u64, FutureProducer)>,
    max_message_bytes: usize,
    timeout: Duration,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka").finish_non_exhaustive()
    }
}

impl Kafka {
    pub fn build(cfg: &KafkaConfig, _: &crate::providers::BuildContext) -> Result<Kafka, ProviderError> {
        Kafka::new(cfg)
    }

    /// Builds the producer; it connects in the background. A property
    /// librdkafka refuses is a configuration error, reported at start.
    pub fn new(cfg: &KafkaConfig) -> Result<Kafka, ProviderError> {
        Ok(Kafka {
            inner: Arc::new(Inner {
                producer: std::sync::Mutex::new((0, create(cfg)?)),
                cfg: cfg.clone(),
                max_message_bytes: cfg.max_message_bytes,
                timeout: Duration::from_millis(cfg.timeout_ms),
            }),
        })
    }

    /// The producer in use now (tests inject faults into it).
    #[doc(hidden)]
    pub fn producer(&self) -> FutureProducer {
        self.current().1
    }

    fn current(&self) -> (u64, FutureProducer) {
        self.inner.producer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces generation `seen`'s producer after a fatal error, unless
    /// another send already did.
    fn replace(&self, seen: u64) {
        let mut slot = self.inner.producer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.0 == seen {
            match create(&self.inner.cfg) {
                Ok(fresh) => *slot = (seen + 1, fresh),
                Err(e) => tracing::warn!(error = %e, "kafka: could not replace the producer after a fatal error"),
            }
        }
    }

    /// One result per message, same order; all handed to librdkafka at once,
    /// which batches them per partition.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        join_all(messages.iter().map(|m| self.send(m))).await
    }

    async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let out = envelope::build(m, CE_PREFIX)?;
        let size = envelope::size(&out);
        if size > self.inner.max_message_bytes {
            return Err(too_large("kafka", size, self.inner.max_message_bytes));
        }
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len() + 1)
            .insert(Header { key: "content-type", value: Some(out.content_type) });
        for (k, v) in &out.headers {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let mut record = FutureRecord::to(&out.destination).payload(&out.body).headers(headers);
        if !out.key.is_empty() {
            record = record.key(&out.key);
        }
        let (generation, producer) = self.current();
        match producer.send(record, self.inner.timeout).await {
            Ok(d) => {
                Ok(Accepted { provider_message_id: Some(format!("{}/{}@{}", out.destination, d.partition, d.offset)) })
            }
            Err((e, _)) => {
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
                    self.replace(generation);
                    return Err(retryable(short(format!("kafka: producer failed fatally, replaced: {e}"))));
                }
                Err(classify(e, &out.destination))
            }
        }
    }
}

fn create(cfg: &KafkaConfig) -> Result<FutureProducer, ProviderError> {
    client_config(cfg)
        .create()
        .map_err(|e| ProviderError::Permanent { reason: short(format!("kafka: providers.kafka: {e}")) })
}

/// librdkafka's settings: `properties` first, then ours, which win.
fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (k, v) in &cfg.properties {
        client.set(k, v.expose());
    }
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("message.timeout.ms", cfg.timeout_ms.to_string())
        .set("message.max.bytes", cfg.max_message_bytes.max(1000).to_string())
        .set("allow.auto.create.topics", cfg.create_missing.to_string())
        // Small batches go out at once: the relay batches already.
        .set("linger.ms", "2");
    for (k, v) in FIXED {
        client.set(k, v);
    }
    client
}

/// Authentication and authorisation need a human; a message the broker finds
/// too large or invalid fails again; an unknown topic waits (retryable) for
/// someone to create it; the rest — timeouts, brokers down, leader changes —
/// may pass later.
fn classify(e: KafkaError, topic: &str) -> ProviderError {
    use RDKafkaErrorCode as C;
    let reason = short(format!("kafka: {e}"));
    match e.rdkafka_error_code() {
        Some(
            C::SaslAuthenticationFailed
            | C::Authentication
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed,
        ) => ProviderError::Unauthorized { reason },
        Some(
            C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::InvalidRecord,
        ) => ProviderError::Permanent { reason },
        Some(C::UnknownTopicOrPartition | C::UnknownTopic) => {
            retryable(format!("kafka: topic {topic:?} does not exist (providers.kafka.create_missing = false)"))
        }
        _ => retryable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn properties_cannot_weaken_idempotence() {
        let cfg = KafkaConfig {
            brokers: "b:9092".into(),
            timeout_ms: 10_000,
            create_missing: false,
            max_message_bytes: 1_000_000,
            properties: [
                ("acks".to_string(), Secret::new("1")),
                ("enable.idempotence".to_string(), Secret::new("false")),
                ("security.protocol".to_string(), Secret::new("sasl_plaintext")),
            ]
            .into(),
        };
        let c = client_config(&cfg);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"), "other properties pass through");
        assert_eq!(c.get("allow.auto.create.topics"), Some("false"));
    }
}
