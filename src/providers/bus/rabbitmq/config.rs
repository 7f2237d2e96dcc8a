//! `[providers.rabbitmq]`.

use serde::Deserialize;

use crate::config::Secret;

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
pub const DEFAULT_CONCURRENCY: usize = 16;
