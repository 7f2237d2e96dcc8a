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
use futures_util::FutureExt;
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
use crate::telemetry::{metric, Health};

/// Outcomes by claim (ledger id and the attempt count it was claimed with).
type Outcomes = Vec<(ClaimRef, Outcome)>;

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
    ids: std::sync::Mutex<std::collections::HashSet<i64>>,
    gate: tokio::sync::RwLock<()>,
}

impl Held {
    fn add(&self, claims: &[Claimed]) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).extend(claims.iter().map(|c| c.id));
    }
    fn remove(&self, outcomes: &Outcomes) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for ((id, _), _) in outcomes {
            ids.remove(id);
        }
    }
    fn snapshot(&self) -> Vec<i64> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
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

/// Batches ingestion may hand over in memory at once. Small: rows waiting here
/// are `sending` in the ledger, so a crash counts them as possible re-sends.
const FRESH_BATCHES: usize = 2;

/// Ingestion's side of the fast path: when dispatch has room, fresh rows are
/// written already claimed and passed here, one ledger write fewer per
/// delivery; otherwise they are written `pending` and `wake` rings.
pub struct Intake {
    fresh: mpsc::Sender<Vec<Claimed>>,
    held: Arc<Held>,
    wake: Arc<Notify>,
    lease: Duration,
    /// When a worker last finished a handed-over batch, shared with the
    /// dispatcher (see [`Intake::room_soon`]).
    finished: Arc<Finished>,
}

/// When a worker last finished a handed-over batch (every outcome recorded).
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

    /// A batch was finished less than `within` ago.
    fn recently(&self, within: Duration) -> bool {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        last > 0 && (self.base.elapsed().as_millis() as u64 + 1).saturating_sub(last) <= within.as_millis() as u64
    }
}

/// How long ingestion waits for room in the hand-over, and how recently a
/// worker must have finished a batch for waiting to be worth it. Draining,
/// four workers finish a batch about every 100 ms; a slow provider (seconds
/// per call) finishes none that recently, and the stream does not wait.
const HANDOVER_WAIT: Duration = Duration::from_millis(100);

impl Intake {
    /// Room for one batch in memory, if dispatch keeps up; hold it across the
    /// ledger write and pass it to [`Intake::committed`].
    pub fn room(&self) -> Option<mpsc::Permit<'_, Vec<Claimed>>> {
        self.fresh.try_reserve().ok()
    }

    /// [`Intake::room`], waiting for it while dispatch is busy but moving.
    /// When dispatch is the slower stage (a backlog being drained) every row
    /// then takes the fast path — inserted claimed, then its outcome: two
    /// writes — instead of queueing in the ledger — inserted, claimed,
    /// outcome: three, and a claim query. The rows not yet read wait in the
    /// slot's WAL, which holds them anyway. Waiting only while workers keep
    /// finishing batches (one done in the last [`HANDOVER_WAIT`]) means a
    /// slow or failing provider never holds the stream: the batch goes to
    /// the ledger's queue at once, as before.
    pub async fn room_soon(&self) -> Option<mpsc::Permit<'_, Vec<Claimed>>> {
        if let Ok(permit) = self.fresh.try_reserve() {
            return Some(permit);
        }
        if !self.finished.recently(HANDOVER_WAIT) {
            return None;
        }
        tokio::time::timeout(HANDOVER_WAIT, self.fresh.reserve()).await.ok()?.ok()
    }

    /// The lease to insert fresh rows under, when there is room for them.
    pub fn claim(&self, room: &Option<mpsc::Permit<'_, Vec<Claimed>>>) -> Option<Duration> {
        room.as_ref().map(|_| self.lease)
    }

    /// After the ledger commit: hands the claimed rows over, and wakes the
    /// workers for rows that wait in the ledger.
    pub fn committed(&self, room: Option<mpsc::Permit<'_, Vec<Claimed>>>, inserted: Inserted) {
        let waiting = inserted.count > inserted.claimed.len() as u64;
        if let Some(room) = room.filter(|_| !inserted.claimed.is_empty()) {
            self.held.add(&inserted.claimed);
            room.send(inserted.claimed);
            self.wake.notify_one();
        }
        if waiting {
            self.wake.notify_waiters();
        }
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
    fresh_rx: tokio::sync::Mutex<mpsc::Receiver<Vec<Claimed>>>,
    held: Arc<Held>,
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
    pub fn new(cfg: &Config, health: Arc<Health>) -> Result<Dispatcher, ProviderError> {
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
        let (fresh_tx, fresh_rx) = mpsc::channel(FRESH_BATCHES);
        Ok(Dispatcher {
            health,
            schema: cfg.relay.schema.clone(),
            held: Arc::default(),
            floor: Default::default(),
            finished: Arc::default(),
            claimer: None,
            fresh_tx,
            fresh_rx: tokio::sync::Mutex::new(fresh_rx),
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
            held: self.held.clone(),
            wake: self.wake.clone(),
            lease: self.lease,
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
        let mut untried: Outcomes = Vec::new();
        while let Some(batch) = self.take_fresh() {
            let error = "handed over at shutdown, not tried".to_string();
            untried.extend(
                batch.iter().map(|c| (c.claim_ref(), Outcome::Defer { error: error.clone(), delay: Duration::ZERO })),
            );
        }
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
            let mut handed_over = false;
            let batch = match self.take_fresh() {
                Some(fresh) => {
                    handed_over = true;
                    fresh
                }
                None => {
                    let _registered_before_release = self.held.gate.read().await;
                    let from = self.floor.lock().unwrap_or_else(|p| p.into_inner()).start(Instant::now());
                    let (claimed, first_due) =
                        ledger.claim_from(self.batch, self.lease, self.claimer.as_deref(), from).await?;
                    self.floor.lock().unwrap_or_else(|p| p.into_inner()).claimed(from, first_due);
                    self.held.add(&claimed);
                    claimed
                }
            };
            if batch.is_empty() {
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
            let mut lost: Option<LedgerError> = None;
            while let Some(outcomes) = calls.next().await {
                unrecorded.extend(outcomes);
                // Calls that finished meanwhile go into the same statement.
                while let Some(Some(more)) = calls.next().now_or_never() {
                    unrecorded.extend(more);
                }
                if lost.is_none() {
                    match ledger.finish(unrecorded).await {
                        Ok(()) => {
                            self.held.remove(unrecorded);
                            unrecorded.clear();
                        }
                        Err(e) => lost = Some(e),
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
            if handed_over {
                self.finished.now();
            }
            if full {
                // More is probably waiting: let the other workers know.
                self.wake.notify_one();
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
                (Some(cp), _, _) => Some(contacts::prepare(db, cp, c.recipient.as_deref(), &c.event, &c.payload).await),
                (None, Some(sql), Some(recipient)) => contacts::preference_refuses(db, sql, recipient, &c.event).await,
                _ => None,
            };
            let mut settle = |outcome: Outcome| {
                record(c, provider, &outcome, Utc::now(), 0.0);
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
        let results = match &plan.devices {
            None => target.send_batch(&messages).await,
            Some(dp) => self.send_to_devices(target, dp, &messages, &reached_before, db).await,
        };
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
                (c.claim_ref(), outcome)
            })
            .chain(settled)
            .collect()
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
                channel = %c.channel, provider, latency_ms = latency.as_millis() as u64, call_ms,
                provider_message_id = message_id.as_deref(), "delivered");
        }
        Outcome::Retry { error, delay, .. } => {
            warn!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, provider, attempts = c.attempts, retry_in_ms = delay.as_millis() as u64,
                error = %error, "delivery failed, will retry");
        }
        Outcome::Defer { .. } => {}
        Outcome::Skipped { reason, .. } => {
            info!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, provider, reason = %reason, "delivery skipped");
        }
        Outcome::Failed { error, .. } | Outcome::Dead { error, .. } => {
            warn!(delivery_id = c.id, key = %c.idempotency_key, table = %c.source_table, pk = %c.source_pk,
                channel = %c.channel, provider, attempts = c.attempts, status = outcome.label(),
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
        let intake = Intake {
            fresh,
            held: Arc::default(),
            wake: Arc::default(),
            lease: Duration::from_secs(60),
            finished: Arc::default(),
        };
        (intake, rx)
    }

    #[tokio::test]
    async fn ingestion_waits_for_a_moving_dispatch_and_not_for_a_slow_one() {
        let (intake, mut rx) = intake(1);
        intake.room().unwrap().send(vec![]);
        // No batch finished yet (a provider taking seconds per call looks like
        // this): the hand-over is full, the batch goes to the queue at once.
        assert!(intake.room_soon().await.is_none());
        // Workers finish batches: ingestion waits, and gets the room a worker frees.
        intake.finished.now();
        let worker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            rx.recv().await.unwrap();
            rx
        });
        assert!(intake.room_soon().await.is_some(), "room once the worker took its batch");
        drop(worker.await.unwrap());
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
