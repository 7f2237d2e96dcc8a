//! LISTEN/NOTIFY mode, for databases without logical replication.
//!
//! **Capture.** `setup` puts statement-level triggers on each routed table
//! (function `capture_rows()`, sql/migrations/007): every row a statement
//! inserts, updates or deletes (the old row for a delete) goes to the relay's
//! change log with the columns the routes read, as PostgreSQL's text output,
//! inside the writer's transaction — with the writing transaction's xid8. The
//! relay routes from the change log only: values as committed, deletes
//! routable, nothing looked up in the routed tables afterwards.
//!
//! **Wake-up.** The trigger sends one NOTIFY with a constant payload, which
//! PostgreSQL folds to one per transaction. A connection of its own LISTENs and
//! does nothing else: a backend inside a transaction stops consuming the
//! notification queue, and a listener that falls behind holds the queue for the
//! whole cluster (docs/listen-mode.md). The reader also polls every
//! `source.poll_interval_ms`, so a missed notification delays a row, never loses
//! it; `source.notify = false` drops the NOTIFY and the LISTEN altogether.
//!
//! **Watermark.** Which log rows are safe to read is decided by transaction
//! visibility, not by `max(id)`: in one REPEATABLE READ transaction the relay
//! takes `H = pg_snapshot_xmin(pg_current_snapshot())` — every transaction below
//! H has finished, so all its rows are visible now — reads rows with
//! `watermark <= xid < H`, routes them, and writes their deliveries and the new
//! position in the same transaction. Rows of transactions still running have
//! xid >= H and wait for a later read. docs/listen-mode.md has the ids-5-and-6 story.
//!
//! **Pages.** A read takes at most `relay.ingest_batch_rows` rows in (xid, id)
//! order, so memory follows the page, not the transaction. A full page may end
//! inside a transaction: the watermark then moves only up to that transaction
//! (every one below it was read whole) and a cursor (xid, last id) says how far
//! into it the relay got; the next read continues there. Each page's deliveries
//! and position commit together; a page read twice after a crash yields the
//! same ledger keys (`ChangeId::Log`), which the ledger ignores.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::Value as Json;
use tokio::sync::{watch, Notify};
use tokio_postgres::{AsyncMessage, Client, IsolationLevel};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::db::quote_ident;
use crate::db::reconnect_delay;
use crate::dispatch::Intake;
use crate::ledger::{self, LedgerError};
use crate::routing::{Disposition, NewDelivery, Router};
use crate::source::{ChangeId, Column, Lsn, Operation, RowChange, Table, Value};
use crate::telemetry::{metric, Health, Telemetry};

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

/// How often old change-log rows (below the watermark) are pruned and the
/// NOTIFY queue's fill level is checked.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

/// How soon a relay that just read rows reads again: while writes keep
/// coming, polling this often costs an indexed read, where a NOTIFY from every
/// writer would serialise their commits.
const QUICK_POLL: Duration = Duration::from_millis(10);

/// How long the change log must stay empty before the relay waits for a
/// notification (or the poll interval) rather than polling every QUICK_POLL.
const IDLE_BEFORE_WAITING: Duration = Duration::from_millis(200);

/// Above this fill of PostgreSQL's NOTIFY queue the relay warns: when the queue
/// is full, every transaction that notifies fails at commit.
const QUEUE_WARN_AT: f64 = 0.1;

/// What a change-log row written by an earlier install's trigger (key only)
/// records when `setup` could not fill its values in: the row was gone by then.
const UNCAPTURED: &str = "recorded by the capture trigger of an earlier install, which kept no values, and the \
                          row was gone when setup upgraded it";

pub struct ListenSource {
    cfg: Arc<Config>,
    router: Router,
    intake: Intake,
    health: Arc<Health>,
    /// `ingest` and `ledger.write` spans of what each page recorded.
    telemetry: Telemetry,
}

/// One change-log row.
struct Change {
    id: i64,
    xid: i64,
    table: String,
    op: Operation,
    at: DateTime<Utc>,
    /// Captured columns → text output or null; `None` for a row of an earlier trigger.
    data: Option<serde_json::Map<String, Json>>,
}

/// The page read. Public for the test that EXPLAINs it: the (xid, id) index
/// serves both the range and the order, so a read costs the page, not the log.
/// $1, $2: read after this (xid, id); $3: the horizon; $4: the page size.
/// The ORDER BY names the table's columns: a bare `xid` would mean the output
/// column `xid::text::bigint`, which no index serves (a sort of the whole range).
pub fn read_page_sql(schema: &str) -> String {
    format!(
        "SELECT c.id, c.xid::text::bigint AS xid_number, c.source_table, c.op, c.created_at, c.row_data
         FROM {schema}.changes c
         WHERE (c.xid, c.id) > ($1::text::xid8, $2::bigint) AND c.xid < $3::text::xid8
         ORDER BY c.xid, c.id LIMIT $4"
    )
}

/// Deletes up to 10 000 change-log rows read (below the watermark of
/// position $1) an hour ago or more. Public for its test.
pub fn prune_sql(schema: &str) -> String {
    format!(
        "DELETE FROM {schema}.changes WHERE ctid = ANY (ARRAY(
            SELECT c.ctid FROM {schema}.changes c, {schema}.listen_progress p
            WHERE p.name = $1 AND c.xid < p.watermark AND c.created_at < now() - interval '1 hour'
            LIMIT 10000))"
    )
}

impl ListenSource {
    pub fn new(cfg: Arc<Config>, intake: Intake, health: Arc<Health>, telemetry: Telemetry) -> ListenSource {
        let router = Router::new(&cfg);
        ListenSource { cfg, router, intake, health, telemetry }
    }

    /// Change-log rows read per poll, at most (a backlog, or one large
    /// transaction, drains in several polls): the same bound as a logical-mode
    /// ledger batch, which is what bounds memory.
    fn page_rows(&self) -> i64 {
        self.cfg.relay.ingest_batch_rows.max(100) as i64
    }

    /// Polls until `shutdown` turns true, reconnecting with backoff when the
    /// database goes away; errors that need a human end the run.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ListenError> {
        let wake = Arc::new(Notify::new());
        let listener = self.cfg.source.notify.then(|| {
            let (url, channel) = (self.cfg.source.database_url.clone(), self.cfg.relay.schema.clone());
            tokio::spawn(listen_for_wakeups(url, channel, wake.clone(), shutdown.clone()))
        });
        let mut failures = 0u32;
        let result = loop {
            let Err(e) = self.session(&wake, &mut shutdown, &mut failures).await else { break Ok(()) };
            let retry = classify(&e);
            match crate::source::back_off("listen", &self.health, e, retry, &mut failures, &mut shutdown).await {
                Ok(true) => continue,
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if let Some(listener) = listener {
            listener.abort();
        }
        result
    }

    async fn session(
        &self,
        wake: &Notify,
        shutdown: &mut watch::Receiver<bool>,
        failures: &mut u32,
    ) -> Result<(), ListenError> {
        let schema = &self.cfg.relay.schema;
        let mut client = ledger::connect(&self.cfg.source.database_url).await?;
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
        // Claims whose commit outlived a lost connection go back to the queue
        // now, not after their lease (as in logical mode; see `dispatch::Intake`).
        let orphans = ledger::Ledger::new(ledger::connect(&self.cfg.source.database_url).await?, schema);
        self.intake.release_orphans(&orphans).await?;
        drop(orphans);
        self.health.source_connected.store(true, Ordering::Relaxed);
        self.health.ledger_connected.store(true, Ordering::Relaxed);
        *failures = 0;
        info!(name = %self.cfg.source.slot, notify = self.cfg.source.notify, "reading the change log");

        let poll = Duration::from_millis(self.cfg.source.poll_interval_ms.max(10));
        let mut last_housekeeping = tokio::time::Instant::now();
        // The doorbell (notify mode): armed while we wait for a notification,
        // disarmed while busy, so that writers notify only when it wakes us.
        // `armed_after`: an xid taken once the arming committed; a writer that
        // still saw the doorbell disarmed has a smaller one. Until every such
        // transaction has finished (the read horizon passes it), we poll
        // rather than wait for a notification it will not send.
        let mut armed_after: Option<i64> = None;
        let mut quick = QUICK_POLL;
        let mut last_rows = tokio::time::Instant::now();
        loop {
            self.health.tick(crate::telemetry::Loop::Source);
            let (read, horizon) = self.poll_once(&mut client).await?;
            if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
                last_housekeeping = tokio::time::Instant::now();
                self.housekeeping(&client).await?;
            }
            if read as i64 >= self.page_rows() {
                continue; // a backlog or a large transaction: keep reading
            }
            let wait = if read > 0 {
                // Busy: read again shortly; writers need not notify meanwhile.
                last_rows = tokio::time::Instant::now();
                if armed_after.take().is_some() {
                    self.ring_doorbell(&client, false).await?;
                }
                quick = QUICK_POLL;
                QUICK_POLL
            } else if last_rows.elapsed() < IDLE_BEFORE_WAITING {
                // An empty read amid a stream of commits (the horizon waits
                // for a writer still running) is a pause, not idleness.
                QUICK_POLL
            } else if !self.cfg.source.notify || armed_after.is_some_and(|after| horizon > after) {
                // Idle; and, with notifications, armed with every writer that
                // saw the doorbell disarmed done: a notification wakes us.
                poll
            } else if armed_after.is_some() {
                quick = (quick * 2).min(poll);
                quick
            } else {
                armed_after = Some(self.ring_doorbell(&client, true).await?);
                quick = QUICK_POLL;
                continue; // read once more: a row may have committed before the doorbell was armed
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = crate::stopped(shutdown) => {
                    // Nobody to wake until a relay runs again (it reads first, then arms).
                    if self.cfg.source.notify {
                        self.ring_doorbell(&client, false).await?;
                    }
                    info!("listen source stopped");
                    return Ok(());
                }
            }
        }
    }

    /// Arms or disarms the doorbell the capture triggers read before
    /// notifying. Arming returns an xid assigned after it committed: every
    /// writer that saw the doorbell disarmed holds a smaller one.
    async fn ring_doorbell(&self, client: &Client, armed: bool) -> Result<i64, ListenError> {
        let schema = &self.cfg.relay.schema;
        // Empty (new, or after a crash: it is unlogged) means armed; keep one row.
        client
            .execute(
                &format!(
                    "WITH changed AS (UPDATE {schema}.listen_doorbell SET armed = $1 RETURNING 1)
                     INSERT INTO {schema}.listen_doorbell (armed) SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM changed)"
                ),
                &[&armed],
            )
            .await?;
        if !armed {
            return Ok(0);
        }
        Ok(client.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).await?.get(0))
    }

    /// One page of the change log behind the watermark; returns the rows read
    /// and the horizon it read below.
    async fn poll_once(&self, client: &mut Client) -> Result<(usize, i64), ListenError> {
        let schema = &self.cfg.relay.schema;
        let name = &self.cfg.source.slot;
        let page = self.page_rows();
        let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().await?;
        // First statement: it takes the snapshot the rest of the transaction sees.
        let horizon: i64 =
            tx.query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint", &[]).await?.get(0);
        let position = tx
            .query_opt(
                &format!(
                    "SELECT watermark::text::bigint, cursor_xid::text::bigint, cursor_id
                     FROM {schema}.listen_progress WHERE name = $1"
                ),
                &[name],
            )
            .await?;
        let (from, cursor) = match position {
            Some(r) => (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1).zip(r.get::<_, Option<i64>>(2))),
            None => (0, None),
        };
        // Just after the cursor inside a transaction read in part, else at the watermark.
        let (after_xid, after_id) = match cursor {
            Some((xid, id)) if xid >= from => (xid, id),
            _ => (from, 0),
        };
        let rows =
            tx.query(&read_page_sql(schema), &[&after_xid.to_string(), &after_id, &horizon.to_string(), &page]).await?;
        let changes: Vec<Change> = rows
            .iter()
            .map(|r| Change {
                id: r.get(0),
                xid: r.get(1),
                table: r.get(2),
                op: match r.get::<_, &str>(3) {
                    "update" => Operation::Update,
                    "delete" => Operation::Delete,
                    _ => Operation::Insert,
                },
                at: r.get(4),
                data: match r.get::<_, Option<Json>>(5) {
                    Some(Json::Object(map)) => Some(map),
                    _ => None,
                },
            })
            .collect();
        drop(rows);
        // A full page may stop inside a transaction: the watermark moves up to
        // that transaction only, and the cursor says how far into it we got. A
        // short page read everything below the horizon.
        let (watermark, next_cursor) = match changes.last() {
            Some(last) if changes.len() as i64 >= page => (last.xid, Some((last.xid, last.id))),
            _ => (horizon, None),
        };
        let mut deliveries = Vec::new();
        self.route(&tx, &changes, &mut deliveries).await?;
        // As in logical mode: fresh rows go to dispatch in memory when it has room.
        let room = self.intake.room_soon(deliveries.len()).await;
        let write_start = std::time::SystemTime::now();
        let inserted = ledger::insert_deliveries(&tx, schema, &deliveries, self.intake.claim(&room)).await?;
        crate::routing::count_recorded(inserted.fresh.iter().map(|&i| &deliveries[i]), &self.cfg);
        if !changes.is_empty() || watermark > from || next_cursor != cursor {
            tx.execute(
                &format!(
                    "UPDATE {schema}.listen_progress
                     SET watermark = GREATEST(watermark, $2::text::xid8), cursor_xid = $3::text::xid8,
                         cursor_id = $4, updated_at = now()
                     WHERE name = $1"
                ),
                &[name, &watermark.to_string(), &next_cursor.map(|c| c.0.to_string()), &next_cursor.map(|c| c.1)],
            )
            .await?;
        }
        tx.commit().await?;
        let fresh = inserted.fresh.iter().map(|&i| &deliveries[i]);
        crate::routing::trace_recorded(
            self.telemetry.tracer.as_ref(),
            fresh,
            write_start,
            std::time::SystemTime::now(),
        );
        let read = changes.len();
        if read > 0 {
            metrics::counter!(metric::ROWS_INGESTED).increment(read as u64);
            debug!(read, deliveries = deliveries.len(), inserted = inserted.count, watermark, cursor = ?next_cursor,
                "change log read");
        }
        self.intake.committed(room, inserted, Vec::new());
        Ok((read, horizon))
    }

    /// Routes the captured rows, in log order.
    async fn route(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        changes: &[Change],
        out: &mut Vec<NewDelivery>,
    ) -> Result<(), ListenError> {
        // Each table's columns (type OIDs, primary key), read once per page.
        let mut described: HashMap<&str, Table> = HashMap::new();
        // The Table for a set of captured columns: shared by the rows that have it.
        let mut shapes: HashMap<(&str, String), Arc<Table>> = HashMap::new();
        for c in changes.iter().filter(|c| self.router.routes_table(&c.table)) {
            if !described.contains_key(c.table.as_str()) {
                described.insert(&c.table, describe(tx, &c.table).await?);
            }
            let full = &described[c.table.as_str()];
            let Some(data) = &c.data else {
                // An earlier trigger's row that setup could not fill in: routed
                // on no columns, so each route records a failure, saying why.
                let table = Arc::new(Table { columns: vec![], ..full.clone() });
                let first = out.len();
                let change = RowChange { id: ChangeId::Log(c.id), table, op: c.op, values: vec![] };
                self.router.route_change(&change, Lsn::default(), c.at, out);
                for d in &mut out[first..] {
                    d.disposition = Disposition::Failed(UNCAPTURED.into());
                }
                continue;
            };
            // serde_json's map iterates in key order: the same columns, the same signature.
            let signature: String = data.keys().map(|k| k.as_str()).collect::<Vec<_>>().join("\0");
            let table = shapes
                .entry((&c.table, signature))
                .or_insert_with(|| {
                    let columns = full.columns.iter().filter(|col| data.contains_key(&col.name)).cloned().collect();
                    Arc::new(Table { columns, ..full.clone() })
                })
                .clone();
            let values = table
                .columns
                .iter()
                .map(|col| match data.get(&col.name) {
                    Some(Json::String(text)) => Value::Text(text.clone()),
                    _ => Value::Null,
                })
                .collect();
            let change = RowChange { id: ChangeId::Log(c.id), table, op: c.op, values };
            self.router.route_change(&change, Lsn::default(), c.at, out);
        }
        Ok(())
    }

    /// Drops change-log rows below the watermark older than an hour, a slice
    /// at a time, and warns when PostgreSQL's NOTIFY queue fills.
    async fn housekeeping(&self, client: &Client) -> Result<(), ListenError> {
        // By ctid: the change log has no index on id (sql/migrations/007).
        let schema = &self.cfg.relay.schema;
        let n = client.execute(&prune_sql(schema), &[&self.cfg.source.slot]).await?;
        if n > 0 {
            debug!(pruned = n, "change log pruned");
        }
        let usage: f64 = client.query_one("SELECT pg_notification_queue_usage()", &[]).await?.get(0);
        if usage >= QUEUE_WARN_AT {
            warn!(
                usage_percent = usage * 100.0,
                "PostgreSQL's NOTIFY queue is filling: a LISTENing session is not reading it (see the server log \
                 for its PID). When it is full, every notifying transaction fails at commit: find that session, \
                 or set source.notify = false and re-run setup (docs/listen-mode.md)"
            );
        }
        Ok(())
    }
}

/// Keeps a connection LISTENing on `channel` and rings `wake` for each
/// notification; it runs nothing else, so it never sits in a transaction
/// while notifications queue up. Reconnects by itself, and rings once after
/// each (re)connection for whatever was written while nobody listened.
async fn listen_for_wakeups(url: String, channel: String, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        match crate::db::connect(&url).await {
            Ok((client, mut connection)) => {
                let ring = wake.clone();
                // The connection is driven here rather than by a plain `await`, to see NOTIFYs.
                let mut driver = tokio::spawn(async move {
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
                });
                match client.batch_execute(&format!("LISTEN {}", quote_ident(&channel))).await {
                    Ok(()) => {
                        failures = 0;
                        wake.notify_one();
                        tokio::select! {
                            _ = &mut driver => {}
                            _ = crate::stopped(&mut shutdown) => {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "LISTEN failed");
                        driver.abort();
                    }
                }
            }
            Err(e) => debug!(error = %e, "listen connection failed"),
        }
        // Until it is back, the reader's polling alone picks rows up.
        failures += 1;
        tokio::select! {
            _ = tokio::time::sleep(reconnect_delay(failures)) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}

/// Retry or not: connection trouble passes, anything else needs a human.
fn classify(e: &ListenError) -> bool {
    match e {
        ListenError::Ledger(l) => l.is_retryable(),
        ListenError::Db(e) => crate::db::db_error_is_retryable(e),
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
