//! `outbox-relay pause <channel>` and `resume <channel>`: hold a channel's
//! deliveries in the ledger, and let them go.
//!
//! The state is one row per paused channel in the relay's schema (migration
//! 009), not in a process: it holds across restarts and when a standby takes
//! over, and every relay and dispatch-only process sharing the ledger sees it.
//! Dispatch reads it inside its claim statement, ingestion inside its insert
//! (a paused channel's fresh rows are written `pending`, never handed over in
//! memory), so nothing is skipped: the rows wait, and go out after `resume`.
//! Unlike `enabled = false`, which records a channel's rows `skipped` for good.

use crate::config::Config;
use crate::ledger::{Ledger, LedgerError, PausedChannel};

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Permanent: a typo, or a channel the config does not have.
    #[error("channel {channel:?} is not in the relay config (its channels: {known})")]
    UnknownChannel { channel: String, known: String },
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl PauseError {
    /// A lost connection passes; an unknown channel needs the operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            PauseError::UnknownChannel { .. } => false,
            PauseError::Ledger(e) => e.is_retryable(),
        }
    }
}

/// What `pause` did.
#[derive(Debug, PartialEq)]
pub enum Paused {
    Now,
    /// Nothing changed: it was paused already, since then, by them.
    Already(PausedChannel),
}

/// What `resume` did.
#[derive(Debug, PartialEq)]
pub enum Resumed {
    Now,
    /// Nothing changed: it was not paused.
    NotPaused,
}

fn unknown(cfg: &Config, channel: &str) -> PauseError {
    let known: Vec<&str> = cfg.channels.keys().map(String::as_str).collect();
    PauseError::UnknownChannel { channel: channel.to_string(), known: known.join(", ") }
}

/// Who runs the command, for `paused_by`: the OS login when the environment
/// says it (`None`: the database role is recorded instead).
pub fn operator() -> Option<String> {
    ["USER", "LOGNAME"].iter().find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Pauses `channel`, which the config must name. Idempotent.
pub async fn pause(ledger: &Ledger, cfg: &Config, channel: &str, by: Option<&str>) -> Result<Paused, PauseError> {
    if !cfg.channels.contains_key(channel) {
        return Err(unknown(cfg, channel));
    }
    Ok(match ledger.pause(channel, by).await? {
        None => Paused::Now,
        Some(was) => Paused::Already(was),
    })
}

/// Resumes `channel`. Idempotent. A channel paused and since removed from
/// the config can still be resumed (its row would otherwise stay for ever);
/// a name neither paused nor configured is a typo, and an error.
pub async fn resume(ledger: &Ledger, cfg: &Config, channel: &str) -> Result<Resumed, PauseError> {
    if ledger.resume(channel).await? {
        return Ok(Resumed::Now);
    }
    if !cfg.channels.contains_key(channel) {
        return Err(unknown(cfg, channel));
    }
    Ok(Resumed::NotPaused)
}
