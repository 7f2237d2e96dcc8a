//! `[providers.smtp]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;
use std::fmt;

use crate::secret::redact_url;

/// A mail relay takes a few sessions at once; one SMTP transaction per message.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 4, per_second: 0.0 }, batch_size: 10, reach: Reach::Address };

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// May carry credentials: never logged in clear.
    pub url: String,
    /// `Alerts <alerts@example.com>`.
    pub from: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Lets credentials go over a connection without TLS (a relay on localhost).
    #[serde(default)]
    pub allow_insecure_auth: bool,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("url", &redact_url(&self.url))
            .field("from", &self.from)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("allow_insecure_auth", &self.allow_insecure_auth)
            .finish()
    }
}

impl Section for SmtpConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
