//! `[providers.kafka]`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:9092,host2:9092`.
    pub brokers: String,
    /// Until the message is acknowledged by all in-sync replicas
    /// (librdkafka's `message.timeout.ms`, retries included).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A topic that does not exist: let the broker create it (when the broker
    /// allows it, `auto.create.topics.enable`) or, `false`, refuse and retry
    /// until someone creates it.
    #[serde(default)]
    pub create_missing: bool,
    /// librdkafka's `message.max.bytes`: bigger messages fail at once.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// SASL (`security.protocol = "sasl_plaintext"` / `"sasl_ssl"`,
    /// `sasl.mechanism = "PLAIN"`, ...) and any other librdkafka property.
    /// The idempotence settings cannot be overridden here.
    #[serde(default)]
    pub properties: BTreeMap<String, Secret>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Kafka's own default `message.max.bytes` (broker side, about 1 MB).
fn default_max_message_bytes() -> usize {
    1_000_000
}

/// Sends in flight at once; librdkafka batches them per partition anyway.
pub const PROFILE: Profile = Profile {
    // Buses have no rate limit to respect: only how many calls are in flight.
    limits: LimitConfig { concurrency: 32, per_second: 0.0 },
    // Published at once and confirmed one by one: a batch is one round
    // trip's worth, and what a crash may re-send.
    batch_size: 50,
    reach: Reach::Bus,
};

impl Section for KafkaConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
