//! `[providers.pubsub]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubSubConfig {
    /// The Google Cloud project of the topics. Default: the key's `project_id`.
    #[serde(default)]
    pub project: Option<String>,
    /// Path of the service-account JSON key (role `roles/pubsub.publisher`).
    #[serde(default)]
    pub service_account_file: Option<String>,
    /// ...or the key's JSON itself (a secret: `file:` works).
    #[serde(default)]
    pub service_account_json: Option<Secret>,
    /// Default `https://pubsub.googleapis.com`; a regional endpoint
    /// (`https://europe-west1-pubsub.googleapis.com`) keeps ordered messages in one region.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Each publish call, and each token request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Pub/Sub's publish quota is throughput per region (MB/s), not calls: no
/// rate cap, a bound on calls in flight. A batch of 100 goes out as one
/// publish call per topic (and ordering key), well under the 1,000 messages
/// and 10 MB one call takes (https://cloud.google.com/pubsub/quotas#resource_limits).
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 16, per_second: 0.0 }, batch_size: 100, reach: Reach::Bus };

impl Section for PubSubConfig {
    fn timeout(&self) -> Duration {
        // A call may first wait for a token: both within the budget.
        Duration::from_millis(self.timeout_ms.saturating_mul(2))
    }
}
