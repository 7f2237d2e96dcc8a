//! Retention: settled deliveries leave the ledger `ledger.retention_days`
//! after their last change (`outbox-relay prune`, and hourly while running).
//!
//! Deleted in slices of [`SLICE`] rows, each its own short statement, so that
//! pruning a large ledger never holds locks dispatch would wait on. Never
//! pruned: anything not settled, and — in logical mode — any row whose change
//! sits at or after the stored offset, which a replay could still bring back
//! (without its row, the replayed change would be delivered again).

use tokio_postgres::Client;
use tracing::info;

use crate::config::{Config, SourceMode};

/// Rows deleted per statement.
pub const SLICE: i64 = 5000;

/// The statuses nothing will change any more (delivery reports aside, which
/// arrive within days, not months).
const SETTLED: &str = "'sent', 'delivered', 'read', 'bounced', 'skipped', 'failed', 'discarded', 'dead'";

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The condition a prunable row meets; `$1` = retention in days, `$2` = slot.
fn prunable(cfg: &Config) -> String {
    let schema = &cfg.relay.schema;
    let replay_guard = match cfg.source.mode {
        // No stored offset yet: nothing is safe from a replay.
        SourceMode::Logical => format!(
            "AND commit_lsn < coalesce((SELECT confirmed_lsn FROM {schema}.progress WHERE slot = $2), '0/0'::pg_lsn)"
        ),
        // The change log is read once, behind the watermark: a settled row a day old is never needed again.
        SourceMode::Listen => "AND $2::text IS NOT NULL".to_string(),
    };
    format!("status IN ({SETTLED}) AND updated_at < now() - $1::int * interval '1 day' {replay_guard}")
}

/// Deletes (or with `dry_run`, counts) what retention allows; returns the count.
pub async fn prune(client: &Client, cfg: &Config, dry_run: bool) -> Result<u64, RetentionError> {
    let days = cfg.ledger.retention_days as i32;
    if days == 0 {
        return Ok(0);
    }
    let schema = &cfg.relay.schema;
    let cond = prunable(cfg);
    let slot = &cfg.source.slot;
    if dry_run {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {schema}.deliveries WHERE {cond}"), &[&days, slot])
            .await?
            .get(0);
        return Ok(n as u64);
    }
    // Oldest first, by id (the primary key's order is roughly commit order):
    // the scan stops after a slice of matches instead of reading the table.
    // A push delivery's per-device outcomes go with it, in the same statement.
    let sql = format!(
        "WITH pruned AS (
             DELETE FROM {schema}.deliveries WHERE id IN (
                 SELECT id FROM {schema}.deliveries WHERE {cond} ORDER BY id LIMIT {SLICE})
             RETURNING id),
         devices AS (DELETE FROM {schema}.device_sends WHERE delivery_id IN (SELECT id FROM pruned))
         SELECT count(*) FROM pruned"
    );
    let mut total = 0u64;
    loop {
        let n = client.query_one(&sql, &[&days, slot]).await?.get::<_, i64>(0) as u64;
        total += n;
        if (n as i64) < SLICE {
            break;
        }
        // Room for dispatch between slices.
        tokio::task::yield_now().await;
    }
    if total > 0 {
        info!(deleted = total, retention_days = days, "pruned settled deliveries");
    }
    Ok(total)
}
