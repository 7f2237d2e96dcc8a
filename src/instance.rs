//! One relay works a slot (or listen position) and its ledger at a time.
//!
//! A second `run` against the same database, schema and slot — a rolling
//! deploy, a second replica, an operator's stray command — waits as a standby
//! instead of working: it would otherwise re-send what the live one is sending
//! (rows in flight look abandoned to anyone but their owner).
//!
//! The lock is a PostgreSQL session advisory lock held on a connection that
//! does nothing else, so it lives exactly as long as the holder's session: a
//! process killed by `kill -9` loses it the moment the server sees the socket
//! close. Holding it is what makes start-up recovery safe: whoever takes the
//! lock knows that every row left `sending` belongs to a process that is gone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{error, info, warn};

use crate::ledger::{self, LedgerError};
use crate::telemetry::{metric, Health};

/// How often a standby asks for the lock.
const POLL: Duration = Duration::from_secs(1);

/// A connection for the lock: the server ends the session after `takeover` of
/// silence (`idle_session_timeout`, PostgreSQL 14+), so a holder that is
/// frozen (SIGSTOP) or cut off loses the lock within that time, and TCP
/// keepalives find a dead peer about as fast on older servers. The holder
/// speaks every fifth of it.
async fn lock_connection(url: &str, takeover: Duration) -> Result<Client, LedgerError> {
    let client = ledger::connect(url).await?;
    let secs = takeover.as_secs().max(1);
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = 2",
            (secs / 2).max(1),
            (secs / 4).max(1)
        ))
        .await?;
    // Refused before PostgreSQL 14: keepalives then do the job.
    let _ = client.batch_execute(&format!("SET idle_session_timeout = {}", takeover.as_millis())).await;
    Ok(client)
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The lock's session ended (database restart, network) and another relay
    /// took the lock before this one could take it back. Two relays must not
    /// work at once: this one stops, and its orchestrator may start it again
    /// as a standby.
    #[error("another relay took over slot {slot} while this one was cut off from the database; stopping")]
    TakenOver { slot: String },
}

/// The held lock. Dropping it (or the process dying) releases it.
pub struct InstanceLock {
    client: Client,
    keys: (i32, i32),
    url: String,
    slot: String,
    takeover: Duration,
}

/// The advisory lock's two keys: the relay, then schema and slot, so relays
/// with their own schema or slot in one database do not exclude each other.
fn lock_keys(schema: &str, slot: &str) -> (i32, i32) {
    (fnv(b"outbox-relay"), fnv(format!("{schema}/{slot}").as_bytes()))
}

/// FNV-1a, folded to 32 bits: stable across versions and platforms (unlike
/// std's hasher), which matters because every relay must compute the same key.
fn fnv(bytes: &[u8]) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

async fn try_lock(client: &Client, keys: (i32, i32)) -> Result<bool, LedgerError> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&keys.0, &keys.1]).await?.get(0))
}

impl InstanceLock {
    /// Waits as a standby until the lock is ours; `None` if `shutdown` came first.
    pub async fn acquire(
        url: &str,
        schema: &str,
        slot: &str,
        takeover: Duration,
        health: &Health,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<InstanceLock>, LedgerError> {
        let keys = lock_keys(schema, slot);
        let client = lock_connection(url, takeover).await?;
        let mut said = false;
        loop {
            if try_lock(&client, keys).await? {
                health.standby.store(false, Ordering::Relaxed);
                metrics::gauge!(metric::ACTIVE).set(1.0);
                if said {
                    info!(slot, "the other relay is gone: this one takes over");
                }
                let lock = InstanceLock { client, keys, url: url.to_string(), slot: slot.to_string(), takeover };
                return Ok(Some(lock));
            }
            health.standby.store(true, Ordering::Relaxed);
            metrics::gauge!(metric::ACTIVE).set(0.0);
            if !said {
                said = true;
                info!(slot, schema, "another relay is working this slot: standing by until it stops");
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = crate::stopped(shutdown) => return Ok(None),
            }
        }
    }

    /// Logical mode, just after taking over: a walsender still streaming the
    /// slot belongs to the relay that lost the lock (frozen, cut off) — ours
    /// has not started — so it is ended rather than waited out
    /// (`wal_sender_timeout`, a minute by default).
    pub async fn free_slot(&self) -> Result<(), LedgerError> {
        let ended = self
            .client
            .query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&self.slot],
            )
            .await?;
        if !ended.is_empty() {
            warn!(slot = %self.slot, "ended the previous relay's replication connection to the slot");
        }
        Ok(())
    }

    /// Holds the lock until `shutdown`. If its session ends, the relay stops
    /// sending (`health.standby`) until the lock is taken back; if another
    /// relay got it first, this returns [`InstanceError::TakenOver`].
    pub async fn hold(mut self, health: Arc<Health>, mut shutdown: watch::Receiver<bool>) -> Result<(), InstanceError> {
        let ping = (self.takeover / 5).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ping) => {}
                _ = crate::stopped(&mut shutdown) => return Ok(()),
            }
            if !self.client.is_closed() && self.client.simple_query("").await.is_ok() {
                continue;
            }
            health.standby.store(true, Ordering::Relaxed);
            warn!(slot = %self.slot, "lost the connection holding the relay's lock; sending paused until it is back");
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = crate::stopped(&mut shutdown) => return Ok(()),
                }
                let Ok(client) = lock_connection(&self.url, self.takeover).await else { continue };
                match try_lock(&client, self.keys).await {
                    Ok(true) => {
                        self.client = client;
                        health.standby.store(false, Ordering::Relaxed);
                        info!(slot = %self.slot, "relay lock taken back; sending resumes");
                        break;
                    }
                    Ok(false) => {
                        metrics::gauge!(metric::ACTIVE).set(0.0);
                        error!(slot = %self.slot, "another relay holds the lock now");
                        return Err(InstanceError::TakenOver { slot: self.slot.clone() });
                    }
                    Err(_) => continue,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinguish_slots_and_schemas() {
        assert_eq!(lock_keys("outbox_relay", "a"), lock_keys("outbox_relay", "a"));
        assert_ne!(lock_keys("outbox_relay", "a"), lock_keys("outbox_relay", "b"));
        assert_ne!(lock_keys("x", "a"), lock_keys("y", "a"));
        // Published FNV-1a vectors: a change here would let an old and a new relay work at once.
        assert_eq!(fnv(b""), 0x811c_9dc5_u32 as i32);
        assert_eq!(fnv(b"a"), 0xe40c_292c_u32 as i32);
    }
}
