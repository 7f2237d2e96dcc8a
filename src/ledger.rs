//! The delivery ledger and the stored offset, in the relay's own schema.
//!
//! Ingestion writes deliveries and the offset they cover in one transaction;
//! only after that commit is the offset confirmed to PostgreSQL. Dispatch claims
//! due rows (`pending` → `sending`), calls providers, and records each outcome.
//! A row left `sending` by a crash is the one window where a provider may have
//! accepted a message the ledger does not know about: on start it goes back to
//! `pending` and is counted as a possible re-send.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

use crate::change::Lsn;
use crate::db::db_error_is_retryable;
use crate::routing::NewDelivery;
use crate::unwritten;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("connecting to the database: {0}")]
    Connect(crate::db::ConnectError),
}

impl LedgerError {
    /// Connection trouble and serialization conflicts pass; anything else
    /// (missing privilege, missing schema) needs a human.
    pub fn is_retryable(&self) -> bool {
        match self {
            LedgerError::Db(e) => db_error_is_retryable(e),
            LedgerError::Connect(e) => e.is_retryable(),
        }
    }
}

/// Applied in order; each exactly once per schema (recorded in schema_migrations).
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../sql/migrations/001_ledger.sql")),
    (2, include_str!("../sql/migrations/002_discarded.sql")),
    (3, include_str!("../sql/migrations/003_listen.sql")),
    (4, include_str!("../sql/migrations/004_webhooks.sql")),
    (5, include_str!("../sql/migrations/005_capture_args.sql")),
    (6, include_str!("../sql/migrations/006_change_keys.sql")),
    (7, include_str!("../sql/migrations/007_capture_rows.sql")),
    (8, include_str!("../sql/migrations/008_claims_and_vacuum.sql")),
    (9, include_str!("../sql/migrations/009_paused_channels.sql")),
    (10, include_str!("../sql/migrations/010_correlation.sql")),
    (11, include_str!("../sql/migrations/011_device_sends.sql")),
    (12, include_str!("../sql/migrations/012_unwritten.sql")),
];

/// SQL for "this channel is not paused" (migration 009): evaluated once per
/// statement (an uncorrelated subquery, an InitPlan), read in the statement's
/// own snapshot, so a pause holds for every claim and claimed insert that
/// starts after its commit.
fn not_paused(schema: &str, column: &str) -> String {
    format!("{column} <> ALL(ARRAY(SELECT channel FROM {schema}.paused_channels))")
}

/// The migrations' SQL with the schema name filled in (it is a validated identifier).
pub fn migration_sql(schema: &str) -> Vec<(i32, String)> {
    MIGRATIONS.iter().map(|(v, sql)| (*v, sql.replace("__SCHEMA__", schema))).collect()
}

/// Opens a connection (TLS as `url` says) and drives it on the runtime.
pub async fn connect(url: &str) -> Result<Client, LedgerError> {
    let (client, conn) = crate::db::connect(url).await.map_err(LedgerError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            // The owner sees the error on its next query; this is for the log.
            tracing::debug!(error = %e, "ledger connection ended");
        }
    });
    // Whatever the server's default: a ledger commit must be on disk before the
    // relay acts on it (confirms the offset past it, or forgets an outcome).
    // With `synchronous_commit = off` a server crash could undo it afterwards.
    //
    // And a transaction the relay left open (its process frozen by SIGSTOP, or
    // cut off) must not hold its row locks for ever: the relay that takes
    // over would wait on them. The relay never waits inside a transaction.
    //
    // Prepared statements are planned for their parameters every time: a
    // generic plan made while the ledger was nearly empty (a sequential scan
    // and a hash join for an outcome update) would be kept as the table grew
    // to millions of rows.
    client
        .batch_execute(&format!(
            "SET synchronous_commit = on; SET idle_in_transaction_session_timeout = {}; \
             SET plan_cache_mode = force_custom_plan",
            IDLE_IN_TRANSACTION.as_millis()
        ))
        .await?;
    Ok(client)
}

/// How long a relay connection may sit idle inside a transaction before the
/// server ends it (see [`connect`]).
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// Longest error text the ledger keeps: a provider's whole HTML error page
/// helps nobody, and `last_error` is shown in `status` and dead-letter lists.
const MAX_ERROR_CHARS: usize = 2000;

/// Longest delay a retry or deferral may ask for. A `Retry-After` of 10^13
/// seconds would overflow PostgreSQL's timestamp and make the outcome
/// unstorable; past a week `max_age` has long made the delivery dead anyway.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Text the ledger can store: no NUL (PostgreSQL's text refuses it), bounded.
pub fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('\0') && s.len() <= MAX_ERROR_CHARS {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out: String = s.chars().take(MAX_ERROR_CHARS).map(|c| if c == '\0' { '\u{FFFD}' } else { c }).collect();
    if s.chars().count() > MAX_ERROR_CHARS {
        out.push('…');
    }
    std::borrow::Cow::Owned(out)
}

/// Creates or upgrades the relay schema. Safe to run twice, and concurrently:
/// an advisory lock serialises migrators.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, LedgerError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('outbox_relay.migrate'))", &[]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    let done: Vec<i32> = tx
        .query(&format!("SELECT version FROM {schema}.schema_migrations"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = vec![];
    for (version, sql) in migration_sql(schema) {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(&sql).await?;
        tx.execute(&format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"), &[&version]).await?;
        applied.push(version);
    }
    tx.commit().await?;
    if !applied.is_empty() {
        info!(schema, ?applied, "ledger migrations applied");
    }
    Ok(applied)
}

/// A delivery claimed for sending.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: i64,
    pub idempotency_key: String,
    pub source_table: String,
    pub source_pk: String,
    pub channel: String,
    pub event: String,
    pub recipient: Option<String>,
    pub payload: Json,
    /// Including this one.
    pub attempts: i32,
    pub committed_at: DateTime<Utc>,
    /// The provider of the last attempt, if any: a delivery stays with it.
    pub provider: Option<String>,
    /// Claimed before by a worker that never reported back: the provider may
    /// already have it, so this send counts as a possible re-send.
    pub lease_expired: bool,
    /// No provider call may start after this: the lease ends a fifth later, and
    /// past it another worker may take the row over and send it too.
    pub send_by: std::time::Instant,
    /// The row's correlation value (migration 010), for logs, provider
    /// metadata and the delivery's trace.
    pub correlation: Option<String>,
    /// Handed over before it was written (`id` is then 0): the outcome's
    /// write inserts the row (see `unwritten`).
    pub unwritten: Option<Arc<unwritten::Row>>,
}

/// A claim as the ledger knows it.
#[derive(Clone, Debug)]
pub enum ClaimRef {
    /// The row and its attempt count when claimed. An outcome is recorded only
    /// if the row still carries this claim, so a worker that lost its lease
    /// cannot overwrite the worker that took the row over.
    Row(i64, i32),
    /// Not in the ledger yet: the outcome is the row's first write.
    Unwritten(Arc<unwritten::Row>),
}

impl PartialEq for ClaimRef {
    fn eq(&self, other: &ClaimRef) -> bool {
        match (self, other) {
            (ClaimRef::Row(a, x), ClaimRef::Row(b, y)) => a == b && x == y,
            (ClaimRef::Unwritten(a), ClaimRef::Unwritten(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Claimed {
    pub fn claim_ref(&self) -> ClaimRef {
        match &self.unwritten {
            Some(row) => ClaimRef::Unwritten(row.clone()),
            None => ClaimRef::Row(self.id, self.attempts),
        }
    }

    /// A delivery handed to dispatch unwritten, as a first attempt. The
    /// payload moves here; the row keeps it as text, for its write.
    pub fn unwritten(mut row: unwritten::Row, send_by: std::time::Instant) -> Claimed {
        let payload = std::mem::take(&mut row.delivery.payload);
        let mut claimed = Claimed::first(&row.delivery, 0, payload, send_by);
        claimed.unwritten = Some(Arc::new(row));
        claimed
    }

    /// A fresh delivery's first attempt, as row `id` (0: not written yet).
    fn first(d: &NewDelivery, id: i64, payload: Json, send_by: std::time::Instant) -> Claimed {
        Claimed {
            id,
            idempotency_key: d.idempotency_key.clone(),
            source_table: d.source_table.clone(),
            source_pk: d.source_pk.clone(),
            channel: d.channel.clone(),
            event: d.event.clone(),
            recipient: d.recipient.clone(),
            payload,
            attempts: 1,
            committed_at: d.committed_at,
            provider: None,
            lease_expired: false,
            send_by,
            correlation: d.correlation.clone(),
            unwritten: None,
        }
    }
}

/// What became of a claimed delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Sent {
        provider: &'static str,
        message_id: Option<String>,
    },
    /// Back to `pending`, due again after `delay`.
    Retry {
        provider: &'static str,
        error: String,
        delay: Duration,
    },
    /// Refused for good.
    Failed {
        provider: &'static str,
        error: String,
    },
    /// Retryable, but out of attempts.
    Dead {
        provider: &'static str,
        error: String,
    },
    /// Deliberately not sent (no address, no consent, preference): never retried.
    Skipped {
        provider: &'static str,
        reason: String,
    },
    /// Not tried (the provider's circuit is open): back to `pending` after
    /// `delay`, and the claim's attempt is given back.
    Defer {
        error: String,
        delay: Duration,
    },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::Retry { .. } => "retry",
            Outcome::Failed { .. } => "failed",
            Outcome::Dead { .. } => "dead",
            Outcome::Defer { .. } => "deferred",
            Outcome::Skipped { .. } => "skipped",
        }
    }
}

/// Ledger statements on one connection. Cheap to create; make one per task that
/// needs its own connection (ingestion, each dispatch worker).
pub struct Ledger {
    client: Client,
    schema: String,
    /// The hot statements (insert, claim, finish), prepared once per
    /// connection: an unprepared query costs a Parse/Describe round trip
    /// every time. Still planned per execution (see [`connect`]).
    prepared: std::sync::Mutex<HashMap<&'static str, Statement>>,
}

impl Ledger {
    pub fn new(client: Client, schema: &str) -> Ledger {
        Ledger { client, schema: schema.to_string(), prepared: Default::default() }
    }

    /// `sql(schema)` prepared on this connection, once.
    async fn statement(&self, name: &'static str, sql: fn(&str) -> String) -> Result<Statement, LedgerError> {
        if let Some(st) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(st.clone());
        }
        let st = self.client.prepare(&sql(&self.schema)).await?;
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(name, st.clone());
        Ok(st)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The offset stored for `slot`, if any.
    pub async fn load_offset(&self, slot: &str) -> Result<Option<Lsn>, LedgerError> {
        Ok(self.load_progress(slot).await?.map(|p| p.0))
    }

    /// The offset stored for `slot` and the highest commit position handed
    /// over unwritten (see `unwritten`), if any.
    pub async fn load_progress(&self, slot: &str) -> Result<Option<(Lsn, Option<Lsn>)>, LedgerError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT confirmed_lsn::text, unwritten_lsn::text FROM {}.progress WHERE slot = $1",
                    self.schema
                ),
                &[&slot],
            )
            .await?;
        Ok(row.and_then(|r| {
            let confirmed = r.get::<_, String>(0).parse().ok()?;
            Some((confirmed, r.get::<_, Option<String>>(1).and_then(|u| u.parse().ok())))
        }))
    }

    /// Records `deliveries` and moves the stored offset to `end_lsn`, atomically.
    /// Replayed rows (same idempotency key) are ignored, so replaying a
    /// transaction after a crash is harmless. `claim`: see [`insert_deliveries`].
    /// `unwritten`: the highest commit position about to be handed over
    /// unwritten, stored before any of it can reach a provider.
    pub async fn record(
        &mut self,
        deliveries: &[NewDelivery],
        slot: &str,
        end_lsn: Lsn,
        claim: Option<Duration>,
        unwritten: Option<Lsn>,
    ) -> Result<Inserted, LedgerError> {
        let insert = self.statement("insert", insert_sql).await?;
        let tx = self.client.transaction().await?;
        let inserted = insert_with(&tx, &insert, deliveries, claim).await?;
        save_offset(&tx, &self.schema, slot, end_lsn, unwritten).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Moves the offset with no deliveries (idle stream, unrouted changes).
    pub async fn save_offset(&self, slot: &str, lsn: Lsn) -> Result<(), LedgerError> {
        save_offset(&self.client, &self.schema, slot, lsn, None).await
    }

    /// After a crash: rows left `sending` go back to `pending`. Their earlier
    /// attempt may have reached the provider, so the caller counts them.
    /// Claims of dispatch-only processes (`claimed_by` set) are theirs: they
    /// may be sending right now, and end by outcome or lease.
    pub async fn recover_in_flight(&self) -> Result<u64, LedgerError> {
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {}.deliveries SET status = 'pending', next_attempt_at = now(), updated_at = now()
                     WHERE status = 'sending' AND claimed_by IS NULL",
                    self.schema
                ),
                &[],
            )
            .await?;
        if n > 0 {
            warn!(deliveries = n, "deliveries were in flight when the relay stopped; sending them again");
        }
        Ok(n)
    }

    /// Rows `sending` whose id is not in `held` go back to `pending`, their
    /// attempt given back (it never reached a provider: nobody held the claim).
    pub async fn release_unheld(&self, held: &[i64]) -> Result<u64, LedgerError> {
        Ok(self
            .client
            .execute(
                &format!(
                    "UPDATE {}.deliveries SET status = 'pending', attempts = greatest(attempts - 1, 0),
                         next_attempt_at = now(), updated_at = now()
                     WHERE status = 'sending' AND claimed_by IS NULL AND NOT (id = ANY($1))",
                    self.schema
                ),
                &[&held],
            )
            .await?)
    }

    /// Claims up to `limit` due deliveries of channels not paused, oldest first, for `lease`. SKIP
    /// LOCKED lets several workers claim side by side without waiting on each
    /// other. A row still `sending` after its lease (its worker lost the
    /// database mid-batch) is claimed again and flagged as a possible re-send.
    /// Scans the queue from its start, for the slot's relay; dispatch uses
    /// [`Ledger::claim_from`].
    pub async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<Claimed>, LedgerError> {
        Ok(self.claim_from(limit, lease, None, None, &[]).await?.0)
    }

    /// [`Ledger::claim`], for `claimer` and from a floor.
    ///
    /// `claimer`: `None` for the slot's relay, a dispatch-only process's name
    /// otherwise (see `claimed_by` in migration 008).
    ///
    /// `from`: where to start in the queue index (see `dispatch::QueueFloor`);
    /// `None` scans it from its start. Rows below `from` are not lost, only
    /// left to the next full scan. Returns the claims and the lowest
    /// `next_attempt_at` among them (the next floor).
    ///
    /// `held`: rows the caller still has in hand although their lease may
    /// have run out (it was frozen); never claimed again by the same process.
    pub async fn claim_from(
        &self,
        limit: usize,
        lease: Duration,
        claimer: Option<&str>,
        from: Option<DateTime<Utc>>,
        held: &[i64],
    ) -> Result<(Vec<Claimed>, Option<DateTime<Utc>>), LedgerError> {
        let claim = self.statement("claim", claim_sql).await?;
        // Measured before the statement: the lease runs from the server's now().
        let send_by = std::time::Instant::now() + lease.mul_f64(0.8);
        let rows = self.client.query(&claim, &[&(limit as i64), &lease.as_secs_f64(), &from, &claimer, &held]).await?;
        let mut first_due: Option<DateTime<Utc>> = None;
        let mut claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| {
                let due: DateTime<Utc> = r.get(12);
                first_due = Some(first_due.map_or(due, |f| f.min(due)));
                Claimed {
                    id: r.get(0),
                    idempotency_key: r.get(1),
                    source_table: r.get(2),
                    source_pk: r.get(3),
                    channel: r.get(4),
                    event: r.get(5),
                    recipient: r.get(6),
                    payload: r.get(7),
                    attempts: r.get(8),
                    committed_at: r.get(9),
                    lease_expired: r.get(10),
                    provider: r.get(11),
                    send_by,
                    correlation: r.get(13),
                    unwritten: None,
                }
            })
            .collect();
        // RETURNING does not keep the CTE's order; providers should see commit order.
        claimed.sort_unstable_by_key(|c| c.id);
        Ok((claimed, first_due))
    }

    /// Records outcomes: one `UPDATE` for claimed rows, one `INSERT` for
    /// deliveries handed over unwritten (each is written here for the first
    /// time, already in its outcome's state). Safe to call again with the
    /// same outcomes after an error: the update holds only under its claim,
    /// the insert skips keys the ledger has.
    pub async fn finish(&self, outcomes: &[(ClaimRef, Outcome)]) -> Result<(), LedgerError> {
        let mut rows = Rows::default();
        let mut fresh = Rows::default();
        let mut unwritten: Vec<&unwritten::Row> = Vec::new();
        for (claim, o) in outcomes {
            match claim {
                ClaimRef::Row(id, attempts) => {
                    rows.ids.push(*id);
                    rows.attempts.push(*attempts);
                    rows.push(o);
                }
                ClaimRef::Unwritten(row) => {
                    unwritten.push(row);
                    fresh.push(o);
                }
            }
        }
        if !rows.ids.is_empty() {
            let finish = self.statement("finish", finish_sql).await?;
            let msg_ids: Vec<Option<&str>> = rows.msg_ids.iter().map(|m| m.as_deref()).collect();
            let errors: Vec<Option<&str>> = rows.errors.iter().map(|e| e.as_deref()).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                [&rows.ids, &rows.statuses, &rows.providers, &msg_ids, &errors, &rows.delays, &rows.attempts];
            self.client.execute(&finish, &params).await?;
        }
        if !unwritten.is_empty() {
            let write = self.statement("write", write_sql).await?;
            let cols = NewRows::of(unwritten.iter().map(|r| (&r.delivery, Some(r.payload.as_str()))));
            // Routing fails what jsonb cannot hold before a delivery is handed
            // over; should one slip through, it is written `failed`, never
            // left to fail this statement on every retry.
            for (i, bad) in cols.unstorable.iter().enumerate() {
                if *bad {
                    fresh.statuses[i] = "failed";
                    fresh.errors[i] = Some(UNSTORABLE.into());
                }
            }
            let msg_ids: Vec<Option<&str>> = fresh.msg_ids.iter().map(|m| m.as_deref()).collect();
            let errors: Vec<Option<&str>> = fresh.errors.iter().map(|e| e.as_deref()).collect();
            let mut params = cols.params();
            params.extend([
                &fresh.statuses as &(dyn tokio_postgres::types::ToSql + Sync),
                &fresh.providers,
                &msg_ids,
                &errors,
                &fresh.delays,
            ]);
            self.client.execute(&write, &params).await?;
            for row in unwritten {
                row.written();
            }
        }
        Ok(())
    }

    /// Counts by (channel, status), for `status` and the backlog gauge.
    pub async fn counts(&self) -> Result<Vec<(String, String, i64)>, LedgerError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT channel, status, count(*) FROM {}.deliveries GROUP BY 1, 2 ORDER BY 1, 2",
                    self.schema
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// Dead letters by channel, for the gauge: read through the
    /// `deliveries_dead` index. The gauge once grouped the whole ledger every
    /// 5 s, a full scan that grew with every delivery ever made.
    pub async fn dead_counts(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT channel, count(*) FROM {}.deliveries
                     WHERE status IN ('dead', 'failed') AND status = 'dead' GROUP BY 1",
                    self.schema
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Deliveries not yet settled (pending or in flight), paused channels'
    /// left out: the work the relay is expected to be doing, what the backlog
    /// alert watches. A paused channel's rows wait on purpose; `status` lists
    /// them by channel, `outbox_relay_channel_paused` says why.
    pub async fn backlog(&self) -> Result<i64, LedgerError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {s}.deliveries WHERE status IN ('pending', 'sending') AND {paused}",
                    s = self.schema,
                    paused = not_paused(&self.schema, "channel")
                ),
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Age of the oldest due delivery: the number an on-call wants first.
    /// Paused channels left out, as in [`Ledger::backlog`]: a pause is not an outage.
    pub async fn oldest_pending_age(&self) -> Result<Option<Duration>, LedgerError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM {s}.deliveries
                     WHERE status IN ('pending', 'sending') AND {paused}",
                    s = self.schema,
                    paused = not_paused(&self.schema, "channel")
                ),
                &[],
            )
            .await?;
        Ok(row.get::<_, Option<f64>>(0).map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}

/// A channel an operator paused (migration 009).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PausedChannel {
    pub channel: String,
    pub paused_at: DateTime<Utc>,
    pub paused_by: String,
}

impl Ledger {
    /// Every paused channel, by name.
    pub async fn paused_channels(&self) -> Result<Vec<PausedChannel>, LedgerError> {
        let rows = self
            .client
            .query(
                &format!("SELECT channel, paused_at, paused_by FROM {}.paused_channels ORDER BY channel", self.schema),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| PausedChannel { channel: r.get(0), paused_at: r.get(1), paused_by: r.get(2) }).collect())
    }

    /// Pauses `channel`: `Ok(None)` if it was not paused, else how it already
    /// was (nothing changes). `by`: who, when known (else the database role).
    pub async fn pause(&self, channel: &str, by: Option<&str>) -> Result<Option<PausedChannel>, LedgerError> {
        let s = &self.schema;
        let inserted = self
            .client
            .execute(
                &format!(
                    "INSERT INTO {s}.paused_channels (channel, paused_by) VALUES ($1, coalesce($2, session_user::text))
                     ON CONFLICT (channel) DO NOTHING"
                ),
                &[&channel, &by],
            )
            .await?;
        if inserted == 1 {
            return Ok(None);
        }
        Ok(self.paused_channels().await?.into_iter().find(|p| p.channel == channel))
    }

    /// Resumes `channel`; `false` if it was not paused.
    pub async fn resume(&self, channel: &str) -> Result<bool, LedgerError> {
        let n = self
            .client
            .execute(&format!("DELETE FROM {}.paused_channels WHERE channel = $1", self.schema), &[&channel])
            .await?;
        Ok(n > 0)
    }
}

/// Records outcomes; `$7` is each row's claim (attempt count), so a worker
/// that lost its lease cannot overwrite the one that took the row over.
fn finish_sql(s: &str) -> String {
    format!(
        "UPDATE {s}.deliveries d SET
                status = CASE WHEN u.st = 'deferred' THEN 'pending' ELSE u.st END,
                attempts = CASE WHEN u.st = 'deferred' THEN d.attempts - 1 ELSE d.attempts END,
                provider = COALESCE(u.pr, d.provider),
                provider_message_id = COALESCE(u.mid, d.provider_message_id),
                last_error = CASE WHEN u.st = 'sent' THEN d.last_error ELSE u.err END,
                next_attempt_at = CASE WHEN u.st IN ('pending', 'deferred')
                    THEN now() + u.delay * interval '1 second' ELSE d.next_attempt_at END,
                sent_at = CASE WHEN u.st = 'sent' THEN now() ELSE d.sent_at END,
                updated_at = now()
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
                 $7::int[])
                  AS u(id, st, pr, mid, err, delay, att)
             WHERE d.id = u.id AND d.status = 'sending' AND d.attempts = u.att"
    )
}

/// The claim. `$3`: the floor (see [`Ledger::claim_from`]); the queue index's
/// dead entries below it — every settled delivery leaves one until VACUUM —
/// are not walked. `due_at` comes back to move the floor. Dispatch
/// connections run it with bitmap scans off (see `Dispatcher::run_worker`).
fn claim_sql(s: &str) -> String {
    format!(
        "WITH due AS (
            SELECT id, status AS was, next_attempt_at AS due_at FROM {s}.deliveries
            WHERE status IN ('pending', 'sending') AND next_attempt_at <= now()
              AND next_attempt_at >= coalesce($3::timestamptz, '-infinity')
              AND id <> ALL($5::int8[])
              AND {paused}
            ORDER BY next_attempt_at, id
            LIMIT $1
            FOR UPDATE SKIP LOCKED)
         UPDATE {s}.deliveries d
         SET status = 'sending', attempts = d.attempts + 1, updated_at = now(),
             next_attempt_at = now() + $2::float8 * interval '1 second', claimed_by = $4::text
         FROM due WHERE d.id = due.id
         RETURNING d.id, d.idempotency_key, d.source_table, d.source_pk, d.channel, d.event,
                   d.recipient, d.payload, d.attempts, d.committed_at, due.was = 'sending',
                   d.provider, due.due_at, d.correlation",
        paused = not_paused(s, "channel")
    )
}

/// A delivery that needs an operator: `dead` (retries exhausted) or `failed`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub status: String,
    pub channel: String,
    pub source_table: String,
    pub source_pk: String,
    pub event: String,
    pub recipient: Option<String>,
    pub attempts: i32,
    pub provider: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which dead letters to list.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterFilter {
    pub channel: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Also list `failed` (permanent refusals), not only `dead`.
    pub include_failed: bool,
    pub limit: i64,
}

impl Ledger {
    pub async fn dead_letters(&self, f: &DeadLetterFilter) -> Result<Vec<DeadLetter>, LedgerError> {
        let statuses: Vec<&str> = if f.include_failed { vec!["dead", "failed"] } else { vec!["dead"] };
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT id, status, channel, source_table, source_pk, event, recipient, attempts,
                            provider, last_error, created_at, updated_at
                     FROM {}.deliveries
                     WHERE status = ANY($1) AND ($2::text IS NULL OR channel = $2)
                       AND ($3::timestamptz IS NULL OR updated_at >= $3)
                     ORDER BY id LIMIT $4",
                    self.schema
                ),
                &[&statuses, &f.channel, &f.since, &f.limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                status: r.get(1),
                channel: r.get(2),
                source_table: r.get(3),
                source_pk: r.get(4),
                event: r.get(5),
                recipient: r.get(6),
                attempts: r.get(7),
                provider: r.get(8),
                last_error: r.get(9),
                created_at: r.get(10),
                updated_at: r.get(11),
            })
            .collect())
    }

    /// Puts dead (or failed) deliveries back in the queue with fresh attempts.
    /// `None` means every dead letter. Returns how many moved.
    pub async fn retry_dead(&self, ids: Option<&[i64]>) -> Result<u64, LedgerError> {
        let ids: Option<Vec<i64>> = ids.map(<[i64]>::to_vec);
        Ok(self
            .client
            .execute(
                &format!(
                    "UPDATE {}.deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
                     WHERE status IN ('dead', 'failed') AND ($1::bigint[] IS NULL OR id = ANY($1))
                       AND ($1::bigint[] IS NOT NULL OR status = 'dead')",
                    self.schema
                ),
                &[&ids],
            )
            .await?)
    }

    /// Marks dead letters `discarded`: kept for audit, never sent.
    pub async fn discard_dead(&self, ids: &[i64]) -> Result<u64, LedgerError> {
        Ok(self
            .client
            .execute(
                &format!(
                    "UPDATE {}.deliveries SET status = 'discarded', updated_at = now()
                     WHERE status IN ('dead', 'failed') AND id = ANY($1)",
                    self.schema
                ),
                &[&ids],
            )
            .await?)
    }
}

/// What an insert did.
#[derive(Debug, Default)]
pub struct Inserted {
    /// Rows that were new (replays are ignored).
    pub count: u64,
    /// New rows written already claimed, to be handed to dispatch in memory.
    pub claimed: Vec<Claimed>,
    /// Indexes (into the deliveries given) of the rows that were new: what
    /// metrics count as recorded. A replay is not a second delivery.
    pub fresh: Vec<usize>,
}

/// Rows per INSERT: bounds the size of one statement's parameter arrays.
const CHUNK: usize = 5000;

/// Inserts deliveries, ignoring replays (same idempotency key), inside the
/// caller's transaction. The one way rows enter the ledger ahead of their
/// outcome, for both source modes. With `claim = Some(lease)`, new sendable rows are written as
/// `sending` under that lease and returned as [`Ledger::claim`] would return
/// them, so dispatch can take them without a second write.
pub async fn insert_deliveries(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    deliveries: &[NewDelivery],
    claim: Option<Duration>,
) -> Result<Inserted, LedgerError> {
    let insert = client.prepare(&insert_sql(schema)).await?;
    insert_with(client, &insert, deliveries, claim).await
}

/// Why a payload was stored as `{}` and its delivery `failed`.
const UNSTORABLE: &str = "the payload holds a U+0000 (NUL) character, which jsonb cannot store";

/// A delivery's own columns, as statement parameters (`$1`–`$12` of
/// [`insert_sql`] and [`write_sql`]).
struct NewRows<'a> {
    text: [Vec<&'a str>; 6],
    recipients: Vec<Option<&'a str>>,
    payloads: Vec<String>,
    lsns: Vec<String>,
    times: Vec<DateTime<Utc>>,
    changes: Vec<String>,
    correlations: Vec<Option<&'a str>>,
    /// Routing already fails payloads jsonb cannot hold; this is the last
    /// line, so that one bad value can never wedge a whole statement (and
    /// every replay of it). Such a row's payload is written as `{}`.
    unstorable: Vec<bool>,
}

impl<'a> NewRows<'a> {
    /// Each delivery with its payload as JSON text, if already serialized.
    fn of(deliveries: impl ExactSizeIterator<Item = (&'a NewDelivery, Option<&'a str>)>) -> NewRows<'a> {
        let n = deliveries.len();
        let mut r = NewRows {
            text: Default::default(),
            recipients: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            lsns: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            changes: Vec::with_capacity(n),
            correlations: Vec::with_capacity(n),
            unstorable: Vec::with_capacity(n),
        };
        for (d, text) in deliveries {
            let payload = text.map_or_else(|| d.payload.to_string(), str::to_string);
            // serde_json writes U+0000 as this escape.
            let bad = payload.contains("\\u0000");
            r.unstorable.push(bad);
            r.payloads.push(if bad { "{}".into() } else { payload });
            for (col, v) in r.text.iter_mut().zip([
                d.source_table.as_str(),
                &d.source_pk,
                &d.channel,
                &d.idempotency_key,
                &d.event,
                d.operation.as_str(),
            ]) {
                col.push(v);
            }
            r.changes.push(d.change.to_string());
            r.recipients.push(d.recipient.as_deref());
            r.lsns.push(d.commit_lsn.to_string());
            r.times.push(d.committed_at);
            r.correlations.push(d.correlation.as_deref());
        }
        r
    }

    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let [t, pk, ch, k, ev, op] = &self.text;
        vec![
            t,
            pk,
            ch,
            k,
            ev,
            &self.recipients,
            &self.payloads,
            &self.lsns,
            &self.times,
            op,
            &self.changes,
            &self.correlations,
        ]
    }
}

/// [`NewRows::params`] as `unnest` arguments, and the names the statements give them.
const NEW_ROWS: &str = "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::text[]";
const NEW_NAMES: &str = "t, pk, ch, k, ev, r, p, l, c, op, cr, co";

/// Outcomes as statement parameters (`finish`: `$2`–`$6`; `write`: `$13`–`$17`).
#[derive(Default)]
struct Rows<'a> {
    ids: Vec<i64>,
    attempts: Vec<i32>,
    statuses: Vec<&'static str>,
    providers: Vec<Option<&'static str>>,
    msg_ids: Vec<Option<std::borrow::Cow<'a, str>>>,
    errors: Vec<Option<std::borrow::Cow<'a, str>>>,
    delays: Vec<f64>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, o: &'a Outcome) {
        let (status, provider, msg, err, delay): (&str, Option<&'static str>, Option<&str>, Option<&str>, f64) = match o
        {
            Outcome::Sent { provider, message_id } => ("sent", Some(provider), message_id.as_deref(), None, 0.0),
            Outcome::Retry { provider, error, delay } => {
                ("pending", Some(provider), None, Some(error), delay.as_secs_f64())
            }
            Outcome::Failed { provider, error } => ("failed", Some(provider), None, Some(error), 0.0),
            Outcome::Dead { provider, error } => ("dead", Some(provider), None, Some(error), 0.0),
            Outcome::Defer { error, delay } => ("deferred", None, None, Some(error), delay.as_secs_f64()),
            Outcome::Skipped { provider, reason } => ("skipped", Some(provider), None, Some(reason), 0.0),
        };
        self.statuses.push(status);
        self.providers.push(provider);
        self.msg_ids.push(msg.map(storable_text));
        self.errors.push(err.map(storable_text));
        self.delays.push(delay.clamp(0.0, MAX_DELAY.as_secs_f64()));
    }
}

/// [`insert_deliveries`] with the statement already prepared (by
/// [`insert_sql`]) on this connection.
async fn insert_with(
    client: &impl tokio_postgres::GenericClient,
    insert: &Statement,
    deliveries: &[NewDelivery],
    claim: Option<Duration>,
) -> Result<Inserted, LedgerError> {
    let mut out = Inserted::default();
    let lease: Option<f64> = claim.map(|l| l.as_secs_f64());
    // Measured before the statement: the lease runs from the server's now().
    let send_by = claim.map(|l| std::time::Instant::now() + l.mul_f64(0.8));
    for (n, chunk) in deliveries.chunks(CHUNK).enumerate() {
        let offset = n * CHUNK;
        let cols = NewRows::of(chunk.iter().map(|d| (d, None)));
        let mut statuses: Vec<&str> = Vec::with_capacity(chunk.len());
        let mut errors: Vec<Option<&str>> = Vec::with_capacity(chunk.len());
        for (d, bad) in chunk.iter().zip(&cols.unstorable) {
            statuses.push(if *bad { "failed" } else { d.disposition.status() });
            errors.push(if *bad { Some(UNSTORABLE) } else { d.disposition.reason() });
        }
        let mut params = cols.params();
        params.extend([&statuses as &(dyn tokio_postgres::types::ToSql + Sync), &errors, &lease]);
        let rows = client.query(insert, &params).await?;
        out.count += rows.len() as u64;
        // The first of several deliveries sharing a key is the one ON CONFLICT
        // kept: the claim handed to dispatch must carry what the ledger holds.
        let mut by_key: HashMap<&str, usize> = HashMap::with_capacity(chunk.len());
        for (i, d) in chunk.iter().enumerate() {
            by_key.entry(d.idempotency_key.as_str()).or_insert(i);
        }
        for r in &rows {
            let i = by_key[r.get::<_, &str>(1)];
            out.fresh.push(offset + i);
            let Some(send_by) = send_by.filter(|_| r.get::<_, bool>(2)) else { continue };
            let d = &chunk[i];
            out.claimed.push(Claimed::first(d, r.get(0), d.payload.clone(), send_by));
        }
    }
    out.claimed.sort_unstable_by_key(|c| c.id);
    Ok(out)
}

/// The one INSERT of deliveries ahead of their outcome: replays (same key)
/// ignored, sendable rows written already claimed when `$15` (the lease) is
/// given — except rows of a paused channel, written `pending` so that they
/// wait in the ledger.
pub fn insert_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.deliveries
           (source_table, source_pk, channel, idempotency_key, event, status,
            recipient, last_error, payload, commit_lsn, committed_at, attempts, next_attempt_at,
            operation, change_ref, correlation)
         SELECT t, pk, ch, k, ev, CASE WHEN x.claim THEN 'sending' ELSE st END,
                r, e, p::jsonb, l::pg_lsn, c, CASE WHEN x.claim THEN 1 ELSE 0 END,
                CASE WHEN x.claim THEN now() + $15::float8 * interval '1 second' ELSE now() END,
                op, cr, co
         FROM unnest({NEW_ROWS}, $13::text[], $14::text[]) AS u({NEW_NAMES}, st, e),
              LATERAL (SELECT u.st = 'pending' AND $15::float8 IS NOT NULL AND {paused} AS claim) x
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id, idempotency_key, status = 'sending'",
        paused = not_paused(schema, "u.ch")
    )
}

/// A delivery handed over unwritten, written once with its first outcome:
/// `sent`, `pending` again after a delay (a retry, or `deferred`: untried,
/// its attempt not counted), `failed`, `dead` or `skipped`. A key the ledger
/// has (a replay that raced a crash) is left alone.
fn write_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.deliveries
           (source_table, source_pk, channel, idempotency_key, event, recipient, payload, commit_lsn,
            committed_at, operation, change_ref, correlation,
            status, attempts, provider, provider_message_id, last_error, next_attempt_at, sent_at)
         SELECT t, pk, ch, k, ev, r, p::jsonb, l::pg_lsn, c, op, cr, co,
                CASE WHEN st = 'deferred' THEN 'pending' ELSE st END,
                CASE WHEN st = 'deferred' THEN 0 ELSE 1 END,
                pr, mid, CASE WHEN st = 'sent' THEN NULL ELSE err END,
                now() + delay * interval '1 second',
                CASE WHEN st = 'sent' THEN now() END
         FROM unnest({NEW_ROWS}, $13::text[], $14::text[], $15::text[], $16::text[], $17::float8[])
              AS u({NEW_NAMES}, st, pr, mid, err, delay)
         ON CONFLICT (idempotency_key) DO NOTHING"
    )
}

async fn save_offset(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    slot: &str,
    lsn: Lsn,
    unwritten: Option<Lsn>,
) -> Result<(), LedgerError> {
    // GREATEST: a late or replayed write can never move either position backwards.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.progress AS p (slot, confirmed_lsn, unwritten_lsn)
                 VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn)
                 ON CONFLICT (slot) DO UPDATE
                 SET confirmed_lsn = GREATEST(p.confirmed_lsn, EXCLUDED.confirmed_lsn),
                     unwritten_lsn = GREATEST(p.unwritten_lsn, EXCLUDED.unwritten_lsn), updated_at = now()"
            ),
            &[&slot, &lsn.to_string(), &unwritten.map(|u| u.to_string())],
        )
        .await?;
    Ok(())
}
