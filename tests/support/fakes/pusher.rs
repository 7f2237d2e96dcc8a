//! A Pusher Channels HTTP API on 127.0.0.1 that checks what Pusher checks.
//!
//! Only `POST /apps/{app_id}/batch_events` is served. Every rule is checked
//! independently of the client's code (the signature is recomputed here from
//! the documented algorithm), and every refusal is recorded so a test can
//! assert that nothing slipped through.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use outbox_relay::config::Secret;
use outbox_relay::providers::pusher::PusherConfig;
use sha2::Sha256;
use tokio::task::JoinHandle;

use super::http::{form_decode, serve, with_retry_after, Conn, Faults};

/// One event Pusher accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    pub channel: String,
    pub name: String,
    /// The event's `data` string parsed as JSON (a JSON string if it was not JSON).
    pub data: serde_json::Value,
}

/// A request the fake refused, with the status and the reason it gave.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
}

#[derive(Default)]
struct Record {
    requests: usize,
    batches: Vec<Vec<ReceivedEvent>>,
    rejections: Vec<Rejection>,
}

struct Shared {
    app_id: String,
    key: String,
    secret: String,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakePusher {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakePusher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePusher {
    /// Starts serving at once; call inside a tokio runtime.
    pub fn start(app_id: &str, key: &str, secret: &str) -> FakePusher {
        let shared = Arc::new(Shared {
            app_id: app_id.into(),
            key: key.into(),
            secret: secret.into(),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new()
            .route("/apps/{app_id}/batch_events", post(batch_events))
            .fallback(|| async { (StatusCode::NOT_FOUND, "Not found") })
            .with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakePusher { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// A config pointing at this fake with its credentials.
    pub fn config(&self) -> PusherConfig {
        PusherConfig {
            app_id: self.shared.app_id.clone(),
            key: self.shared.key.clone(),
            secret: Secret::new(self.shared.secret.clone()),
            cluster: None,
            base_url: Some(self.base_url.clone()),
            timeout_ms: 5_000,
        }
    }

    /// Every accepted event, call by call in arrival order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.shared.record.lock().unwrap().batches.iter().flatten().cloned().collect()
    }

    /// How many events were accepted, without copying them.
    pub fn accepted_count(&self) -> usize {
        self.shared.record.lock().unwrap().batches.iter().map(Vec::len).sum()
    }

    /// Accepted events grouped by the call that carried them.
    pub fn batches(&self) -> Vec<Vec<ReceivedEvent>> {
        self.shared.record.lock().unwrap().batches.clone()
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

    /// The next request gets exactly this answer (status, headers, body).
    pub fn answer_next_raw(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.shared.faults.answer_next_raw(status, headers, body);
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

/// Pusher's HTTP API reference, checked rule by rule:
/// https://pusher.com/docs/channels/library_auth_reference/rest-api/
async fn batch_events(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(app_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Handled in its own task so that a client giving up (timeout) does not
    // cancel it: like the real service, the fake may still take a request
    // whose answer nobody waits for.
    let handled = tokio::spawn(handle_batch_events(shared, conn, app_id, query, headers, body));
    handled.await.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle_batch_events(
    shared: Arc<Shared>,
    conn: Conn,
    app_id: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.record.lock().unwrap().requests += 1;
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let body = status.canonical_reason().unwrap_or("injected failure").into_response();
        with_retry_after(status, retry_after, body)
    });
    if let Some(response) = injected.await {
        return response;
    }
    let path = format!("/apps/{app_id}/batch_events");
    match check(&shared, &app_id, &path, query.as_deref().unwrap_or(""), &headers, &body) {
        Ok(events) => {
            shared.record.lock().unwrap().batches.push(events);
            // "200 Successful request. The body will contain a JSON hash of response data"
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response()
        }
        Err((status, reason)) => {
            shared
                .record
                .lock()
                .unwrap()
                .rejections
                .push(Rejection { status: status.as_u16(), reason: reason.clone() });
            (status, reason).into_response()
        }
    }
}

type Refusal = (StatusCode, String);

fn check(
    shared: &Shared,
    app_id: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<ReceivedEvent>, Refusal> {
    let unauthorized = |why: String| Err((StatusCode::UNAUTHORIZED, why));
    let bad_request = |why: String| Err((StatusCode::BAD_REQUEST, why));

    if app_id != shared.app_id {
        return Err((StatusCode::NOT_FOUND, format!("Unknown app_id {app_id}")));
    }

    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
            return bad_request(format!("Malformed query component {pair:?}"));
        };
        params.push((k, v));
    }
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

    // Authentication parameters, all required:
    // https://pusher.com/docs/channels/library_auth_reference/rest-api/#authentication
    if get("auth_key") != Some(shared.key.as_str()) {
        return unauthorized("Unknown auth_key".into());
    }
    if get("auth_version") != Some("1.0") {
        return unauthorized("auth_version must be 1.0".into());
    }
    // auth_timestamp: seconds since the epoch; the server refuses requests
    // more than 600 s away from its own clock.
    let Some(ts) = get("auth_timestamp").and_then(|t| t.parse::<i64>().ok()) else {
        return unauthorized("auth_timestamp missing or not a number".into());
    };
    let now = chrono::Utc::now().timestamp();
    if (now - ts).abs() > 600 {
        return unauthorized(format!("Timestamp expired: given {ts}, now {now} (600 s allowed)"));
    }
    // "body_md5: ... the hex encoded MD5 hash of the body" (required when there is a body).
    let md5 = hex::encode(Md5::digest(body));
    if get("body_md5") != Some(md5.as_str()) {
        return unauthorized(format!("body_md5 does not match the body (expected {md5})"));
    }
    // Signature: HMAC-SHA256 hex of "POST\n<path>\n<sorted query without auth_signature>".
    // https://pusher.com/docs/channels/library_auth_reference/rest-api/#generating-authentication-signatures
    let mut sorted: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    sorted.sort();
    let query_to_sign = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let to_sign = format!("POST\n{path}\n{query_to_sign}");
    let mut mac = Hmac::<Sha256>::new_from_slice(shared.secret.as_bytes()).expect("hmac key");
    mac.update(to_sign.as_bytes());
    let expected = hex::encode(mac.finalize().into_bytes());
    if get("auth_signature") != Some(expected.as_str()) {
        return unauthorized(format!(
            "Invalid signature: you should have sent HmacSHA256Hex({to_sign:?}, your_secret_key)"
        ));
    }

    // "POST requests ... SHOULD be submitted in the POST body as a JSON hash
    // (while setting Content-Type:application/json)."
    let json_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_content {
        return bad_request("Content-Type must be application/json".into());
    }
    let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(body) else {
        return bad_request("Request body is not valid JSON".into());
    };
    let Some(batch) = parsed.get("batch").and_then(|b| b.as_array()) else {
        return bad_request("Body must be {\"batch\": [...]}".into());
    };
    // "All of our multi-tenant clusters accept up to 10 events per request."
    // https://pusher.com/blog/publish-batches-of-events-at-scale-with-the-batch-events-api/
    if batch.len() > 10 {
        return bad_request(format!("Batch too large ({} > 10)", batch.len()));
    }

    let mut events = Vec::with_capacity(batch.len());
    for (i, ev) in batch.iter().enumerate() {
        let field = |name: &str| ev.get(name).and_then(|v| v.as_str());
        let (Some(name), Some(channel), Some(data)) = (field("name"), field("channel"), field("data")) else {
            return bad_request(format!("batch[{i}] needs string name, channel and data"));
        };
        // "name: Event name (required) - limited to 200 characters"
        if name.is_empty() || name.chars().count() > 200 {
            return bad_request(format!("batch[{i}]: event name must be 1 to 200 characters"));
        }
        // "Channel names may contain a maximum of 164 characters ... should only
        // include lower and uppercase letters, numbers and _ - = @ , . ;"
        // https://pusher.com/docs/channels/using_channels/channels/#channel-naming-conventions
        let allowed = |c: char| c.is_ascii_alphanumeric() || "_-=@,.;".contains(c);
        if channel.is_empty() || channel.len() > 164 || !channel.chars().all(allowed) {
            return bad_request(format!("batch[{i}]: invalid channel name {channel:?}"));
        }
        // "The event data should not be larger than 10KB. If you attempt to POST
        // an event with a larger data parameter, you will receive a 413 error code."
        if data.len() > 10 * 1024 {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("batch[{i}]: event data of {} bytes is over 10KB", data.len()),
            ));
        }
        let data = serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.to_string()));
        events.push(ReceivedEvent { channel: channel.into(), name: name.into(), data });
    }
    Ok(events)
}
