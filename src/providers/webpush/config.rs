//! `[providers.webpush]`: the VAPID key and contact, message lifetime and
//! urgency, and what Web Push allows per call.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// One HTTP call per device (RFC 8030 §5: a push message is one POST to the
/// subscription's endpoint), so a batch is a number of messages whose
/// devices are all sent to at once. Push services publish no fixed rate;
/// they answer 429 with Retry-After when pushed too hard (RFC 8030 §8.4),
/// which the relay honours.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 20, reach: Reach::Devices };

/// RFC 8030 §5.4 `Urgency`: how soon the device should wake for it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Urgency {
    VeryLow,
    Low,
    Normal,
    High,
}

impl Urgency {
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebpushConfig {
    /// The VAPID signing key (RFC 8292): PEM PKCS#8, or the raw 32-byte
    /// scalar base64url with `public_key`. `file:/path` reads it from a file.
    pub private_key: Secret,
    /// base64url uncompressed P-256 point; needed with a raw `private_key`,
    /// checked against a PEM one. The browser's `applicationServerKey`.
    #[serde(default)]
    pub public_key: Option<String>,
    /// `mailto:` or `https:` contact the push service may use about this
    /// sender (the JWT's `sub`).
    pub subject: String,
    /// RFC 8030 §5.2 `TTL`: seconds the push service keeps a message for a
    /// device that is offline; 0 = deliver now or drop.
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u32,
    /// RFC 8030 §5.4; none sends no `Urgency` header (the service's "normal").
    #[serde(default)]
    pub urgency: Option<Urgency>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Section for WebpushConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A day: a notification older than that is rarely worth a wake-up.
fn default_ttl_s() -> u32 {
    86_400
}

fn default_timeout_ms() -> u64 {
    10_000
}
