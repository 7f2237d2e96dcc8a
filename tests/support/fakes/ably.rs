//! An Ably REST publish endpoint on 127.0.0.1 that checks what Ably checks.
//!
//! Serves `POST /channels/{channel}/messages` (JSON only). Keeps two views:
//! every publish that passed the checks (`publishes`), and the messages Ably
//! would actually deliver after dropping repeated idempotency ids (`messages`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use outbox_relay::config::Secret;
use outbox_relay::providers::ably::AblyConfig;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::{serve, with_retry_after, Conn, Faults};

/// One message Ably accepted and would deliver.
#[derive(Clone, Debug, PartialEq)]
pub struct AblyMessage {
    pub channel: String,
    pub id: Option<String>,
    pub name: Option<String>,
    pub data: Value,
    /// `extras`, as sent (checked as Ably checks it, error 40032).
    pub extras: Option<Value>,
}

/// A request the fake refused: HTTP status, Ably error code, message.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub status: u16,
    pub code: u32,
    pub message: String,
}

#[derive(Default)]
struct Record {
    requests: usize,
    publishes: usize,
    messages: Vec<AblyMessage>,
    rejections: Vec<Rejection>,
    seen_ids: HashSet<String>,
}

struct Shared {
    api_key: String,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeAbly {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeAbly {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAbly {
    /// `api_key` is `appId.keyId:keySecret`. Call inside a tokio runtime.
    pub fn start(api_key: &str) -> FakeAbly {
        let shared = Arc::new(Shared { api_key: api_key.into(), faults: Faults::default(), record: Mutex::default() });
        let router = Router::new()
            .route("/channels/{channel}/messages", post(publish))
            .fallback(|| async { ably_error(StatusCode::NOT_FOUND, 40400, "Not found") })
            .with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeAbly { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// A config pointing at this fake with its key.
    pub fn config(&self) -> AblyConfig {
        AblyConfig {
            api_key: Secret::new(self.shared.api_key.clone()),
            base_url: Some(self.base_url.clone()),
            timeout_ms: 5_000,
        }
    }

    /// Publishes that passed every check, duplicates included.
    pub fn publishes(&self) -> usize {
        self.shared.record.lock().unwrap().publishes
    }

    /// Messages accepted for delivery, repeated ids dropped, in arrival order.
    pub fn messages(&self) -> Vec<AblyMessage> {
        self.shared.record.lock().unwrap().messages.clone()
    }

    /// HTTP requests that reached the fake, including refused, failed and reset ones.
    pub fn requests(&self) -> usize {
        self.shared.record.lock().unwrap().requests
    }

    /// Requests refused by a check (not injected failures).
    pub fn rejections(&self) -> Vec<Rejection> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    /// The next `n` requests get `status` (and `Retry-After`, if given) without being looked at.
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        self.shared.faults.fail_next(n, status, retry_after);
    }

    /// The service is healthy again.
    pub fn recover(&self) {
        self.shared.faults.clear();
    }

    /// Every request waits this long before it is handled.
    pub fn set_delay(&self, d: Duration) {
        self.shared.faults.set_delay(d);
    }

    /// The next `n` requests have their connection closed without an answer.
    pub fn reset_connections_next(&self, n: usize) {
        self.shared.faults.reset_connections_next(n);
    }
}

/// Ably's error body, https://ably.com/docs/platform/errors/codes
fn ably_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({"error": {
        "message": message,
        "code": code,
        "statusCode": status.as_u16(),
        "href": format!("https://help.ably.io/error/{code}"),
    }});
    (status, Json(body)).into_response()
}

type Refusal = (StatusCode, u32, String);

async fn publish(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Handled in its own task so that a client giving up (timeout) does not
    // cancel it: like the real service, the fake may still take a request
    // whose answer nobody waits for.
    let handled = tokio::spawn(handle_publish(shared, conn, channel, headers, body));
    handled.await.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle_publish(shared: Arc<Shared>, conn: Conn, channel: String, headers: HeaderMap, body: Bytes) -> Response {
    shared.record.lock().unwrap().requests += 1;
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let code = u32::from(status.as_u16()) * 100;
        let reason = status.canonical_reason().unwrap_or("injected failure");
        with_retry_after(status, retry_after, ably_error(status, code, reason))
    });
    if let Some(response) = injected.await {
        return response;
    }
    match check(&shared, &channel, &headers, &body) {
        Ok((key, messages)) => {
            let mut rec = shared.record.lock().unwrap();
            rec.publishes += 1;
            // Idempotent publishing: a publish whose id was already seen is
            // acknowledged but not delivered again.
            // https://ably.com/docs/pub-sub/advanced#idempotency
            let fresh = match &key {
                Some(k) => rec.seen_ids.insert(k.clone()),
                None => true,
            };
            if fresh {
                rec.messages.extend(messages);
            }
            let message_id = key.unwrap_or_else(|| format!("fake-{}", rec.publishes));
            (StatusCode::CREATED, Json(json!({"channel": channel, "messageId": message_id}))).into_response()
        }
        Err((status, code, message)) => {
            shared.record.lock().unwrap().rejections.push(Rejection {
                status: status.as_u16(),
                code,
                message: message.clone(),
            });
            ably_error(status, code, &message)
        }
    }
}

/// Returns the publish's idempotency key (if it has ids) and its messages.
fn check(
    shared: &Shared,
    channel: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Option<String>, Vec<AblyMessage>), Refusal> {
    // Basic auth: "Authorization: Basic base64(keyName:keySecret)".
    // https://ably.com/docs/auth/basic and 40101 for a key that does not match:
    // https://ably.com/docs/platform/errors/codes/40101-invalid-credentials
    let unauthorized = |m: &str| Err((StatusCode::UNAUTHORIZED, 40101, m.to_string()));
    let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return unauthorized("No authentication information provided");
    };
    let Some(encoded) = auth.strip_prefix("Basic ") else {
        return unauthorized("Only Basic auth is supported by this fake");
    };
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok().and_then(|b| String::from_utf8(b).ok());
    let Some(decoded) = decoded else {
        // 40005: a credential that cannot be read at all.
        // https://ably.com/docs/platform/errors/codes/40005-invalid-credential
        return Err((StatusCode::BAD_REQUEST, 40005, "Invalid key in request".into()));
    };
    let (want_name, want_secret) = shared.api_key.split_once(':').unwrap_or((&shared.api_key, ""));
    match decoded.split_once(':') {
        Some((name, secret)) if name == want_name && secret == want_secret => {}
        Some((name, _)) if name == want_name => return unauthorized("Invalid credentials"),
        _ => return unauthorized("Invalid key name"),
    }

    // Channel naming: "can't start with [ or :", "can't be empty", "can't
    // contain newline characters". https://ably.com/docs/channels#use and
    // https://ably.com/docs/platform/errors/codes/40010-invalid-channel-name
    if channel.is_empty() || channel.starts_with(['[', ':']) || channel.contains(['\n', '\r']) {
        return Err((StatusCode::BAD_REQUEST, 40010, format!("invalid channel name: {channel:?}")));
    }

    // The fake speaks JSON only (Ably also takes msgpack and forms).
    // https://ably.com/docs/api/rest-api#message-publish
    let json_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let parsed = serde_json::from_slice::<Value>(body).ok().filter(|_| json_content);
    // 40001: invalid request body. https://ably.com/docs/platform/errors/codes
    let invalid_body = |m: String| Err((StatusCode::BAD_REQUEST, 40001, m));
    let items: Vec<Value> = match parsed {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(obj @ Value::Object(_)) => vec![obj],
        _ => return invalid_body("Body must be a JSON message object or a non-empty array of them".into()),
    };

    let mut messages = Vec::with_capacity(items.len());
    let mut size = 0usize;
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return invalid_body(format!("message {i} is not an object"));
        };
        let string_field = |k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err((StatusCode::BAD_REQUEST, 40001, format!("message {i}: {k} must be a string"))),
        };
        let id = string_field("id")?;
        let name = string_field("name")?;
        let client_id = string_field("clientId")?;
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        // Size counts name, clientId, data and extras; an array publish is
        // measured as one payload. Default limit 64 KiB.
        // https://ably.com/docs/platform/errors/codes/40009-max-message-size-exceeded
        size += name.as_deref().map_or(0, str::len) + client_id.as_deref().map_or(0, str::len);
        size += match &data {
            Value::Null => 0,
            Value::String(s) => s.len(),
            other => other.to_string().len(),
        };
        size += obj.get("extras").map_or(0, |e| e.to_string().len());
        let extras = obj.get("extras").cloned();
        if let Some(e) = &extras {
            check_extras(i, e)?;
        }
        messages.push(AblyMessage { channel: channel.to_string(), id, name, data, extras });
    }
    if size > 64 * 1024 {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, 40009, format!("Maximum message size exceeded ({size} > 65536)")));
    }

    // Client-specified ids: a single message's id is its idempotency key; in
    // a multi-message publish every id must be `<base>:<index>` and the base
    // is the key for the whole publish.
    // https://ably.com/docs/platform/errors/codes/40031-invalid-client-specified-message-id
    let bad_id = |m: &str| Err((StatusCode::BAD_REQUEST, 40031, m.to_string()));
    let with_ids = messages.iter().filter(|m| m.id.is_some()).count();
    let key = if with_ids == 0 {
        None
    } else if messages.iter().any(|m| m.id.as_deref() == Some("")) {
        return bad_id("Client-specified message id cannot be empty");
    } else if messages.len() == 1 {
        messages[0].id.clone()
    } else if with_ids != messages.len() {
        return bad_id(
            "Client-specified message ids do not match the required format for multi-message ProtocolMessages",
        );
    } else {
        let mut base: Option<&str> = None;
        for (i, m) in messages.iter().enumerate() {
            let id = m.id.as_deref().unwrap_or_default();
            let ok = id.rsplit_once(':').filter(|(b, idx)| *idx == i.to_string() && base.is_none_or(|x| x == *b));
            match ok {
                Some((b, _)) => base = Some(b),
                None => return bad_id(
                    "Client-specified message ids do not match the required format for multi-message ProtocolMessages",
                ),
            }
        }
        base.map(str::to_string)
    };
    Ok((key, messages))
}

/// Ably accepts only its own keys in `extras`, and `extras.headers` must be
/// a flat map of string keys to string, number, boolean or null values.
/// https://ably.com/docs/platform/errors/codes/40032-invalid-message-extras-field
fn check_extras(i: usize, extras: &Value) -> Result<(), (StatusCode, u32, String)> {
    let bad = |m: String| Err((StatusCode::BAD_REQUEST, 40032, format!("message {i}: {m}")));
    let Some(obj) = extras.as_object() else { return bad("extras must be an object".into()) };
    for key in obj.keys() {
        if !["headers", "push", "ephemeral", "privileged", "ref"].contains(&key.as_str()) {
            return bad(format!("Message has impermissible extras fields: {key}"));
        }
    }
    if let Some(h) = obj.get("headers") {
        let flat = h.as_object().is_some_and(|m| {
            m.values().all(|v| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null))
        });
        if !flat {
            return bad("extras.headers if present must be a map<string, string|number|boolean|null>".into());
        }
    }
    Ok(())
}
