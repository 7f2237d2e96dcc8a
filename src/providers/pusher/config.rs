//! `[providers.pusher]` and what Pusher allows per call.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// Pusher has no published rate limit per app beyond its plan's daily
/// messages; 16 calls in flight of 10 events each keep a worker busy without
/// opening dozens of connections.
pub const PROFILE: Profile = Profile {
    limits: LimitConfig { concurrency: 16, per_second: 0.0 },
    batch_size: super::MAX_EVENTS_PER_CALL,
    reach: Reach::Channel,
};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PusherConfig {
    pub app_id: String,
    pub key: String,
    pub secret: Secret,
    /// `eu` → `https://api-eu.pusher.com`.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Overrides the host entirely (tests, proxies): `http://127.0.0.1:8080`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl PusherConfig {
    pub fn endpoint(&self) -> String {
        match (&self.base_url, &self.cluster) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(c)) => format!("https://api-{c}.pusher.com"),
            (None, None) => "https://api.pusherapp.com".to_string(),
        }
    }
}

impl Section for PusherConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
