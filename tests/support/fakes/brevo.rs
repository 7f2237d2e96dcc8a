//! Brevo's transactional e-mail endpoint at the wire, checking what Brevo
//! checks (https://developers.brevo.com/reference/sendtransacemail):
//! - the `api-key` header (401 `unauthorized` otherwise);
//! - a JSON body (`Content-Type: application/json`, 400 otherwise);
//! - `sender.email`, a non-empty `to` with e-mail addresses;
//! - either a known `templateId` or `subject` plus `textContent`/`htmlContent`
//!   (400 `invalid_parameter` / `missing_parameter` otherwise).
//! - `headers.idempotencyKey`, when given, a UUID; a repeated key is accepted
//!   again but sent only once (https://developers.brevo.com/docs/heterogenous-versions-batch-emails).
//!
//! Accepted mails answer 201 `{"messageId": "<...>"}`.

use std::collections::BTreeSet;
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
    accepted: Vec<Value>,
    /// idempotencyKey -> the messageId first answered for it.
    seen: std::collections::HashMap<String, String>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    api_key: String,
    templates: BTreeSet<i64>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeBrevo {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeBrevo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeBrevo {
    /// `templates`: the template ids this account has.
    pub fn start(api_key: &str, templates: &[i64]) -> FakeBrevo {
        let shared = Arc::new(Shared {
            api_key: api_key.into(),
            templates: templates.iter().copied().collect(),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().route("/v3/smtp/email", post(send)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeBrevo { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Request bodies Brevo accepted.
    pub fn accepted(&self) -> Vec<Value> {
        self.shared.record.lock().unwrap().accepted.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        self.shared.faults.fail_next(n, status, retry_after);
    }

    /// Back to healthy: queued failures dropped.
    pub fn recover(&self) {
        self.shared.faults.clear();
    }
}

fn refuse(shared: &Shared, status: StatusCode, code: &str, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

async fn send(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let body = Json(json!({"code": "error", "message": "injected failure"})).into_response();
        if status != StatusCode::TOO_MANY_REQUESTS {
            return with_retry_after(status, retry_after, body);
        }
        // Brevo's 429 carries no Retry-After, only its rate-limit headers
        // (https://developers.brevo.com/docs/limit-headers).
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert("x-sib-ratelimit-limit", "1000".parse().unwrap());
        h.insert("x-sib-ratelimit-remaining", "0".parse().unwrap());
        if let Some(reset) = retry_after.and_then(|r| r.parse().ok()) {
            h.insert("x-sib-ratelimit-reset", reset);
        }
        resp
    });
    if let Some(response) = injected.await {
        return response;
    }
    if headers.get("api-key").and_then(|v| v.to_str().ok()) != Some(shared.api_key.as_str()) {
        return refuse(&shared, StatusCode::UNAUTHORIZED, "unauthorized", "Key not found");
    }
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Ok(mail) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "bad_request", "body is not JSON");
    };
    if !json_type {
        return refuse(&shared, StatusCode::BAD_REQUEST, "bad_request", "Content-Type must be application/json");
    }
    if mail["sender"]["email"].as_str().is_none_or(|e| !e.contains('@')) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "missing_parameter", "sender.email is missing");
    }
    let to = mail["to"].as_array().cloned().unwrap_or_default();
    if to.is_empty() || to.iter().any(|t| t["email"].as_str().is_none_or(|e| !e.contains('@'))) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "invalid_parameter", "to is missing or invalid");
    }
    match mail["templateId"].as_i64() {
        Some(id) if !shared.templates.contains(&id) => {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                "Template ID must exist and be active",
            );
        }
        Some(_) => {}
        None => {
            let has_content = mail["textContent"].is_string() || mail["htmlContent"].is_string();
            if !mail["subject"].is_string() || !has_content {
                return refuse(
                    &shared,
                    StatusCode::BAD_REQUEST,
                    "missing_parameter",
                    "subject and content are required",
                );
            }
        }
    }
    // `headers`: custom headers sent along with the mail, names to string
    // values (https://developers.brevo.com/reference/sendtransacemail).
    let headers_ok = match &mail["headers"] {
        Value::Null => true,
        Value::Object(h) => h.values().all(Value::is_string),
        _ => false,
    };
    if !headers_ok {
        return refuse(&shared, StatusCode::BAD_REQUEST, "invalid_parameter", "headers must map names to strings");
    }
    let key = mail["headers"]["idempotencyKey"].as_str().map(str::to_string);
    if key.as_deref().is_some_and(|k| uuid::Uuid::parse_str(k).is_err()) {
        return refuse(&shared, StatusCode::BAD_REQUEST, "invalid_parameter", "idempotencyKey must be a UUID");
    }
    let mut record = shared.record.lock().unwrap();
    if let Some(id) = key.as_ref().and_then(|k| record.seen.get(k)) {
        return (StatusCode::CREATED, Json(json!({"messageId": id}))).into_response();
    }
    record.accepted.push(mail);
    let id = format!("<{}.{}@smtp-relay.mailin.fr>", record.accepted.len(), std::process::id());
    if let Some(k) = key {
        record.seen.insert(k, id.clone());
    }
    (StatusCode::CREATED, Json(json!({"messageId": id}))).into_response()
}
