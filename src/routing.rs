//! Routing: a committed row becomes one delivery per channel.
//!
//! Pure and synchronous: no I/O, so every rule (allow-lists, channel columns,
//! bad rows) is unit-tested on plain values. A row that cannot be routed is not
//! dropped: it becomes a delivery already `failed` with the reason, so the ledger
//! shows what happened and the stream moves on.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Number, Value as Json};
use sha2::{Digest, Sha256};

use tracing::{info, warn};

use crate::change::{ChangeId, CommittedTx, Lsn, Operation, RowChange, Table, Value};
use crate::config::{Config, RouteConfig};
use crate::telemetry::metric;

/// What the ledger records for a new delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Disposition {
    /// To be sent by dispatch.
    Pending,
    /// Never sendable as it stands (bad row, unknown channel); the reason says why.
    Failed(String),
    /// Deliberately not sent (channel disabled); the reason says why.
    Skipped(String),
}

impl Disposition {
    pub fn status(&self) -> &'static str {
        match self {
            Disposition::Pending => "pending",
            Disposition::Failed(_) => "failed",
            Disposition::Skipped(_) => "skipped",
        }
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            Disposition::Pending => None,
            Disposition::Failed(r) | Disposition::Skipped(r) => Some(r),
        }
    }
}

/// One (change, channel) to record in the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDelivery {
    /// The committed change this delivery is for: with the channel, its key.
    pub change: ChangeId,
    pub operation: Operation,
    pub source_table: String,
    /// The row's primary key, for people reading the ledger ("what happened to
    /// notification 42?"); `-` when the table has none. Never part of the key.
    pub source_pk: String,
    pub channel: String,
    pub idempotency_key: String,
    pub event: String,
    pub recipient: Option<String>,
    pub payload: Json,
    pub disposition: Disposition,
    pub commit_lsn: Lsn,
    pub committed_at: DateTime<Utc>,
    /// The route's `correlation_column` value, normalised (see
    /// `telemetry::correlation`); `None` without one or when the row's is empty.
    pub correlation: Option<String>,
}

/// The key of a (change, channel): the same change always yields the same key,
/// across replays and restarts, so the ledger's unique index and the providers
/// that deduplicate (Ably's message id, Brevo's idempotency key) see a repeat
/// as a repeat — and two changes of one row are two keys.
pub fn idempotency_key(change: ChangeId, channel: &str) -> String {
    let mut h = Sha256::new();
    let change = change.to_string();
    for part in [change.as_str(), channel] {
        // Length-prefixed so no two (change, channel) pairs share a byte string.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    format!("or2-{}", hex::encode(&h.finalize()[..16]))
}

/// Metrics and warnings for what a batch recorded; counted per (channel,
/// status) first, so a 5000-row batch costs a handful of metric updates.
pub fn count_recorded<'a>(deliveries: impl Iterator<Item = &'a NewDelivery>, cfg: &Config) {
    let mut counts: HashMap<(&str, &'static str), u64> = HashMap::new();
    for d in deliveries {
        // Channel names can come from row data: only configured ones become
        // label values, or a bad column could mint a time series per row.
        let channel = if cfg.channels.contains_key(&d.channel) { d.channel.as_str() } else { "unknown" };
        *counts.entry((channel, d.disposition.status())).or_default() += 1;
        // A bad row is worth a warning; a channel switched off on purpose is not.
        match &d.disposition {
            Disposition::Failed(reason) => warn!(key = %d.idempotency_key, table = %d.source_table,
                pk = %d.source_pk, channel = %d.channel, correlation = d.correlation.as_deref(), status = "failed",
                reason, "delivery recorded without sending"),
            Disposition::Skipped(reason) => info!(key = %d.idempotency_key, table = %d.source_table,
                pk = %d.source_pk, channel = %d.channel, correlation = d.correlation.as_deref(), status = "skipped",
                reason, "delivery recorded without sending"),
            Disposition::Pending => {}
        }
    }
    for ((channel, status), n) in counts {
        metrics::counter!(metric::DELIVERIES_RECORDED, "channel" => channel.to_string(), "status" => status)
            .increment(n);
    }
}

/// The `ingest` span (source commit → ledger commit) and its `ledger.write`
/// child of each delivery a batch recorded, when tracing is on. Failed and
/// skipped deliveries get theirs too: a trace shows why nothing was sent.
pub fn trace_recorded<'a>(
    tracer: Option<&crate::telemetry::otlp::Tracer>,
    deliveries: impl Iterator<Item = &'a NewDelivery>,
    write_start: std::time::SystemTime,
    write_end: std::time::SystemTime,
) {
    use crate::telemetry::otlp::{DeliveryTrace, Span};
    let Some(tracer) = tracer else { return };
    for d in deliveries {
        let trace = DeliveryTrace::new(&d.idempotency_key, d.correlation.as_deref());
        let committed = std::time::SystemTime::from(d.committed_at).min(write_start);
        let mut ingest = Span::internal(&trace, trace.ingest_span, trace.remote_parent, "ingest")
            .between(committed, write_end)
            .attr("outbox_relay.delivery_key", d.idempotency_key.clone())
            .attr("outbox_relay.channel", d.channel.clone())
            .attr("outbox_relay.event", d.event.clone())
            .attr("outbox_relay.table", d.source_table.clone())
            .attr("outbox_relay.status", d.disposition.status());
        if let Some(v) = d.correlation.as_deref().filter(|_| trace.remote_parent.is_none()) {
            ingest = ingest.attr("outbox_relay.correlation", v.to_string());
        }
        if let Disposition::Failed(reason) = &d.disposition {
            ingest.error = Some(reason.clone());
        }
        tracer.record(ingest);
        tracer.record(
            Span::internal(&trace, trace.ledger_span(), Some(trace.ingest_span), "ledger.write")
                .between(write_start, write_end),
        );
    }
}

/// Routes compiled from config, looked up by `schema.table`.
#[derive(Clone, Debug)]
pub struct Router {
    routes: HashMap<String, Vec<RouteConfig>>,
    /// Primary-key columns per routed table, from the catalog (see
    /// [`Router::with_primary_keys`]). pgoutput's key flags describe the
    /// replica identity, which under `REPLICA IDENTITY FULL` is every column.
    primary_keys: HashMap<String, Vec<String>>,
    /// Channel name → enabled. Names absent here are unknown channels.
    channels: HashMap<String, bool>,
}

impl Router {
    pub fn new(cfg: &Config) -> Router {
        let mut routes: HashMap<String, Vec<RouteConfig>> = HashMap::new();
        for r in &cfg.routes {
            routes.entry(r.qualified_table()).or_default().push(r.clone());
        }
        let channels = cfg.channels.iter().map(|(k, c)| (k.clone(), c.enabled)).collect();
        Router { routes, channels, primary_keys: HashMap::new() }
    }

    /// Names each table's primary-key columns (`schema.table` → columns), for
    /// the ledger's `source_pk`. A table absent here falls back to the replica
    /// identity's key columns, then to a column named `id`.
    pub fn with_primary_keys(mut self, keys: HashMap<String, Vec<String>>) -> Router {
        self.primary_keys = keys;
        self
    }

    /// The routed tables, `schema.table`.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// Is this table routed at all? (Unrouted tables in the publication are ignored.)
    pub fn routes_table(&self, qualified: &str) -> bool {
        self.routes.contains_key(qualified)
    }

    /// Appends the deliveries of every routed change in `tx` to `out`.
    pub fn route_tx(&self, tx: &CommittedTx, out: &mut Vec<NewDelivery>) {
        for change in &tx.changes {
            self.route_change(change, tx.commit_lsn, tx.commit_time, out);
        }
    }

    pub fn route_change(
        &self,
        change: &RowChange,
        commit_lsn: Lsn,
        committed_at: DateTime<Utc>,
        out: &mut Vec<NewDelivery>,
    ) {
        let table_name = change.table.qualified_name();
        let Some(routes) = self.routes.get(&table_name) else { return };
        let row = RowView { table: &change.table, values: &change.values };
        let pk = match self.primary_keys.get(&table_name) {
            Some(cols) => row.key_of(cols),
            None => row.primary_key(),
        };
        let base = NewDelivery {
            change: change.id,
            operation: change.op,
            source_table: table_name.clone(),
            source_pk: pk.unwrap_or_else(|| "-".into()),
            channel: String::new(),
            idempotency_key: String::new(),
            event: String::new(),
            recipient: None,
            payload: Json::Object(Map::new()),
            disposition: Disposition::Pending,
            commit_lsn,
            committed_at,
            correlation: None,
        };
        // Several routes on one table each get their own channels; two routes
        // naming one channel for one change make one delivery (the first
        // route's), as its key is the same.
        let first = out.len();
        let push = |out: &mut Vec<NewDelivery>, d: NewDelivery| {
            if !out[first..].iter().any(|o| o.channel == d.channel) {
                out.push(d);
            }
        };
        for route in routes.iter().filter(|r| r.operations.contains(&change.op)) {
            // Best effort: a missing or NULL correlation never fails a delivery.
            let correlation = route.correlation_column.as_deref().and_then(|col| match row.get(col) {
                Ok(Value::Text(t)) => crate::telemetry::correlation::normalise(t),
                _ => None,
            });
            let base = NewDelivery { correlation, ..base.clone() };
            match self.decide(route, &row, change.op) {
                Ok(d) => {
                    for (channel, disposition) in d.channels {
                        push(out, finish(&base, channel, &d.event, &d.recipient, &d.payload, disposition));
                    }
                }
                Err(fail) => {
                    // Record the failure once per channel we could tell, else once under "-".
                    let channels = if fail.channels.is_empty() { vec!["-".to_string()] } else { fail.channels };
                    for channel in channels {
                        let d = finish(
                            &base,
                            channel,
                            fail.event.as_deref().unwrap_or("-"),
                            &fail.recipient,
                            &Json::Object(Map::new()),
                            Disposition::Failed(fail.reason.clone()),
                        );
                        push(out, d);
                    }
                }
            }
        }
    }

    fn decide(&self, route: &RouteConfig, row: &RowView<'_>, op: Operation) -> Result<Decided, RouteFailure> {
        let mut fail = RouteFailure::whole(String::new());
        // Channels first: a failure later in the row is then recorded per channel.
        let channels = match &route.channels_column {
            Some(col) => match row.get(col) {
                Err(e) => return Err(fail.with(e)),
                Ok(Value::Null) => route.channels.clone(),
                Ok(Value::Unchanged) => return Err(fail.with(format!("column {col} was not sent (unchanged TOAST)"))),
                Ok(Value::Text(t)) => match parse_text_array(t) {
                    Some(list) if list.iter().all(Option::is_some) => {
                        let list: Vec<String> = list.into_iter().flatten().collect();
                        if list.is_empty() {
                            route.channels.clone()
                        } else {
                            list
                        }
                    }
                    _ => return Err(fail.with(format!("column {col} is not a text array: {}", clip(t)))),
                },
            },
            None => route.channels.clone(),
        };
        let mut channels = dedup(channels);
        if channels.is_empty() {
            return Err(fail.with("row names no channel and the route has no default channels".into()));
        }
        fail.channels = channels.clone();

        let event = match (&route.event, &route.event_column) {
            (Some(e), _) => e.clone(),
            (None, Some(col)) => match row.get(col).map_err(|e| fail.clone().with(e))? {
                Value::Text(t) if !t.is_empty() => t.clone(),
                _ => return Err(fail.with(format!("event column {col} is NULL or empty"))),
            },
            (None, None) => unreachable!("config validation requires event or event_column"),
        };
        fail.event = Some(event.clone());

        let recipient = match row.get(&route.recipient_column).map_err(|e| fail.clone().with(e))? {
            Value::Text(t) if !t.is_empty() => t.clone(),
            _ => return Err(fail.with(format!("recipient column {} is NULL or empty", route.recipient_column))),
        };
        fail.recipient = Some(recipient.clone());

        let payload = match (&route.payload_columns, &route.payload_column) {
            (Some(cols), _) => {
                let mut obj = Map::new();
                for col in cols {
                    let (column, value) = row.column(col).map_err(|e| fail.clone().with(e))?;
                    if matches!(value, Value::Unchanged) && op == Operation::Update {
                        continue;
                    }
                    obj.insert(col.clone(), to_json(column.type_oid, value));
                }
                Json::Object(obj)
            }
            (None, Some(col)) => match row.column(col).map_err(|e| fail.clone().with(e))? {
                (c, v @ Value::Text(_)) => match to_json(c.type_oid, v) {
                    obj @ Json::Object(_) => obj,
                    other => {
                        let kind = json_kind(&other);
                        return Err(fail.with(format!("payload column {col} holds {kind}, not a JSON object")));
                    }
                },
                _ => return Err(fail.with(format!("payload column {col} is NULL"))),
            },
            (None, None) => unreachable!("config validation requires payload_columns or payload_column"),
        };

        // jsonb cannot store U+0000 (a `json` column can): the ledger would
        // refuse the whole batch, and every replay of it, so the row fails here.
        if holds_nul(&payload) {
            return Err(fail.with("the payload holds a U+0000 (NUL) character, which jsonb cannot store".into()));
        }

        // Critical-only and similar: a channel with conditions takes the row
        // only when the payload matches every one of them.
        channels.retain(|ch| match route.only.get(ch) {
            None => true,
            Some(conds) => conds.iter().all(|(k, want)| payload.get(k) == Some(want)),
        });
        let decided = channels
            .drain(..)
            .map(|ch| {
                let disposition = match self.channels.get(&ch) {
                    None => {
                        Disposition::Failed(format!("unknown channel {ch:?}: no [channels.{ch}] in the relay config"))
                    }
                    Some(false) => Disposition::Skipped("disabled".into()),
                    Some(true) => Disposition::Pending,
                };
                (ch, disposition)
            })
            .collect();
        Ok(Decided { event, recipient: Some(recipient), payload, channels: decided })
    }
}

struct Decided {
    event: String,
    recipient: Option<String>,
    payload: Json,
    channels: Vec<(String, Disposition)>,
}

/// A routing failure and how much of the row was understood before it.
#[derive(Clone)]
struct RouteFailure {
    reason: String,
    channels: Vec<String>,
    event: Option<String>,
    recipient: Option<String>,
}

impl RouteFailure {
    fn whole(reason: String) -> Self {
        RouteFailure { reason, channels: vec![], event: None, recipient: None }
    }
    fn with(mut self, reason: String) -> Self {
        self.reason = reason;
        self
    }
}

fn finish(
    base: &NewDelivery,
    channel: String,
    event: &str,
    recipient: &Option<String>,
    payload: &Json,
    disposition: Disposition,
) -> NewDelivery {
    NewDelivery {
        idempotency_key: idempotency_key(base.change, &channel),
        channel,
        event: event.to_string(),
        recipient: recipient.clone(),
        payload: payload.clone(),
        disposition,
        ..base.clone()
    }
}

fn holds_nul(v: &Json) -> bool {
    match v {
        Json::String(s) => s.contains('\0'),
        Json::Array(a) => a.iter().any(holds_nul),
        Json::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|c| seen.insert(c.clone()));
    v
}

fn clip(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A row with its table, for lookups by column name.
pub struct RowView<'a> {
    pub table: &'a Arc<Table>,
    pub values: &'a [Value],
}

impl RowView<'_> {
    fn column(&self, name: &str) -> Result<(&crate::change::Column, &Value), String> {
        let i = self
            .table
            .columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| format!("column {name} does not exist in {}", self.table.qualified_name()))?;
        let v = self.values.get(i).ok_or_else(|| format!("column {name} missing from the change"))?;
        Ok((&self.table.columns[i], v))
    }

    fn get(&self, name: &str) -> Result<&Value, String> {
        self.column(name).map(|(_, v)| v)
    }

    /// The named columns' values joined by ','; `None` if one is missing or NULL.
    pub fn key_of(&self, columns: &[String]) -> Option<String> {
        let mut parts = Vec::with_capacity(columns.len());
        for c in columns {
            match self.get(c) {
                Ok(Value::Text(t)) => parts.push(t.as_str()),
                _ => return None,
            }
        }
        (!parts.is_empty()).then(|| parts.join(","))
    }

    /// Replica-identity key columns' values joined by ','. Falls back to a
    /// column named `id` when the table reports no key (replica identity NOTHING).
    pub fn primary_key(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (c, v) in self.table.columns.iter().zip(self.values) {
            if c.is_key {
                match v {
                    Value::Text(t) => parts.push(t.as_str()),
                    _ => return None,
                }
            }
        }
        if parts.is_empty() {
            return match self.get("id") {
                Ok(Value::Text(t)) => Some(t.clone()),
                _ => None,
            };
        }
        Some(parts.join(","))
    }
}

// Type OIDs from pg_type.dat; only those whose JSON form differs from a string.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const DATE: u32 = 1082;
const JSONB: u32 = 3802;
const BOOL_ARRAY: u32 = 1000;
const INT2_ARRAY: u32 = 1005;
const INT4_ARRAY: u32 = 1007;
const INT8_ARRAY: u32 = 1016;
const TEXT_ARRAY: u32 = 1009;
const VARCHAR_ARRAY: u32 = 1015;
const BPCHAR_ARRAY: u32 = 1014;
const FLOAT8_ARRAY: u32 = 1022;
const NUMERIC_ARRAY: u32 = 1231;

/// A column's text output as JSON of the type a user expects: numbers stay
/// numbers, booleans booleans, json(b) structured, timestamps RFC 3339.
/// Anything unrecognised stays a string, never an error.
pub fn to_json(type_oid: u32, value: &Value) -> Json {
    let text = match value {
        Value::Null | Value::Unchanged => return Json::Null,
        Value::Text(t) => t.as_str(),
    };
    match type_oid {
        BOOL => Json::Bool(text == "t"),
        INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | NUMERIC => number(text),
        JSON | JSONB => serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_string())),
        TIMESTAMPTZ => timestamptz(text).map(Json::String).unwrap_or_else(|| Json::String(text.into())),
        TIMESTAMP => NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .map(|t| Json::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()))
            .unwrap_or_else(|_| Json::String(text.into())),
        DATE => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(|d| Json::String(d.to_string()))
            .unwrap_or_else(|_| Json::String(text.into())),
        BOOL_ARRAY | INT2_ARRAY | INT4_ARRAY | INT8_ARRAY | FLOAT8_ARRAY | NUMERIC_ARRAY | TEXT_ARRAY
        | VARCHAR_ARRAY | BPCHAR_ARRAY => match parse_text_array(text) {
            Some(items) => {
                let elem = match type_oid {
                    BOOL_ARRAY => BOOL,
                    TEXT_ARRAY | VARCHAR_ARRAY | BPCHAR_ARRAY => 25,
                    _ => NUMERIC,
                };
                Json::Array(
                    items
                        .into_iter()
                        .map(|i| match i {
                            None => Json::Null,
                            Some(s) => to_json(elem, &Value::Text(s)),
                        })
                        .collect(),
                )
            }
            None => Json::String(text.into()),
        },
        _ => Json::String(text.into()),
    }
}

fn number(text: &str) -> Json {
    if let Ok(i) = text.parse::<i64>() {
        return Json::Number(i.into());
    }
    // NaN and Infinity have no JSON number: keep them as text rather than lie.
    match text.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(n) => Json::Number(n),
        None => Json::String(text.into()),
    }
}

/// `2026-11-24 17:35:00.123+01` (PostgreSQL's output) → `2026-11-24T16:35:00.123Z`.
fn timestamptz(text: &str) -> Option<String> {
    // PostgreSQL prints the offset as +HH, +HH:MM or +HH:MM:SS; chrono wants +HH:MM.
    let split = text.rfind(['+', '-']).filter(|&i| i > 10)?;
    let (dt, off) = text.split_at(split);
    let mut off = off.to_string();
    if off.len() == 3 {
        off.push_str(":00");
    }
    let off = if off.len() > 6 { off[..6].to_string() } else { off };
    let parsed = DateTime::parse_from_str(&format!("{dt}{off}"), "%Y-%m-%d %H:%M:%S%.f%:z").ok()?;
    Some(parsed.with_timezone(&Utc).to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A one-dimensional array literal (`{a,"b c",NULL}`) into its elements.
/// `None` when the text is not such a literal; NULL elements are `None`.
pub fn parse_text_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
            out.push(Some(item));
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None; // nested arrays are not channel lists
                }
                item.push(c);
                chars.next();
            }
            out.push(if item == "NULL" { None } else { Some(item) });
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Column;

    fn table(name: &str, cols: &[(&str, u32, bool)]) -> Arc<Table> {
        Arc::new(Table {
            schema: "public".into(),
            name: name.into(),
            columns: cols.iter().map(|(n, t, k)| Column { name: n.to_string(), type_oid: *t, is_key: *k }).collect(),
        })
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn cfg() -> Config {
        // The README's channels, with SMS switched off.
        let text = crate::config::README_EXAMPLE.replace(
            "[channels.sms]\nprovider = \"twilio\"\n",
            "[channels.sms]\nprovider = \"twilio\"\nenabled = false\n",
        );
        Config::from_toml(&text).unwrap()
    }

    fn notif_table() -> Arc<Table> {
        table(
            "operators_notificationoperateur",
            &[
                ("id", INT8, true),
                ("user_id", INT4, false),
                ("kind", 1043, false),
                ("title", 1043, false),
                ("body", 25, false),
                ("level", 1043, false),
                ("url", 1043, false),
                ("is_read", BOOL, false),
                ("created_at", TIMESTAMPTZ, false),
            ],
        )
    }

    fn outbox_table() -> Arc<Table> {
        table(
            "operators_outboxevent",
            &[
                ("id", INT8, true),
                ("event_type", 1043, false),
                ("recipient_id", INT4, false),
                ("channels", VARCHAR_ARRAY, false),
                ("payload", JSONB, false),
            ],
        )
    }

    fn route(values: Vec<Value>, tbl: Arc<Table>, op: Operation) -> Vec<NewDelivery> {
        let router = Router::new(&cfg());
        let mut out = vec![];
        let change = RowChange { id: ChangeId::Wal { commit_lsn: Lsn(42), seq: 0 }, table: tbl, op, values };
        router.route_change(&change, Lsn(42), DateTime::UNIX_EPOCH, &mut out);
        out
    }

    #[test]
    fn notification_row_goes_to_in_app_with_allow_listed_typed_payload() {
        let out = route(
            vec![
                t("7"),
                t("3"),
                t("order_ready"),
                t("Commande prête 🎉"),
                t("secret body"),
                t("info"),
                t("/orders/9"),
                t("f"),
                t("2026-11-24 17:35:00.5+01"),
            ],
            notif_table(),
            Operation::Insert,
        );
        assert_eq!(out.len(), 1);
        let d = &out[0];
        assert_eq!(d.channel, "in_app");
        assert_eq!(d.event, "notification_created");
        assert_eq!(d.recipient.as_deref(), Some("3"));
        assert_eq!(d.source_pk, "7");
        assert_eq!(d.disposition, Disposition::Pending);
        assert_eq!(
            d.payload,
            serde_json::json!({"id": 7, "kind": "order_ready", "title": "Commande prête 🎉", "level": "info",
                "url": "/orders/9", "created_at": "2026-11-24T16:35:00.500Z"})
        );
        assert!(d.payload.get("body").is_none(), "columns outside the allow-list never leave");
    }

    #[test]
    fn updates_and_deletes_route_nowhere_unless_listed() {
        let vals = vec![t("7"), t("3"), t("k"), t("x"), t(""), t("info"), t(""), t("t"), t("2026-11-24 17:35:00+00")];
        assert!(route(vals.clone(), notif_table(), Operation::Update).is_empty());
        assert!(route(vals, notif_table(), Operation::Delete).is_empty());
    }

    #[test]
    fn outbox_row_takes_event_channels_and_payload_from_the_row() {
        let out = route(
            vec![t("11"), t("order_shipped"), t("5"), t("{in_app,email,sms,pager}"), t(r#"{"order": 9, "n": 1.5}"#)],
            outbox_table(),
            Operation::Insert,
        );
        let got: Vec<_> = out.iter().map(|d| (d.channel.as_str(), d.disposition.status())).collect();
        assert_eq!(got, [("in_app", "pending"), ("email", "pending"), ("sms", "skipped"), ("pager", "failed")]);
        assert_eq!(out[0].event, "order_shipped");
        assert_eq!(out[0].payload, serde_json::json!({"order": 9, "n": 1.5}));
        assert!(out[3].disposition.reason().unwrap().contains("unknown channel \"pager\""));
        let keys: std::collections::HashSet<_> = out.iter().map(|d| &d.idempotency_key).collect();
        assert_eq!(keys.len(), 4, "one key per channel");
    }

    #[test]
    fn the_correlation_column_is_read_and_a_missing_or_empty_one_fails_nothing() {
        let text = crate::config::README_EXAMPLE.replace(
            "payload_column = \"payload\"",
            "payload_column = \"payload\"\ncorrelation_column = \"request_id\"",
        );
        let cfg = Config::from_toml(&text).unwrap();
        assert_eq!(cfg.routes[1].correlation_column.as_deref(), Some("request_id"));
        let router = Router::new(&cfg);
        let mut cols: Vec<_> = outbox_table().columns.iter().map(|c| (c.name.clone(), c.type_oid, c.is_key)).collect();
        cols.push(("request_id".into(), 25, false));
        let cols: Vec<(&str, u32, bool)> = cols.iter().map(|(n, t, k)| (n.as_str(), *t, *k)).collect();
        let with = table("operators_outboxevent", &cols);
        let route_one = |request_id: Value| {
            let values = vec![t("1"), t("e"), t("5"), t("{in_app}"), t("{}"), request_id];
            let change = RowChange {
                id: ChangeId::Wal { commit_lsn: Lsn(42), seq: 0 },
                table: with.clone(),
                op: Operation::Insert,
                values,
            };
            let mut out = vec![];
            router.route_change(&change, Lsn(42), DateTime::UNIX_EPOCH, &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].disposition, Disposition::Pending, "correlation never fails a delivery");
            out.remove(0).correlation
        };
        assert_eq!(route_one(t(" req-42 ")).as_deref(), Some("req-42"));
        assert_eq!(route_one(Value::Null), None);
        assert_eq!(route_one(t("")), None);
        assert_eq!(route_one(t(&"x".repeat(300))).map(|c| c.len()), Some(128));
        // A row without the column at all (not captured): no correlation, still sent.
        let change = RowChange {
            id: ChangeId::Wal { commit_lsn: Lsn(42), seq: 0 },
            table: outbox_table(),
            op: Operation::Insert,
            values: vec![t("1"), t("e"), t("5"), t("{in_app}"), t("{}")],
        };
        let mut out = vec![];
        router.route_change(&change, Lsn(42), DateTime::UNIX_EPOCH, &mut out);
        assert_eq!((out[0].correlation.as_deref(), out[0].disposition.status()), (None, "pending"));
    }

    #[test]
    fn empty_channel_array_falls_back_to_route_defaults_or_fails_clearly() {
        let out = route(vec![t("1"), t("e"), t("5"), t("{}"), t("{}")], outbox_table(), Operation::Insert);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].channel, "-");
        assert!(out[0].disposition.reason().unwrap().contains("no channel"));
    }

    #[test]
    fn bad_rows_become_failed_deliveries_with_reasons() {
        let cases = [
            (vec![t("1"), t("e"), Value::Null, t("{in_app}"), t("{}")], "recipient column recipient_id"),
            (vec![t("2"), t("e"), t("5"), t("{in_app}"), t("[1,2]")], "not a JSON object"),
            (vec![t("3"), t("e"), t("5"), t("{in_app}"), t("\"str\"")], "not a JSON object"),
            (vec![t("4"), Value::Null, t("5"), t("{in_app}"), t("{}")], "event column"),
            (vec![t("5"), t("e"), t("5"), t("{in_app}"), Value::Null], "payload column payload is NULL"),
        ];
        for (vals, want) in cases {
            let out = route(vals, outbox_table(), Operation::Insert);
            assert_eq!(out.len(), 1);
            let reason = out[0].disposition.reason().unwrap();
            assert_eq!(out[0].disposition.status(), "failed");
            assert!(reason.contains(want), "{reason} should mention {want}");
        }
    }

    #[test]
    fn a_channel_can_be_restricted_to_matching_rows() {
        let text = crate::config::README_EXAMPLE.replace(
            "payload_column = \"payload\"        # a jsonb object, sent as the payload",
            "payload_column = \"payload\"\nonly = { sms = { level = \"critical\" } }",
        );
        let router = Router::new(&Config::from_toml(&text).unwrap());
        let route = |payload: &str| {
            let mut out = vec![];
            let values = vec![t("1"), t("e"), t("5"), t("{in_app,sms}"), t(payload)];
            let change = RowChange { id: ChangeId::Log(1), table: outbox_table(), op: Operation::Insert, values };
            router.route_change(&change, Lsn(1), DateTime::UNIX_EPOCH, &mut out);
            out.into_iter().map(|d| d.channel).collect::<Vec<_>>()
        };
        assert_eq!(route(r#"{"level": "critical"}"#), ["in_app", "sms"]);
        assert_eq!(route(r#"{"level": "info"}"#), ["in_app"]);
        assert_eq!(route(r#"{}"#), ["in_app"]);
    }

    #[test]
    fn two_routes_naming_one_channel_make_one_delivery_from_the_first() {
        // The second route would send other content on the same key: the
        // ledger keeps the first (ON CONFLICT DO NOTHING), so must routing.
        let text = format!(
            "{}\n[[routes]]\ntable = \"public.operators_outboxevent\"\nrecipient_column = \"recipient_id\"\n\
             event = \"second_route\"\nchannels = [\"in_app\"]\npayload_columns = [\"id\"]\n",
            crate::config::README_EXAMPLE
        );
        let router = Router::new(&Config::from_toml(&text).unwrap());
        let mut out = vec![];
        let values = vec![t("1"), t("first_route"), t("5"), t("{in_app}"), t("{}")];
        let change = RowChange { id: ChangeId::Log(1), table: outbox_table(), op: Operation::Insert, values };
        router.route_change(&change, Lsn(1), DateTime::UNIX_EPOCH, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].event, "first_route");
    }

    #[test]
    fn a_table_under_replica_identity_full_is_keyed_by_its_primary_key() {
        // pgoutput flags every column as key under FULL; NULLs among them
        // must not fail the row, and non-key columns must not reach the ledger.
        let full = table(
            "operators_notificationoperateur",
            &[
                ("id", INT8, true),
                ("user_id", INT4, true),
                ("kind", 1043, true),
                ("title", 1043, true),
                ("body", 25, true),
                ("level", 1043, true),
                ("url", 1043, true),
                ("is_read", BOOL, true),
                ("created_at", TIMESTAMPTZ, true),
            ],
        );
        let keys = HashMap::from([("public.operators_notificationoperateur".to_string(), vec!["id".to_string()])]);
        let router = Router::new(&cfg()).with_primary_keys(keys);
        let mut out = vec![];
        let values =
            vec![t("7"), t("3"), t("k"), t("x"), Value::Null, t("info"), t(""), t("f"), t("2026-11-24 17:35:00+00")];
        let change = RowChange { id: ChangeId::Log(9), table: full, op: Operation::Insert, values };
        router.route_change(&change, Lsn(1), DateTime::UNIX_EPOCH, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].disposition, Disposition::Pending);
        assert_eq!(out[0].source_pk, "7");
    }

    #[test]
    fn idempotency_keys_name_the_change_and_channel() {
        let wal = |lsn, seq| ChangeId::Wal { commit_lsn: Lsn(lsn), seq };
        assert_eq!(idempotency_key(wal(1, 0), "a"), idempotency_key(wal(1, 0), "a"), "stable across replays");
        assert_ne!(idempotency_key(wal(1, 0), "a"), idempotency_key(wal(1, 0), "b"));
        assert_ne!(idempotency_key(wal(1, 0), "a"), idempotency_key(wal(1, 1), "a"), "two changes of one tx");
        assert_ne!(idempotency_key(wal(1, 0), "a"), idempotency_key(wal(2, 0), "a"), "same row, later tx");
        assert_ne!(idempotency_key(ChangeId::Log(7), "a"), idempotency_key(ChangeId::Log(8), "a"));
    }

    #[test]
    fn json_conversion_keeps_types() {
        assert_eq!(to_json(INT8, &t("9007199254740993")), serde_json::json!(9007199254740993i64));
        assert_eq!(to_json(NUMERIC, &t("12.50")), serde_json::json!(12.5));
        assert_eq!(to_json(FLOAT8, &t("NaN")), serde_json::json!("NaN"));
        assert_eq!(to_json(BOOL, &t("t")), serde_json::json!(true));
        assert_eq!(to_json(JSONB, &t(r#"{"a":[1]}"#)), serde_json::json!({"a": [1]}));
        assert_eq!(to_json(TIMESTAMPTZ, &t("2026-01-02 03:04:05+00")), serde_json::json!("2026-01-02T03:04:05Z"));
        assert_eq!(
            to_json(TIMESTAMPTZ, &t("2026-01-02 03:04:05.123456-03:30")),
            serde_json::json!("2026-01-02T06:34:05.123456Z")
        );
        assert_eq!(to_json(TIMESTAMP, &t("2026-01-02 03:04:05")), serde_json::json!("2026-01-02T03:04:05"));
        assert_eq!(to_json(INT4_ARRAY, &t("{1,NULL,3}")), serde_json::json!([1, null, 3]));
        assert_eq!(to_json(25, &Value::Null), Json::Null);
        assert_eq!(to_json(25, &t("a\u{0}\u{7}b")), serde_json::json!("a\u{0}\u{7}b"));
    }

    #[test]
    fn array_literals() {
        assert_eq!(parse_text_array("{}"), Some(vec![]));
        assert_eq!(
            parse_text_array(r#"{a,"b c","d\"e",NULL}"#),
            Some(vec![Some("a".into()), Some("b c".into()), Some("d\"e".into()), None])
        );
        assert_eq!(parse_text_array("{{1,2},{3,4}}"), None);
        assert_eq!(parse_text_array("not an array"), None);
        assert_eq!(parse_text_array("{\"unterminated"), None);
    }
}
