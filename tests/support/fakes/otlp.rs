//! A fake OpenTelemetry collector's OTLP/HTTP receiver, JSON encoding
//! (https://opentelemetry.io/docs/specs/otlp/#otlphttp): `POST /v1/traces`
//! with `Content-Type: application/json` and an `ExportTraceServiceRequest`
//! body, whose trace and span ids are hex strings (32 and 16 characters) and
//! whose timestamps are decimal strings. Anything else is a 400 (415 for
//! another content type), as a collector answers.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::serve;

/// One received span, flattened.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub attributes: Value,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    rejections: Mutex<Vec<String>>,
}

pub struct FakeCollector {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCollector {
    pub fn start() -> FakeCollector {
        let shared = Arc::new(Shared::default());
        let router = Router::new().route("/v1/traces", post(traces)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeCollector { shared, base_url, task }
    }

    /// What `telemetry.otlp_endpoint` is set to.
    pub fn endpoint(&self) -> String {
        self.base_url.clone()
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().unwrap().clone()
    }

    pub fn rejections(&self) -> Vec<String> {
        self.shared.rejections.lock().unwrap().clone()
    }

    /// Waits until the spans received satisfy `done` (bounded).
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        for _ in 0..600 {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("collector never got {what}: {:?}, refused {:?}", self.spans(), self.rejections());
    }
}

fn hex_of(v: &Value, len: usize) -> Option<String> {
    let s = v.as_str()?;
    (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_string())
}

async fn traces(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let refuse = |status: StatusCode, why: String| {
        shared.rejections.lock().unwrap().push(why.clone());
        (status, Json(json!({"code": 3, "message": why})))
    };
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("application/json") {
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("content type {ct:?}"));
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "body is not JSON".into());
    };
    let mut got = Vec::new();
    for rs in req["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or("")
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let (Some(trace_id), Some(span_id)) = (hex_of(&s["traceId"], 32), hex_of(&s["spanId"], 16)) else {
                    return refuse(StatusCode::BAD_REQUEST, format!("bad ids in {s}"));
                };
                let parent_span_id = match &s["parentSpanId"] {
                    Value::Null => None,
                    Value::String(p) if p.is_empty() => None,
                    p => match hex_of(p, 16) {
                        Some(p) => Some(p),
                        None => return refuse(StatusCode::BAD_REQUEST, format!("bad parentSpanId in {s}")),
                    },
                };
                let times_ok = ["startTimeUnixNano", "endTimeUnixNano"]
                    .iter()
                    .all(|k| s[*k].as_str().is_some_and(|t| t.parse::<u64>().is_ok()));
                let Some(name) = s["name"].as_str().filter(|n| !n.is_empty() && times_ok) else {
                    return refuse(StatusCode::BAD_REQUEST, format!("span without name or times: {s}"));
                };
                got.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id,
                    span_id,
                    parent_span_id,
                    name: name.to_string(),
                    attributes: s["attributes"].clone(),
                });
            }
        }
    }
    shared.spans.lock().unwrap().extend(got);
    (StatusCode::OK, Json(json!({})))
}
