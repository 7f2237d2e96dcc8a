//! Ingestion: replication stream → routing → ledger → confirmed offset.
//!
//! The order of those arrows is the exactly-once argument: a transaction's
//! deliveries and the offset past it are committed to the ledger together, and
//! only then is that offset confirmed to the slot. A crash anywhere before the
//! ledger commit replays the transaction (the ledger ignores repeats); a crash
//! after it finds the deliveries already recorded.
//!
//! Transactions are batched: one ledger write covers every transaction that
//! arrived within `ingest_flush_ms` (or `ingest_batch_rows` rows), which is what
//! makes high insert rates cheap.
//!
//! While dispatch keeps up, sendable deliveries are not written here at all:
//! they are handed over in memory and written once, with their outcome
//! (`unwritten`). The offset then moves only over batches whose deliveries
//! are all written — a crash before that replays them, and the ledger skips
//! what it has.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::change::Lsn;
use crate::config::Config;
use crate::dispatch::Intake;
use crate::ledger::{self, Claimed, Ledger, LedgerError};
use crate::routing::{NewDelivery, Router};
use crate::source::replication::{ReplicationError, ReplicationEvent, ReplicationStream};
use crate::telemetry::{metric, Health, Telemetry};
use crate::unwritten::Prefix;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Gap(#[from] crate::gap::GapError),
    #[error("source.database_url: {0}")]
    Url(String),
    /// The ledger writer stopped; its own error is the one reported.
    #[error("ledger writer stopped")]
    WriterGone,
}

impl IngestError {
    pub fn is_retryable(&self) -> bool {
        match self {
            IngestError::Replication(e) => e.is_retryable(),
            IngestError::Ledger(e) => e.is_retryable(),
            IngestError::Gap(e) => e.is_retryable(),
            IngestError::Url(_) => false,
            IngestError::WriterGone => true,
        }
    }

    /// Another connection streams the slot. Usually the server has not yet
    /// noticed that a previous relay process died: worth waiting a little.
    pub fn slot_in_use(&self) -> bool {
        matches!(self, IngestError::Replication(e) if e.sqlstate() == Some("55006"))
    }
}

/// How long a "slot in use" is waited out before it counts as a second relay
/// running against the same slot (a configuration error).
const SLOT_BUSY_PATIENCE: u32 = 20;

/// How often the relay reports its position even when the server does not ask:
/// well inside PostgreSQL's default wal_sender_timeout (60 s).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

pub struct Ingest {
    cfg: Arc<Config>,
    /// Routes as configured; each session adds the tables' primary keys.
    router: Router,
    intake: Intake,
    health: Arc<Health>,
    /// `ingest` and `ledger.write` spans of what each batch recorded.
    telemetry: Telemetry,
}

impl Ingest {
    pub fn new(cfg: Arc<Config>, intake: Intake, health: Arc<Health>, telemetry: Telemetry) -> Ingest {
        let router = Router::new(&cfg);
        Ingest { cfg, router, intake, health, telemetry }
    }

    /// Streams until `shutdown` turns true. Connection losses (PostgreSQL
    /// restarting, network) reconnect with backoff and resume from the
    /// confirmed offset; errors that need a human end the run.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), IngestError> {
        let pg =
            crate::db::PgTarget::parse(&self.cfg.source.database_url).map_err(|e| IngestError::Url(e.to_string()))?;
        let mut failures = 0u32;
        loop {
            let Err(e) = self.session(&pg, &mut shutdown, &mut failures).await else { return Ok(()) };
            // A busy slot is usually our previous connection not yet released.
            let retry = e.is_retryable() || (e.slot_in_use() && failures < SLOT_BUSY_PATIENCE);
            if !crate::source::back_off("source", &self.health, e, retry, &mut failures, &mut shutdown).await? {
                return Ok(());
            }
        }
    }

    async fn session(
        &self,
        pg: &crate::db::PgTarget,
        shutdown: &mut watch::Receiver<bool>,
        failures: &mut u32,
    ) -> Result<(), IngestError> {
        let src = &self.cfg.source;
        let ledger = Ledger::new(ledger::connect(&src.database_url).await?, &self.cfg.relay.schema);
        // What the last session handed over unwritten is written first (by
        // workers, once the ledger is back): the replay must find it there.
        self.intake.unwritten().all_written().await;
        let progress = ledger.load_progress(&src.slot).await?;
        let stored = progress.map(|p| p.0);
        // Changes up to here may have been handed over unwritten, and sent,
        // before the last stop: see `Self::write`.
        let replay = progress.and_then(|(confirmed, unwritten)| unwritten.filter(|u| *u >= confirmed));
        // Checked on every (re)connection: a slot recreated while the relay was
        // cut off would otherwise skip what was committed in between.
        crate::gap::check_slot(ledger.client(), &src.slot, stored).await?;
        let start = stored.unwrap_or_default();
        self.intake.release_orphans(&ledger).await?;
        // Read per session: a table given a primary key since is seen on reconnect.
        let keys = crate::source::primary_keys(ledger.client(), self.router.tables()).await.map_err(LedgerError::Db)?;
        let router = self.router.clone().with_primary_keys(keys);
        let stream = ReplicationStream::start(pg, &src.slot, &src.publication, start).await?;
        self.health.source_connected.store(true, Ordering::Relaxed);
        self.health.ledger_connected.store(true, Ordering::Relaxed);
        *failures = 0;
        info!(slot = %src.slot, publication = %src.publication, from = %start, "streaming");

        // Reading and writing overlap: while one batch is being written, the
        // next one is read and routed. One batch waits at most; a slow ledger
        // then slows reading (and the slot keeps the WAL) rather than memory growing.
        let (handoff, batches) = mpsc::channel::<Handoff>(1);
        let (written_tx, written) = mpsc::unbounded_channel::<Lsn>();
        let reader = self.read(&router, stream, start, handoff, written, shutdown);
        let writer = self.write(ledger, batches, written_tx, start, replay);
        match tokio::join!(reader, writer) {
            (_, Err(e)) | (Err(e), _) => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads the stream, routes, hands batches to [`Self::write`], and confirms
    /// to PostgreSQL each offset the writer reports durable.
    async fn read(
        &self,
        router: &Router,
        mut stream: ReplicationStream,
        start: Lsn,
        handoff: mpsc::Sender<Handoff>,
        mut written: mpsc::UnboundedReceiver<Lsn>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let mut batch = Batch {
            deliveries: Vec::new(),
            end: None,
            deadline: None,
            handed: start,
            confirmed: start,
            last_idle_write: None,
        };
        let flush_after = Duration::from_millis(self.cfg.relay.ingest_flush_ms);
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.health.tick(crate::telemetry::Loop::Source);
            let deadline = batch.deadline;
            tokio::select! {
                biased;
                _ = crate::stopped(shutdown) => {
                    // Stop reading, make what was read durable, confirm it, leave.
                    batch.hand_off(&handoff).await?;
                    drop(handoff);
                    while batch.confirmed < batch.handed {
                        match written.recv().await {
                            Some(lsn) => batch.confirmed = batch.confirmed.max(lsn),
                            None => return Err(IngestError::WriterGone),
                        }
                    }
                    stream.send_status(batch.confirmed, false).await?;
                    let _ = stream.close().await;
                    info!(confirmed = %batch.confirmed, "ingestion stopped");
                    return Ok(());
                }
                lsn = written.recv() => {
                    let Some(lsn) = lsn else { return Err(IngestError::WriterGone) };
                    // The ledger has it: only now may the slot let it go.
                    batch.confirmed = batch.confirmed.max(lsn);
                    stream.send_status(batch.confirmed, false).await?;
                    metrics::gauge!(metric::CONFIRMED_LSN).set(batch.confirmed.0 as f64);
                    let lag = stream.server_wal_end().0.saturating_sub(batch.confirmed.0);
                    metrics::gauge!(metric::REPLICATION_LAG).set(lag as f64);
                }
                _ = sleep_until(deadline), if deadline.is_some() => batch.hand_off(&handoff).await?,
                _ = status_tick.tick() => stream.send_status(batch.confirmed, false).await?,
                event = stream.next_event() => match event? {
                    ReplicationEvent::Tx(tx) => {
                        let routed = tx.changes.iter().filter(|c| router.routes_table(&c.table.qualified_name()));
                        let rows = routed.count();
                        if rows > 0 {
                            metrics::counter!(metric::ROWS_INGESTED).increment(rows as u64);
                        }
                        router.route_tx(&tx, &mut batch.deliveries);
                        if tx.complete {
                            batch.end = Some(tx.end_lsn);
                        }
                        if batch.deliveries.len() >= self.cfg.relay.ingest_batch_rows {
                            batch.hand_off(&handoff).await?;
                        } else if batch.deadline.is_none() {
                            batch.deadline = Some(Instant::now() + flush_after);
                        }
                    }
                    ReplicationEvent::Keepalive { wal_end, reply_requested } => {
                        // Idle and between transactions, with nothing unwritten:
                        // everything up to wal_end has been received and is
                        // recorded, so the slot may let that WAL go. Without this,
                        // quiet routed tables would make the slot retain WAL
                        // written by everything else.
                        let idle = batch.end.is_none() && batch.handed <= batch.confirmed && !stream.in_transaction();
                        // At most once per STATUS_INTERVAL: each write is WAL
                        // the walsender then reports, which would be written
                        // again — the relay's own writes must not feed themselves.
                        let due = batch.last_idle_write.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL);
                        if idle && due && wal_end > batch.handed {
                            batch.last_idle_write = Some(Instant::now());
                            // Through the writer, so the stored offset moves too.
                            batch.end = Some(wal_end);
                            batch.hand_off(&handoff).await?;
                        } else if reply_requested {
                            stream.send_status(batch.confirmed, false).await?;
                        }
                        let lag = stream.server_wal_end().0.saturating_sub(batch.confirmed.0);
                        metrics::gauge!(metric::REPLICATION_LAG).set(lag as f64);
                    }
                }
            }
        }
    }

    /// Writes each batch with its offset in one ledger transaction, hands
    /// fresh deliveries to dispatch, and reports back to the reader each
    /// offset that is durable — the end of the batches whose deliveries are
    /// all in the ledger. Ends when the reader drops its sender (or on the
    /// first error).
    ///
    /// `replay`: the highest commit position the last session handed over
    /// unwritten. Changes up to it are written the ordinary way — the ledger
    /// skips those it has — and what is new among them may have been sent
    /// before the stop: counted as possible re-sends, as a row left `sending`
    /// would be.
    async fn write(
        &self,
        mut ledger: Ledger,
        mut batches: mpsc::Receiver<Handoff>,
        written: mpsc::UnboundedSender<Lsn>,
        mut saved: Lsn,
        mut replay: Option<Lsn>,
    ) -> Result<(), IngestError> {
        let slot = &self.cfg.source.slot;
        let unwritten = self.intake.unwritten().clone();
        let mut prefix = Prefix::default();
        loop {
            let h = tokio::select! {
                h = batches.recv() => match h {
                    Some(h) => h,
                    None => break,
                },
                _ = unwritten.some_written(), if prefix.waiting() => {
                    saved = save_written(&mut prefix, &ledger, slot, saved, &written).await?;
                    continue;
                }
            };
            // Dispatch has room (or will in a moment): hand fresh deliveries
            // over — unwritten while it keeps up, else written already
            // claimed. If not, they wait in the ledger's queue.
            let room = match h.deliveries.is_empty() {
                true => None,
                false => self.intake.room_soon(h.deliveries.len()).await,
            };
            let claim = self.intake.claim(&room);
            let replaying = replay.is_some_and(|r| h.deliveries.iter().any(|d| d.commit_lsn <= r));
            let skip_write = room.is_some() && !replaying && self.intake.keeps_up();
            let (handed, recorded): (Vec<NewDelivery>, Vec<NewDelivery>) = match skip_write {
                true => h.deliveries.into_iter().partition(|d| self.intake.may_skip_write(d)),
                false => (Vec::new(), h.deliveries),
            };
            let batch = (!handed.is_empty()).then(|| unwritten.batch(handed.len()));
            prefix.push(h.end, batch.clone());
            let save = prefix.advance().unwrap_or(saved).max(saved);
            let high = handed.iter().map(|d| d.commit_lsn).max();
            let started = std::time::Instant::now();
            let write_start = std::time::SystemTime::now();
            let inserted = ledger.record(&recorded, slot, save, claim, high).await?;
            metrics::histogram!(metric::LEDGER_FLUSH).record(started.elapsed().as_secs_f64());
            if let Some(r) = replay {
                let sendable = |d: &NewDelivery| matches!(d.disposition, crate::routing::Disposition::Pending);
                let again =
                    inserted.fresh.iter().filter(|&&i| recorded[i].commit_lsn <= r && sendable(&recorded[i])).count();
                if again > 0 {
                    metrics::counter!(metric::RESENDS_AFTER_RESTART).increment(again as u64);
                    warn!(
                        deliveries = again,
                        "deliveries handed over before the last stop may have been sent; sending them again"
                    );
                }
            }
            let fresh = inserted.fresh.iter().map(|&i| &recorded[i]).chain(&handed);
            crate::routing::count_recorded(fresh.clone(), &self.cfg);
            crate::routing::trace_recorded(
                self.telemetry.tracer.as_ref(),
                fresh,
                write_start,
                std::time::SystemTime::now(),
            );
            let (count, claimed) = (inserted.count, inserted.claimed.len());
            debug!(recorded = recorded.len(), inserted = count, claimed, unwritten = handed.len(), offset = %h.end,
                "ledger batch committed");
            let send_by = std::time::Instant::now() + self.intake.lease().mul_f64(0.8);
            let handed = match batch {
                Some(b) => handed.into_iter().map(|d| Claimed::unwritten(b.row(d), send_by)).collect(),
                None => Vec::new(),
            };
            self.intake.committed(room, inserted, handed);
            // Past the replayed region: every change up to it has been read.
            if replay.is_some_and(|r| h.end > r) {
                replay = None;
            }
            if save > saved {
                saved = save;
                // The reader may be gone (shutting down after an error): nothing to confirm then.
                let _ = written.send(save);
            }
        }
        // Stopping: what no worker took goes back to the queue untried; what
        // workers hold, they finish and write. Then the offset covers it all.
        self.intake.give_back_untaken(&ledger).await?;
        while prefix.waiting() {
            saved = save_written(&mut prefix, &ledger, slot, saved, &written).await?;
            if prefix.waiting() {
                unwritten.some_written().await;
            }
        }
        Ok(())
    }
}

/// After deliveries handed over unwritten were written: stores the offset
/// the written prefix reaches, if past `saved`, and reports it to the reader.
async fn save_written(
    prefix: &mut Prefix,
    ledger: &Ledger,
    slot: &str,
    saved: Lsn,
    written: &mpsc::UnboundedSender<Lsn>,
) -> Result<Lsn, IngestError> {
    let Some(end) = prefix.advance().filter(|e| *e > saved) else { return Ok(saved) };
    ledger.save_offset(slot, end).await?;
    // The reader may be gone (shutting down after an error): nothing to confirm then.
    let _ = written.send(end);
    Ok(end)
}

/// A batch on its way to the ledger: deliveries and the offset just past them.
struct Handoff {
    deliveries: Vec<NewDelivery>,
    end: Lsn,
}

/// The reader's position: what it holds, what it handed over, what is confirmed.
struct Batch {
    /// Received and routed, not yet handed to the writer.
    deliveries: Vec<NewDelivery>,
    /// End of the last complete transaction in `deliveries`.
    end: Option<Lsn>,
    /// When the oldest of them has waited long enough.
    deadline: Option<Instant>,
    /// Highest offset handed to the writer.
    handed: Lsn,
    /// Last offset the writer reported durable and we confirmed; never moves backwards.
    confirmed: Lsn,
    /// When an idle stream's position was last written to the ledger.
    last_idle_write: Option<Instant>,
}

impl Batch {
    /// Hands what is held to the writer (waiting while it is busy with the previous batch).
    async fn hand_off(&mut self, to: &mpsc::Sender<Handoff>) -> Result<(), IngestError> {
        // Parts of a transaction still open go with the offset already handed:
        // recorded now (memory stays bounded), confirmed with its Commit.
        let end = match self.end.take() {
            Some(end) => end,
            None if !self.deliveries.is_empty() => self.handed,
            None => return Ok(()),
        };
        let deliveries = std::mem::take(&mut self.deliveries);
        self.deadline = None;
        to.send(Handoff { deliveries, end }).await.map_err(|_| IngestError::WriterGone)?;
        self.handed = self.handed.max(end);
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
