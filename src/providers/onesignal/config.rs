//! `[providers.onesignal]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// One call per notification (one recipient each). OneSignal's limits are per
/// app and plan, and a 429 says how long to wait (`Retry-After`), which the
/// retries honour: a bound on calls in flight, no rate cap.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 10, reach: Reach::Channel };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneSignalConfig {
    /// The app's id (public: it is in the dashboard's URL).
    pub app_id: String,
    /// The app's REST API key, sent as `Authorization: Key <key>`.
    pub api_key: Secret,
    /// Default `https://api.onesignal.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl Section for OneSignalConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
