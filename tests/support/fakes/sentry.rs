//! A fake of Sentry's envelope endpoint, checking what Relay (Sentry's
//! ingestion) checks of an event envelope:
//!
//! - `POST /api/{project_id}/envelope/` for the DSN's project;
//! - `X-Sentry-Auth: Sentry sentry_version=7, sentry_key=<public key>, sentry_client=<name/version>`
//!   (https://develop.sentry.dev/sdk/overview/#authentication): 401 without it,
//!   403 for another key;
//! - the envelope (https://develop.sentry.dev/sdk/envelopes/): a JSON header
//!   line, then items, each a JSON item header line (`type`, and `length` =
//!   the payload's bytes when given) and its payload; an `event` item's payload
//!   is the event JSON, whose `event_id` (32 hex characters) matches the
//!   envelope header's. A malformed envelope is a 400.
//!
//! Accepted events are kept, with the envelope's raw text, for the tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::serve;

/// An accepted event and the envelope it came in.
#[derive(Clone, Debug)]
pub struct Received {
    pub event: Value,
    pub envelope: String,
    pub auth: String,
}

struct Shared {
    key: String,
    project: String,
    events: Mutex<Vec<Received>>,
    rejections: Mutex<Vec<(u16, String)>>,
}

pub struct FakeSentry {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeSentry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSentry {
    pub fn start(key: &str, project: &str) -> FakeSentry {
        let shared = Arc::new(Shared {
            key: key.into(),
            project: project.into(),
            events: Mutex::default(),
            rejections: Mutex::default(),
        });
        let router = Router::new().route("/api/{project}/envelope/", post(envelope)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeSentry { shared, base_url, task }
    }

    /// The DSN naming this fake: `http://KEY@127.0.0.1:PORT/PROJECT`.
    pub fn dsn(&self) -> String {
        let host = self.base_url.trim_start_matches("http://");
        format!("http://{}@{host}/{}", self.shared.key, self.shared.project)
    }

    pub fn events(&self) -> Vec<Received> {
        self.shared.events.lock().unwrap().clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.rejections.lock().unwrap().clone()
    }

    /// Waits until an accepted event satisfies `want` (bounded, so a test
    /// fails with what arrived instead of hanging).
    pub async fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) -> Received {
        for _ in 0..600 {
            if let Some(r) = self.events().into_iter().find(|r| want(&r.event)) {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no Sentry event {what}; got {:?}, refused {:?}", self.events(), self.rejections());
    }
}

async fn envelope(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let refuse = |status: StatusCode, why: String| {
        shared.rejections.lock().unwrap().push((status.as_u16(), why.clone()));
        (status, Json(json!({"detail": why})))
    };
    if project != shared.project {
        return refuse(StatusCode::NOT_FOUND, format!("unknown project {project}"));
    }
    let Some(auth) = headers.get("x-sentry-auth").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return refuse(StatusCode::UNAUTHORIZED, "missing authorization information".into());
    };
    let Some(fields) = auth.strip_prefix("Sentry ") else {
        return refuse(StatusCode::UNAUTHORIZED, "bad X-Sentry-Auth scheme".into());
    };
    let field = |name: &str| {
        fields.split(',').map(str::trim).find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    if field("sentry_version").as_deref() != Some("7") || field("sentry_client").is_none_or(|c| !c.contains('/')) {
        return refuse(StatusCode::UNAUTHORIZED, format!("bad X-Sentry-Auth fields: {fields}"));
    }
    if field("sentry_key").as_deref() != Some(shared.key.as_str()) {
        return refuse(StatusCode::FORBIDDEN, "invalid api key".into());
    }
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return refuse(StatusCode::BAD_REQUEST, "envelope is not UTF-8".into());
    };
    match parse(&text) {
        Ok(event) => {
            let id = event["event_id"].clone();
            shared.events.lock().unwrap().push(Received { event, envelope: text, auth });
            (StatusCode::OK, Json(json!({"id": id})))
        }
        Err(why) => refuse(StatusCode::BAD_REQUEST, why),
    }
}

/// The envelope's event, or why it is malformed.
fn parse(text: &str) -> Result<Value, String> {
    let (header_line, mut rest) = text.split_once('\n').ok_or("no envelope header line")?;
    let header: Value = serde_json::from_str(header_line).map_err(|e| format!("envelope header: {e}"))?;
    let mut event = None;
    while !rest.is_empty() {
        let (item_line, after) = rest.split_once('\n').ok_or("item header without payload")?;
        let item: Value = serde_json::from_str(item_line).map_err(|e| format!("item header: {e}"))?;
        let kind = item["type"].as_str().ok_or("item header without type")?;
        let (payload, after) = match item["length"].as_u64() {
            Some(n) => {
                let n = n as usize;
                if after.len() < n {
                    return Err(format!("item length {n} runs past the envelope"));
                }
                let (p, a) = after.split_at(n);
                (p, a.strip_prefix('\n').unwrap_or(a))
            }
            None => after.split_once('\n').unwrap_or((after, "")),
        };
        if kind == "event" {
            let e: Value = serde_json::from_str(payload).map_err(|e| format!("event payload: {e}"))?;
            event = Some(e);
        }
        rest = after;
    }
    let event = event.ok_or("no event item")?;
    let id = event["event_id"].as_str().ok_or("event without event_id")?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("event_id {id:?} is not 32 hex characters"));
    }
    if header.get("event_id").is_some_and(|h| h != id) {
        return Err("envelope and event disagree on event_id".into());
    }
    Ok(event)
}
