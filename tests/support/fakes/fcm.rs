//! FCM HTTP v1 `messages:send` at the wire
//! (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send),
//! checking what FCM checks (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode):
//! - `Authorization: Bearer` with a token the fake token endpoint minted
//!   (401 UNAUTHENTICATED otherwise), and this project (403 PERMISSION_DENIED);
//! - `{"message": {...}}` with exactly one of `token`, `topic`, `condition`;
//! - `data` values all strings, no reserved key (`from`, `notification`,
//!   `message_type`, `google…`, `gcm…`), data and notification ≤ 4096 bytes
//!   (400 INVALID_ARGUMENT);
//! - the token: registered → 200 `{"name": "projects/<p>/messages/<id>"}`;
//!   unregistered (app uninstalled) → 404 UNREGISTERED; anything else → 400
//!   INVALID_ARGUMENT "not a valid FCM registration token", both with an
//!   `FcmError` detail.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::google_auth::TokenState;
use super::http::{serve, with_retry_after, Conn, Faults};

#[derive(Default)]
struct Record {
    /// (token, message) for every message FCM took.
    delivered: Vec<(String, Value)>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    project: String,
    registered: Mutex<BTreeSet<String>>,
    unregistered: BTreeSet<String>,
    tokens: Arc<TokenState>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeFcm {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeFcm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeFcm {
    pub fn start(project: &str, registered: &[&str], unregistered: &[&str], tokens: Arc<TokenState>) -> FakeFcm {
        let shared = Arc::new(Shared {
            project: project.into(),
            registered: Mutex::new(registered.iter().map(|s| s.to_string()).collect()),
            unregistered: unregistered.iter().map(|s| s.to_string()).collect(),
            tokens,
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().route("/v1/projects/{project}/{method}", post(send)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeFcm { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn delivered(&self) -> Vec<(String, Value)> {
        self.shared.record.lock().unwrap().delivered.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

fn fcm_error(shared: &Shared, status: StatusCode, google: &str, fcm: Option<&str>, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    let details: Vec<Value> = fcm
        .map(|c| json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}))
        .into_iter()
        .collect();
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": google, "details": details}});
    (status, Json(body)).into_response()
}

fn invalid(shared: &Shared, message: &str) -> Response {
    fcm_error(shared, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), message)
}

async fn send(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((project, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let (google, fcm) = match status.as_u16() {
            429 => ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
            503 => ("UNAVAILABLE", "UNAVAILABLE"),
            _ => ("INTERNAL", "INTERNAL"),
        };
        let body = json!({"error": {"code": status.as_u16(), "message": "injected", "status": google,
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm}]}});
        with_retry_after(status, retry_after, Json(body).into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    if !shared.tokens.accepts(&headers) {
        return fcm_error(
            &shared,
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials.",
        );
    }
    if method != "messages:send" {
        return fcm_error(&shared, StatusCode::NOT_FOUND, "NOT_FOUND", None, "unknown method");
    }
    if project != shared.project {
        return fcm_error(
            &shared,
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            None,
            "Permission denied for this project.",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid(&shared, "Invalid JSON payload received.");
    };
    let message = &request["message"];
    let targets = ["token", "topic", "condition"].iter().filter(|t| message.get(**t).is_some()).count();
    if targets != 1 {
        return invalid(&shared, "Exactly one of token, topic or condition must be specified.");
    }
    let mut size = 0;
    for (k, v) in message["data"].as_object().cloned().unwrap_or_default() {
        let Some(v) = v.as_str() else {
            return invalid(&shared, &format!("Invalid value at 'message.data[{k}].value' (TYPE_STRING)"));
        };
        if ["from", "notification", "message_type"].contains(&k.as_str())
            || k.starts_with("google")
            || k.starts_with("gcm")
        {
            return invalid(&shared, &format!("Invalid data payload key: {k}"));
        }
        size += k.len() + v.len();
    }
    for f in ["title", "body"] {
        size += message["notification"][f].as_str().map_or(0, str::len);
    }
    if size > 4096 {
        return invalid(&shared, "Message too big");
    }
    let token = message["token"].as_str().unwrap_or("").to_string();
    if shared.unregistered.contains(&token) {
        return fcm_error(
            &shared,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        );
    }
    if !shared.registered.lock().unwrap().contains(&token) {
        return invalid(&shared, "The registration token is not a valid FCM registration token");
    }
    let mut record = shared.record.lock().unwrap();
    record.delivered.push((token, message.clone()));
    let name = format!("projects/{}/messages/0:{}", shared.project, 1_700_000 + record.delivered.len());
    Json(json!({"name": name})).into_response()
}
