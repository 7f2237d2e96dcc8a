//! Delivery traces, exported over OTLP/HTTP (JSON) when `telemetry.otlp_endpoint` is set.
//!
//! One trace per delivery: an `ingest` span (from the source commit to the
//! ledger commit that recorded it), its child `ledger.write` (that write), and
//! one `provider.send` span per attempt, also a child of `ingest`. When the
//! row's correlation value is a W3C `traceparent` (the Django request's), the
//! trace is that request's: same trace id, `ingest`'s parent its span id.
//!
//! Ingestion and dispatch run at different times, in different tasks, and
//! after a restart possibly in another process; so span ids are not kept
//! anywhere: each is derived from the delivery's idempotency key (and the
//! attempt), and both sides compute the same ones. A delivery whose row
//! carries no traceparent gets a trace id derived the same way.
//!
//! Why hand-written and not the `opentelemetry` SDK crates: the SDK's model is
//! an in-process span context handed from parent to child, which these spans
//! do not have (see above); using it would mean building remote span
//! contexts by hand anyway. What is left — three span kinds, a bounded queue
//! and a JSON POST of the `ExportTraceServiceRequest` the OTLP spec defines —
//! is ~200 lines on the HTTP client the relay already has, against four
//! crates (opentelemetry, _sdk, -otlp, -proto with prost) whose versions
//! must move together. The OTLP/HTTP JSON encoding is specified at
//! https://opentelemetry.io/docs/specs/otlp/#otlphttp (ids as hex strings,
//! 64-bit integers as strings, `POST {endpoint}/v1/traces`).
//!
//! Export never slows delivery: spans go through a bounded queue and are
//! dropped (and counted) when it is full or the collector is down.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::correlation::TraceParent;
use crate::secret::Secret;

/// Spans waiting for export, at most: a burst larger than this loses spans
/// (counted in `outbox_relay_spans_dropped_total`), never memory or speed.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// A partly filled batch waits at most this long.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// OTLP `SpanKind`: INTERNAL for ingestion and the ledger, CLIENT for the provider call.
const KIND_INTERNAL: i32 = 1;
const KIND_CLIENT: i32 = 3;
/// OTLP `Status.code`.
const STATUS_OK: i32 = 1;
const STATUS_ERROR: i32 = 2;

/// The ids of one delivery's trace, computed the same way wherever it is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryTrace {
    pub trace_id: [u8; 16],
    /// The Django request's span, when the row carried its traceparent.
    pub remote_parent: Option<[u8; 8]>,
    pub ingest_span: [u8; 8],
    /// Trace flags to pass on (sampled), from the traceparent or 01.
    pub flags: u8,
}

fn derive<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed: no two part lists hash the same bytes.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = [0u8; N];
    out.copy_from_slice(&digest[..N]);
    // All-zero ids are invalid in OTLP and W3C; a hash giving one is
    // astronomically unlikely, but cheap to rule out.
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1;
    }
    out
}

impl DeliveryTrace {
    pub fn new(idempotency_key: &str, correlation: Option<&str>) -> DeliveryTrace {
        let key = idempotency_key.as_bytes();
        let parent = correlation.and_then(TraceParent::parse);
        DeliveryTrace {
            trace_id: parent.map_or_else(|| derive(&[b"trace", key]), |p| p.trace_id),
            remote_parent: parent.map(|p| p.parent_id),
            ingest_span: derive(&[b"ingest", key]),
            flags: parent.map_or(1, |p| p.flags),
        }
    }

    pub fn ledger_span(&self) -> [u8; 8] {
        derive(&[b"ledger", &self.ingest_span])
    }

    /// Attempt `n` (1-based) of sending: its own span.
    pub fn send_span(&self, attempt: i32) -> [u8; 8] {
        derive(&[b"send", &self.ingest_span, &attempt.to_be_bytes()])
    }

    /// The W3C `traceparent` naming `span` in this trace, for a downstream
    /// consumer (a bus message) to continue it.
    pub fn traceparent(&self, span: [u8; 8]) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(span), self.flags)
    }
}

/// The correlation value to hand a provider for attempt `attempt`: the row's
/// value, except that with tracing on a `traceparent` names this attempt's
/// `provider.send` span as the parent (as W3C Trace Context wants of each
/// hop), so a consumer of the message continues the delivery's trace.
pub fn propagated(correlation: Option<&str>, idempotency_key: &str, attempt: i32, tracing: bool) -> Option<String> {
    let value = correlation?;
    if tracing {
        let trace = DeliveryTrace::new(idempotency_key, Some(value));
        if trace.remote_parent.is_some() {
            return Some(trace.traceparent(trace.send_span(attempt)));
        }
    }
    Some(value.to_string())
}

/// A finished span, queued for export.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: &'static str,
    kind: i32,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Attribute values are strings or integers; nothing personal ever goes
    /// here (no recipient, no payload, no address): see [`Tracer`]'s callers.
    pub attributes: Vec<(&'static str, Json)>,
    /// An error description makes the span's status ERROR.
    pub error: Option<String>,
}

impl Span {
    pub fn internal(trace: &DeliveryTrace, span_id: [u8; 8], parent: Option<[u8; 8]>, name: &'static str) -> Span {
        Span::new(trace, span_id, parent, name, KIND_INTERNAL)
    }

    pub fn client(trace: &DeliveryTrace, span_id: [u8; 8], parent: Option<[u8; 8]>, name: &'static str) -> Span {
        Span::new(trace, span_id, parent, name, KIND_CLIENT)
    }

    fn new(trace: &DeliveryTrace, span_id: [u8; 8], parent: Option<[u8; 8]>, name: &'static str, kind: i32) -> Span {
        let now = SystemTime::now();
        Span {
            trace_id: trace.trace_id,
            span_id,
            parent,
            name,
            kind,
            start: now,
            end: now,
            attributes: Vec::new(),
            error: None,
        }
    }

    pub fn between(mut self, start: SystemTime, end: SystemTime) -> Span {
        self.start = start;
        self.end = end.max(start);
        self
    }

    pub fn attr(mut self, key: &'static str, value: impl Into<Json>) -> Span {
        self.attributes.push((key, value.into()));
        self
    }

    fn to_json(&self) -> Json {
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64).to_string();
        let attributes: Vec<Json> = self
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Json::Number(n) if n.is_i64() => json!({"intValue": n.to_string()}),
                    Json::Bool(b) => json!({"boolValue": b}),
                    Json::String(s) => json!({"stringValue": s}),
                    other => json!({"stringValue": other.to_string()}),
                };
                json!({"key": k, "value": value})
            })
            .collect();
        let status = match &self.error {
            Some(message) => json!({"code": STATUS_ERROR, "message": message}),
            None => json!({"code": STATUS_OK}),
        };
        let mut span = json!({
            "traceId": hex::encode(self.trace_id),
            "spanId": hex::encode(self.span_id),
            "name": self.name,
            "kind": self.kind,
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(self.end),
            "attributes": attributes,
            "status": status,
        });
        if let Some(p) = self.parent {
            span["parentSpanId"] = json!(hex::encode(p));
        }
        span
    }
}

/// The `ExportTraceServiceRequest` for `spans`, as OTLP/JSON.
pub fn export_request(service_name: &str, spans: &[Span]) -> Json {
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": service_name}},
                {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "outbox-relay", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans.iter().map(Span::to_json).collect::<Vec<_>>(),
            }],
        }]
    })
}

/// Where spans go: a handle on the exporter's queue. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracer {
    queue: mpsc::Sender<Span>,
}

impl Tracer {
    /// Queues a span; drops it (counted) if the queue is full.
    pub fn record(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            metrics::counter!(super::metric::SPANS_DROPPED).increment(1);
        }
    }
}

/// The exporter's settings, from `[telemetry]`.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The collector's base URL (`http://host:4318`); spans go to `/v1/traces` under it.
    pub endpoint: String,
    /// Sent with every export (a hosted collector's API key): secrets.
    pub headers: BTreeMap<String, Secret>,
    pub service_name: String,
}

/// Starts the exporter; it runs until `stop` turns true, then sends what is
/// queued and ends (await the handle, bounded, to flush at shutdown).
pub fn start(
    cfg: ExportConfig,
    http: reqwest::Client,
    stop: watch::Receiver<bool>,
) -> (Tracer, tokio::task::JoinHandle<()>) {
    let (queue, rx) = mpsc::channel(QUEUE);
    let handle = tokio::spawn(export_loop(cfg, http, rx, stop));
    (Tracer { queue }, handle)
}

async fn export_loop(
    cfg: ExportConfig,
    http: reqwest::Client,
    mut rx: mpsc::Receiver<Span>,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("{}/v1/traces", cfg.endpoint.trim_end_matches('/'));
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    // When the oldest span in `batch` has waited long enough.
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            span = rx.recv() => match span {
                Some(span) => {
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_EVERY);
                    batch.push(span);
                    false
                }
                None => true,
            },
            // (Evaluated even when disabled: hence no unwrap.)
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => false,
            _ = crate::stopped(&mut stop) => true,
        };
        if stopping {
            while let Ok(span) = rx.try_recv() {
                batch.push(span);
            }
        }
        let due = stopping || batch.len() >= BATCH || deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if stopping && batch.is_empty() {
            return;
        }
        if !due || batch.is_empty() {
            continue;
        }
        for chunk in batch.chunks(BATCH) {
            match export(&http, &url, &cfg, chunk).await {
                Ok(()) => failing = false,
                Err(e) => {
                    metrics::counter!(super::metric::SPANS_DROPPED).increment(chunk.len() as u64);
                    // Once per outage, not once per batch.
                    if !failing {
                        warn!(error = %e, "OTLP export failed; spans are dropped until the collector answers");
                    }
                    failing = true;
                }
            }
        }
        debug!(spans = batch.len(), "spans exported");
        batch.clear();
        deadline = None;
        if stopping {
            return;
        }
    }
}

async fn export(http: &reqwest::Client, url: &str, cfg: &ExportConfig, spans: &[Span]) -> Result<(), String> {
    let body = export_request(&cfg.service_name, spans);
    let mut request = http.post(url).timeout(EXPORT_TIMEOUT).json(&body);
    for (name, value) in &cfg.headers {
        let mut v = reqwest::header::HeaderValue::from_str(value.expose())
            .map_err(|_| format!("header {name}: not a valid value"))?;
        v.set_sensitive(true);
        request = request.header(name.as_str(), v);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {}", e.without_url()))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_makes_the_delivery_a_child_of_the_request() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = DeliveryTrace::new("or2-abc", Some(tp));
        assert_eq!(hex::encode(t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.remote_parent.map(hex::encode).as_deref(), Some("00f067aa0ba902b7"));
        // The same ids on the dispatch side, in another task or process.
        assert_eq!(t, DeliveryTrace::new("or2-abc", Some(tp)));
        assert_ne!(t.send_span(1), t.send_span(2), "one span per attempt");
        assert_ne!(t.ingest_span, DeliveryTrace::new("or2-abd", Some(tp)).ingest_span, "per delivery");

        let own = DeliveryTrace::new("or2-abc", Some("req-42"));
        assert_eq!(own.remote_parent, None, "a request id is no trace context");
        assert_eq!(own, DeliveryTrace::new("or2-abc", None));
        assert_ne!(own.trace_id, DeliveryTrace::new("or2-abd", None).trace_id, "one trace per delivery");
    }

    #[test]
    fn a_traceparent_passed_on_names_the_attempts_span_when_tracing() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(propagated(Some(tp), "or2-abc", 1, false).as_deref(), Some(tp), "tracing off: as written");
        let t = DeliveryTrace::new("or2-abc", Some(tp));
        let passed = propagated(Some(tp), "or2-abc", 2, true).unwrap();
        assert_eq!(passed, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hex::encode(t.send_span(2))));
        assert_eq!(propagated(Some("req-1"), "or2-abc", 2, true).as_deref(), Some("req-1"));
        assert_eq!(propagated(None, "or2-abc", 2, true), None);
    }

    #[test]
    fn recording_never_waits_for_the_exporter() {
        // No exporter reads this queue: a full one drops, it does not block.
        let (queue, _rx) = mpsc::channel(1);
        let tracer = Tracer { queue };
        let t = DeliveryTrace::new("or2-abc", None);
        for _ in 0..3 {
            tracer.record(Span::internal(&t, t.ingest_span, None, "ingest"));
        }
    }

    #[test]
    fn spans_encode_as_otlp_json() {
        let t = DeliveryTrace::new("or2-abc", Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let at = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut span = Span::client(&t, t.send_span(1), Some(t.ingest_span), "provider.send")
            .between(at, at + Duration::from_millis(2))
            .attr("outbox_relay.attempt", 1)
            .attr("outbox_relay.channel", "in_app");
        span.error = Some("503".into());
        let req = export_request("relay", &[span]);
        let s = &req["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["parentSpanId"], hex::encode(t.ingest_span));
        assert_eq!(s["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(s["endTimeUnixNano"], "1700000000125456789");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["attributes"][0], json!({"key": "outbox_relay.attempt", "value": {"intValue": "1"}}));
        assert_eq!(s["attributes"][1]["value"]["stringValue"], "in_app");
        assert_eq!(req["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "relay");
    }
}
