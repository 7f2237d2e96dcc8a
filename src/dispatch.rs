//! Dispatch: works the ledger, never the replication stream.
//!
//! Workers claim due deliveries, call the channel's provider, and record each
//! outcome. A slow or failing provider therefore only grows the ledger's
//! backlog (on disk), never the relay's memory nor the slot's lag. Whether to
//! retry is decided in one place, [`decide`], from the provider's error class.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::stream::{self, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::Client;
use tracing::{debug, error, info, warn};

use crate::circuit::{Admission, Circuit};
use crate::config::{Config, ProviderKind};
use crate::contacts::{self, ContactPlan, Prepared};
use crate::db::reconnect_delay;
use crate::devices::{self, DevicePlan, DeviceStatus};
use crate::ledger::{ClaimRef, Claimed, Inserted, Ledger, LedgerError, Outcome};
use crate::limits::Pacer;
use crate::providers::bus::{BusMessage, BusRoute};
use crate::providers::devices::{fold, Device, DeviceError};
use crate::providers::{Accepted, BuildContext, OutboundMessage, Provider, ProviderError};
use crate::routing::NewDelivery;
use crate::telemetry::otlp::{DeliveryTrace, Span};
use crate::telemetry::{metric, Health, Telemetry};
use crate::unwritten::Unwritten;

/// Outcomes by claim (ledger id and the attempt count it was claimed with).
type Outcomes = Vec<(ClaimRef, Outcome)>;

/// A write of outcomes, and how it went.
type Written = (Outcomes, Result<(), LedgerError>);

/// A channel as dispatch sees it: who carries it and how its provider channel is named.
#[derive(Clone, Debug)]
struct ChannelPlan {
    provider: Provider,
    /// Takes fresh deliveries while `provider`'s circuit is open.
    fallback: Option<Provider>,
    /// A retryable failure older than this (since the source commit) goes `dead`.
    max_age: Duration,
    /// `private-user-{recipient}`.
    channel_name: String,
    max_attempts: u32,
    /// E-mail, SMS, WhatsApp: how to find the address and word the message.
    contact: Option<ContactPlan>,
    /// App channels' `preferences_query` (address channels check theirs in `contact`).
    preferences_query: Option<String>,
    /// Bus channels: the route, and the CloudEvents `source` before the table.
    bus: Option<(Arc<BusRoute>, String)>,
    /// Push channels: how to find the recipient's devices, and forget dead ones.
    devices: Option<DevicePlan>,
}

/// Retry timing; from `[relay]`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// "Full jitter": uniform in [0, min(max, base·2^(attempt-1))]. Spreads a
    /// burst of failures so that retries do not arrive at the provider together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max);
        Duration::from_secs_f64(rand::rng().random_range(0.0..=cap.as_secs_f64()))
    }
}

/// The claims this process holds in memory: handed over, being sent, or
/// with an outcome not yet written. After the ledger connection was lost, a
/// row `sending` in the ledger but not held here is an orphan — its claim's
/// commit went through while its acknowledgement was lost — and nobody would
/// send it before its lease ran out. [`Intake::release_orphans`] gives those
/// back at once. The gate keeps a claim from being read between its commit
/// and its registration here.
#[derive(Default)]
struct Held {
    /// Each held claim's `send_by`: past it, its lease may have run out.
    ids: std::sync::Mutex<HashMap<i64, Instant>>,
    gate: tokio::sync::RwLock<()>,
}

impl Held {
    /// Deliveries handed over unwritten are not rows yet: nothing to hold.
    fn add(&self, claims: &[Claimed]) {
        let held = claims.iter().filter(|c| c.unwritten.is_none()).map(|c| (c.id, c.send_by));
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).extend(held);
    }
    fn remove(&self, outcomes: &Outcomes) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for (claim, _) in outcomes {
            if let ClaimRef::Row(id, _) = claim {
                ids.remove(id);
            }
        }
    }
    fn snapshot(&self) -> Vec<i64> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }
    /// Held claims whose lease may have run out: the process was frozen
    /// (SIGSTOP, a VM pause) or starved while it held them. Their rows look
    /// due again in the ledger, but this process still has them in hand — a
    /// call may be under way, or its outcome not yet written — so its own
    /// claims must not take them a second time. Empty in normal running.
    fn overdue(&self) -> Vec<i64> {
        let now = Instant::now();
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter(|(_, send_by)| **send_by <= now).map(|(id, _)| *id).collect()
    }
}

/// Where claims start in the queue index. Every delivery leaves dead entries
/// at the low end of `deliveries_due` (its `pending` and `sending` versions)
/// until VACUUM removes them; a claim scanning from the start walks all of
/// them, so with a large backlog each claim cost more than the last — a 1 M
/// backlog drained at a fifth of the rate of a 100 k one. Claims instead
/// start at the lowest `next_attempt_at` the previous claim took: below it,
/// every row was dead, locked by another claim, or not yet committed.
///
/// That last case (a transaction that began earlier and committed later, a
/// row given back with `now()` while a claim ran) can leave a due row below
/// the floor, so at most every [`FULL_SCAN_EVERY`] a claim scans from the
/// start. The floor only decides *when* a row is claimed, never *whether*:
/// the claim itself is the same locked, leased update.
#[derive(Default)]
struct QueueFloor {
    floor: Option<chrono::DateTime<Utc>>,
    last_full: Option<Instant>,
}

/// How stale the floor may get: a due row below it waits at most this long.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

impl QueueFloor {
    /// Where the next claim starts; `None`: from the start of the index.
    fn start(&mut self, now: Instant) -> Option<chrono::DateTime<Utc>> {
        if self.floor.is_none() || self.last_full.is_none_or(|t| now.duration_since(t) >= FULL_SCAN_EVERY) {
            self.last_full = Some(now);
            return None;
        }
        self.floor
    }

    /// After a claim that started at `from` and took rows from `first_due` on.
    /// A full scan may lower the floor (it found a row a floored scan missed);
    /// a floored one only raises it. A claim that took nothing leaves it: an
    /// empty queue full of dead entries must not make every poll a full scan.
    fn claimed(&mut self, from: Option<chrono::DateTime<Utc>>, first_due: Option<chrono::DateTime<Utc>>) {
        let Some(first) = first_due else { return };
        self.floor = match (from, self.floor) {
            (Some(_), Some(floor)) => Some(floor.max(first)),
            _ => Some(first),
        };
    }
}

/// Channels paused (migration 009) as a worker last read them, for batches
/// ingestion handed over in memory: those were claimed at insert, before a
/// pause that may have landed since. Claims from the ledger need no such
/// check (the claim statement itself leaves paused channels alone), and a
/// stale "paused" here only sends a row back to the queue, never loses one.
#[derive(Default)]
struct PausedCache {
    channels: std::collections::HashSet<String>,
    read_at: Option<Instant>,
}

/// How stale [`PausedCache`] may get: after a pause, a batch handed over
/// before it may still be sent for this long. Rows inserted after the pause
/// are never handed over (the insert reads the table).
const PAUSED_REFRESH: Duration = Duration::from_secs(1);

/// Rows of a paused channel in a handed-over batch go back to the queue,
/// untried (their attempt given back); the rest is sent.
fn hold_back_paused(batch: Vec<Claimed>, paused: &std::collections::HashSet<String>) -> (Outcomes, Vec<Claimed>) {
    if paused.is_empty() {
        return (Vec::new(), batch);
    }
    let (held, send): (Vec<Claimed>, Vec<Claimed>) = batch.into_iter().partition(|c| paused.contains(&c.channel));
    let outcomes = held
        .iter()
        .map(|c| {
            let error = format!("channel {} paused; back to the queue", c.channel);
            (c.claim_ref(), Outcome::Defer { error, delay: Duration::ZERO })
        })
        .collect();
    (outcomes, send)
}

/// What is left in the hand-over, as untried outcomes.
fn untried(rx: &mut mpsc::Receiver<Vec<Claimed>>) -> Outcomes {
    let mut untried: Outcomes = Vec::new();
    while let Ok(batch) = rx.try_recv() {
        let error = "handed over at shutdown, not tried".to_string();
        untried.extend(
            batch.iter().map(|c| (c.claim_ref(), Outcome::Defer { error: error.clone(), delay: Duration::ZERO })),
        );
    }
    untried
}

/// Room in the hand-over: one permit per part.
pub type Room<'a> = mpsc::PermitIterator<'a, Vec<Claimed>>;

/// Batches ingestion may hand over in memory at once. Small: a crash counts
/// what waits here (`sending` in the ledger, or not written yet) as possible
/// re-sends, and it is memory.
const FRESH_BATCHES: usize = 2;

/// Ingestion's side of the fast path (docs/design.md): when dispatch has
/// room, fresh deliveries are passed here in memory — unwritten while calls
/// keep returning (written once, with their outcome), else written already
/// claimed; otherwise they are written `pending` and `wake` rings.
pub struct Intake {
    fresh: mpsc::Sender<Vec<Claimed>>,
    /// The other end, to give back at shutdown what no worker took.
    untaken: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<Claimed>>>>,
    held: Arc<Held>,
    /// Deliveries handed over before they are written (see `unwritten`).
    unwritten: Arc<Unwritten>,
    /// Channels whose deliveries may be handed over unwritten: all but push
    /// channels, whose per-device outcomes (`device_sends`) refer to the row.
    skip_write_channels: Arc<std::collections::HashSet<String>>,
    wake: Arc<Notify>,
    lease: Duration,
    /// Rows per hand-over part (`relay.dispatch_batch`).
    part: usize,
    /// When a provider call last returned, shared with the dispatcher (see
    /// [`Intake::room_soon`], [`Intake::keeps_up`]).
    finished: Arc<Finished>,
}

/// When a provider call last returned: the sign that dispatch is moving.
#[derive(Debug)]
struct Finished {
    base: Instant,
    /// Milliseconds after `base`; 0: never.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Finished {
    fn default() -> Finished {
        Finished { base: Instant::now(), last_ms: Default::default() }
    }
}

impl Finished {
    fn now(&self) {
        let ms = self.base.elapsed().as_millis() as u64 + 1;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// A call returned less than `within` ago.
    fn recently(&self, within: Duration) -> bool {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        last > 0 && (self.base.elapsed().as_millis() as u64 + 1).saturating_sub(last) <= within.as_millis() as u64
    }
}

/// How long ingestion waits for room in the hand-over, and how recently a
/// provider call must have returned for waiting — or handing deliveries over
/// unwritten — to be worth it. Draining, calls return every few
/// milliseconds; a slow provider (seconds per call) returns none that
/// recently, and the stream does not wait on it.
const HANDOVER_WAIT: Duration = Duration::from_millis(100);

/// How many [`HANDOVER_WAIT`]s ingestion waits for room while calls keep
/// returning. Waiting costs nothing the slot does not hold anyway;
/// giving up writes the batch to the queue — three writes per delivery
/// instead of one.
const HANDOVER_PATIENCE: u32 = 10;

impl Intake {
    /// Room for one batch in memory, if dispatch keeps up; hold it across the
    /// ledger write and pass it to [`Intake::committed`].
    pub fn room(&self, rows: usize) -> Option<Room<'_>> {
        self.fresh.try_reserve_many(self.parts(rows)).ok()
    }

    /// Hand-over parts for `rows` deliveries: workers take a part at a time
    /// (`relay.dispatch_batch` rows), so a worker waiting on the provider's
    /// pace holds that many in memory, not a whole ingestion batch.
    fn parts(&self, rows: usize) -> usize {
        rows.div_ceil(self.part).max(1)
    }

    /// [`Intake::room`], waiting for it while dispatch is busy but moving.
    /// When dispatch is the slower stage (a backlog being drained) every row
    /// then takes the fast path — handed over unwritten and written once
    /// with its outcome, or inserted claimed and then given its outcome —
    /// instead of queueing in the ledger: inserted, claimed, outcome, and a
    /// claim query. The rows not yet read wait in the slot's WAL, which
    /// holds them anyway. Waiting only while provider calls keep returning
    /// (one in the last [`HANDOVER_WAIT`]) means a slow provider never holds
    /// the stream: the batch goes to the ledger's queue at once, as before.
    pub async fn room_soon(&self, rows: usize) -> Option<Room<'_>> {
        let parts = self.parts(rows);
        if let Ok(permit) = self.fresh.try_reserve_many(parts) {
            return Some(permit);
        }
        if parts > self.fresh.max_capacity() {
            // More than the hand-over holds (many channels per row): the queue.
            return None;
        }
        for _ in 0..HANDOVER_PATIENCE {
            if !self.finished.recently(HANDOVER_WAIT) {
                return None;
            }
            if let Ok(Ok(permit)) = tokio::time::timeout(HANDOVER_WAIT, self.fresh.reserve_many(parts)).await {
                return Some(permit);
            }
        }
        None
    }

    /// The lease to insert fresh rows under, when there is room for them.
    pub fn claim(&self, room: &Option<Room<'_>>) -> Option<Duration> {
        room.as_ref().map(|_| self.lease)
    }

    /// Whether fresh deliveries may skip their first write now, handed over
    /// unwritten: only while provider calls keep returning, so that what
    /// waits on their outcomes — the stored offset — waits for moments. Not
    /// before the first call has returned (a provider may be slow from the
    /// start: `a_slow_provider_never_stalls_the_stream`), and never without
    /// workers. A provider that turns slow mid-stream holds the offset back
    /// for the calls already under way (at most its timeout); the batches
    /// after them are written as before.
    pub fn keeps_up(&self) -> bool {
        self.finished.recently(HANDOVER_WAIT)
    }

    /// A delivery that may be handed over unwritten: sendable, and not for
    /// a push channel.
    pub fn may_skip_write(&self, d: &NewDelivery) -> bool {
        matches!(d.disposition, crate::routing::Disposition::Pending) && self.skip_write_channels.contains(&d.channel)
    }

    /// How long a claim holds (`relay.claim_lease_ms`).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn unwritten(&self) -> &Arc<Unwritten> {
        &self.unwritten
    }

    /// After the ledger commit: hands the claimed rows — and the deliveries
    /// handed over unwritten, which only come with room — over, and wakes
    /// the workers for rows that wait in the ledger.
    pub fn committed(&self, room: Option<Room<'_>>, inserted: Inserted, unwritten: Vec<Claimed>) {
        let waiting = inserted.count > inserted.claimed.len() as u64;
        let mut batch = inserted.claimed;
        batch.extend(unwritten);
        if let Some(mut room) = room.filter(|_| !batch.is_empty()) {
            self.held.add(&batch);
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(self.part));
                room.next().expect("room reserved for every part").send(std::mem::replace(&mut batch, rest));
                // One worker per part: waking them all would send the rest
                // to claim from the ledger's queue for nothing.
                self.wake.notify_one();
            }
        } else {
            assert!(batch.is_empty(), "claimed rows are only written with room for them");
        }
        if waiting {
            self.wake.notify_waiters();
        }
    }

    /// Batches handed over that no worker took, back to the queue untried
    /// (written `pending`, their attempt not counted). Ingestion calls it
    /// when it stops, before it waits for the deliveries it handed over
    /// unwritten: workers stopping take no new batch.
    pub async fn give_back_untaken(&self, ledger: &Ledger) -> Result<u64, LedgerError> {
        let untried = untried(&mut *self.untaken.lock().await);
        ledger.finish(&untried).await?;
        self.held.remove(&untried);
        Ok(untried.len() as u64)
    }

    /// At the start of a source session (after a lost connection, typically):
    /// rows left `sending` that no worker of this process holds go back to the
    /// queue at once, instead of waiting out their lease. Sound because this
    /// process holds the relay's lock (`instance`): no other one claims rows.
    pub async fn release_orphans(&self, ledger: &Ledger) -> Result<u64, LedgerError> {
        let _no_claim_in_between = self.held.gate.write().await;
        let n = ledger.release_unheld(&self.held.snapshot()).await?;
        if n > 0 {
            info!(deliveries = n, "claims whose commit outlived the connection given back to the queue");
        }
        Ok(n)
    }
}

/// Shared by all dispatch workers.
pub struct Dispatcher {
    channels: HashMap<String, ChannelPlan>,
    backoff: Backoff,
    batch: usize,
    concurrency: usize,
    poll: Duration,
    /// How long a claim holds before another worker may take the row over.
    lease: Duration,
    /// One breaker per provider, shared by every worker and channel.
    circuits: HashMap<&'static str, Circuit>,
    /// One pacer per provider (concurrency and rate), likewise shared.
    pacers: HashMap<&'static str, Pacer>,
    /// Ingestion rings this after each ledger commit, so new work is picked up
    /// at once rather than at the next poll.
    pub wake: Arc<Notify>,
    /// Fresh batches from ingestion, already claimed (see [`Intake`]).
    fresh_tx: mpsc::Sender<Vec<Claimed>>,
    fresh_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<Claimed>>>>,
    held: Arc<Held>,
    /// See [`Intake::unwritten`].
    unwritten: Arc<Unwritten>,
    skip_write_channels: Arc<std::collections::HashSet<String>>,
    /// `None` in the slot's relay; a dispatch-only process's name, written
    /// with each of its claims (see [`Dispatcher::dispatch_only`]).
    claimer: Option<String>,
    /// When a handed-over batch was last finished, for [`Intake::room_soon`].
    finished: Arc<Finished>,
    /// Shared by the workers: one worker's claim moves every worker's floor.
    floor: std::sync::Mutex<QueueFloor>,
    /// `standby` set: this relay does not hold its lock (see `instance`), so
    /// it starts no provider call.
    health: Arc<Health>,
    /// Paused channels, re-read at most every [`PAUSED_REFRESH`], for handed-over batches.
    paused: std::sync::Mutex<PausedCache>,
    /// Provider-call spans and Sentry reports of deliveries given up.
    telemetry: Telemetry,
    /// The relay's schema, for per-device outcomes (`device_sends`).
    schema: String,
}

/// Builds every provider client named by a channel. Config validation
/// guarantees the sections exist; an SMTP URL lettre cannot parse is the one
/// error left.
pub fn build_providers(cfg: &Config) -> Result<HashMap<ProviderKind, Provider>, ProviderError> {
    let ctx = BuildContext { http: crate::providers::http_client_with(&cfg.tls)?, tls: cfg.tls.clone() };
    let mut out = HashMap::new();
    for kind in cfg.channels.values().flat_map(|ch| std::iter::once(ch.provider).chain(ch.fallback)) {
        if out.contains_key(&kind) {
            continue;
        }
        out.insert(kind, Provider::build(kind, &cfg.providers, &ctx)?);
    }
    Ok(out)
}

/// The database the relay reads, for the CloudEvents `source` of bus
/// channels; `postgres` (PostgreSQL's own default) when the DSN names none.
fn database_name(dsn: &str) -> String {
    crate::db::dsn::split(dsn)
        .ok()
        .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok())
        .and_then(|c| c.get_dbname().map(str::to_string))
        .unwrap_or_else(|| "postgres".into())
}

impl Dispatcher {
    pub fn new(cfg: &Config, health: Arc<Health>, telemetry: Telemetry) -> Result<Dispatcher, ProviderError> {
        let providers = build_providers(cfg)?;
        let database = database_name(&cfg.source.database_url);
        let channels = cfg
            .channels
            .iter()
            .map(|(name, ch)| {
                let plan = ChannelPlan {
                    provider: providers[&ch.provider].clone(),
                    fallback: ch.fallback.map(|f| providers[&f].clone()),
                    max_age: Duration::from_secs(ch.max_age_s),
                    channel_name: ch.channel_name.clone(),
                    max_attempts: ch.max_attempts,
                    contact: ContactPlan::from_config(name, ch),
                    preferences_query: ch.preferences_query.clone().filter(|_| ch.address_query.is_none()),
                    bus: ch.bus.as_ref().map(|route| (Arc::new(route.clone()), route.source_prefix(&database))),
                    devices: DevicePlan::from_config(ch),
                };
                (name.clone(), plan)
            })
            .collect();
        let circuits = providers
            .values()
            .map(|p| {
                let open_for = Duration::from_millis(cfg.relay.circuit_open_ms);
                (p.name(), Circuit::new(cfg.relay.circuit_failures, open_for))
            })
            .collect();
        let pacers = providers
            .iter()
            .map(|(kind, p)| {
                let l = cfg.limits_for(*kind);
                (p.name(), Pacer::new(l.concurrency, l.per_second))
            })
            .collect();
        // In parts (see `Intake::parts`): as many rows as before, two ingestion batches.
        let parts = cfg.relay.ingest_batch_rows.div_ceil(cfg.relay.dispatch_batch.max(1)).max(1);
        let (fresh_tx, fresh_rx) = mpsc::channel(FRESH_BATCHES * parts);
        Ok(Dispatcher {
            health,
            paused: Default::default(),
            telemetry,
            schema: cfg.relay.schema.clone(),
            held: Arc::default(),
            floor: Default::default(),
            finished: Arc::default(),
            claimer: None,
            fresh_tx,
            fresh_rx: Arc::new(tokio::sync::Mutex::new(fresh_rx)),
            unwritten: Arc::default(),
            skip_write_channels: Arc::new(
                cfg.channels
                    .iter()
                    .filter(|(_, ch)| DevicePlan::from_config(ch).is_none())
                    .map(|(n, _)| n.clone())
                    .collect(),
            ),
            channels,
            circuits,
            pacers,
            backoff: Backoff {
                base: Duration::from_millis(cfg.relay.retry_base_ms),
                max: Duration::from_millis(cfg.relay.retry_max_ms),
            },
            batch: cfg.relay.dispatch_batch.max(1),
            concurrency: cfg.relay.dispatch_concurrency.max(1),
            poll: Duration::from_millis(cfg.relay.dispatch_poll_ms.max(10)),
            lease: Duration::from_millis(cfg.relay.claim_lease_ms.max(1000)),
            wake: Arc::new(Notify::new()),
        })
    }

    /// For `run --only dispatch`: claims carry `name`, so the slot's relay
    /// leaves them alone at its start and session starts; they end by their
    /// outcome or, if this process dies, by their lease.
    pub fn dispatch_only(mut self, name: String) -> Dispatcher {
        self.claimer = Some(name);
        self
    }

    pub fn intake(&self) -> Intake {
        Intake {
            fresh: self.fresh_tx.clone(),
            untaken: self.fresh_rx.clone(),
            held: self.held.clone(),
            unwritten: self.unwritten.clone(),
            skip_write_channels: self.skip_write_channels.clone(),
            wake: self.wake.clone(),
            lease: self.lease,
            part: self.batch,
            finished: self.finished.clone(),
        }
    }

    /// A batch ingestion handed over, if any (and if no other worker is taking one).
    fn take_fresh(&self) -> Option<Vec<Claimed>> {
        self.fresh_rx.try_lock().ok()?.try_recv().ok()
    }

    /// After the workers stopped: batches still waiting in memory were never
    /// tried; give them back to the queue so the next start does not count
    /// them as possible re-sends.
    pub async fn release_fresh(&self, db_url: &str, schema: &str) -> Result<u64, LedgerError> {
        let untried = untried(&mut *self.fresh_rx.lock().await);
        if !untried.is_empty() {
            Ledger::new(crate::ledger::connect(db_url).await?, schema).finish(&untried).await?;
        }
        Ok(untried.len() as u64)
    }

    /// One worker: claim, deliver, record, until `shutdown` turns true, on its
    /// own connection. When the database goes away it reconnects with backoff
    /// and first records the outcomes it still holds, so a delivery accepted by
    /// a provider is not sent again just because PostgreSQL restarted.
    pub async fn run_worker(&self, db_url: &str, schema: &str, mut shutdown: watch::Receiver<bool>) {
        let mut unrecorded: Outcomes = Vec::new();
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() && unrecorded.is_empty() {
                return;
            }
            let result = match crate::ledger::connect(db_url).await {
                // The claim must walk the queue index in order and stop after
                // `batch` rows. Judged against statistics from when a backlog
                // was written, a bounded range of `next_attempt_at` looks like
                // a few hundred rows, and the planner's choice becomes "fetch
                // every row in the range, then sort": the whole backlog for
                // each claim of 500 (280 ms instead of 5 at 300 k). Without
                // bitmap scans the ordered index scan is the only cheap plan.
                Ok(client) => match client.batch_execute("SET enable_bitmapscan = off").await {
                    Err(e) => Err(LedgerError::Db(e)),
                    Ok(()) => {
                        let ledger = Ledger::new(client, schema);
                        self.work(&ledger, &mut unrecorded, &mut failures, &mut shutdown).await
                    }
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    // Waiting for the database is not being stuck.
                    self.health.tick(crate::telemetry::Loop::Dispatch);
                    failures += 1;
                    let delay = reconnect_delay(failures);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "dispatch lost the ledger; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = crate::stopped(&mut shutdown) => {}
                    }
                }
            }
        }
    }

    async fn work(
        &self,
        ledger: &Ledger,
        unrecorded: &mut Outcomes,
        failures: &mut u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), LedgerError> {
        if !unrecorded.is_empty() {
            ledger.finish(unrecorded).await?;
            self.held.remove(unrecorded);
            unrecorded.clear();
        }
        *failures = 0;
        loop {
            self.health.tick(crate::telemetry::Loop::Dispatch);
            if *shutdown.borrow() {
                return Ok(());
            }
            // Not holding the relay's lock: claim nothing until it is back.
            if self.health.standby.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Every channel's provider is down with nowhere to fall back: claiming
            // would only defer rows (a write each). Sleep until a probe is due.
            if let Some(until) = self.blocked_until(Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Registered before the claim: a wake-up that lands while we query is not lost.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = match self.take_fresh() {
                Some(fresh) => {
                    // Claimed at insert: a pause may have landed since.
                    let (held_back, send) = hold_back_paused(fresh, &self.paused_channels(ledger).await);
                    unrecorded.extend(held_back);
                    send
                }
                None => {
                    let _registered_before_release = self.held.gate.read().await;
                    let from = self.floor.lock().unwrap_or_else(|p| p.into_inner()).start(Instant::now());
                    let held = self.held.overdue();
                    let (claimed, first_due) =
                        ledger.claim_from(self.batch, self.lease, self.claimer.as_deref(), from, &held).await?;
                    self.floor.lock().unwrap_or_else(|p| p.into_inner()).claimed(from, first_due);
                    self.held.add(&claimed);
                    claimed
                }
            };
            if batch.is_empty() {
                if !unrecorded.is_empty() {
                    ledger.finish(unrecorded).await?;
                    self.held.remove(unrecorded);
                    unrecorded.clear();
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let resends = batch.iter().filter(|c| c.lease_expired).count();
            if resends > 0 {
                metrics::counter!(metric::RESENDS_AFTER_RESTART).increment(resends as u64);
            }
            let full = batch.len() == self.batch;
            let (settled, calls) = self.plan(&batch, ledger.client());
            unrecorded.extend(settled);
            // Each provider call is recorded as soon as it returns, not when the
            // whole batch is done: that keeps the crash window (accepted by the
            // provider, not yet in the ledger) to one call, not one batch.
            //
            // If the ledger goes away meanwhile, the calls already started are
            // still awaited and their outcomes kept: dropping them would forget
            // what a provider may have accepted, and the rows would wait out
            // their lease and be sent again.
            let mut calls = stream::iter(calls).buffer_unordered(self.concurrency);
            let mut calls_done = false;
            let mut lost: Option<LedgerError> = None;
            // One write at a time, and calls go on during it: what finishes
            // meanwhile goes into the next write. Under load that makes
            // fewer, larger statements; it never holds an outcome back
            // longer than the write before it takes. At most `concurrency`
            // calls' outcomes wait for the next write: that, and the calls
            // in flight, is what a crash can leave sent but not recorded.
            let mut writing: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Written> + Send + '_>>> = None;
            let mut waiting_calls = 0;
            loop {
                if writing.is_none() && lost.is_none() && !unrecorded.is_empty() {
                    waiting_calls = 0;
                    let batch = std::mem::take(unrecorded);
                    writing = Some(Box::pin(async move {
                        let result = ledger.finish(&batch).await;
                        (batch, result)
                    }));
                }
                if calls_done && writing.is_none() {
                    break;
                }
                tokio::select! {
                    outcomes = calls.next(), if !calls_done && (waiting_calls < self.concurrency || lost.is_some()) => match outcomes {
                        Some(outcomes) => {
                            waiting_calls += 1;
                            unrecorded.extend(outcomes);
                            self.finished.now();
                        }
                        None => calls_done = true,
                    },
                    (batch, result) = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                        writing = None;
                        match result {
                            Ok(()) => self.held.remove(&batch),
                            Err(e) => {
                                unrecorded.extend(batch);
                                lost = Some(e);
                            }
                        }
                    }
                }
            }
            if let Some(e) = lost {
                return Err(e);
            }
            if !unrecorded.is_empty() {
                ledger.finish(unrecorded).await?;
                self.held.remove(unrecorded);
                unrecorded.clear();
            }
            if full {
                // More is probably waiting: let the other workers know.
                self.wake.notify_one();
            }
        }
    }

    /// The paused channels, re-read from the ledger when the copy is older
    /// than [`PAUSED_REFRESH`]. If the read fails the last copy stands: the
    /// claim and the insert enforce a pause on their own; this only narrows
    /// the window for batches already handed over.
    async fn paused_channels(&self, ledger: &Ledger) -> std::collections::HashSet<String> {
        let fresh = |c: &PausedCache| c.read_at.is_some_and(|t| t.elapsed() < PAUSED_REFRESH);
        {
            let cache = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            if fresh(&cache) {
                return cache.channels.clone();
            }
        }
        match ledger.paused_channels().await {
            Ok(list) => {
                let channels: std::collections::HashSet<String> = list.into_iter().map(|p| p.channel).collect();
                let mut cache = self.paused.lock().unwrap_or_else(|p| p.into_inner());
                *cache = PausedCache { channels: channels.clone(), read_at: Some(Instant::now()) };
                channels
            }
            Err(e) => {
                debug!(error = %e, "could not re-read the paused channels; using the last list");
                self.paused.lock().unwrap_or_else(|p| p.into_inner()).channels.clone()
            }
        }
    }

    /// `Some(when)` if no channel can send now: each one's provider circuit is
    /// open and its fallback (if any) too.
    fn blocked_until(&self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for plan in self.channels.values() {
            let primary = self.circuits[plan.provider.name()].blocked_until(now)?;
            let until = match &plan.fallback {
                Some(f) => primary.min(self.circuits[f.name()].blocked_until(now)?),
                None => primary,
            };
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
        }
        earliest
    }

    /// Splits a claimed batch into provider calls (grouped by channel and
    /// provider, at most 100 messages each). Deliveries settled without a call
    /// (unknown channel, circuit open) come back at once in the first vector.
    fn plan<'a>(
        &'a self,
        batch: &'a [Claimed],
        db: &'a Client,
    ) -> (Outcomes, Vec<impl std::future::Future<Output = Outcomes> + Send + 'a>) {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut groups: HashMap<&str, Vec<&Claimed>> = HashMap::new();
        for c in batch {
            groups.entry(c.channel.as_str()).or_default().push(c);
        }
        let mut calls = Vec::new();
        for (channel, items) in groups {
            let Some(plan) = self.channels.get(channel) else {
                // The config changed since ingestion: say so rather than guess.
                for c in items {
                    let error = format!("channel {channel:?} is no longer in the relay config");
                    outcomes.push((c.claim_ref(), Outcome::Failed { provider: "none", error }));
                }
                continue;
            };
            // Which provider each delivery goes to. A delivery stays with the
            // provider that first had it — a timeout may hide an acceptance, so
            // moving it could deliver it twice — and only never-tried ones move
            // to the fallback while the primary's circuit is open.
            let now = Instant::now();
            let admission = self.circuits[plan.provider.name()].admit(now);
            let (mut primary, mut fallback) = (Vec::new(), Vec::new());
            for c in items {
                let to_fallback = match (&plan.fallback, c.provider.as_deref()) {
                    (Some(f), Some(p)) => p == f.name(),
                    (Some(_), None) => matches!(admission, Admission::Refuse(_)),
                    (None, _) => false,
                };
                if to_fallback {
                    fallback.push(c);
                } else if let Admission::Refuse(until) = admission {
                    let error = format!("{} is failing (circuit open); waiting", plan.provider.name());
                    outcomes.push((c.claim_ref(), Outcome::Defer { error, delay: until - now }));
                } else {
                    primary.push(c);
                }
            }
            // One chunk per provider call: it is also the unit recorded as soon
            // as it returns. Several chunks of a channel run at once. A probe
            // rides on the first chunk; with no chunk it is handed back, or the
            // circuit would wait for a result that never comes.
            let mut probe = admission == Admission::Probe;
            if probe && primary.is_empty() {
                self.circuits[plan.provider.name()].probe_unused();
            }
            for chunk in primary.chunks(plan.provider.batch_size()) {
                calls.push((plan, &plan.provider, chunk.to_vec(), std::mem::take(&mut probe)));
            }
            if let Some(f) = &plan.fallback {
                for chunk in fallback.chunks(f.batch_size()) {
                    calls.push((plan, f, chunk.to_vec(), false));
                }
            }
        }
        // Futures built here, polled by the caller: a closure inside the stream
        // would make the worker future non-`Send` (higher-ranked lifetimes).
        let futures = calls
            .into_iter()
            .map(|(plan, provider, chunk, probe)| self.call(plan, provider, chunk, probe, db))
            .collect();
        (outcomes, futures)
    }

    /// What to record for a delivery the contact lookup settled without a call.
    fn unprepared(&self, prepared: Prepared, provider: &'static str, c: &Claimed, plan: &ChannelPlan) -> Outcome {
        match prepared {
            Prepared::Skip(reason) => Outcome::Skipped { provider, reason },
            Prepared::Fail(error) => Outcome::Failed { provider, error },
            Prepared::Retry(reason) => {
                let age = (Utc::now() - c.committed_at).to_std().unwrap_or_default();
                let limits = Limits { max_attempts: plan.max_attempts, max_age: plan.max_age };
                let err = ProviderError::Retryable { reason, retry_after: None };
                decide(&err, provider, c.attempts as u32, age, &limits, &self.backoff)
            }
            Prepared::Ready(_) => unreachable!("a ready contact is sent, not settled"),
        }
    }

    /// Sends one chunk to `target`. `probe`: this call is the half-open
    /// circuit's probe; if no call is made after all, it is handed back.
    async fn call(
        &self,
        plan: &ChannelPlan,
        target: &Provider,
        chunk: Vec<&Claimed>,
        probe: bool,
        db: &Client,
    ) -> Outcomes {
        let provider = target.name();
        let unused_probe = || {
            if probe {
                self.circuits[provider].probe_unused();
            }
        };
        let mut settled: Outcomes = Vec::new();
        let mut sending: Vec<&Claimed> = Vec::with_capacity(chunk.len());
        let mut messages: Vec<OutboundMessage> = Vec::with_capacity(chunk.len());
        // Push channels: what each device did with these deliveries on earlier
        // attempts, so that a retry goes only to the devices still to reach.
        let mut earlier = HashMap::new();
        if plan.devices.is_some() {
            let ids: Vec<i64> = chunk.iter().map(|c| c.id).collect();
            match devices::earlier(db, &self.schema, &ids).await {
                Ok(found) => earlier = found,
                Err(e) => {
                    // Without them a retry could reach a device twice: wait for the database.
                    unused_probe();
                    let reason = format!("per-device outcomes: {e}");
                    return chunk
                        .iter()
                        .map(|c| {
                            let outcome = self.unprepared(Prepared::Retry(reason.clone()), provider, c, plan);
                            record(c, provider, &outcome, Utc::now(), 0.0);
                            (c.claim_ref(), outcome)
                        })
                        .collect();
                }
            }
        }
        // Per message: devices that took it on an earlier attempt.
        let mut reached_before: Vec<usize> = Vec::with_capacity(chunk.len());
        for c in chunk {
            // Looked up now, not stored: consent and preferences are those at send time.
            let prepared = match (&plan.contact, &plan.preferences_query, c.recipient.as_deref()) {
                (Some(cp), _, _) => {
                    let (recipient, kind) = (c.recipient.as_deref(), target.kind());
                    Some(contacts::prepare(db, cp, kind, recipient, &c.event, &c.payload).await)
                }
                (None, Some(sql), Some(recipient)) => contacts::preference_refuses(db, sql, recipient, &c.event).await,
                _ => None,
            };
            let mut settle = |outcome: Outcome| {
                record(c, provider, &outcome, Utc::now(), 0.0);
                self.report(c, plan, provider, &outcome);
                settled.push((c.claim_ref(), outcome));
            };
            let contact = match prepared {
                None => None,
                Some(Prepared::Ready(contact)) => Some(contact),
                Some(prepared) => {
                    settle(self.unprepared(prepared, provider, c, plan));
                    continue;
                }
            };
            let (mut to_reach, mut before) = (Vec::new(), 0);
            if let Some(dp) = &plan.devices {
                let found = match devices::lookup(db, dp, c.recipient.as_deref()).await {
                    Ok(found) => found,
                    Err(prepared) => {
                        settle(self.unprepared(prepared, provider, c, plan));
                        continue;
                    }
                };
                let done = earlier.get(&c.id);
                for device in found {
                    match done.and_then(|d| d.get(&device.hash()[..])) {
                        Some(DeviceStatus::Sent) => before += 1,
                        Some(DeviceStatus::Gone | DeviceStatus::Failed) => {}
                        None => to_reach.push(device),
                    }
                }
                if to_reach.is_empty() {
                    // Every device settled on earlier attempts (the process
                    // stopped between a call and its outcome): nothing to send.
                    settle(match before {
                        0 => Outcome::Failed {
                            provider,
                            error: "every device was gone or refused it on earlier attempts".into(),
                        },
                        _ => Outcome::Sent { provider, message_id: None },
                    });
                    continue;
                }
            }
            messages.push(OutboundMessage {
                delivery_id: c.id,
                idempotency_key: c.idempotency_key.clone(),
                channel_name: plan.channel_name.replace("{recipient}", c.recipient.as_deref().unwrap_or("")),
                event: c.event.clone(),
                payload: c.payload.clone(),
                contact,
                bus: plan.bus.as_ref().map(|(route, source)| BusMessage {
                    route: route.clone(),
                    source: format!("{source}/{}", c.source_table),
                    recipient: c.recipient.clone(),
                    time: c.committed_at,
                }),
                correlation: self.propagated_correlation(c),
                devices: to_reach,
            });
            reached_before.push(before);
            sending.push(c);
        }
        if messages.is_empty() {
            unused_probe();
            return settled;
        }
        let chunk = sending;
        // A slow pace (or a long batch) can outlast the claim: sending after it
        // could race a worker that took the row over. Hand it back untried instead.
        let send_by = chunk.iter().map(|c| c.send_by).min();
        let permit = match self.health.standby.load(std::sync::atomic::Ordering::Relaxed) {
            // The lock was lost since the claim: another relay may take over.
            true => None,
            false => self.pacers[provider].admit(messages.len(), send_by).await,
        };
        let Some(permit) = permit else {
            unused_probe();
            let error = format!("{provider} pacing: the claim would run out before the call; back to the queue");
            return chunk
                .iter()
                .map(|c| (c.claim_ref(), Outcome::Defer { error: error.clone(), delay: Duration::ZERO }))
                .chain(settled)
                .collect();
        };
        let started = Instant::now();
        let started_at = std::time::SystemTime::now();
        let results = match &plan.devices {
            None => target.send_batch(&messages).await,
            Some(dp) => self.send_to_devices(target, dp, &messages, &reached_before, db).await,
        };
        let ended_at = std::time::SystemTime::now();
        drop(permit);
        let call_ms = started.elapsed().as_secs_f64() * 1000.0;
        let circuit = &self.circuits[provider];
        if results.iter().any(|r| matches!(r, Err(e) if e.is_retryable())) {
            if circuit.failure(Instant::now()) {
                metrics::gauge!(metric::CIRCUIT_OPEN, "provider" => provider).set(1.0);
                warn!(provider, "provider keeps failing: circuit open, fresh deliveries go to the fallback if any");
            }
        } else {
            circuit.success();
            metrics::gauge!(metric::CIRCUIT_OPEN, "provider" => provider).set(0.0);
        }
        let now = Utc::now();
        chunk
            .iter()
            .zip(messages.iter().zip(results))
            .map(|(c, (message, result))| {
                let outcome = match result {
                    Ok(accepted) => Outcome::Sent { provider, message_id: accepted.provider_message_id },
                    Err(e) => {
                        let e = match &message.contact {
                            Some(contact) => e.without_address(&contact.address),
                            None => e,
                        };
                        let age = (now - c.committed_at).to_std().unwrap_or_default();
                        let limits = Limits { max_attempts: plan.max_attempts, max_age: plan.max_age };
                        decide(&e, provider, c.attempts as u32, age, &limits, &self.backoff)
                    }
                };
                record(c, provider, &outcome, now, call_ms);
                self.report(c, plan, provider, &outcome);
                self.trace_call(c, provider, &outcome, started_at, ended_at);
                (c.claim_ref(), outcome)
            })
            .chain(settled)
            .collect()
    }

    /// What the provider is given as correlation (see `otlp::propagated`).
    fn propagated_correlation(&self, c: &Claimed) -> Option<String> {
        let tracing = self.telemetry.tracer.is_some();
        crate::telemetry::otlp::propagated(c.correlation.as_deref(), &c.idempotency_key, c.attempts, tracing)
    }

    /// The `provider.send` span of this attempt, a child of the delivery's `ingest` span.
    fn trace_call(
        &self,
        c: &Claimed,
        provider: &'static str,
        outcome: &Outcome,
        start: std::time::SystemTime,
        end: std::time::SystemTime,
    ) {
        let Some(tracer) = &self.telemetry.tracer else { return };
        let trace = DeliveryTrace::new(&c.idempotency_key, c.correlation.as_deref());
        let mut span = Span::client(&trace, trace.send_span(c.attempts), Some(trace.ingest_span), "provider.send")
            .between(start, end)
            .attr("outbox_relay.delivery_key", c.idempotency_key.clone())
            .attr("outbox_relay.channel", c.channel.clone())
            .attr("outbox_relay.provider", provider)
            .attr("outbox_relay.event", c.event.clone())
            .attr("outbox_relay.attempt", c.attempts as i64)
            .attr("outbox_relay.outcome", outcome.label());
        if let Some(v) = c.correlation.as_deref().filter(|_| trace.remote_parent.is_none()) {
            span = span.attr("outbox_relay.correlation", v.to_string());
        }
        span.error = match outcome {
            Outcome::Sent { .. } | Outcome::Skipped { .. } => None,
            Outcome::Retry { .. } => Some("failed, will retry".into()),
            Outcome::Failed { .. } => Some("refused for good".into()),
            Outcome::Dead { .. } => Some("retries exhausted".into()),
            Outcome::Defer { .. } => Some("deferred".into()),
        };
        tracer.record(span);
    }

    /// Deliveries given up (`failed`) and dead letters go to Sentry, with ids
    /// and names only: the error text is scrubbed of the recipient and the
    /// provider channel name (which holds it).
    fn report(&self, c: &Claimed, plan: &ChannelPlan, provider: &'static str, outcome: &Outcome) {
        let (status, error) = match outcome {
            Outcome::Failed { error, .. } => ("failed", error),
            Outcome::Dead { error, .. } => ("dead", error),
            _ => return,
        };
        if self.telemetry.sentry.is_none() {
            return;
        }
        let recipient = c.recipient.as_deref().unwrap_or("");
        let channel_name = plan.channel_name.replace("{recipient}", recipient);
        let error = crate::telemetry::sentry::scrub(error, &[&channel_name, recipient]);
        let tags = crate::telemetry::sentry::DeliveryTags {
            channel: c.channel.clone(),
            provider: provider.to_string(),
            event: c.event.clone(),
            delivery_key: c.idempotency_key.clone(),
            correlation: c.correlation.clone(),
        };
        self.telemetry.given_up(status, tags, error);
    }
}

impl Dispatcher {
    /// Sends to each message's devices, keeps every device's settled answer
    /// (`device_sends`), runs `on_invalid_token` for the gone ones, and
    /// returns each message's one result.
    ///
    /// The answers are written right after the call, before the deliveries'
    /// outcomes: if the process stops in between, the delivery is claimed
    /// again and finds its devices already settled, instead of reaching them
    /// twice. If that write fails (the database went away), a retry may
    /// reach a device twice: the same window as any call whose outcome is
    /// lost, counted the same way.
    async fn send_to_devices(
        &self,
        target: &Provider,
        plan: &DevicePlan,
        messages: &[OutboundMessage],
        reached_before: &[usize],
        db: &Client,
    ) -> Vec<Result<Accepted, ProviderError>> {
        let answers = target.send_devices(messages).await;
        let mut rows = Vec::new();
        let mut gone: Vec<&Device> = Vec::new();
        let mut results = Vec::with_capacity(messages.len());
        for ((m, answers), before) in messages.iter().zip(answers).zip(reached_before) {
            if answers.len() != m.devices.len() {
                results.push(Err(ProviderError::Retryable {
                    reason: format!("{} answered for {} of {} devices", target.name(), answers.len(), m.devices.len()),
                    retry_after: None,
                }));
                continue;
            }
            let answers: Vec<_> = answers
                .into_iter()
                .zip(&m.devices)
                .map(|(a, d)| crate::providers::devices::without_token(a, d))
                .collect();
            for (a, d) in answers.iter().zip(&m.devices) {
                if let Some(status) = DeviceStatus::of(a) {
                    rows.push((m.delivery_id, d.hash(), status));
                }
                if matches!(a, Err(DeviceError::Gone { .. })) {
                    gone.push(d);
                }
            }
            results.push(fold(*before, &answers, &m.devices));
        }
        if let Err(e) = devices::record(db, &self.schema, &rows).await {
            warn!(provider = target.name(), error = %e,
                "per-device outcomes not recorded: a retry of these deliveries may reach a device twice");
        }
        for device in gone {
            devices::forget(db, plan, device).await;
        }
        results
    }
}

/// When a retryable failure stops being retried.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_attempts: u32,
    pub max_age: Duration,
}

/// Retry or not, in one place. Retryable errors retry with backoff (at least
/// what the provider asked for) until `max_attempts` or `max_age`, then go
/// `dead` for an operator; permanent ones fail at once with the provider's words.
pub fn decide(
    err: &ProviderError,
    provider: &'static str,
    attempts: u32,
    age: Duration,
    limits: &Limits,
    backoff: &Backoff,
) -> Outcome {
    match err {
        ProviderError::Retryable { reason, .. } if attempts >= limits.max_attempts => {
            Outcome::Dead { provider, error: format!("gave up after {attempts} attempts: {reason}") }
        }
        ProviderError::Retryable { reason, .. } if age >= limits.max_age => {
            Outcome::Dead { provider, error: format!("gave up after {} s (max_age): {reason}", age.as_secs()) }
        }
        ProviderError::Retryable { reason, retry_after } => {
            let delay = backoff.delay(attempts).max(retry_after.unwrap_or_default());
            Outcome::Retry { provider, error: reason.clone(), delay }
        }
        ProviderError::Permanent { reason } => Outcome::Failed { provider, error: reason.clone() },
        ProviderError::Unauthorized { reason } => {
            // Every message will fail the same way until someone fixes the credentials.
            metrics::counter!(metric::PROVIDER_UNAUTHORIZED, "provider" => provider).increment(1);
            error!(provider, "provider refused the relay's credentials: fix [providers.{provider}] ({reason})");
            Outcome::Failed { provider, error: format!("credentials refused: {reason}") }
        }
    }
}

fn record(c: &Claimed, provider: &'static str, outcome: &Outcome, now: chrono::DateTime<Utc>, call_ms: f64) {
    metrics::counter!(metric::DELIVERIES, "channel" => c.channel.clone(), "provider" => provider, "outcome" => outcome.label())
        .increment(1);
    match outcome {
        Outcome::Sent { message_id, .. } => {
            let latency = (now - c.committed_at).to_std().unwrap_or_default();
            metrics::histogram!(metric::COMMIT_TO_ACCEPTED, "channel" => c.channel.clone(), "provider" => provider)
                .record(latency.as_secs_f64());
            debug!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, correlation = c.correlation.as_deref(), provider, latency_ms = latency.as_millis() as u64, call_ms,
                provider_message_id = message_id.as_deref(), "delivered");
        }
        Outcome::Retry { error, delay, .. } => {
            warn!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, correlation = c.correlation.as_deref(), provider, attempts = c.attempts, retry_in_ms = delay.as_millis() as u64,
                error = %error, "delivery failed, will retry");
        }
        Outcome::Defer { .. } => {}
        Outcome::Skipped { reason, .. } => {
            info!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, correlation = c.correlation.as_deref(), provider, reason = %reason,
                "delivery skipped");
        }
        Outcome::Failed { error, .. } | Outcome::Dead { error, .. } => {
            warn!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, correlation = c.correlation.as_deref(), provider, attempts = c.attempts,
                status = outcome.label(),
                error = %error, "delivery given up");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../docs/bus.example.toml");

    #[test]
    fn the_readme_example_routes_one_table_to_each_bus() {
        let readme = include_str!("../README.md");
        assert!(readme.contains(EXAMPLE), "README shows docs/bus.example.toml verbatim");
        let cfg = Config::from_toml(EXAMPLE).unwrap();
        let kinds: Vec<_> = cfg.routes[0].channels.iter().map(|c| cfg.channels[c].provider.as_str()).collect();
        assert_eq!(kinds, ["kafka", "rabbitmq", "redis", "nats"]);
        assert_eq!(cfg.channels["rabbitmq"].bus.as_ref().unwrap().mode, crate::providers::bus::EnvelopeMode::Binary);
        let redis = cfg.channels["redis"].bus.as_ref().unwrap();
        assert_eq!(redis.events["order_shipped"].destination.as_deref(), Some("orders:shipped"));
        assert_eq!(cfg.providers.nats.as_ref().unwrap().create_stream.as_ref().unwrap().duplicate_window_s, 86_400);
        assert!(build_providers(&cfg).is_ok(), "every sink builds from it");
    }

    #[test]
    fn bus_channels_are_checked_at_start() {
        let with = |channel: &str| EXAMPLE.replace("[channels.kafka]\nprovider = \"kafka\"", channel);
        let err = |toml: String| Config::from_toml(&toml).unwrap_err().to_string();
        // A bus provider without its route.
        let no_route = EXAMPLE.replace("bus = { destination = \"notifications.{event}\" }", "");
        assert!(err(no_route).contains("needs [channels.kafka.bus]"));
        // A route on a provider that is not a bus.
        let on_log = with("[channels.kafka]\nprovider = \"log\"");
        assert!(err(on_log).contains("only for bus providers"));
        // A fallback that does not reach the same kind of place.
        let mixed = with("[channels.kafka]\nprovider = \"kafka\"\nfallback = \"log\"");
        assert!(err(mixed).contains("fallback must be a bus"));
        // A bus provider with no [providers.<sink>] section.
        let no_section = EXAMPLE.replace("[providers.kafka]\nbrokers = \"127.0.0.1:9092\"\n", "");
        assert!(err(no_section).contains("needs a [providers.kafka] section"));
        let empty = EXAMPLE.replace("destination = \"notifications.{event}\" }", "destination = \"\" }");
        assert!(err(empty).contains("destination is empty"));
    }

    const B: Backoff = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(10) };

    #[test]
    fn backoff_is_jittered_under_an_exponential_cap() {
        for attempt in 1..40 {
            let cap = Duration::from_millis(100).saturating_mul(1 << (attempt - 1).min(20)).min(B.max);
            assert!(B.delay(attempt) <= cap);
        }
    }

    #[test]
    fn the_queue_floor_rises_with_claims_and_a_full_scan_comes_back_every_second() {
        let at = |s: i64| chrono::DateTime::<Utc>::from_timestamp(s, 0).unwrap();
        let t0 = Instant::now();
        let mut f = QueueFloor::default();
        assert_eq!(f.start(t0), None, "no floor yet: from the start");
        f.claimed(None, Some(at(100)));
        assert_eq!(f.start(t0), Some(at(100)));
        f.claimed(Some(at(100)), Some(at(90)));
        assert_eq!(f.start(t0), Some(at(100)), "a floored claim never lowers it");
        f.claimed(Some(at(100)), Some(at(120)));
        f.claimed(Some(at(120)), None);
        assert_eq!(f.start(t0 + Duration::from_millis(500)), Some(at(120)), "an empty claim leaves it");
        assert_eq!(f.start(t0 + FULL_SCAN_EVERY), None, "a full scan every second");
        f.claimed(None, Some(at(50)));
        assert_eq!(f.start(t0 + FULL_SCAN_EVERY), Some(at(50)), "a full scan may lower it");
        f.claimed(None, None);
        assert_eq!(f.start(t0 + FULL_SCAN_EVERY), Some(at(50)));
    }

    fn intake(capacity: usize) -> (Intake, mpsc::Receiver<Vec<Claimed>>) {
        let (fresh, rx) = mpsc::channel(capacity);
        let (_, untaken) = mpsc::channel(1);
        let intake = Intake {
            fresh,
            untaken: Arc::new(tokio::sync::Mutex::new(untaken)),
            unwritten: Arc::default(),
            skip_write_channels: Arc::default(),
            held: Arc::default(),
            wake: Arc::default(),
            lease: Duration::from_secs(60),
            part: 500,
            finished: Arc::default(),
        };
        (intake, rx)
    }

    #[tokio::test]
    async fn ingestion_waits_for_a_moving_dispatch_and_not_for_a_slow_one() {
        let (intake, mut rx) = intake(1);
        intake.room(1).unwrap().next().unwrap().send(vec![]);
        // No call returned yet (a provider taking seconds per call looks like
        // this): the hand-over is full, the batch goes to the queue at once.
        assert!(intake.room_soon(1).await.is_none());
        assert!(!intake.keeps_up(), "nothing is handed over unwritten to a provider not yet heard from");
        // Calls return: ingestion waits, and gets the room a worker frees.
        intake.finished.now();
        let worker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            rx.recv().await.unwrap();
            rx
        });
        assert!(intake.room_soon(1).await.is_some(), "room once the worker took its batch");
        drop(worker.await.unwrap());
    }

    fn claimed(id: i64, channel: &str) -> Claimed {
        Claimed {
            id,
            idempotency_key: format!("k{id}"),
            source_table: "public.t".into(),
            source_pk: id.to_string(),
            channel: channel.into(),
            event: "e".into(),
            recipient: None,
            payload: serde_json::json!({}),
            attempts: 1,
            committed_at: Utc::now(),
            provider: None,
            lease_expired: false,
            send_by: Instant::now(),
            correlation: None,
            unwritten: None,
        }
    }

    #[test]
    fn a_handed_over_batch_sends_nothing_of_a_paused_channel() {
        let batch = vec![claimed(1, "email"), claimed(2, "in_app"), claimed(3, "email")];
        let none = std::collections::HashSet::new();
        let (held, send) = hold_back_paused(batch.clone(), &none);
        assert!(held.is_empty());
        assert_eq!(send.len(), 3);
        let paused: std::collections::HashSet<String> = ["email".to_string()].into();
        let (held, send) = hold_back_paused(batch, &paused);
        assert_eq!(send.iter().map(|c| c.id).collect::<Vec<_>>(), [2]);
        let refs: Vec<ClaimRef> = held.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(refs, [ClaimRef::Row(1, 1), ClaimRef::Row(3, 1)], "by claim, attempt given back");
        for (_, outcome) in &held {
            assert!(
                matches!(outcome, Outcome::Defer { delay, error } if delay.is_zero() && error.contains("paused")),
                "back to the queue, untried: {outcome:?}"
            );
        }
    }

    #[test]
    fn retry_or_not() {
        let l = Limits { max_attempts: 3, max_age: Duration::from_secs(3600) };
        let young = Duration::from_secs(1);
        let retry = ProviderError::Retryable { reason: "503".into(), retry_after: Some(Duration::from_secs(30)) };
        match decide(&retry, "pusher", 1, young, &l, &B) {
            Outcome::Retry { delay, .. } => assert!(delay >= Duration::from_secs(30), "Retry-After is a floor"),
            o => panic!("{o:?}"),
        }
        assert_eq!(decide(&retry, "pusher", 3, young, &l, &B).label(), "dead");
        let old = decide(&retry, "pusher", 1, Duration::from_secs(7200), &l, &B);
        assert!(matches!(&old, Outcome::Dead { error, .. } if error.contains("max_age")), "{old:?}");
        let perm = ProviderError::Permanent { reason: "payload too large".into() };
        assert_eq!(
            decide(&perm, "pusher", 1, young, &l, &B),
            Outcome::Failed { provider: "pusher", error: "payload too large".into() }
        );
        let auth = ProviderError::Unauthorized { reason: "bad key".into() };
        assert_eq!(decide(&auth, "ably", 1, young, &l, &B).label(), "failed");
    }
}
