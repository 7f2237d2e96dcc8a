//! SendGrid's v3 Mail Send at the wire, checking what SendGrid checks
//! (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send):
//! - `Authorization: Bearer <api key>` (401 otherwise);
//! - a JSON body of at most 30 MB (413 above; the limit can be lowered for a test);
//! - `from.email` a verified Sender Identity (403 otherwise);
//! - 1 to 1,000 `personalizations`, each with a non-empty `to` of addresses;
//! - a known dynamic `template_id` ("d-..."), or a `subject` and non-empty `content`;
//!
//! and answers as SendGrid does: 202 with an empty body and `X-Message-Id`;
//! errors as `{"errors": [{"field", "message"}]}`
//! (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/errors);
//! a 429 with `X-RateLimit-Limit`, `-Remaining` and `-Reset` (a Unix time)
//! (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits).
//! SendGrid has no idempotency key: every accepted request is a mail.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::{serve, with_retry_after, Conn, Faults};

pub const MAX_BYTES: usize = 30 * 1024 * 1024;

#[derive(Default)]
struct Record {
    /// (X-Message-Id, request body) of each accepted mail.
    accepted: Vec<(String, Value)>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    api_key: String,
    sender: String,
    templates: BTreeSet<String>,
    max_bytes: AtomicUsize,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeSendgrid {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeSendgrid {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSendgrid {
    /// `sender`: the account's one verified Sender Identity; `templates`: its dynamic templates.
    pub fn start(api_key: &str, sender: &str, templates: &[&str]) -> FakeSendgrid {
        let shared = Arc::new(Shared {
            api_key: api_key.into(),
            sender: sender.into(),
            templates: templates.iter().map(|t| t.to_string()).collect(),
            max_bytes: AtomicUsize::new(MAX_BYTES),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new()
            .route("/v3/mail/send", post(send))
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeSendgrid { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Lowers the size limit, to see a 413 without sending 30 MB.
    pub fn set_max_bytes(&self, n: usize) {
        self.shared.max_bytes.store(n, Ordering::SeqCst);
    }

    /// (X-Message-Id, body) of each accepted mail.
    pub fn accepted(&self) -> Vec<(String, Value)> {
        self.shared.record.lock().unwrap().accepted.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }
}

fn refuse(shared: &Shared, status: StatusCode, field: Option<&str>, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    (status, Json(json!({"errors": [{"field": field, "message": message}]}))).into_response()
}

fn is_address(v: &Value) -> bool {
    v.as_str().is_some_and(|e| e.contains('@') && !e.contains(' '))
}

async fn send(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let body = Json(json!({"errors": [{"field": null, "message": "injected failure"}]})).into_response();
        if status != StatusCode::TOO_MANY_REQUESTS {
            return with_retry_after(status, retry_after, body);
        }
        // SendGrid's 429: the rate-limit headers, the reset as a Unix time.
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit", "600".parse().unwrap());
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        if let Some(secs) = retry_after.and_then(|r| r.parse::<i64>().ok()) {
            let reset = chrono::Utc::now().timestamp() + secs;
            h.insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
        }
        resp
    });
    if let Some(response) = injected.await {
        return response;
    }
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(shared.api_key.as_str()) {
        return refuse(
            &shared,
            StatusCode::UNAUTHORIZED,
            None,
            "The provided authorization grant is invalid, expired, or revoked",
        );
    }
    if body.len() > shared.max_bytes.load(Ordering::SeqCst) {
        return refuse(
            &shared,
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            "The JSON payload you have included in your request is too large.",
        );
    }
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let Some(mail) = serde_json::from_slice::<Value>(&body).ok().filter(|_| json_type) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, None, "Bad Request: a JSON body is expected");
    };
    if mail["from"]["email"].as_str() != Some(shared.sender.as_str()) {
        return refuse(
            &shared,
            StatusCode::FORBIDDEN,
            Some("from"),
            "The from address does not match a verified Sender Identity.",
        );
    }
    let personalizations = mail["personalizations"].as_array().cloned().unwrap_or_default();
    if personalizations.is_empty() || personalizations.len() > 1000 {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            Some("personalizations"),
            "between 1 and 1000 personalizations are required",
        );
    }
    for (i, p) in personalizations.iter().enumerate() {
        let to = p["to"].as_array().cloned().unwrap_or_default();
        if to.is_empty() || to.iter().any(|t| !is_address(&t["email"])) {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                Some(&format!("personalizations.{i}.to")),
                "Does not contain a valid address.",
            );
        }
    }
    match mail["template_id"].as_str() {
        Some(id) if !shared.templates.contains(id) => {
            return refuse(
                &shared,
                StatusCode::BAD_REQUEST,
                Some("template_id"),
                "The template_id is not a valid template ID.",
            );
        }
        Some(_) => {}
        None => {
            let has_subject = mail["subject"].is_string() || personalizations.iter().all(|p| p["subject"].is_string());
            let content = mail["content"].as_array().cloned().unwrap_or_default();
            if !has_subject {
                return refuse(&shared, StatusCode::BAD_REQUEST, Some("subject"), "The subject is required.");
            }
            if content.is_empty() || content.iter().any(|c| c["value"].as_str().is_none_or(str::is_empty)) {
                return refuse(
                    &shared,
                    StatusCode::BAD_REQUEST,
                    Some("content"),
                    "Content value must be a string at least one character in length.",
                );
            }
        }
    }
    let mut record = shared.record.lock().unwrap();
    let id = format!("sg{:06}{:014}", record.accepted.len() + 1, std::process::id());
    record.accepted.push((id.clone(), mail));
    let mut resp = StatusCode::ACCEPTED.into_response();
    resp.headers_mut().insert("x-message-id", id.parse().unwrap());
    resp
}
