//! `[providers.redis]`.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:6379[/db]`, `rediss://` for TLS. Never logged.
    pub url: Secret,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A stream that does not exist: create it with the first entry (Redis's
    /// own way) or, `false`, refuse (`XADD NOMKSTREAM`) until someone creates it.
    #[serde(default = "default_true")]
    pub create_missing: bool,
    /// How long a delivery key is remembered against a second add. Must
    /// outlast every re-send: a crash re-sends within the claim lease, a retry
    /// within the channel's `max_age_s` (1 day by default).
    #[serde(default = "default_dedup_window_s")]
    pub dedup_window_s: u64,
    /// At most this many keys per stream are remembered (oldest forgotten
    /// first), so the de-dup set stays bounded whatever the window.
    #[serde(default = "default_dedup_max")]
    pub dedup_max: u64,
    /// `XADD ... MAXLEN ~ n`: trims the stream as it grows; 0 = never.
    #[serde(default)]
    pub maxlen: u64,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_dedup_window_s() -> u64 {
    2 * 86_400
}
fn default_dedup_max() -> u64 {
    1_000_000
}
/// Redis takes values up to 512 MB, but a stream entry that size stalls
/// every reader; 1 MiB is an opinion, adjustable.
fn default_max_message_bytes() -> usize {
    1024 * 1024
}

/// Scripts in flight at once: Redis runs them one at a time anyway.
pub const PROFILE: Profile = Profile {
    // Buses have no rate limit to respect: only how many calls are in flight.
    limits: LimitConfig { concurrency: 16, per_second: 0.0 },
    // Published at once and confirmed one by one: a batch is one round
    // trip's worth, and what a crash may re-send.
    batch_size: 50,
    reach: Reach::Bus,
};

impl Section for RedisConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
