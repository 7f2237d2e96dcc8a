//! `[providers.webhook]`: one HTTPS endpoint of the team's, signed the
//! Standard Webhooks way, and its defaults.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// One POST per delivery. The receiver is the team's own service, of unknown
/// capacity: 8 in flight is gentle, and a 429 or 503 with Retry-After slows
/// the relay further. Raise `[limits.webhook]` for a receiver that keeps up.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 8, per_second: 0.0 }, batch_size: 10, reach: Reach::Channel };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST. `{channel}` (the channel's `channel_name`, filled in)
    /// and `{event}` are replaced, percent-encoded, so one endpoint can
    /// route by path. May hold a token, so it is never logged.
    pub url: String,
    /// `whsec_` + base64 of 24 to 64 random bytes (the spec's format; the
    /// prefix may be left out). The HMAC key is the decoded bytes.
    pub secret: Secret,
    /// The spec recommends giving receivers 15 to 30 s.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// `http://` URLs are refused unless this is set: the signature proves
    /// who sent a delivery but does not hide it (local receivers, tests).
    #[serde(default)]
    pub allow_http: bool,
}

impl Section for WebhookConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    15_000
}
