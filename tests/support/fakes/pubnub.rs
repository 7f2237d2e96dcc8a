//! PubNub's publish endpoint on 127.0.0.1, checking what PubNub checks:
//! - `POST /publish/{pub_key}/{sub_key}/0/{channel}/0` with the keyset's keys
//!   (400 `[0,"Invalid Key",..]` otherwise);
//! - `uuid` present, at most 92 characters (400);
//! - with a secret key: `timestamp` within ±60 s and `signature` = `v2.` +
//!   URL-safe base64 (no padding) of HMAC-SHA256(secret, `GET\n{pub}\n{path}\n{sorted,
//!   encoded query}\n`), recomputed here from the documented rules (403 otherwise);
//!   https://www.pubnub.com/docs/sdks/rest-api/access-manager-introduction
//! - a JSON body of at most 32 KiB (413 `[0,"Message Too Large",..]`);
//! - a channel name PubNub allows, `meta` a JSON object, `custom_message_type`
//!   3 to 50 of `[A-Za-z0-9_-]` (400 `[0,"Invalid Arguments",..]`).
//!
//! Accepted publishes answer `[1,"Sent","<timetoken>"]`. PubNub keeps no
//! idempotency key: a repeated publish is a second message, here too.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_relay::config::Secret;
use outbox_relay::providers::pubnub::PubnubConfig;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::task::JoinHandle;

use super::http::{form_decode, serve, with_retry_after, Conn, Faults};

/// One message PubNub accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub channel: String,
    pub message: Value,
    pub meta: Option<Value>,
    pub custom_message_type: Option<String>,
    pub uuid: String,
    /// Whether the call carried a valid signature.
    pub signed: bool,
}

#[derive(Default)]
struct Record {
    requests: usize,
    published: Vec<Published>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    publish_key: String,
    subscribe_key: String,
    secret_key: Option<String>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakePubnub {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakePubnub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePubnub {
    /// `secret_key`: `Some` for a keyset that requires signed publishes.
    pub fn start(publish_key: &str, subscribe_key: &str, secret_key: Option<&str>) -> FakePubnub {
        let shared = Arc::new(Shared {
            publish_key: publish_key.into(),
            subscribe_key: subscribe_key.into(),
            secret_key: secret_key.map(str::to_string),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new()
            .route("/publish/{pub_key}/{sub_key}/{callback}/{channel}/{store}", post(publish))
            .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!([0, "Not Found", timetoken()]))) })
            .with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakePubnub { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// A config pointing at this fake with its keys.
    pub fn config(&self) -> PubnubConfig {
        PubnubConfig {
            publish_key: self.shared.publish_key.clone(),
            subscribe_key: self.shared.subscribe_key.clone(),
            secret_key: self.shared.secret_key.clone().map(Secret::new),
            uuid: "outbox-relay".into(),
            base_url: Some(self.base_url.clone()),
            timeout_ms: 5_000,
        }
    }

    pub fn published(&self) -> Vec<Published> {
        self.shared.record.lock().unwrap().published.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    /// HTTP requests that reached the fake, including refused, failed and reset ones.
    pub fn requests(&self) -> usize {
        self.shared.record.lock().unwrap().requests
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

fn timetoken() -> String {
    let now = chrono::Utc::now();
    format!("{}", now.timestamp_micros() * 10)
}

fn refuse(shared: &Shared, status: StatusCode, body: Value, reason: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), reason.to_string()));
    (status, Json(body)).into_response()
}

/// The signature rules' encoding: everything but `0-9 a-z A-Z - _ .` as `%XX`.
fn pn_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 92
        && !name.chars().any(|c| matches!(c, ',' | ':' | '*' | '/' | '\\' | ' ') || c.is_control())
}

async fn publish(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((pub_key, sub_key, callback, channel, store)): Path<(String, String, String, String, String)>,
    uri: Uri,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    shared.record.lock().unwrap().requests += 1;
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let body =
            Json(json!({"status": status.as_u16(), "error": true, "message": "injected failure"})).into_response();
        with_retry_after(status, retry_after, body)
    });
    if let Some(response) = injected.await {
        return response;
    }
    let invalid =
        |why: &str| refuse(&shared, StatusCode::BAD_REQUEST, json!([0, "Invalid Arguments", timetoken()]), why);
    if pub_key != shared.publish_key || sub_key != shared.subscribe_key {
        return refuse(&shared, StatusCode::BAD_REQUEST, json!([0, "Invalid Key", timetoken()]), "Invalid Key");
    }
    if callback != "0" || store != "0" {
        return invalid("callback and the trailing segment must be 0");
    }
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
            return invalid("query is not percent-encoded UTF-8");
        };
        params.push((k, v));
    }
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());

    let mut signed = false;
    if let Some(secret) = &shared.secret_key {
        let forbidden = |why: &str| {
            refuse(
                &shared,
                StatusCode::FORBIDDEN,
                json!({"status": 403, "error": true, "service": "Access Manager", "message": why}),
                why,
            )
        };
        let Some(signature) = param("signature") else {
            return forbidden("Forbidden: no signature");
        };
        let ts = param("timestamp").and_then(|t| t.parse::<i64>().ok());
        match ts {
            Some(ts) if (chrono::Utc::now().timestamp() - ts).abs() <= 60 => {}
            _ => return forbidden("Signature timestamp is missing or more than 60 s off"),
        }
        let mut unsigned: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "signature").collect();
        unsigned.sort_by(|a, b| a.0.cmp(&b.0));
        let canonical: Vec<String> = unsigned.iter().map(|(k, v)| format!("{k}={}", pn_encode(v))).collect();
        let to_sign = format!("GET\n{}\n{}\n{}\n", shared.publish_key, uri.path(), canonical.join("&"));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(to_sign.as_bytes());
        let given =
            signature.strip_prefix("v2.").and_then(|s| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok());
        if given.is_none_or(|g| mac.verify_slice(&g).is_err()) {
            return forbidden("Signature does not match");
        }
        signed = true;
    }
    let Some(uuid) = param("uuid").filter(|u| !u.is_empty() && u.chars().count() <= 92) else {
        return invalid("uuid is missing or longer than 92 characters");
    };
    if !valid_channel(&channel) {
        return invalid("invalid channel name");
    }
    let meta = match param("meta") {
        Some(m) => match serde_json::from_str::<Value>(&m) {
            Ok(v) if v.is_object() => Some(v),
            _ => return invalid("meta is not a JSON object"),
        },
        None => None,
    };
    let custom_message_type = param("custom_message_type");
    if let Some(t) = &custom_message_type {
        let ok = (3..=50).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return invalid("custom_message_type must be 3 to 50 of [A-Za-z0-9_-]");
        }
    }
    if body.len() > 32 * 1024 {
        return refuse(
            &shared,
            StatusCode::PAYLOAD_TOO_LARGE,
            json!([0, "Message Too Large", timetoken()]),
            "Message Too Large",
        );
    }
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, json!([0, "Invalid JSON", timetoken()]), "Invalid JSON");
    };
    shared.record.lock().unwrap().published.push(Published {
        channel,
        message,
        meta,
        custom_message_type,
        uuid,
        signed,
    });
    (StatusCode::OK, Json(json!([1, "Sent", timetoken()]))).into_response()
}
