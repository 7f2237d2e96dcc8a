//! The configuration file: a public contract, documented key by key in the README.
//!
//! TOML at `--config PATH` (default `relay.toml`, or `OUTBOX_RELAY_CONFIG`), then
//! every key overridable by `OUTBOX_RELAY__SECTION__KEY`, then `DATABASE_URL`.
//! Unknown keys are errors naming the key: a typo must not silently fall back to
//! a default. Validation that spans keys (a route naming a missing channel)
//! happens here too, so `run` never starts half-configured.
//!
//! Secrets can live in files (Docker and Kubernetes secrets): any key can be
//! set from `OUTBOX_RELAY__SECTION__KEY_FILE` (and `DATABASE_URL_FILE`), and any
//! secret value, `source.database_url` and `providers.smtp.url` can be written
//! `file:/path`. The file's content is used minus a trailing newline; its path
//! may appear in errors, its content never does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub use crate::providers::template::TemplateId;
pub use crate::providers::{LimitConfig, ProviderKind, ProvidersConfig, Reach, TlsConfig};
pub use crate::secret::{read_file_value, read_secret_file, redact_url, Secret};

use crate::change::Operation;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Load { path: String, source: config::ConfigError },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Keys whose own name ends in `_file`: their `..._FILE` env variable sets the
/// key itself rather than naming a file to read it from.
const KEYS_NAMED_FILE: [&str; 1] = ["ca_file"];

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelConfig>,
    #[serde(default)]
    pub providers: ProvidersConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Per-provider pacing; absent providers get their defaults.
    #[serde(default)]
    pub limits: BTreeMap<ProviderKind, LimitConfig>,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Traces (OTLP) and error reports (Sentry); both off unless set.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// How long the ledger keeps what it has settled.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Settled deliveries (sent, delivered, read, bounced, skipped, failed,
    /// discarded, dead) are pruned this many days after their last change;
    /// 0 keeps them for ever. The ledger holds recipients and payloads: keep
    /// it as short as your audit needs (docs/gdpr.md).
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { retention_days: default_retention_days() }
    }
}

fn default_retention_days() -> u32 {
    30
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    #[default]
    Logical,
    Listen,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// May carry a password: never logged (see the `Debug` impl).
    pub database_url: String,
    #[serde(default)]
    pub mode: SourceMode,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Role that `setup` creates for the relay; `None` leaves roles alone.
    #[serde(default)]
    pub role: Option<String>,
    /// Listen mode: how often the change log is read when no NOTIFY woke the relay.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Listen mode: the capture trigger sends a NOTIFY (one per transaction) to
    /// wake the relay. `false`: poll only, no NOTIFY queue and no commit-time
    /// lock in Django's transactions (docs/listen-mode.md). Re-run `setup` after changing it.
    #[serde(default = "default_true")]
    pub notify: bool,
}

fn default_poll_interval_ms() -> u64 {
    1000
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("mode", &self.mode)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("role", &self.role)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("notify", &self.notify)
            .finish()
    }
}

fn default_slot() -> String {
    "outbox_relay".into()
}
fn default_publication() -> String {
    "outbox_relay".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `schema.table`; a bare name means `public.name`.
    pub table: String,
    #[serde(default = "default_operations")]
    pub operations: Vec<Operation>,
    pub recipient_column: String,
    /// A fixed event name for every row...
    #[serde(default)]
    pub event: Option<String>,
    /// ...or the column holding it.
    #[serde(default)]
    pub event_column: Option<String>,
    /// Fixed channels; with `channels_column`, the default for rows whose array is empty.
    #[serde(default)]
    pub channels: Vec<String>,
    /// A text[] column naming the row's channels.
    #[serde(default)]
    pub channels_column: Option<String>,
    /// Columns sent out, keyed by name. Nothing else leaves the database.
    #[serde(default)]
    pub payload_columns: Option<Vec<String>>,
    /// A jsonb object column sent as the payload.
    #[serde(default)]
    pub payload_column: Option<String>,
    /// Channel → conditions on the payload: the row goes to that channel only
    /// when every listed key has the listed value, e.g. `only = { sms = { level = "critical" } }`.
    #[serde(default)]
    pub only: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// A text column with the row's correlation value (a Django request id,
    /// or a W3C `traceparent`): kept on the ledger row and carried into the
    /// delivery's log lines, provider metadata and trace.
    #[serde(default)]
    pub correlation_column: Option<String>,
}

fn default_operations() -> Vec<Operation> {
    vec![Operation::Insert]
}

impl RouteConfig {
    /// `(schema, table)` with `public` filled in.
    pub fn schema_and_table(&self) -> (&str, &str) {
        match self.table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", self.table.as_str()),
        }
    }

    pub fn qualified_table(&self) -> String {
        let (s, t) = self.schema_and_table();
        format!("{s}.{t}")
    }

    /// Every column this route reads; `setup` and startup checks verify they exist.
    pub fn columns(&self) -> Vec<&str> {
        let mut cols = vec![self.recipient_column.as_str()];
        cols.extend(self.event_column.as_deref());
        cols.extend(self.channels_column.as_deref());
        cols.extend(self.payload_column.as_deref());
        cols.extend(self.correlation_column.as_deref());
        if let Some(p) = &self.payload_columns {
            cols.extend(p.iter().map(String::as_str));
        }
        cols
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub provider: ProviderKind,
    /// Provider channel, `{recipient}` replaced by the row's recipient.
    #[serde(default = "default_channel_name")]
    pub channel_name: String,
    /// `false` keeps routing rows to this channel but records them skipped.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Attempts before a retryable failure becomes `dead`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds after the source commit past which a retryable failure becomes `dead`.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    /// Provider for fresh deliveries while `provider` is failing (circuit open).
    #[serde(default)]
    pub fallback: Option<ProviderKind>,
    /// E-mail, SMS, WhatsApp: SQL run at send time, `$1` = the recipient, returning
    /// the address. No row or NULL means no address or no consent: `skipped`.
    #[serde(default)]
    pub address_query: Option<String>,
    /// SQL run at send time, `$1` = recipient, `$2` = event, returning whether the
    /// user wants this event on this channel. False (or no row): `skipped: preference`.
    #[serde(default)]
    pub preferences_query: Option<String>,
    /// E-mail providers: event → template (Brevo: a number, SendGrid: `d-...`,
    /// Mailgun: a name), or per provider (`{ brevo = 14, sendgrid = "d-..." }`)
    /// when the fallback is another service. An event without one for the
    /// provider sending it gets a subject and body from the payload, unless
    /// `require_template`.
    #[serde(default)]
    pub templates: BTreeMap<String, TemplateChoice>,
    #[serde(default)]
    pub require_template: bool,
    /// Text of SMS/WhatsApp messages and e-mails without a template: `{key}` is a
    /// payload value. Default: the payload's `title`, else the event name.
    #[serde(default)]
    pub body: Option<String>,
    /// E-mail subject, same placeholders. Default: the payload's `title`, else the event.
    #[serde(default)]
    pub subject: Option<String>,
    /// Per-event text (`texts.order_shipped = { subject = "...", body = "..." }`),
    /// ahead of `subject`/`body`: one channel serves events that read differently.
    #[serde(default)]
    pub texts: BTreeMap<String, EventText>,
    /// Twilio: send over WhatsApp (`whatsapp:` addresses). Default: true for a
    /// channel named `whatsapp`, false otherwise.
    #[serde(default)]
    pub whatsapp: Option<bool>,
    /// Event-bus channels: destination, key, headers, envelope mode.
    #[serde(default)]
    pub bus: Option<crate::providers::bus::BusRoute>,
    /// Push channels (webpush, fcm): SQL run at send time, `$1` = the
    /// recipient, one row per device. First column: the FCM token or the Web
    /// Push subscription's endpoint URL; Web Push also needs columns named
    /// `p256dh` and `auth` (the subscription's keys, base64url). No row: the
    /// delivery is `skipped` ("no device").
    #[serde(default)]
    pub tokens_query: Option<String>,
    /// Push channels: SQL run when the provider says a device is gone (Web
    /// Push 404/410, FCM UNREGISTERED), `$1` = its token or endpoint, so the
    /// application stops sending to it (typically a DELETE).
    #[serde(default)]
    pub on_invalid_token: Option<String>,
}

/// One event's entry in a channel's `templates`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TemplateChoice {
    /// For the channel's `provider` (not its fallback): the form every
    /// single-provider config has used since Brevo's `templates = { x = 12 }`.
    One(TemplateId),
    /// Per provider, so that a fallback to another service sends its own
    /// template rather than the primary's id, which it would not know.
    PerProvider(BTreeMap<ProviderKind, TemplateId>),
}

impl TemplateChoice {
    /// The template `target` sends for this event, on a channel whose
    /// provider is `primary`.
    pub fn for_provider(&self, primary: ProviderKind, target: ProviderKind) -> Option<&TemplateId> {
        match self {
            TemplateChoice::One(t) => (target == primary).then_some(t),
            TemplateChoice::PerProvider(m) => m.get(&target),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventText {
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
}

impl ChannelConfig {
    pub fn is_whatsapp(&self, name: &str) -> bool {
        self.whatsapp.unwrap_or(name == "whatsapp")
    }

    /// How `kind` reaches someone on this channel: SNS sends SMS, or publishes
    /// to a topic when the channel has a `bus` route.
    pub fn reach_of(&self, kind: ProviderKind) -> Reach {
        kind.reach_with(self.bus.is_some())
    }

    /// Config checks of `templates`: every value fits the provider that would
    /// send it, a per-provider table names only this channel's providers, and
    /// with `require_template` the fallback has its template too.
    fn validate_templates(&self, name: &str) -> Result<(), String> {
        let kinds: Vec<ProviderKind> = std::iter::once(self.provider).chain(self.fallback).collect();
        for (event, choice) in &self.templates {
            let at = format!("channels.{name}.templates.{event}");
            if let TemplateChoice::PerProvider(m) = choice {
                if let Some(other) = m.keys().find(|k| !kinds.contains(k)) {
                    return Err(format!(
                        "{at} names provider {:?}, which is neither this channel's provider nor its fallback",
                        other.as_str()
                    ));
                }
            }
            for &kind in &kinds {
                match choice.for_provider(self.provider, kind) {
                    Some(t) => kind.takes_template(t).map_err(|e| format!("{at} = {t:?}: {e}"))?,
                    None if self.require_template => {
                        return Err(format!(
                            "{at}: require_template is set but {:?} has no template for this event: \
                             write {{ {} = ..., {} = ... }}",
                            kind.as_str(),
                            self.provider.as_str(),
                            kind.as_str()
                        ))
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

fn default_max_age_s() -> u64 {
    86_400
}

fn default_channel_name() -> String {
    "private-user-{recipient}".into()
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    8
}

impl Config {
    pub fn limits_for(&self, kind: ProviderKind) -> LimitConfig {
        self.limits.get(&kind).copied().unwrap_or_else(|| kind.profile().limits)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz`. Empty string turns the listener off.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: default_metrics_listen() }
    }
}

impl MetricsConfig {
    pub fn socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Invalid(format!("metrics.listen: {:?} is not host:port", self.listen)))
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}

/// Tuning knobs; the defaults are what the benchmarks in docs/ ran with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay's own schema: ledger and stored offset.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Ledger rows written per ingestion transaction, at most.
    #[serde(default = "default_ingest_batch_rows")]
    pub ingest_batch_rows: usize,
    /// Longest a committed change waits in memory before its ledger write.
    #[serde(default = "default_ingest_flush_ms")]
    pub ingest_flush_ms: u64,
    /// Deliveries claimed from the ledger per dispatch round.
    #[serde(default = "default_dispatch_batch")]
    pub dispatch_batch: usize,
    /// Provider calls in flight at once, across all channels.
    #[serde(default = "default_dispatch_concurrency")]
    pub dispatch_concurrency: usize,
    /// How often dispatch looks at the ledger when nothing woke it (retries coming due).
    #[serde(default = "default_dispatch_poll_ms")]
    pub dispatch_poll_ms: u64,
    /// Dispatch workers, each with its own ledger connection.
    #[serde(default = "default_dispatch_workers")]
    pub dispatch_workers: usize,
    /// A claimed delivery whose worker never reports back is taken over after this.
    /// Keep it well above the slowest provider timeout.
    #[serde(default = "default_claim_lease_ms")]
    pub claim_lease_ms: u64,
    /// Heartbeat WAL record interval (0 disables); keeps a quiet slot advancing.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Warn (and show in metrics) when the slot retains more WAL than this.
    #[serde(default = "default_max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
    /// Consecutive retryable failures that open a provider's circuit.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// How long an open circuit refuses calls before one probe is let through.
    #[serde(default = "default_circuit_open_ms")]
    pub circuit_open_ms: u64,
    /// Backoff for retryable provider failures: first delay and cap.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// How soon a standby takes over from an active relay that stopped
    /// answering (frozen, cut off): the server ends the active relay's lock
    /// session after this long without a word from it.
    #[serde(default = "default_takeover_ms")]
    pub takeover_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            schema: default_schema(),
            ingest_batch_rows: default_ingest_batch_rows(),
            ingest_flush_ms: default_ingest_flush_ms(),
            dispatch_batch: default_dispatch_batch(),
            dispatch_concurrency: default_dispatch_concurrency(),
            dispatch_poll_ms: default_dispatch_poll_ms(),
            dispatch_workers: default_dispatch_workers(),
            claim_lease_ms: default_claim_lease_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            max_retained_wal_mb: default_max_retained_wal_mb(),
            circuit_failures: default_circuit_failures(),
            circuit_open_ms: default_circuit_open_ms(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
            takeover_ms: default_takeover_ms(),
        }
    }
}

fn default_takeover_ms() -> u64 {
    10_000
}
fn default_schema() -> String {
    "outbox_relay".into()
}
fn default_ingest_batch_rows() -> usize {
    2000
}
fn default_ingest_flush_ms() -> u64 {
    5
}
fn default_dispatch_batch() -> usize {
    500
}
fn default_dispatch_concurrency() -> usize {
    16
}
fn default_dispatch_poll_ms() -> u64 {
    500
}
fn default_dispatch_workers() -> usize {
    4
}
fn default_claim_lease_ms() -> u64 {
    60_000
}
fn default_heartbeat_ms() -> u64 {
    60_000
}
fn default_max_retained_wal_mb() -> u64 {
    1024
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_circuit_open_ms() -> u64 {
    30_000
}
fn default_retry_base_ms() -> u64 {
    500
}
fn default_retry_max_ms() -> u64 {
    300_000
}

impl Config {
    /// Reads the file (if it exists or was named explicitly), env overrides, then validates.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let mut builder = config::Config::builder();
        if explicit || path.exists() {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        let (env, from_files) = env_overrides(std::env::vars())?;
        builder = builder.add_source(
            config::Environment::with_prefix("OUTBOX_RELAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        for (key, value) in from_files {
            builder = builder
                .set_override(key, value)
                .map_err(|source| ConfigError::Load { path: display.clone(), source })?;
        }
        let url = match (std::env::var("DATABASE_URL"), std::env::var_os("DATABASE_URL_FILE")) {
            (Ok(_), Some(_)) => {
                return Err(ConfigError::Invalid("both DATABASE_URL and DATABASE_URL_FILE are set: keep one".into()))
            }
            (Ok(url), None) => Some(url),
            (Err(_), Some(path)) => Some(read_secret_file(Path::new(&path)).map_err(ConfigError::Invalid)?),
            (Err(_), None) => None,
        };
        if let Some(url) = url {
            builder = builder
                .set_override("source.database_url", url)
                .map_err(|source| ConfigError::Load { path: display.clone(), source })?;
        }
        let mut cfg: Config = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|source| ConfigError::Load { path: display, source })?;
        cfg.read_file_values()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `file:` values of the keys that are not [`Secret`]s but may hold one.
    fn read_file_values(&mut self) -> Result<(), ConfigError> {
        let read = |key: &str, v: &mut String| {
            *v = read_file_value(v).map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
            Ok::<_, ConfigError>(())
        };
        read("source.database_url", &mut self.source.database_url)?;
        if let Some(smtp) = &mut self.providers.smtp {
            read("providers.smtp.url", &mut smtp.url)?;
        }
        Ok(())
    }

    /// Parses TOML text only (no env): for tests and the embedded demo.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|source| ConfigError::Load { path: "<inline>".into(), source })?;
        cfg.read_file_values()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-key checks. Each message names the key and what to write instead.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !is_identifier(&self.source.slot) {
            return bad(format!("source.slot {:?}: use lowercase letters, digits and _", self.source.slot));
        }
        if !is_identifier(&self.relay.schema) {
            return bad(format!("relay.schema {:?}: use lowercase letters, digits and _", self.relay.schema));
        }
        if self.routes.is_empty() {
            return bad("no [[routes]]: add one per table Django writes".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}] ({})", r.table);
            match (&r.event, &r.event_column) {
                (Some(_), Some(_)) => return bad(format!("{at}: set event or event_column, not both")),
                (None, None) => return bad(format!("{at}: set event = \"name\" or event_column = \"column\"")),
                _ => {}
            }
            match (&r.payload_columns, &r.payload_column) {
                (Some(_), Some(_)) => return bad(format!("{at}: set payload_columns or payload_column, not both")),
                (None, None) => return bad(format!("{at}: set payload_columns = [..] or payload_column = \"column\"")),
                _ => {}
            }
            if r.channels.is_empty() && r.channels_column.is_none() {
                return bad(format!("{at}: set channels = [..] or channels_column = \"column\""));
            }
            if r.operations.is_empty() {
                return bad(format!("{at}: operations is empty; list at least \"insert\""));
            }
            for c in &r.channels {
                if !self.channels.contains_key(c) {
                    return bad(format!("{at}: channel {c:?} has no [channels.{c}] section"));
                }
            }
        }
        for (name, ch) in &self.channels {
            for kind in std::iter::once(ch.provider).chain(ch.fallback) {
                let missing = !self.providers.has(kind);
                if missing {
                    let p = kind.as_str();
                    return bad(format!("channels.{name}: provider {p:?} needs a [providers.{p}] section"));
                }
            }
            let reach = ch.reach_of(ch.provider);
            if reach == Reach::Address && ch.address_query.is_none() {
                let topic = if ch.provider.can_bus() {
                    format!(" (or [channels.{name}.bus] with destination = \"<topic ARN>\" to publish to a topic)")
                } else {
                    String::new()
                };
                return bad(format!(
                    "channels.{name}: provider {:?} sends to an address: set address_query (e.g. \"SELECT email FROM auth_user WHERE id = $1\"){topic}",
                    ch.provider.as_str()
                ));
            }
            // OneSignal reaches the user by External ID, which `channel_name`
            // names; the in-app default (`private-user-{recipient}`) is never one.
            let onesignal = std::iter::once(ch.provider).chain(ch.fallback).any(|k| k == ProviderKind::Onesignal);
            if onesignal && ch.channel_name == default_channel_name() {
                return bad(format!(
                    "channels.{name}: OneSignal targets the user's External ID: set channel_name = \"{{recipient}}\" (or the pattern your app passes to OneSignal.login)"
                ));
            }
            let devices = ch.provider.needs_devices() || ch.fallback.is_some_and(ProviderKind::needs_devices);
            if devices && ch.tokens_query.is_none() {
                return bad(format!(
                    "channels.{name}: provider {:?} pushes to devices: set tokens_query (e.g. \"SELECT endpoint, p256dh, auth FROM push_subscription WHERE user_id = $1\")",
                    ch.provider.as_str()
                ));
            }
            for (key, set) in
                [("tokens_query", ch.tokens_query.is_some()), ("on_invalid_token", ch.on_invalid_token.is_some())]
            {
                if set && !devices {
                    return bad(format!("channels.{name}.{key} is only for push providers (webpush, fcm)"));
                }
            }
            if ch.fallback.is_some_and(|f| f.needs_devices() != ch.provider.needs_devices()) {
                return bad(format!(
                    "channels.{name}.fallback must push to devices too when the provider does, and not otherwise"
                ));
            }
            if ch.fallback.is_some_and(|f| (ch.reach_of(f) == Reach::Address) != (reach == Reach::Address)) {
                return bad(format!(
                    "channels.{name}.fallback must reach people the same way as the provider (address or app channel)"
                ));
            }
            if ch.fallback == Some(ch.provider) {
                return bad(format!("channels.{name}.fallback is the channel's own provider: name another one"));
            }
            let bus = ch.provider.is_bus() || ch.fallback.is_some_and(ProviderKind::is_bus);
            match (&ch.bus, bus) {
                (None, true) => {
                    return bad(format!(
                        "channels.{name}: a bus provider needs [channels.{name}.bus] with destination = \"...\""
                    ))
                }
                (Some(_), _) if !ch.provider.can_bus() => {
                    return bad(format!(
                        "channels.{name}.bus is only for bus providers (kafka, rabbitmq, redis, nats, pubsub) and sns topics"
                    ))
                }
                (Some(route), _) => route.validate(&format!("channels.{name}")).map_err(ConfigError::Invalid)?,
                (None, false) => {}
            }
            if ch.fallback.is_some_and(|f| (ch.reach_of(f) == Reach::Bus) != (reach == Reach::Bus)) {
                return bad(format!(
                    "channels.{name}.fallback must be a bus too when the provider is one, and not otherwise"
                ));
            }
            let sns_topic = std::iter::once(ch.provider).chain(ch.fallback).any(|k| k == ProviderKind::Sns);
            if sns_topic && ch.bus.is_some() && ch.address_query.is_some() {
                return bad(format!(
                    "channels.{name}: set address_query (SMS to a number) or bus (publish to a topic), not both"
                ));
            }
            if let (Some(route), true) = (&ch.bus, sns_topic) {
                crate::providers::sns::validate_route(route, &format!("channels.{name}"))
                    .map_err(ConfigError::Invalid)?;
            }
            ch.validate_templates(name).map_err(ConfigError::Invalid)?;
            if ch.max_attempts == 0 {
                return bad(format!("channels.{name}.max_attempts must be at least 1"));
            }
        }
        // An empty credential would let anyone move the ledger forward: the
        // webhook compares with "", which an unauthenticated request matches.
        if let Some(b) = &self.providers.brevo {
            if b.webhook_token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
                return bad("providers.brevo.webhook_token is empty: set a long random token, or remove the key".into());
            }
            if let Some(basic) = &b.webhook_basic {
                let ok = basic.expose().split_once(':').is_some_and(|(u, p)| !u.is_empty() && !p.is_empty());
                if !ok {
                    return bad("providers.brevo.webhook_basic must be \"user:password\", both non-empty".into());
                }
            }
        }
        if let Some(t) = &self.providers.twilio {
            if t.status_callback_url.is_some() && t.auth_token.expose().trim().is_empty() {
                return bad("providers.twilio.auth_token is empty: status callbacks could not be verified".into());
            }
        }
        let callbacks = self.providers.twilio.as_ref().is_some_and(|t| t.status_callback_url.is_some())
            || self.providers.brevo.as_ref().is_some_and(|b| b.webhook_token.is_some() || b.webhook_basic.is_some());
        if callbacks && self.metrics.socket_addr()?.is_none() {
            return bad(
                "delivery reports are configured (providers.twilio.status_callback_url or providers.brevo.webhook_*) \
                 but metrics.listen is empty: /webhooks/* is served on that listener, set it"
                    .to_string(),
            );
        }
        self.metrics.socket_addr()?;
        self.telemetry.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

type EnvMap = std::collections::HashMap<String, String>;

/// Splits the environment into what the `config` crate reads as
/// `OUTBOX_RELAY__...` overrides and the `..._FILE` variants, read here into
/// (dotted key, content). Setting both forms of one key is an error.
fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Result<(EnvMap, Vec<(String, String)>), ConfigError> {
    const PREFIX: &str = "OUTBOX_RELAY__";
    let mut env = std::collections::HashMap::new();
    let mut files = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            env.insert(name, value);
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let literal = KEYS_NAMED_FILE.iter().any(|k| key == *k || key.ends_with(&format!(".{k}")));
        match key.strip_suffix("_file") {
            Some(target) if !literal => {
                let content =
                    read_secret_file(Path::new(&value)).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
                files.push((target.to_string(), content));
            }
            _ => {
                env.insert(name, value);
            }
        }
    }
    for (target, _) in &files {
        let plain = format!("{PREFIX}{}", target.to_ascii_uppercase().replace('.', "__"));
        if env.contains_key(&plain) {
            return Err(ConfigError::Invalid(format!("both {plain} and {plain}_FILE are set: keep one")));
        }
    }
    Ok((env, files))
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// The README's example, verbatim: tests keep the documentation honest.
pub const README_EXAMPLE: &str = include_str!("../docs/relay.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_example_parses() {
        let cfg = Config::from_toml(README_EXAMPLE).unwrap();
        assert_eq!(cfg.routes.len(), 2);
        assert_eq!(cfg.source.slot, "outbox_relay");
        assert_eq!(cfg.providers.pusher.as_ref().unwrap().endpoint(), "https://api-eu.pusher.com");
        assert_eq!(cfg.routes[1].channels_column.as_deref(), Some("channels"));
        assert_eq!(cfg.channels["email"].templates["order_shipped"], TemplateChoice::One(TemplateId::Number(14)));
        assert!(cfg.channels["whatsapp"].is_whatsapp("whatsapp") && !cfg.channels["sms"].is_whatsapp("sms"));
        assert_eq!(cfg.providers.twilio.as_ref().unwrap().from.as_deref(), Some("+33700000000"));
    }

    #[test]
    fn webhooks_need_the_listener() {
        let text = README_EXAMPLE.replace("listen = \"127.0.0.1:9187\"", "listen = \"\"");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("metrics.listen is empty"), "{err}");
        let without = text.replace("status_callback_url", "# status_callback_url");
        assert!(Config::from_toml(&without).is_ok());
    }

    #[test]
    fn empty_webhook_credentials_are_refused() {
        let with = |line: &str| {
            let text = README_EXAMPLE.replace("sender_name = \"Alerts\"", &format!("sender_name = \"Alerts\"\n{line}"));
            Config::from_toml(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with("webhook_token = \"\"").unwrap_err().contains("webhook_token is empty"));
        assert!(with("webhook_token = \"   \"").unwrap_err().contains("webhook_token is empty"));
        for basic in ["\"\"", "\":\"", "\"user:\"", "\":pw\"", "\"nocolon\""] {
            let err = with(&format!("webhook_basic = {basic}")).unwrap_err();
            assert!(err.contains("webhook_basic must be"), "{basic}: {err}");
        }
        assert_eq!(with("webhook_token = \"a-long-random-token\""), Ok(()));
        assert_eq!(with("webhook_basic = \"brevo:s3cret\""), Ok(()));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = README_EXAMPLE.replace("slot = \"outbox_relay\"", "slott = \"x\"");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("slott"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg = Config::from_toml(README_EXAMPLE).unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("appid.keyid:secret"), "{dbg}");
        assert!(dbg.contains("***"));
    }

    #[test]
    fn secrets_and_urls_read_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let secret = write("pusher", "from-a-file\n");
        let url = write("url", "postgres://relay:pw@db/app\n");
        let text = README_EXAMPLE.replace("secret = \"secret\"", &format!("secret = \"file:{secret}\"")).replace(
            "database_url = \"postgres://relay@127.0.0.1:5432/app\"",
            &format!("database_url = \"file:{url}\""),
        );
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(cfg.providers.pusher.unwrap().secret.expose(), "from-a-file");
        assert_eq!(cfg.source.database_url, "postgres://relay:pw@db/app");

        let missing = README_EXAMPLE.replace("secret = \"secret\"", "secret = \"file:/no/such/secret\"");
        let err = Config::from_toml(&missing).unwrap_err().to_string();
        assert!(err.contains("/no/such/secret"), "{err}");
    }

    #[test]
    fn file_variants_of_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let p = path.display().to_string();
        let vars = [
            ("OUTBOX_RELAY__PROVIDERS__PUSHER__SECRET_FILE".to_string(), p.clone()),
            ("OUTBOX_RELAY__TLS__CA_FILE".to_string(), "/etc/ca.pem".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let (env, files) = env_overrides(vars.clone().into_iter()).unwrap();
        assert_eq!(files, vec![("providers.pusher.secret".to_string(), "s3cret".to_string())]);
        assert_eq!(env.get("OUTBOX_RELAY__TLS__CA_FILE").map(String::as_str), Some("/etc/ca.pem"));
        assert!(!env.contains_key("OUTBOX_RELAY__PROVIDERS__PUSHER__SECRET_FILE"));

        let both = vars.into_iter().chain([("OUTBOX_RELAY__PROVIDERS__PUSHER__SECRET".to_string(), "x".to_string())]);
        let err = env_overrides(both).unwrap_err().to_string();
        assert!(err.contains("keep one"), "{err}");
        let unreadable = [("OUTBOX_RELAY__PROVIDERS__ABLY__API_KEY_FILE".to_string(), "/no/such".to_string())];
        assert!(env_overrides(unreadable.into_iter()).unwrap_err().to_string().contains("/no/such"));
    }

    #[test]
    fn source_debug_hides_passwords_in_every_dsn_form() {
        for url in [
            "postgres://relay:hunter2@db/app",
            "postgres://relay@db/app?password=hunter2&sslmode=require",
            "host=db user=relay password='hunter2 x' sslmode=verify-full",
        ] {
            let text = README_EXAMPLE.replace("postgres://relay@127.0.0.1:5432/app", url);
            let dbg = format!("{:?}", Config::from_toml(&text).unwrap());
            assert!(!dbg.contains("hunter2") && dbg.contains("***"), "{dbg}");
        }
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(redact_url("postgres://relay:hunter2@db:5432/app"), "postgres://relay:***@db:5432/app");
        assert_eq!(redact_url("postgres://relay@db/app"), "postgres://relay@db/app");
    }

    const EMAIL_SNS: &str = include_str!("../docs/email-sns.example.toml");

    #[test]
    fn the_email_and_sns_example_parses_with_a_template_per_provider() {
        assert!(include_str!("../README.md").contains(EMAIL_SNS), "README shows docs/email-sns.example.toml verbatim");
        let cfg = Config::from_toml(EMAIL_SNS).unwrap();
        let email = &cfg.channels["email"];
        let choice = &email.templates["order_shipped"];
        assert_eq!(choice.for_provider(ProviderKind::Brevo, ProviderKind::Brevo), Some(&TemplateId::Number(14)));
        assert_eq!(
            choice.for_provider(ProviderKind::Brevo, ProviderKind::Sendgrid),
            Some(&TemplateId::Name("d-4ad23ad40a0e47d0a0232b85f24ca5c2".into()))
        );
        let digest = &cfg.channels["newsletter"].templates["digest"];
        assert_eq!(
            digest.for_provider(ProviderKind::Mailgun, ProviderKind::Mailgun),
            Some(&TemplateId::Name("weekly-digest".into()))
        );
        assert_eq!(cfg.channels["sms"].reach_of(ProviderKind::Sns), Reach::Address);
        assert_eq!(cfg.channels["orders"].reach_of(ProviderKind::Sns), Reach::Bus);
        assert_eq!(cfg.providers.mailgun.as_ref().unwrap().endpoint(), "https://api.eu.mailgun.net");
        assert_eq!(cfg.providers.sns.as_ref().unwrap().endpoint(), "https://sns.eu-west-3.amazonaws.com");
    }

    #[test]
    fn plain_template_values_stay_the_primarys_and_brevo_configs_keep_working() {
        // The README's Brevo channel, integers and all, is unchanged.
        let cfg = Config::from_toml(README_EXAMPLE).unwrap();
        let choice = &cfg.channels["email"].templates["notification_created"];
        assert_eq!(choice.for_provider(ProviderKind::Brevo, ProviderKind::Brevo), Some(&TemplateId::Number(12)));
        // A plain value is the primary's: a fallback sends plain text instead of an id it does not know.
        assert_eq!(choice.for_provider(ProviderKind::Brevo, ProviderKind::Sendgrid), None);
    }

    #[test]
    fn templates_and_sns_channels_are_checked_at_start() {
        let err = |from: &str, to: &str| {
            let text = EMAIL_SNS.replace(from, to);
            assert_ne!(text, EMAIL_SNS, "{from:?} is in the example");
            Config::from_toml(&text).unwrap_err().to_string()
        };
        let e = err("sendgrid = \"d-4ad23ad40a0e47d0a0232b85f24ca5c2\"", "sendgrid = 15");
        assert!(e.contains("channels.email.templates.order_shipped") && e.contains("d-"), "{e}");
        let e = err("brevo = 14", "brevo = \"fourteen\"");
        assert!(e.contains("Brevo template ids are numbers"), "{e}");
        let e = err("{ brevo = 14, sendgrid", "{ brevo = 14, mailgun = \"x\", sendgrid");
        assert!(e.contains("neither this channel's provider nor its fallback"), "{e}");
        // The e-mail providers are each other's fallback.
        for (primary, fallback) in [("mailgun", "brevo"), ("mailgun", "sendgrid"), ("sendgrid", "smtp")] {
            let text = EMAIL_SNS
                .replace("provider = \"mailgun\"", &format!("provider = \"{primary}\"\nfallback = \"{fallback}\""))
                .replace("templates = { digest = \"weekly-digest\" }", "")
                .replace(
                    "[providers.brevo]",
                    "[providers.smtp]\nurl = \"smtp://127.0.0.1:1025\"\nfrom = \"a@example.com\"\n[providers.brevo]",
                );
            assert!(Config::from_toml(&text).is_ok(), "{primary} -> {fallback}: {:?}", Config::from_toml(&text).err());
        }
        let both = EMAIL_SNS.replace("fallback = \"sendgrid\"", "fallback = \"sendgrid\"\nrequire_template = true");
        assert!(Config::from_toml(&both).is_ok(), "each provider has its template");
        let need = EMAIL_SNS.replace("{ brevo = 14, sendgrid = \"d-4ad23ad40a0e47d0a0232b85f24ca5c2\" }", "14");
        let need = need.replace("fallback = \"sendgrid\"", "fallback = \"sendgrid\"\nrequire_template = true");
        let e = Config::from_toml(&need).unwrap_err().to_string();
        assert!(e.contains("require_template is set but \"sendgrid\" has no template"), "{e}");
        let e = err("body = \"{title}\"", "body = \"{title}\"\ntemplates = { x = 1 }");
        assert!(e.contains("provider \"sns\" has no templates"), "{e}");
        // SNS: SMS needs an address query, a topic an SNS ARN in structured mode.
        let e = err("address_query = \"SELECT phone", "# address_query = \"SELECT phone");
        assert!(e.contains("channels.sms") && e.contains("address_query") && e.contains("topic ARN"), "{e}");
        let e = err("arn:aws:sns:eu-west-3:123456789012:orders.fifo", "orders");
        assert!(e.contains("an SNS topic ARN"), "{e}");
        let e = err("orders.fifo\" }", "orders.fifo\", mode = \"binary\" }");
        assert!(e.contains("structured"), "{e}");
        let e = err("bus = { destination", "address_query = \"SELECT 1\"\nbus = { destination");
        assert!(e.contains("not both"), "{e}");
        // A bus route on an e-mail provider is still refused.
        let e = err("templates = { digest = \"weekly-digest\" }", "bus = { destination = \"x\" }");
        assert!(e.contains("only for bus providers"), "{e}");
    }

    #[test]
    fn device_keys_are_only_for_push_channels() {
        for key in ["tokens_query = \"SELECT 1\"", "on_invalid_token = \"DELETE FROM t WHERE x = $1\""] {
            let text = README_EXAMPLE.replace(
                "channel_name = \"private-user-{recipient}\"",
                &format!("channel_name = \"private-user-{{recipient}}\"\n{key}"),
            );
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains("only for push providers"), "{err}");
        }
    }

    #[test]
    fn push_channels_need_tokens_query_and_a_push_fallback() {
        let push = |channel: &str| {
            let text = README_EXAMPLE.replace(
                "[providers.pusher]",
                &format!("{channel}\n[providers.webpush]\nprivate_key = \"k\"\nsubject = \"mailto:a@b.c\"\n\n[providers.pusher]"),
            );
            Config::from_toml(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        let err = push("[channels.push]\nprovider = \"webpush\"").unwrap_err();
        assert!(err.contains("pushes to devices: set tokens_query"), "{err}");
        let ok = "[channels.push]\nprovider = \"webpush\"\ntokens_query = \"SELECT endpoint, p256dh, auth FROM s WHERE user_id = $1\"";
        assert_eq!(push(ok), Ok(()));
        let err = push(&format!("{ok}\nfallback = \"pusher\"")).unwrap_err();
        assert!(err.contains("fallback must push to devices too"), "{err}");
    }

    #[test]
    fn route_naming_a_missing_channel_is_rejected() {
        let text = README_EXAMPLE.replace("channels = [\"in_app\"]", "channels = [\"pager\"]");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("[channels.pager]"), "{err}");
    }
}
