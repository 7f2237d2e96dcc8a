//! Google Cloud Pub/Sub's publish endpoint at the wire
//! (https://cloud.google.com/pubsub/docs/reference/rest/v1/projects.topics/publish),
//! checking what Pub/Sub checks:
//! - `Authorization: Bearer` with a token the fake token endpoint minted
//!   (401 UNAUTHENTICATED otherwise);
//! - the project, and a topic that exists (404 NOT_FOUND otherwise);
//! - a JSON body `{"messages": [...]}`, 1 to 1,000 messages, at most 10 MB
//!   (https://cloud.google.com/pubsub/quotas#resource_limits; 400 INVALID_ARGUMENT);
//! - each message: base64 `data` or at least one attribute; at most 100
//!   attributes, keys ≤ 256 bytes, not `goog…`, values ≤ 1,024 bytes;
//!   `orderingKey` ≤ 1,024 bytes and the same for every message of a request
//!   (https://cloud.google.com/pubsub/docs/reference/rest/v1/PubsubMessage).
//!
//! Publishes answer `{"messageIds": [...]}`, one per message, in order. No
//! de-duplication: a message published twice is stored twice, as on Pub/Sub.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::google_auth::TokenState;
use super::http::{serve, with_retry_after, Conn, Faults};

/// A message as stored on a topic.
#[derive(Clone, Debug)]
pub struct Stored {
    pub topic: String,
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: String,
    pub message_id: String,
}

#[derive(Default)]
struct Record {
    stored: Vec<Stored>,
    /// Messages per accepted publish call.
    calls: Vec<usize>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    project: String,
    topics: Mutex<BTreeSet<String>>,
    tokens: Arc<TokenState>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakePubSub {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakePubSub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePubSub {
    pub fn start(project: &str, topics: &[&str], tokens: Arc<TokenState>) -> FakePubSub {
        let shared = Arc::new(Shared {
            project: project.into(),
            topics: Mutex::new(topics.iter().map(|t| t.to_string()).collect()),
            tokens,
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router =
            Router::new().route("/v1/projects/{project}/topics/{topic}", post(publish)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakePubSub { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn create_topic(&self, topic: &str) {
        self.shared.topics.lock().unwrap().insert(topic.into());
    }

    pub fn stored(&self) -> Vec<Stored> {
        self.shared.record.lock().unwrap().stored.clone()
    }

    pub fn calls(&self) -> Vec<usize> {
        self.shared.record.lock().unwrap().calls.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

fn google_error(shared: &Shared, status: StatusCode, code: &str, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "status": code}}))).into_response()
}

fn invalid(shared: &Shared, message: &str) -> Response {
    google_error(shared, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

async fn publish(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((project, topic)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let code = match status.as_u16() {
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        let body = Json(json!({"error": {"code": status.as_u16(), "message": "injected", "status": code}}));
        with_retry_after(status, retry_after, body.into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    if !shared.tokens.accepts(&headers) {
        return google_error(
            &shared,
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let Some(topic) = topic.strip_suffix(":publish") else {
        return google_error(&shared, StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method");
    };
    if project != shared.project || !shared.topics.lock().unwrap().contains(topic) {
        return google_error(
            &shared,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Resource not found (resource={topic})."),
        );
    }
    if body.len() > 10_000_000 {
        return invalid(&shared, "Request payload size exceeds the limit: 10485760 bytes.");
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid(&shared, "Invalid JSON payload received.");
    };
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() || messages.len() > 1000 {
        return invalid(&shared, "The value for messages is out of range: 1 to 1000.");
    }
    let mut parsed = Vec::with_capacity(messages.len());
    for m in &messages {
        let data = match m.get("data").map(|d| d.as_str().map(|s| STANDARD.decode(s))) {
            None => Vec::new(),
            Some(Some(Ok(bytes))) => bytes,
            _ => return invalid(&shared, "Invalid value at 'messages.data' (TYPE_BYTES)"),
        };
        let mut attributes = BTreeMap::new();
        for (k, v) in m["attributes"].as_object().cloned().unwrap_or_default() {
            let Some(v) = v.as_str() else { return invalid(&shared, "attribute values must be strings") };
            if k.len() > 256 || v.len() > 1024 || k.starts_with("goog") {
                return invalid(&shared, "An attribute key or value is too long or reserved.");
            }
            attributes.insert(k, v.to_string());
        }
        if attributes.len() > 100 {
            return invalid(&shared, "Too many attributes: at most 100.");
        }
        if data.is_empty() && attributes.is_empty() {
            return invalid(&shared, "Some messages are empty: they need data or attributes.");
        }
        let ordering_key = m["orderingKey"].as_str().unwrap_or("").to_string();
        if ordering_key.len() > 1024 {
            return invalid(&shared, "Ordering key too long.");
        }
        parsed.push((data, attributes, ordering_key));
    }
    if parsed.iter().any(|p| p.2 != parsed[0].2) {
        return invalid(&shared, "All messages of a publish request must have the same ordering key.");
    }
    let mut record = shared.record.lock().unwrap();
    record.calls.push(parsed.len());
    let mut ids = Vec::new();
    for (data, attributes, ordering_key) in parsed {
        let message_id = format!("{}", 7_000_000 + record.stored.len());
        ids.push(message_id.clone());
        record.stored.push(Stored { topic: topic.to_string(), data, attributes, ordering_key, message_id });
    }
    Json(json!({"messageIds": ids})).into_response()
}
