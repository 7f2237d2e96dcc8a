//! A team's webhook receiver on 127.0.0.1 that verifies deliveries the way
//! the Standard Webhooks spec tells receivers to
//! (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md#verifying-signatures):
//! - `webhook-id`, `webhook-timestamp` and `webhook-signature` all present;
//! - the timestamp within 5 minutes of now, either way (replay protection);
//! - one of the space-separated `v1,<base64>` signatures equal, in constant
//!   time, to HMAC-SHA256(base64-decoded `whsec_` secret, `{id}.{timestamp}.{body}`);
//!
//! any failure is a 401 and nothing is processed. A JSON body is required
//! (400). The `webhook-id` is the idempotency key: a repeated id is
//! acknowledged (204) but processed once, as the spec recommends.
//! `gone_under(prefix)` makes later requests under that path a 410 Gone.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_relay::config::Secret;
use outbox_relay::providers::webhook::WebhookConfig;
use serde_json::Value;
use sha2::Sha256;
use tokio::task::JoinHandle;

use super::http::{serve, with_retry_after, Conn, Faults};

/// The spec's example tolerance.
pub const TOLERANCE_S: i64 = 5 * 60;

/// One delivery the receiver verified and processed.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Path and query the request was sent to.
    pub target: String,
    pub id: String,
    pub timestamp: i64,
    pub body: Value,
}

#[derive(Default)]
struct Record {
    requests: usize,
    processed: Vec<Delivery>,
    seen_ids: HashSet<String>,
    rejections: Vec<(u16, String)>,
}

struct Shared {
    secret: String,
    /// Paths starting with one of these answer 410 Gone.
    gone: Mutex<Vec<String>>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeWebhook {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWebhook {
    /// `secret`: `whsec_<base64>`, as the sender is configured.
    pub fn start(secret: &str) -> FakeWebhook {
        let shared = Arc::new(Shared {
            secret: secret.into(),
            gone: Mutex::new(Vec::new()),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().fallback(receive).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeWebhook { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// A config for `path` (appended to the base URL; placeholders allowed).
    pub fn config(&self, path: &str) -> WebhookConfig {
        WebhookConfig {
            url: format!("{}{path}", self.base_url),
            secret: Secret::new(self.shared.secret.clone()),
            timeout_ms: 5_000,
            allow_http: true,
        }
    }

    /// Deliveries verified and processed, first copy of each id only.
    pub fn processed(&self) -> Vec<Delivery> {
        self.shared.record.lock().unwrap().processed.clone()
    }

    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    /// HTTP requests that reached the receiver, verified or not.
    pub fn requests(&self) -> usize {
        self.shared.record.lock().unwrap().requests
    }

    /// From now on requests to paths under `prefix` answer 410 Gone.
    pub fn gone_under(&self, prefix: &str) {
        self.shared.gone.lock().unwrap().push(prefix.to_string());
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

fn refuse(shared: &Shared, status: StatusCode, reason: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), reason.to_string()));
    (status, reason.to_string()).into_response()
}

/// The spec's verification, written from its text (not the client's code).
fn verify(secret: &str, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(String, i64), &'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (Some(id), Some(ts), Some(signatures)) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"))
    else {
        return Err("missing webhook-id, webhook-timestamp or webhook-signature");
    };
    let ts: i64 = ts.parse().map_err(|_| "webhook-timestamp is not an integer")?;
    if (now - ts).abs() > TOLERANCE_S {
        return Err("webhook-timestamp outside the 5 minute tolerance");
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "receiver secret is not base64")?;
    for candidate in signatures.split(' ') {
        let Some(sig) = candidate.strip_prefix("v1,") else { continue };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else { continue };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        // verify_slice compares in constant time, as the spec requires.
        if mac.verify_slice(&sig).is_ok() {
            return Ok((id, ts));
        }
    }
    Err("no matching v1 signature")
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.record.lock().unwrap().requests += 1;
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        with_retry_after(status, retry_after, "injected failure".into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    if shared.gone.lock().unwrap().iter().any(|p| uri.path().starts_with(p.as_str())) {
        return refuse(&shared, StatusCode::GONE, "this endpoint no longer takes webhooks");
    }
    let (id, timestamp) = match verify(&shared.secret, &headers, &body, chrono::Utc::now().timestamp()) {
        Ok(v) => v,
        Err(why) => return refuse(&shared, StatusCode::UNAUTHORIZED, why),
    };
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let mut record = shared.record.lock().unwrap();
    if record.seen_ids.insert(id.clone()) {
        let target = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
        record.processed.push(Delivery { target, id, timestamp, body: json });
    }
    StatusCode::NO_CONTENT.into_response()
}
