//! Mailgun's Messages API at the wire, checking what Mailgun checks
//! (https://documentation.mailgun.com/docs/mailgun/api-reference):
//! - `POST /v3/{domain}/messages` for a domain of the account (404 otherwise);
//! - HTTP Basic `api:<key>` (401 `Forbidden` otherwise);
//! - a `multipart/form-data` (or urlencoded) body, at most 25 MB (413 above);
//! - `from`, `to`; one of `text`, `html` or `template`, a known template
//!   whose `t:variables` is a JSON object
//!   (https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/send-templates);
//!
//! answering 200 `{"id": "<...@domain>", "message": "Queued. Thank you."}`,
//! errors as `{"message": ...}` (400). Mailgun has no idempotency key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::{form_decode, serve, with_retry_after, Conn, Faults};

pub const MAX_BYTES: usize = 25 * 1024 * 1024;

/// The fields of one accepted message.
pub type Fields = BTreeMap<String, String>;

#[derive(Default)]
struct Record {
    accepted: Vec<(String, Fields)>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    api_key: String,
    domain: String,
    templates: BTreeSet<String>,
    max_bytes: AtomicUsize,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeMailgun {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeMailgun {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMailgun {
    pub fn start(api_key: &str, domain: &str, templates: &[&str]) -> FakeMailgun {
        let shared = Arc::new(Shared {
            api_key: api_key.into(),
            domain: domain.into(),
            templates: templates.iter().map(|t| t.to_string()).collect(),
            max_bytes: AtomicUsize::new(MAX_BYTES),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new()
            .route("/v3/{domain}/messages", post(send))
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeMailgun { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    pub fn set_max_bytes(&self, n: usize) {
        self.shared.max_bytes.store(n, Ordering::SeqCst);
    }

    /// (id, fields) of each accepted message.
    pub fn accepted(&self) -> Vec<(String, Fields)> {
        self.shared.record.lock().unwrap().accepted.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }
}

fn refuse(shared: &Shared, status: StatusCode, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), message.to_string()));
    (status, Json(json!({"message": message}))).into_response()
}

/// RFC 7578 text fields: each part's `name` and its content.
fn parse_multipart(boundary: &str, body: &[u8]) -> Option<Fields> {
    let text = std::str::from_utf8(body).ok()?;
    let delimiter = format!("--{boundary}");
    let mut fields = Fields::new();
    let mut parts = text.split(&delimiter);
    parts.next()?; // preamble
    for part in parts {
        if part.starts_with("--") {
            return Some(fields);
        }
        let part = part.strip_prefix("\r\n")?;
        let (head, content) = part.split_once("\r\n\r\n")?;
        let name = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition: form-data"))?
            .split("name=\"")
            .nth(1)?
            .split('"')
            .next()?;
        fields.insert(name.to_string(), content.strip_suffix("\r\n")?.to_string());
    }
    None // no closing delimiter
}

fn parse_form(body: &[u8]) -> Option<Fields> {
    std::str::from_utf8(body)
        .ok()?
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((form_decode(k)?, form_decode(v)?))
        })
        .collect()
}

async fn send(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(domain): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        with_retry_after(status, retry_after, Json(json!({"message": "injected failure"})).into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    let expected =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("api:{}", shared.api_key)));
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        shared.record.lock().unwrap().rejections.push((401, "Forbidden".into()));
        return (StatusCode::UNAUTHORIZED, "Forbidden").into_response();
    }
    if domain != shared.domain {
        return refuse(&shared, StatusCode::NOT_FOUND, &format!("Domain not found: {domain}"));
    }
    if body.len() > shared.max_bytes.load(Ordering::SeqCst) {
        return refuse(&shared, StatusCode::PAYLOAD_TOO_LARGE, "Message size exceeds the 25 MB limit");
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let fields = if let Some(b) = content_type.strip_prefix("multipart/form-data; boundary=") {
        parse_multipart(b.trim_matches('"'), &body)
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        parse_form(&body)
    } else {
        None
    };
    let Some(fields) = fields else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "the body must be multipart/form-data or form-urlencoded");
    };
    for required in ["from", "to"] {
        if fields.get(required).is_none_or(|v| v.trim().is_empty()) {
            return refuse(&shared, StatusCode::BAD_REQUEST, &format!("'{required}' parameter is missing"));
        }
    }
    if !fields["to"].contains('@') {
        return refuse(&shared, StatusCode::BAD_REQUEST, "'to' parameter is not a valid address");
    }
    match fields.get("template") {
        Some(name) if !shared.templates.contains(name) => {
            return refuse(&shared, StatusCode::BAD_REQUEST, "template not found");
        }
        Some(_) => {
            if let Some(vars) = fields.get("t:variables") {
                if !serde_json::from_str::<Value>(vars).is_ok_and(|v| v.is_object()) {
                    return refuse(&shared, StatusCode::BAD_REQUEST, "t:variables must be a valid JSON object");
                }
            }
        }
        None => {
            if !fields.contains_key("text") && !fields.contains_key("html") {
                return refuse(
                    &shared,
                    StatusCode::BAD_REQUEST,
                    "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified",
                );
            }
            if fields.get("subject").is_none_or(|s| s.is_empty()) {
                return refuse(&shared, StatusCode::BAD_REQUEST, "'subject' parameter is missing");
            }
        }
    }
    let mut record = shared.record.lock().unwrap();
    let id = format!("<20261127.{}.{}@{}>", record.accepted.len() + 1, std::process::id(), shared.domain);
    record.accepted.push((id.clone(), fields));
    (StatusCode::OK, Json(json!({"id": id, "message": "Queued. Thank you."}))).into_response()
}
