//! `[providers.nats]`.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:4222`; `tls://` for TLS. Never logged.
    pub url: Secret,
    /// Token authentication, when the server uses it.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Connect, and each publish until its PubAck.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Creates this stream (file storage) at first use if it does not exist.
    /// Without it a subject no stream captures is refused (and retried)
    /// until someone creates one.
    #[serde(default)]
    pub create_stream: Option<StreamSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub name: String,
    /// Subjects it captures, e.g. `["notifications.>"]`.
    pub subjects: Vec<String>,
    /// JetStream's de-duplication window (`Nats-Msg-Id`). Must outlast every
    /// re-send: a crash re-sends within the claim lease, a retry within the
    /// channel's `max_age_s`. JetStream's own default is 2 minutes.
    #[serde(default = "default_duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// Largest message the stream takes; 0 = the server's `max_payload`.
    #[serde(default)]
    pub max_message_bytes: i32,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_duplicate_window_s() -> u64 {
    86_400
}

/// Publishes in flight at once; each waits for its PubAck.
pub const PROFILE: Profile = Profile {
    // Buses have no rate limit to respect: only how many calls are in flight.
    limits: LimitConfig { concurrency: 32, per_second: 0.0 },
    // Published at once and confirmed one by one: a batch is one round
    // trip's worth, and what a crash may re-send.
    batch_size: 50,
    reach: Reach::Bus,
};

impl Section for NatsConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
