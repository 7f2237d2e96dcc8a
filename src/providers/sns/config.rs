//! `[providers.sns]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// A cautious 20/s, not a published number: SMS throughput depends on the
/// account's origination identities and destinations, and Publish is
/// throttled per account and Region
/// (https://docs.aws.amazon.com/general/latest/gr/sns.html) with `Throttling`
/// answers; the pace keeps the backlog in the ledger instead. Set
/// `[limits.sns] per_second` to your quota (topics take thousands). One
/// Publish per message.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 20.0 }, batch_size: 10, reach: Reach::AddressOrBus };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsConfig {
    /// `AKIA...` (or `ASIA...` with a session token).
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Temporary credentials' token (STS, a role), sent as `X-Amz-Security-Token`.
    #[serde(default)]
    pub session_token: Option<Secret>,
    /// `eu-west-3`: the signing region and the endpoint's. Topics must be in it.
    pub region: String,
    /// Default `https://sns.<region>.amazonaws.com` (VPC endpoints, tests).
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl SnsConfig {
    pub fn endpoint(&self) -> String {
        match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("https://sns.{}.amazonaws.com", self.region),
        }
    }
}

impl Section for SnsConfig {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}
