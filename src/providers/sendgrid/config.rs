//! `[providers.sendgrid]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// SendGrid publishes no per-account number for `/v3/mail/send` (its v3 rate
/// limits exclude the endpoint; plans cap daily volume) and answers 429 with
/// its rate-limit headers when pushed too hard: 16 calls in flight and no
/// pace, the 429s slow the relay down. One HTTP call per message.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 10, reach: Reach::Address };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendgridConfig {
    /// Sent as `Authorization: Bearer <api_key>`; needs the "Mail Send" scope.
    pub api_key: Secret,
    /// The `from` of every mail: a verified Sender Identity, or SendGrid answers 403.
    pub sender_email: String,
    #[serde(default)]
    pub sender_name: Option<String>,
    /// Default `https://api.sendgrid.com`; the EU data residency host
    /// (`https://api.eu.sendgrid.com`) or a test fake.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Section for SendgridConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
