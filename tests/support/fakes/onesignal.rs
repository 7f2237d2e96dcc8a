//! OneSignal's create-notification endpoint at the wire
//! (https://documentation.onesignal.com/reference/push-notification), checking
//! what OneSignal checks:
//! - `Authorization: Key <App API key>` (403 `{"errors": [...]}` otherwise);
//! - a JSON body with this app's `app_id` (400 otherwise);
//! - `target_channel: "push"`, `include_aliases.external_id` a non-empty list,
//!   `contents.en` present (400 otherwise);
//! - `idempotency_key`, when given, a UUID; a repeated key answers the first
//!   call's id and sends nothing more
//!   (https://documentation.onesignal.com/reference/idempotent-notification-requests).
//!
//! A user with no push subscription answers 200 with an empty `id` and
//! `errors.invalid_aliases`, as OneSignal does.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::{serve, with_retry_after, Conn, Faults};

#[derive(Default)]
struct Record {
    /// Notifications sent (bodies), once per idempotency key.
    sent: Vec<Value>,
    seen: HashMap<String, String>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    app_id: String,
    api_key: String,
    /// External ids with a push subscription.
    subscribed: BTreeSet<String>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeOneSignal {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeOneSignal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOneSignal {
    pub fn start(app_id: &str, api_key: &str, subscribed: &[&str]) -> FakeOneSignal {
        let shared = Arc::new(Shared {
            app_id: app_id.into(),
            api_key: api_key.into(),
            subscribed: subscribed.iter().map(|s| s.to_string()).collect(),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().route("/notifications", post(create)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeOneSignal { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn sent(&self) -> Vec<Value> {
        self.shared.record.lock().unwrap().sent.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

fn refuse(shared: &Shared, status: StatusCode, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    (status, Json(json!({"errors": [message]}))).into_response()
}

async fn create(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        with_retry_after(status, retry_after, Json(json!({"errors": ["injected"]})).into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != format!("Key {}", shared.api_key) {
        return refuse(
            &shared,
            StatusCode::FORBIDDEN,
            "Access denied.  Please include an 'Authorization: Key ...' header with a valid API key.",
        );
    }
    let Ok(n) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "body is not JSON");
    };
    if n["app_id"] != shared.app_id.as_str() {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "app_id not found. You may be missing a Content-Type: application/json header.",
        );
    }
    if n["target_channel"] != "push" {
        return refuse(&shared, StatusCode::BAD_REQUEST, "target_channel must be push, email or sms");
    }
    let ids: Vec<String> = n["include_aliases"]["external_id"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "You must include which players, segments, or tags you wish to send this notification to.",
        );
    }
    if !n["contents"]["en"].is_string() {
        return refuse(&shared, StatusCode::BAD_REQUEST, "Notification contents must not be null for any languages.");
    }
    let key = n["idempotency_key"].as_str().map(str::to_string);
    if key.as_deref().is_some_and(|k| uuid::Uuid::parse_str(k).is_err()) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "idempotency_key must be a valid UUID");
    }
    let mut record = shared.record.lock().unwrap();
    if let Some(id) = key.as_ref().and_then(|k| record.seen.get(k)) {
        return Json(json!({"id": id, "external_id": null})).into_response();
    }
    let unknown: Vec<&String> = ids.iter().filter(|i| !shared.subscribed.contains(*i)).collect();
    if unknown.len() == ids.len() {
        return Json(json!({"id": "", "errors": {"invalid_aliases": {"external_id": unknown}}})).into_response();
    }
    record.sent.push(n);
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(k) = key {
        record.seen.insert(k, id.clone());
    }
    Json(json!({"id": id, "external_id": null})).into_response()
}
