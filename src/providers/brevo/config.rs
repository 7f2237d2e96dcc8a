//! `[providers.brevo]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// Brevo's general tier: POST /v3/smtp/email 1,000 RPS and 3,600,000 RPH,
/// i.e. 1,000/s sustained. One HTTP call per message; a few per chunk.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 32, per_second: 1000.0 }, batch_size: 10, reach: Reach::Address };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrevoConfig {
    pub api_key: Secret,
    pub sender_email: String,
    #[serde(default)]
    pub sender_name: Option<String>,
    /// Default `https://api.brevo.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `/webhooks/brevo` accepts `Authorization: Bearer <token>` or `?token=<token>`.
    #[serde(default)]
    pub webhook_token: Option<Secret>,
    /// ...or HTTP Basic `user:password`.
    #[serde(default)]
    pub webhook_basic: Option<Secret>,
}

impl Section for BrevoConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
