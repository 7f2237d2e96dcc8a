//! Where changes come from. Both modes hand the pipeline the same thing: whole
//! committed transactions, in commit order, each with the offset to confirm once
//! its deliveries are durable.
//!
//! `replication` streams pgoutput from a logical slot; `pgoutput` is its pure
//! decoder (no I/O, unit-tested on bytes).

pub mod listen;
pub mod pgoutput;
pub mod replication;

pub use crate::change::{ChangeId, Column, CommittedTx, Lsn, Operation, RowChange, Table, Value};

use std::fmt;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tracing::warn;

use crate::db::reconnect_delay;
use crate::telemetry::{metric, Health};

/// Each table's primary-key columns, in key order, read from the catalog
/// (`schema.table` → columns; tables without a primary key are absent). The
/// ledger's `source_pk` uses these whatever the replica identity says: under
/// `REPLICA IDENTITY FULL` pgoutput marks every column as key.
pub async fn primary_keys<'a>(
    client: &tokio_postgres::Client,
    tables: impl Iterator<Item = &'a str>,
) -> Result<std::collections::HashMap<String, Vec<String>>, tokio_postgres::Error> {
    let tables: Vec<&str> = tables.collect();
    let rows = client
        .query(
            "SELECT t.name, array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
             FROM unnest($1::text[]) AS t(name)
             JOIN pg_index i ON i.indrelid = to_regclass(t.name) AND i.indisprimary
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
             GROUP BY t.name",
            &[&tables],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// After a source session failed with `e`: marks the source down, and if
/// `retry` (connection lost, server restarting) counts the reconnection and
/// waits out its backoff: `Ok(true)` to reconnect, `Ok(false)` if shutdown came
/// first. An error that needs a human is handed back. One policy for both
/// sources, so logical and listen mode recover alike.
pub async fn back_off<E: fmt::Display>(
    what: &'static str,
    health: &Health,
    e: E,
    retry: bool,
    failures: &mut u32,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, E> {
    health.source_connected.store(false, Ordering::Relaxed);
    if !retry {
        return Err(e);
    }
    metrics::counter!(metric::SOURCE_RECONNECTS).increment(1);
    health.tick(crate::telemetry::Loop::Source);
    *failures += 1;
    let delay = reconnect_delay(*failures);
    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} connection lost; reconnecting");
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(true),
        _ = crate::stopped(shutdown) => Ok(false),
    }
}
