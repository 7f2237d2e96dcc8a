//! `[providers.pubnub]` and what PubNub allows per call.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// PubNub publishes one message per call and publishes no per-key rate limit
/// beyond its plan; 16 calls in flight of one message each keep a worker busy
/// without opening dozens of connections. A 429 is retried after its Retry-After.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 10, reach: Reach::Channel };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubnubConfig {
    /// `pub-c-...`: part of the publish path, and of the signed string.
    pub publish_key: String,
    /// `sub-c-...`: part of the publish path.
    pub subscribe_key: String,
    /// `sec-c-...`: when set, every publish is signed (signature v2), as a
    /// keyset with Access Manager requires of a server that holds the secret.
    #[serde(default)]
    pub secret_key: Option<Secret>,
    /// The `uuid` query parameter PubNub requires on every call: who published.
    #[serde(default = "default_uuid")]
    pub uuid: String,
    /// Default `https://ps.pndsn.com`; tests and proxies point it elsewhere.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl PubnubConfig {
    pub fn endpoint(&self) -> String {
        self.base_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://ps.pndsn.com".to_string())
    }
}

impl Section for PubnubConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_uuid() -> String {
    "outbox-relay".into()
}

fn default_timeout_ms() -> u64 {
    10_000
}
