//! `[providers.twilio]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// Twilio answers 20429 past its REST concurrency and queues messages beyond
/// the senders' throughput; 10/s keeps a backlog in the ledger, not in
/// Twilio's queue. One HTTP call per message; a few per chunk.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 10.0 }, batch_size: 10, reach: Reach::Address };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    /// Sender number (E.164) for SMS, or
    #[serde(default)]
    pub from: Option<String>,
    /// a Messaging Service that picks the sender.
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// `whatsapp:+33...`, for WhatsApp channels.
    #[serde(default)]
    pub whatsapp_from: Option<String>,
    /// Public URL of this relay's `/webhooks/twilio`; also the URL Twilio signs.
    #[serde(default)]
    pub status_callback_url: Option<String>,
    /// Default `https://api.twilio.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Section for TwilioConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
