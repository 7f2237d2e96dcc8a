//! LISTEN/NOTIFY mode, for databases without logical replication.
//!
//! A trigger on each routed table writes (table, key, writing transaction's
//! xid8) to the relay's change log and sends a NOTIFY. The relay LISTENs only to
//! wake up early; it also reads the log every `source.poll_interval_ms`, so a
//! missed notification (connection drop, queue full, relay down) delays a row
//! but never loses it.
//!
//! Which log rows are safe to read is decided by a transaction-visibility
//! watermark, not by `max(id)`: in one REPEATABLE READ transaction the relay
//! takes `W = pg_snapshot_xmin(pg_current_snapshot())` — every transaction below
//! W has finished, so all its rows are visible now — reads rows with
//! `previous W <= xid < W`, routes them, writes their deliveries and the new W
//! in the same transaction. Rows of transactions still running have xid >= W
//! and wait for a later poll. docs/listen-mode.md has the ids-5-and-6 story.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio_postgres::{AsyncMessage, Client, IsolationLevel};
use tracing::{debug, info};

use crate::config::Config;
use crate::dispatch::Intake;
use crate::ledger::{self, LedgerError};
use crate::routing::{NewDelivery, Router};
use crate::setup::{quote_ident, quote_table};
use crate::source::{ChangeId, Column, Lsn, Operation, RowChange, Table, Value};
use crate::telemetry::{metric, Health};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listen source: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl ListenError {
    pub fn is_retryable(&self) -> bool {
        classify(self)
    }
}

/// How often old change-log rows (below the watermark) are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct ListenSource {
    cfg: Arc<Config>,
    router: Router,
    intake: Intake,
    health: Arc<Health>,
}

/// One change-log row.
struct Change {
    id: i64,
    xid: u64,
    table: String,
    pk: String,
    op: Operation,
    at: DateTime<Utc>,
}

impl ListenSource {
    pub fn new(cfg: Arc<Config>, intake: Intake, health: Arc<Health>) -> ListenSource {
        let router = Router::new(&cfg);
        ListenSource { cfg, router, intake, health }
    }

    /// Change-log rows read per poll, at most (a backlog drains in several
    /// polls): the same bound as a logical-mode ledger batch, which is what
    /// bounds memory (a page's deliveries may wait in the hand-over to dispatch).
    fn page_rows(&self) -> i64 {
        self.cfg.relay.ingest_batch_rows.max(100) as i64
    }

    /// Polls until `shutdown` turns true, reconnecting with backoff when the
    /// database goes away; errors that need a human end the run.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ListenError> {
        let mut failures = 0u32;
        loop {
            let Err(e) = self.session(&mut shutdown, &mut failures).await else { return Ok(()) };
            let retry = classify(&e);
            if !crate::source::back_off("listen", &self.health, e, retry, &mut failures, &mut shutdown).await? {
                return Ok(());
            }
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>, failures: &mut u32) -> Result<(), ListenError> {
        let schema = &self.cfg.relay.schema;
        let (mut client, mut connection) =
            crate::db::connect(&self.cfg.source.database_url).await.map_err(LedgerError::Connect)?;
        // The connection is driven here rather than by a plain `await`, to see NOTIFYs.
        let notified = Arc::new(Notify::new());
        let ring = notified.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => ring.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "listen connection ended");
                        break;
                    }
                }
            }
            // Wake the poller so that its next query reports the broken connection.
            ring.notify_one();
        });
        client.batch_execute(&format!("LISTEN {}", quote_ident(schema))).await?;
        // Marks the position as existing from the start (status, tests).
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.listen_progress (name, watermark) VALUES ($1, '0'::xid8)
                     ON CONFLICT (name) DO NOTHING"
                ),
                &[&self.cfg.source.slot],
            )
            .await?;
        self.health.source_connected.store(true, Ordering::Relaxed);
        self.health.ledger_connected.store(true, Ordering::Relaxed);
        *failures = 0;
        info!(name = %self.cfg.source.slot, "listening for changes");

        let poll = Duration::from_millis(self.cfg.source.poll_interval_ms.max(10));
        let mut tables: HashMap<String, Arc<Table>> = HashMap::new();
        let mut last_prune = tokio::time::Instant::now();
        loop {
            let read = self.poll_once(&mut client, &mut tables).await?;
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                self.prune(&client).await?;
            }
            if read as i64 >= self.page_rows() {
                continue; // a backlog: keep reading
            }
            tokio::select! {
                _ = notified.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = crate::stopped(shutdown) => {
                    info!("listen source stopped");
                    return Ok(());
                }
            }
        }
    }

    /// One read of the change log behind the watermark; returns rows read.
    async fn poll_once(
        &self,
        client: &mut Client,
        tables: &mut HashMap<String, Arc<Table>>,
    ) -> Result<usize, ListenError> {
        let schema = &self.cfg.relay.schema;
        let name = &self.cfg.source.slot;
        let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().await?;
        // First statement: it takes the snapshot the rest of the transaction sees.
        let horizon: i64 =
            tx.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint", &[]).await?.get(0);
        let from: i64 = tx
            .query_opt(
                &format!("SELECT watermark::text::bigint FROM {schema}.listen_progress WHERE name = $1"),
                &[name],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let rows = tx
            .query(
                &format!(
                    "SELECT xid::text::bigint, source_table, source_pk, op, created_at, id FROM {schema}.changes
                     WHERE xid >= $1::text::xid8 AND xid < $2::text::xid8 ORDER BY xid, id LIMIT $3"
                ),
                &[&from.to_string(), &horizon.to_string(), &(self.page_rows() + 1)],
            )
            .await?;
        let mut changes: Vec<Change> = rows
            .iter()
            .map(|r| Change {
                xid: r.get::<_, i64>(0) as u64,
                table: r.get(1),
                pk: r.get(2),
                op: match r.get::<_, &str>(3) {
                    "update" => Operation::Update,
                    "delete" => Operation::Delete,
                    _ => Operation::Insert,
                },
                at: r.get(4),
                id: r.get(5),
            })
            .collect();
        // The new watermark: the horizon if everything below it was read; else
        // the xid of the last, possibly incomplete, transaction in this page
        // (its rows are read again next time; the ledger ignores repeats).
        let mut next = horizon as u64;
        if changes.len() as i64 > self.page_rows() {
            let last = changes[changes.len() - 1].xid;
            let first = changes[0].xid;
            if first == last {
                // One transaction larger than a page: read it whole.
                changes = self.whole_transaction(&tx, last).await?;
                next = last + 1;
            } else {
                changes.retain(|c| c.xid < last);
                next = last;
            }
        }
        let read = changes.len();
        let mut deliveries = Vec::new();
        self.route(&tx, &changes, tables, &mut deliveries).await?;
        // As in logical mode: fresh rows go to dispatch in memory when it has room.
        let room = self.intake.room();
        let inserted = ledger::insert_deliveries(&tx, schema, &deliveries, self.intake.claim(&room)).await?;
        if next > from as u64 {
            tx.execute(
                &format!(
                    "UPDATE {schema}.listen_progress
                     SET watermark = GREATEST(watermark, $2::text::xid8), updated_at = now() WHERE name = $1"
                ),
                &[name, &next.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        if read > 0 {
            metrics::counter!(metric::ROWS_INGESTED).increment(read as u64);
            debug!(read, deliveries = deliveries.len(), inserted = inserted.count, watermark = next, "change log read");
        }
        self.intake.committed(room, inserted);
        Ok(read)
    }

    async fn whole_transaction(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        xid: u64,
    ) -> Result<Vec<Change>, ListenError> {
        let schema = &self.cfg.relay.schema;
        let rows = tx
            .query(
                &format!(
                    "SELECT source_table, source_pk, op, created_at, id FROM {schema}.changes
                     WHERE xid = $1::text::xid8 ORDER BY id"
                ),
                &[&xid.to_string()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Change {
                xid,
                table: r.get(0),
                pk: r.get(1),
                op: if r.get::<_, &str>(2) == "update" { Operation::Update } else { Operation::Insert },
                at: r.get(3),
                id: r.get(4),
            })
            .collect())
    }

    /// Reads the current rows the changes name and routes them, in log order.
    async fn route(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        changes: &[Change],
        tables: &mut HashMap<String, Arc<Table>>,
        out: &mut Vec<NewDelivery>,
    ) -> Result<(), ListenError> {
        let mut keys: HashMap<&str, Vec<&str>> = HashMap::new();
        for c in changes.iter().filter(|c| self.router.routes_table(&c.table)) {
            keys.entry(&c.table).or_default().push(&c.pk);
        }
        let mut rows: HashMap<(&str, String), Vec<Value>> = HashMap::new();
        for (table, pks) in keys {
            // Looked up each poll: a column Django added since is seen at once.
            let shape = Arc::new(describe(tx, table).await?);
            tables.insert(table.to_string(), shape.clone());
            let key_cols: Vec<&Column> = shape.columns.iter().filter(|c| c.is_key).collect();
            let key_expr = if key_cols.is_empty() {
                "id::text".to_string()
            } else {
                let parts: Vec<String> = key_cols.iter().map(|c| format!("{}::text", quote_ident(&c.name))).collect();
                format!("concat_ws(',', {})", parts.join(", "))
            };
            let select: Vec<String> = shape.columns.iter().map(|c| format!("{}::text", quote_ident(&c.name))).collect();
            let sql = format!(
                "SELECT {key_expr}, {} FROM {} WHERE {key_expr} = ANY($1)",
                select.join(", "),
                quote_table(table)
            );
            let pk_list: Vec<&str> = pks;
            for r in tx.query(&sql, &[&pk_list]).await? {
                let key: String = r.get(0);
                let values = (1..r.len())
                    .map(|i| match r.get::<_, Option<String>>(i) {
                        Some(t) => Value::Text(t),
                        None => Value::Null,
                    })
                    .collect();
                rows.insert((table, key), values);
            }
        }
        for c in changes.iter().filter(|c| self.router.routes_table(&c.table)) {
            match (rows.get(&(c.table.as_str(), c.pk.clone())), tables.get(&c.table)) {
                (Some(values), Some(table)) => {
                    let change =
                        RowChange { id: ChangeId::Log(c.id), table: table.clone(), op: c.op, values: values.clone() };
                    self.router.route_change(&change, Lsn::default(), c.at, out);
                }
                _ => out.extend(self.router.vanished(ChangeId::Log(c.id), &c.table, &c.pk, c.op, c.at)),
            }
        }
        Ok(())
    }

    /// Drops change-log rows below the watermark older than an hour, a slice at a time.
    async fn prune(&self, client: &Client) -> Result<(), ListenError> {
        let schema = &self.cfg.relay.schema;
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {schema}.changes WHERE id IN (
                        SELECT c.id FROM {schema}.changes c, {schema}.listen_progress p
                        WHERE p.name = $1 AND c.xid < p.watermark AND c.created_at < now() - interval '1 hour'
                        LIMIT 10000)"
                ),
                &[&self.cfg.source.slot],
            )
            .await?;
        if n > 0 {
            debug!(pruned = n, "change log pruned");
        }
        Ok(())
    }
}

/// Retry or not: connection trouble passes, anything else needs a human.
fn classify(e: &ListenError) -> bool {
    match e {
        ListenError::Ledger(l) => l.is_retryable(),
        ListenError::Db(e) => ledger::db_error_is_retryable(e),
    }
}

/// A table's columns (type OIDs, primary-key flags), as pgoutput would describe it.
async fn describe(tx: &tokio_postgres::Transaction<'_>, qualified: &str) -> Result<Table, ListenError> {
    let (schema, name) = qualified.split_once('.').unwrap_or(("public", qualified));
    let rows = tx
        .query(
            "SELECT a.attname::text, a.atttypid::oid, coalesce(a.attnum = ANY (i.indkey::int2[]), false)
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    Ok(Table {
        schema: schema.to_string(),
        name: name.to_string(),
        columns: rows.iter().map(|r| Column { name: r.get(0), type_oid: r.get(1), is_key: r.get(2) }).collect(),
    })
}
