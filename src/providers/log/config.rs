//! `[providers.log]`: nothing to set; the section may be left out.

use std::time::Duration;

use serde::Deserialize;

use crate::providers::{LimitConfig, Profile, Reach, Section};

/// Stdout takes a batch at a time; a few writers are plenty.
pub const PROFILE: Profile =
    Profile { limits: LimitConfig { concurrency: 4, per_second: 0.0 }, batch_size: 100, reach: Reach::Channel };

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {}

impl Section for LogConfig {
    /// Needs no section: a channel may name `log` alone.
    fn implicit() -> Option<Self> {
        Some(LogConfig {})
    }
    fn timeout(&self) -> Duration {
        Duration::ZERO
    }
}
