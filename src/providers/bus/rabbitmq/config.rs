//! `[providers.rabbitmq]`.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqConfig {
    /// `amqp://user:password@host:5672/vhost` (`%2f` is the `/` vhost);
    /// `amqps://` for TLS. Never logged.
    pub url: Secret,
    /// Per publish, until the broker's confirm.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// An exchange that does not exist: declare it (durable, of
    /// `exchange_type`) rather than refuse the message. Queues and bindings
    /// stay the consumers' business: a message no queue takes is returned.
    #[serde(default)]
    pub create_missing: bool,
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    /// Bigger messages fail at once instead of closing the channel at the
    /// broker; RabbitMQ's own `max_message_size` is 128 MiB by default.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_exchange_type() -> String {
    "topic".into()
}

fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}

/// Publishes in flight at once across workers: confirms are pipelined on one
/// channel, so more only queue up inside the client.
pub const PROFILE: Profile = Profile {
    // Buses have no rate limit to respect: only how many calls are in flight.
    limits: LimitConfig { concurrency: 16, per_second: 0.0 },
    // Published at once and confirmed one by one: a batch is one round
    // trip's worth, and what a crash may re-send.
    batch_size: 50,
    reach: Reach::Bus,
};

impl Section for RabbitmqConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
