//! `run`: wires ingestion, dispatch workers and the telemetry server together,
//! and owns the shutdown sequence.
//!
//! Shutdown (SIGTERM/SIGINT, or the `shutdown` channel in tests and the demo):
//! 1. ingestion stops reading, records what it read, confirms the offset;
//! 2. dispatch workers finish the batch in hand and record it;
//! 3. the HTTP server stops.
//!
//! The whole sequence shares one deadline, [`SHUTDOWN_GRACE`] from the signal:
//! a worker still waiting on a provider then is abandoned, and its rows, left
//! `sending`, are re-sent (and counted) on the next start; releasing untried
//! hand-overs gets what is left, at most [`RELEASE_GRACE`]. That keeps the
//! exit within 10 s whatever the providers and the database do.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::{Config, SourceMode};
use crate::dispatch::Dispatcher;
use crate::ingest::{Ingest, IngestError};
use crate::instance::{InstanceError, InstanceLock};
use crate::ledger::{self, Ledger, LedgerError};
use crate::source::listen::{ListenError, ListenSource};
use crate::telemetry::{self, metric, Health, Telemetry, TelemetryTasks};

pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
/// For giving back untried hand-overs after the grace (one short statement).
pub const RELEASE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    ListenSource(#[from] ListenError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("metrics listener {addr}: {source}")]
    MetricsListen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("{0}")]
    Provider(crate::providers::ProviderError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Gap(#[from] crate::gap::GapError),
}

/// Sends the stop signal when dropped, so that tasks started early (the
/// metrics server) end with `run` on every path out of it.
struct StopOnDrop(watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// The metrics, health and webhook endpoints, until `stop`.
async fn serve_metrics(
    cfg: &Config,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    health: &Arc<Health>,
    stop: &watch::Receiver<bool>,
) -> Result<(), RunError> {
    if let Some(addr) = cfg.metrics.socket_addr()? {
        let listener =
            telemetry::bind(addr).await.map_err(|source| RunError::MetricsListen { addr: addr.to_string(), source })?;
        info!(%addr, "serving /metrics, /healthz, /readyz");
        let mut app = telemetry::router(metrics, health.clone());
        if let Some(hooks) = crate::webhooks::router(cfg) {
            app = app.merge(hooks);
        }
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(listener, app, stop).await {
                warn!(error = %e, "metrics server stopped");
            }
        });
    }
    Ok(())
}

/// `run --only dispatch`: dispatch workers and nothing else, beside the relay
/// that works the slot. Such a process reads no stream and takes no lock (it
/// is not the slot's relay, and any number may run), and for the same reason
/// never gives back rows left `sending`: it cannot know whose they are. Its
/// own claims carry its name (`claimed_by`), so the slot's relay leaves them
/// alone too; if it dies, they are taken over when their lease ends, and
/// counted as possible re-sends. It takes no fresh hand-over either: it
/// claims what the ledger holds (`FOR UPDATE SKIP LOCKED`), which is what a
/// backlog is.
pub async fn run_dispatch_only(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let (telemetry_cfg, tls) = (cfg.telemetry.clone(), cfg.tls.clone());
    let started = std::sync::atomic::AtomicBool::new(false);
    let result = dispatch_only(cfg, shutdown, &started).await;
    report_failure(&telemetry_cfg, &tls, &result, started.load(Ordering::Relaxed)).await;
    result
}

/// A failure that ends `run` (at startup, typically: unreachable database,
/// a provider that cannot be built, a configuration the database refuses)
/// goes to Sentry when `telemetry.sentry_dsn` is set, before the process exits.
async fn report_failure(
    cfg: &telemetry::TelemetryConfig,
    tls: &crate::config::TlsConfig,
    result: &Result<(), RunError>,
    started: bool,
) {
    let Err(e) = result else { return };
    if cfg.sentry_dsn.is_none() {
        return;
    }
    match crate::providers::http_client_with(tls) {
        Ok(http) => telemetry::report_fatal(cfg, &http, &e.to_string(), started).await,
        Err(why) => warn!(error = %why, "cannot report the failure to Sentry"),
    }
}

/// Starts `[telemetry]`'s exporters; they stop when `stop` turns true, which
/// `run` sends after dispatch finished (its last spans and reports included).
fn start_telemetry(cfg: &Config, stop: &watch::Receiver<bool>) -> Result<(Telemetry, TelemetryTasks), RunError> {
    let wanted = cfg.telemetry.otlp_endpoint.is_some() || cfg.telemetry.sentry_dsn.is_some();
    if !wanted {
        return Ok(Default::default());
    }
    let http = crate::providers::http_client_with(&cfg.tls).map_err(RunError::Provider)?;
    Ok(Telemetry::start(&cfg.telemetry, &http, stop))
}

/// `started` turns true once the workers run (for [`report_failure`]).
async fn dispatch_only(
    cfg: Config,
    shutdown: watch::Receiver<bool>,
    started: &std::sync::atomic::AtomicBool,
) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    let metrics = telemetry::install_metrics();
    let health = Arc::new(Health::default());
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = StopOnDrop(stop_tx);
    serve_metrics(&cfg, metrics, &health, &stop).await?;
    let url = cfg.source.database_url.clone();
    let schema = cfg.relay.schema.clone();
    // The schema this build expects (serialised against other migrators).
    ledger::migrate(&mut ledger::connect(&url).await?, &schema).await?;
    let name = format!("dispatch:{}", uuid::Uuid::new_v4());
    info!(claimer = %name, "dispatch only: claiming from the ledger beside the slot's relay");
    let (telemetry_stop_tx, telemetry_stop) = watch::channel(false);
    let (telemetry, telemetry_tasks) = start_telemetry(&cfg, &telemetry_stop)?;
    let dispatcher =
        Arc::new(Dispatcher::new(&cfg, health.clone(), telemetry).map_err(RunError::Provider)?.dispatch_only(name));
    // Ready when the ledger answers: there is no stream to be connected to.
    health.source_connected.store(true, Ordering::Relaxed);
    health.ledger_connected.store(true, Ordering::Relaxed);
    let mut tasks = JoinSet::new();
    for _ in 0..cfg.relay.dispatch_workers.max(1) {
        let (d, url, schema, stop) = (dispatcher.clone(), url.clone(), schema.clone(), stop.clone());
        tasks.spawn(async move { d.run_worker(&url, &schema, stop).await });
    }
    started.store(true, Ordering::Relaxed);
    let mut outside = shutdown;
    crate::stopped(&mut outside).await;
    info!("shutting down");
    let _ = stop_tx.0.send(true);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    if tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        warn!("dispatch did not finish in time; its claims are taken over when their lease ends");
        tasks.abort_all();
    }
    let _ = telemetry_stop_tx.send(true);
    telemetry_tasks.finish(RELEASE_GRACE).await;
    info!("stopped");
    Ok(())
}

/// Runs the relay until `shutdown` turns true (or a fatal error, reported to
/// Sentry when configured).
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let (telemetry_cfg, tls) = (cfg.telemetry.clone(), cfg.tls.clone());
    let started = std::sync::atomic::AtomicBool::new(false);
    let result = relay(cfg, shutdown, &started).await;
    report_failure(&telemetry_cfg, &tls, &result, started.load(Ordering::Relaxed)).await;
    result
}

/// `started` turns true once the source and dispatch run (for [`report_failure`]).
async fn relay(
    cfg: Config,
    shutdown: watch::Receiver<bool>,
    started: &std::sync::atomic::AtomicBool,
) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    let metrics = telemetry::install_metrics();
    let health = Arc::new(Health::default());
    // Our own stop signal: set on outside shutdown or when ingestion fails for
    // good — and whenever `run` returns, early or not (the guard).
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = StopOnDrop(stop_tx);
    // Served from the start: a standby answers /readyz (503, "standby") and /metrics.
    serve_metrics(&cfg, metrics, &health, &stop).await?;

    let url = cfg.source.database_url.clone();
    let schema = cfg.relay.schema.clone();

    let mut client = ledger::connect(&url).await?;
    crate::preflight::check(&client, &cfg).await?;
    ledger::migrate(&mut client, &schema).await?;
    // One relay works at a time; a second one waits here as a standby.
    let mut waiting = shutdown.clone();
    let takeover = Duration::from_millis(cfg.relay.takeover_ms.max(1000));
    let Some(lock) = InstanceLock::acquire(&url, &schema, &cfg.source.slot, takeover, &health, &mut waiting).await?
    else {
        return Ok(());
    };
    if cfg.source.mode == SourceMode::Logical {
        lock.free_slot().await?;
    }
    if cfg.source.mode == SourceMode::Listen {
        let client = ledger::connect(&url).await?;
        crate::gap::check_watermark(&client, &schema, &cfg.source.slot).await?;
    }
    // Holding the lock, every row left `sending` belongs to a process that is
    // gone: its call may have reached the provider, so each is counted.
    let resent = Ledger::new(client, &schema).recover_in_flight().await?;
    metrics::counter!(metric::RESENDS_AFTER_RESTART).increment(resent);

    // No call starts after 4/5 of a claim's lease; the last fifth must hold a whole call.
    let lease = Duration::from_millis(cfg.relay.claim_lease_ms);
    if cfg.providers.longest_timeout() > lease / 5 {
        warn!(claim_lease_ms = cfg.relay.claim_lease_ms, longest_timeout_ms = cfg.providers.longest_timeout().as_millis() as u64,
            "relay.claim_lease_ms is under 5 x the longest provider timeout: a slow call may outlive its claim and be sent twice");
    }

    let mut tasks = JoinSet::new();

    // Stopped after dispatch finished, so its last spans and reports are sent.
    let (telemetry_stop_tx, telemetry_stop) = watch::channel(false);
    let (telemetry, telemetry_tasks) = start_telemetry(&cfg, &telemetry_stop)?;
    let dispatcher = Arc::new(Dispatcher::new(&cfg, health.clone(), telemetry.clone()).map_err(RunError::Provider)?);
    register_zeros(&cfg);
    for _ in 0..cfg.relay.dispatch_workers.max(1) {
        let (d, url, schema, stop) = (dispatcher.clone(), url.clone(), schema.clone(), stop.clone());
        tasks.spawn(async move {
            d.run_worker(&url, &schema, stop).await;
            Ok(())
        });
    }
    tasks.spawn(housekeeping(cfg.clone(), health.clone(), stop.clone()));

    // The source: logical replication, or the trigger-fed change log.
    let mut outside = shutdown;
    let source_stop = stop.clone();
    let ingest_task = match cfg.source.mode {
        SourceMode::Logical => {
            let ingest = Ingest::new(cfg.clone(), dispatcher.intake(), health.clone(), telemetry.clone());
            tokio::spawn(async move { ingest.run(source_stop).await.map_err(RunError::from) })
        }
        SourceMode::Listen => {
            let listen = ListenSource::new(cfg.clone(), dispatcher.intake(), health.clone(), telemetry.clone());
            tokio::spawn(async move { listen.run(source_stop).await.map_err(RunError::from) })
        }
    };
    tokio::pin!(ingest_task);
    started.store(true, Ordering::Relaxed);
    let keeper = lock.hold(health.clone(), stop.clone());
    tokio::pin!(keeper);

    // One deadline for the whole stop, fixed when it starts.
    let mut stop_at: Option<tokio::time::Instant> = None;
    let mut deadline = || *stop_at.get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
    let result = tokio::select! {
        r = &mut keeper => {
            // Only returns early when another relay took over: stop everything.
            let _ = stop_tx.0.send(true);
            let _ = tokio::time::timeout_at(deadline(), &mut ingest_task).await;
            r.map_err(RunError::from)
        }
        _ = crate::stopped(&mut outside) => {
            info!("shutting down");
            let _ = stop_tx.0.send(true);
            match tokio::time::timeout_at(deadline(), &mut ingest_task).await {
                Ok(Ok(r)) => r,
                Ok(Err(join)) => { warn!(error = %join, "ingestion task failed"); Ok(()) }
                Err(_) => { warn!("ingestion did not stop in time"); Ok(()) }
            }
        }
        r = &mut ingest_task => {
            let _ = stop_tx.0.send(true);
            match r {
                Ok(r) => r,
                Err(join) => { warn!(error = %join, "ingestion task failed"); Ok(()) }
            }
        }
    };

    // Set when shutdown starts (or now, if ingestion ended first).
    let deadline = *stop_at.get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
    let drained = tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!("dispatch did not finish in time; rows in flight are re-sent on the next start");
        tasks.abort_all();
    }
    // Handed-over batches no worker took: back to the queue, untried.
    let release = dispatcher.release_fresh(&cfg.source.database_url, &cfg.relay.schema);
    match tokio::time::timeout(RELEASE_GRACE, release).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => info!(deliveries = n, "released deliveries handed over but not tried"),
        Ok(Err(e)) => warn!(error = %e, "could not release untried deliveries; the next start re-sends them"),
        Err(_) => warn!("releasing untried deliveries took too long; the next start re-sends them"),
    }
    health.source_connected.store(false, Ordering::Relaxed);
    let _ = telemetry_stop_tx.send(true);
    telemetry_tasks.finish(RELEASE_GRACE).await;
    info!("stopped");
    result
}

/// Counters that alerts watch with `increase()` exist from the start, at 0:
/// an alert cannot see the first increment of a series that did not exist.
fn register_zeros(cfg: &Config) {
    let mut kinds: Vec<_> = cfg.channels.values().flat_map(|c| std::iter::once(c.provider).chain(c.fallback)).collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds {
        metrics::counter!(metric::PROVIDER_UNAUTHORIZED, "provider" => kind.as_str()).increment(0);
        if kind == crate::config::ProviderKind::Smtp {
            metrics::counter!(metric::SMTP_STARTTLS_MISSING).increment(0);
        }
        if kind == crate::config::ProviderKind::Webhook {
            metrics::counter!(metric::WEBHOOK_ENDPOINT_GONE).increment(0);
        }
    }
    let p = &cfg.providers;
    let hooks = [
        ("twilio", p.twilio.as_ref().is_some_and(|t| t.status_callback_url.is_some())),
        ("brevo", p.brevo.as_ref().is_some_and(|b| b.webhook_token.is_some() || b.webhook_basic.is_some())),
    ];
    for (provider, on) in hooks {
        if on {
            metrics::counter!(metric::WEBHOOKS, "provider" => provider, "outcome" => "forbidden").increment(0);
        }
    }
}

/// Every few seconds: backlog, dead-letter and paused-channel gauges, retained WAL (with a
/// warning past `relay.max_retained_wal_mb`), the ledger half of readiness, and
/// the heartbeat. The heartbeat writes a tiny WAL record in this database so
/// that, when the routed tables are quiet, the walsender still has something
/// to move past and the slot's position keeps advancing.
async fn housekeeping(cfg: Arc<Config>, health: Arc<Health>, mut stop: watch::Receiver<bool>) -> Result<(), ()> {
    let mut ledger: Option<Ledger> = None;
    let heartbeat = Duration::from_millis(cfg.relay.heartbeat_ms);
    // First prune a minute after start (not during a restart's catch-up), then hourly.
    let mut next_prune = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last_beat = tokio::time::Instant::now();
    let max_wal = cfg.relay.max_retained_wal_mb.saturating_mul(1024 * 1024) as i64;
    loop {
        if ledger.as_ref().is_none_or(|l| l.client().is_closed()) {
            ledger = ledger::connect(&cfg.source.database_url).await.ok().map(|c| Ledger::new(c, &cfg.relay.schema));
        }
        let ok = match &ledger {
            Some(l) => observe(l, &cfg, max_wal).await.is_ok(),
            None => false,
        };
        health.ledger_connected.store(ok, Ordering::Relaxed);
        if let Some(l) = &ledger {
            if !heartbeat.is_zero() && last_beat.elapsed() >= heartbeat {
                last_beat = tokio::time::Instant::now();
                let beat =
                    l.client().execute("SELECT pg_logical_emit_message(false, 'outbox_relay_heartbeat', '')", &[]);
                if let Err(e) = beat.await {
                    warn!(error = %e, "heartbeat failed (needs EXECUTE on pg_logical_emit_message)");
                }
            }
        }
        if let Some(l) = ledger.as_ref().filter(|_| tokio::time::Instant::now() >= next_prune) {
            next_prune = tokio::time::Instant::now() + Duration::from_secs(3600);
            if let Err(e) = crate::retention::prune(l.client(), &cfg, false).await {
                warn!(error = %e, "pruning settled deliveries failed; trying again in an hour");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = crate::stopped(&mut stop) => return Ok(()),
        }
    }
}

async fn observe(l: &Ledger, cfg: &Config, max_wal: i64) -> Result<(), LedgerError> {
    metrics::gauge!(metric::BACKLOG).set(l.backlog().await? as f64);
    let oldest = l.oldest_pending_age().await?.unwrap_or_default();
    metrics::gauge!(metric::OLDEST_PENDING).set(oldest.as_secs_f64());
    // Every configured channel has the gauge, at 0 when it has no dead letter.
    let mut dead: std::collections::BTreeMap<String, i64> = cfg.channels.keys().map(|c| (c.clone(), 0)).collect();
    for (channel, n) in l.dead_counts().await? {
        // Channel names can come from row data: only configured ones become labels.
        let label = if cfg.channels.contains_key(&channel) { channel } else { "unknown".to_string() };
        *dead.entry(label).or_default() += n;
    }
    for (channel, n) in dead {
        metrics::gauge!(metric::DEAD_LETTERS, "channel" => channel).set(n as f64);
    }
    // Every configured channel has the gauge, 0 or 1 (a paused channel since
    // removed from the config is no label: it has no deliveries to hold).
    let paused: Vec<String> = l.paused_channels().await?.into_iter().map(|p| p.channel).collect();
    for channel in cfg.channels.keys() {
        let on = paused.contains(channel);
        metrics::gauge!(metric::CHANNEL_PAUSED, "channel" => channel.clone()).set(if on { 1.0 } else { 0.0 });
    }
    if cfg.source.mode == crate::config::SourceMode::Logical {
        let row = l
            .client()
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots
                 WHERE slot_name = $1",
                &[&cfg.source.slot],
            )
            .await?;
        if let Some(retained) = row.and_then(|r| r.get::<_, Option<i64>>(0)) {
            metrics::gauge!(metric::RETAINED_WAL).set(retained as f64);
            if max_wal > 0 && retained > max_wal {
                warn!(slot = %cfg.source.slot, retained_bytes = retained, limit_mb = cfg.relay.max_retained_wal_mb,
                    "the slot retains more WAL than relay.max_retained_wal_mb: is the relay keeping up?");
            }
        }
    }
    Ok(())
}
