//! `[providers.ably]` and Ably's defaults.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// Ably deduplicates re-sends by message id; a few per call keeps statements few.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 10, reach: Reach::Channel };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblyConfig {
    /// `appid.keyid:secret`, used for HTTP Basic auth.
    pub api_key: Secret,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl AblyConfig {
    pub fn endpoint(&self) -> String {
        self.base_url
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://rest.ably.io".to_string())
    }
}

impl Section for AblyConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
