//! `[providers.mailgun]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// Mailgun answers 429 past its (plan-dependent, unpublished) rate limits and
/// asks for a retry "as defined in the response": 16 calls in flight and no
/// pace. One HTTP call per message.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 10, reach: Reach::Address };

/// Where the sending domain was created; it decides the API host
/// (https://documentation.mailgun.com/docs/mailgun/api-reference).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    /// `https://api.mailgun.net`
    #[default]
    Us,
    /// `https://api.eu.mailgun.net`: an EU domain's data never leaves the EU.
    Eu,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailgunConfig {
    /// HTTP Basic password (user `api`): the account key or a domain sending key.
    pub api_key: Secret,
    /// The sending domain, as in `/v3/{domain}/messages`.
    pub domain: String,
    /// `Alerts <alerts@mg.example.com>`: the `from` of every mail.
    pub from: String,
    #[serde(default)]
    pub region: Region,
    /// Overrides the region's host (proxies, tests).
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl MailgunConfig {
    /// The API host: `base_url`, else the region's.
    pub fn endpoint(&self) -> String {
        let host = match self.region {
            Region::Us => "https://api.mailgun.net",
            Region::Eu => "https://api.eu.mailgun.net",
        };
        self.base_url.as_deref().unwrap_or(host).trim_end_matches('/').to_string()
    }
}

impl Section for MailgunConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
