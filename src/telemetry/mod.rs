//! What the relay shows: JSON (or text) logs, Prometheus metrics, health,
//! and, when `[telemetry]` asks for them, traces ([`otlp`]) and Sentry reports
//! ([`sentry`]) of deliveries, linked by a row's correlation value ([`correlation`]).
//!
//! Metric names live in [`metric`] so that code, README and dashboards agree.
//! `/livez` fails when a loop (source, dispatch) has made no turn for two
//! minutes; `/healthz` answers while the process runs; `/readyz` only while the
//! replication stream and the ledger are both reachable, so an orchestrator
//! can tell "alive but cut off from PostgreSQL".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

pub mod correlation;
pub mod otlp;
pub mod sentry;

pub mod metric {
    pub const ROWS_INGESTED: &str = "outbox_relay_rows_ingested_total";
    pub const DELIVERIES_RECORDED: &str = "outbox_relay_deliveries_recorded_total";
    pub const DELIVERIES: &str = "outbox_relay_deliveries_total";
    pub const COMMIT_TO_ACCEPTED: &str = "outbox_relay_commit_to_accepted_seconds";
    pub const REPLICATION_LAG: &str = "outbox_relay_replication_lag_bytes";
    pub const CONFIRMED_LSN: &str = "outbox_relay_confirmed_lsn";
    pub const RESENDS_AFTER_RESTART: &str = "outbox_relay_resends_after_restart_total";
    pub const PROVIDER_UNAUTHORIZED: &str = "outbox_relay_provider_unauthorized_total";
    pub const LEDGER_FLUSH: &str = "outbox_relay_ledger_flush_seconds";
    pub const SOURCE_RECONNECTS: &str = "outbox_relay_source_reconnects_total";
    pub const BACKLOG: &str = "outbox_relay_backlog_deliveries";
    pub const DEAD_LETTERS: &str = "outbox_relay_dead_letters";
    pub const RETAINED_WAL: &str = "outbox_relay_slot_retained_wal_bytes";
    pub const WEBHOOKS: &str = "outbox_relay_webhooks_total";
    pub const SMTP_STARTTLS_MISSING: &str = "outbox_relay_smtp_starttls_missing_total";
    pub const WEBHOOK_ENDPOINT_GONE: &str = "outbox_relay_webhook_endpoint_gone_total";
    /// 1 while this process holds the relay's lock and works, 0 as a standby.
    pub const ACTIVE: &str = "outbox_relay_active";
    pub const OLDEST_PENDING: &str = "outbox_relay_oldest_pending_age_seconds";
    pub const CIRCUIT_OPEN: &str = "outbox_relay_circuit_open";
    /// 1 while an operator has a channel paused (`outbox-relay pause`), by channel.
    pub const CHANNEL_PAUSED: &str = "outbox_relay_channel_paused";
    pub const BUILD_INFO: &str = "outbox_relay_build_info";
    pub const SPANS_DROPPED: &str = "outbox_relay_spans_dropped_total";
    pub const SENTRY_DROPPED: &str = "outbox_relay_sentry_reports_dropped_total";
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// Logs go to stderr: stdout belongs to the `log` provider and to `status --json`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        // tokio_postgres logs server NOTICEs ("already exists, skipping") at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // try_init: tests and the demo may call this more than once.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
}

/// How often histogram samples nobody scraped are folded into their buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder once; later calls return the same handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets =
                [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .expect("static buckets are valid")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            // Histogram samples wait in the recorder until something drains
            // them: a scrape, or this. Nobody scraping `/metrics` must not
            // mean memory growing with every delivery (+15 MiB over a 1 M
            // drain before this thread).
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP);
                    upkeep.run_upkeep();
                })
                .expect("a thread can be started");
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(metric::ROWS_INGESTED, "Row changes read from committed transactions on routed tables.");
    describe_counter!(metric::DELIVERIES_RECORDED, "Deliveries written to the ledger, by channel and initial status.");
    describe_counter!(
        metric::DELIVERIES,
        "Delivery attempts by channel, provider and outcome (sent, retry, failed, dead)."
    );
    describe_histogram!(
        metric::COMMIT_TO_ACCEPTED,
        Unit::Seconds,
        "From the source transaction's commit to the provider's acceptance."
    );
    describe_gauge!(metric::REPLICATION_LAG, Unit::Bytes, "Server WAL end minus the offset confirmed to the slot.");
    describe_gauge!(metric::CONFIRMED_LSN, "Offset last confirmed to PostgreSQL, as a number.");
    describe_gauge!(metric::ACTIVE, "1 while this relay holds the slot's lock and works, 0 while it stands by.");
    describe_gauge!(
        metric::OLDEST_PENDING,
        Unit::Seconds,
        "Age of the oldest delivery not yet settled, paused channels left out (0 when none)."
    );
    describe_gauge!(metric::CIRCUIT_OPEN, "1 while a provider's circuit is open or half-open, by provider.");
    describe_gauge!(
        metric::CHANNEL_PAUSED,
        "1 while a channel is paused (its deliveries wait in the ledger, left out of backlog and oldest pending), by channel."
    );
    describe_gauge!(metric::BUILD_INFO, "Always 1; the labels say which build runs.");
    metrics::gauge!(metric::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_counter!(
        metric::RESENDS_AFTER_RESTART,
        "Deliveries in flight at a crash, sent again after restart (possible duplicates)."
    );
    describe_counter!(metric::PROVIDER_UNAUTHORIZED, "Provider calls refused for bad credentials: needs a human.");
    describe_counter!(
        metric::WEBHOOKS,
        "Delivery reports by provider and outcome (the status set, unmatched, or forbidden: unsigned or forged)."
    );
    describe_histogram!(
        metric::LEDGER_FLUSH,
        Unit::Seconds,
        "Time to write one ingestion batch and its offset to the ledger."
    );
    describe_counter!(
        metric::SMTP_STARTTLS_MISSING,
        "E-mails sent unencrypted because an SMTP server (tls=opportunistic) offered no STARTTLS."
    );
    describe_counter!(
        metric::SPANS_DROPPED,
        "Trace spans not exported: queue full, or the OTLP collector refused or did not answer."
    );
    describe_counter!(
        metric::SENTRY_DROPPED,
        "Sentry reports not sent: over 60 a minute, rate limited, queue full, or Sentry did not answer."
    );
    describe_counter!(
        metric::WEBHOOK_ENDPOINT_GONE,
        "Signed-webhook deliveries refused because the endpoint answered 410 Gone (sending to it stopped)."
    );
    describe_counter!(metric::SOURCE_RECONNECTS, "Times the source connection was lost and re-established.");
    describe_gauge!(metric::BACKLOG, "Deliveries pending or in flight in the ledger, paused channels left out.");
    describe_gauge!(metric::DEAD_LETTERS, "Dead deliveries waiting for an operator, by channel.");
    describe_gauge!(
        metric::RETAINED_WAL,
        Unit::Bytes,
        "WAL the slot keeps on the server (current WAL minus restart_lsn)."
    );
}

/// `[telemetry]`: where traces and error reports go. Both off by default.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (`http://otel-collector:4318`): delivery
    /// traces are POSTed to `{otlp_endpoint}/v1/traces` as OTLP/JSON.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Headers sent with every export (a hosted collector's API key). Secrets.
    #[serde(default)]
    pub otlp_headers: std::collections::BTreeMap<String, crate::secret::Secret>,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// `https://KEY@HOST/PROJECT`: deliveries given up, dead letters and
    /// startup failures are reported there. A secret: never printed.
    #[serde(default)]
    pub sentry_dsn: Option<crate::secret::Secret>,
    /// Sentry's `environment` of the events (`production`, `staging`).
    #[serde(default)]
    pub sentry_environment: Option<String>,
}

fn default_service_name() -> String {
    "outbox-relay".into()
}

impl TelemetryConfig {
    /// Checks what can be checked before start; messages name the key, never a secret.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.otlp_endpoint {
            let ok = (e.starts_with("http://") || e.starts_with("https://")) && reqwest::Url::parse(e).is_ok();
            if !ok {
                return Err(format!(
                    "telemetry.otlp_endpoint {e:?}: use the collector's base URL, e.g. http://otel-collector:4318"
                ));
            }
        }
        for (name, value) in &self.otlp_headers {
            let valid = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && reqwest::header::HeaderValue::from_str(value.expose()).is_ok();
            if !valid {
                return Err(format!("telemetry.otlp_headers.{name}: not a valid HTTP header name and value"));
            }
        }
        if let Some(dsn) = &self.sentry_dsn {
            sentry::Dsn::parse(dsn.expose())?;
        }
        Ok(())
    }
}

/// The running telemetry sinks, handed to ingestion and dispatch. `None`
/// parts are off. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub tracer: Option<otlp::Tracer>,
    pub sentry: Option<sentry::Reporter>,
}

/// The background tasks behind a [`Telemetry`], to await (bounded) at shutdown
/// so that what is queued is sent.
#[derive(Debug, Default)]
pub struct TelemetryTasks(Vec<tokio::task::JoinHandle<()>>);

impl TelemetryTasks {
    /// Waits for the exporters to send what they hold, at most `grace`.
    pub async fn finish(self, grace: std::time::Duration) {
        let all = futures_util::future::join_all(self.0);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("telemetry export did not finish in time; the last spans or reports are lost");
        }
    }
}

impl Telemetry {
    /// Starts what `cfg` turns on; the tasks end when `stop` turns true.
    /// `http`: the relay's client (its TLS settings apply to collectors too).
    pub fn start(
        cfg: &TelemetryConfig,
        http: &reqwest::Client,
        stop: &watch::Receiver<bool>,
    ) -> (Telemetry, TelemetryTasks) {
        let mut tasks = TelemetryTasks::default();
        let mut t = Telemetry::default();
        if let Some(endpoint) = &cfg.otlp_endpoint {
            let export = otlp::ExportConfig {
                endpoint: endpoint.clone(),
                headers: cfg.otlp_headers.clone(),
                service_name: cfg.service_name.clone(),
            };
            let (tracer, task) = otlp::start(export, http.clone(), stop.clone());
            t.tracer = Some(tracer);
            tasks.0.push(task);
        }
        // Validated with the config: a DSN that does not parse never gets here.
        if let Some(dsn) = cfg.sentry_dsn.as_ref().and_then(|d| sentry::Dsn::parse(d.expose()).ok()) {
            let (reporter, task) =
                sentry::Reporter::start(dsn, cfg.sentry_environment.clone(), http.clone(), stop.clone());
            t.sentry = Some(reporter);
            tasks.0.push(task);
        }
        (t, tasks)
    }

    /// A delivery was given up (`failed`) or went `dead`.
    pub fn given_up(&self, status: &'static str, tags: sentry::DeliveryTags, error: String) {
        if let Some(s) = &self.sentry {
            s.report(sentry::Report::Delivery { status, tags, error });
        }
    }
}

/// Reports a failure that ends `run` to Sentry, if `cfg` names a DSN, and
/// waits for the answer (bounded): the process exits right after. `started`:
/// the relay had got to work (tagged `phase: running`, else `startup`).
pub async fn report_fatal(cfg: &TelemetryConfig, http: &reqwest::Client, error: &str, started: bool) {
    let Some(dsn) = cfg.sentry_dsn.as_ref().and_then(|d| sentry::Dsn::parse(d.expose()).ok()) else { return };
    let phase = if started { "running" } else { "startup" };
    let report = sentry::Report::Fatal { error: error.to_string(), phase };
    sentry::send_now(dsn, cfg.sentry_environment.clone(), http.clone(), &report).await;
}

/// Readiness, set by the parts that can lose their connection.
#[derive(Debug, Default)]
pub struct Health {
    pub source_connected: AtomicBool,
    pub ledger_connected: AtomicBool,
    /// Not holding the relay's lock (another relay works, or the lock's
    /// session was lost): nothing is sent. See `instance`.
    pub standby: AtomicBool,
    /// Last turn of each [`Loop`], ms since the epoch; 0 before its first.
    pub ticks: [std::sync::atomic::AtomicU64; 2],
}

/// The loops whose progress `/livez` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loop {
    /// The source: logical stream or listen poller.
    Source = 0,
    /// Dispatch workers (any of them).
    Dispatch = 1,
}

/// How long a loop may go without a turn before `/livez` calls the process
/// stuck. Every loop turns at least every few seconds when healthy (the
/// stream's 10 s status tick, the poll intervals, reconnect backoffs of at
/// most 10 s); a provider call is bounded by its timeout, a claim's work by
/// its lease. Two minutes leaves room for all of that.
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    /// A loop made a turn.
    pub fn tick(&self, which: Loop) {
        self.ticks[which as usize].store(now_ms(), Ordering::Relaxed);
    }

    /// The first loop that started and has made no turn for `after`.
    pub fn stuck(&self, after: std::time::Duration) -> Option<(Loop, u64)> {
        let now = now_ms();
        [Loop::Source, Loop::Dispatch].into_iter().find_map(|l| {
            let last = self.ticks[l as usize].load(Ordering::Relaxed);
            let idle = now.saturating_sub(last);
            (last > 0 && idle > after.as_millis() as u64).then_some((l, idle / 1000))
        })
    }

    pub fn ready(&self) -> bool {
        self.source_connected.load(Ordering::Relaxed)
            && self.ledger_connected.load(Ordering::Relaxed)
            && !self.standby.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz`, `/readyz`, plus any extra routes (webhooks).
pub fn router(metrics: PrometheusHandle, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(|State(s): State<AppState>| async move { s.metrics.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        // Liveness: fails only when a loop is stuck, never for a database or
        // provider outage (those are readiness), so a restart is the right cure.
        .route(
            "/livez",
            get(|State(s): State<AppState>| async move {
                match s.health.stuck(STUCK_AFTER) {
                    None => (StatusCode::OK, "alive\n".to_string()),
                    Some((l, secs)) => {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: {l:?} loop made no progress for {secs} s\n"))
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.ready() {
                    (StatusCode::OK, "ready\n")
                } else if s.health.standby.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "standby: another relay holds this slot\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: source or ledger disconnected\n")
                }
            }),
        )
        .with_state(AppState { metrics, health })
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_turning_is_stuck_one_that_never_started_is_not() {
        let h = Health::default();
        assert_eq!(h.stuck(STUCK_AFTER), None, "nothing started yet");
        h.tick(Loop::Dispatch);
        assert_eq!(h.stuck(STUCK_AFTER), None);
        h.ticks[Loop::Source as usize].store(now_ms() - 200_000, Ordering::Relaxed);
        let (l, secs) = h.stuck(STUCK_AFTER).unwrap();
        assert_eq!(l, Loop::Source);
        assert!((199..=201).contains(&secs), "{secs}");
        h.tick(Loop::Source);
        assert_eq!(h.stuck(STUCK_AFTER), None);
    }
}
