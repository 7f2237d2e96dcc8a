//! `[providers.fcm]` and its limits.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};
use crate::secret::Secret;

/// FCM HTTP v1 takes one device per call; its quota is 600,000 messages a
/// minute per project (https://firebase.google.com/docs/cloud-messaging/throttling-and-quotas),
/// far above what one relay sends. A bound on calls in flight, no rate cap;
/// a 429 `QUOTA_EXCEEDED` is retried after its `Retry-After`. A batch of 20
/// deliveries is up to 20 × (their devices) calls.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 32, per_second: 0.0 }, batch_size: 20, reach: Reach::Devices };

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// The Firebase project id. Default: the key's `project_id`.
    #[serde(default)]
    pub project: Option<String>,
    /// Path of the service-account JSON key (Firebase console, Project
    /// settings, Service accounts).
    #[serde(default)]
    pub service_account_file: Option<String>,
    /// ...or the key's JSON itself (a secret: `file:` works).
    #[serde(default)]
    pub service_account_json: Option<Secret>,
    /// Default `https://fcm.googleapis.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Each call, and each token request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl Section for FcmConfig {
    fn timeout(&self) -> Duration {
        // A call may first wait for a token: both within the budget.
        Duration::from_millis(self.timeout_ms.saturating_mul(2))
    }
}
