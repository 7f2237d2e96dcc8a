//! Pusher Channels through its HTTP API: signed `batch_events` calls.
//!
//! Reference: https://pusher.com/docs/channels/library_auth_reference/rest-api/
//! Messages Pusher would refuse anyway (data over 10 KB, a channel name it does
//! not allow) are failed here, one by one, so they never sink a whole batch.
//! The rest go out in calls of at most ten events, several calls at once.

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use serde::Serialize;
use sha2::Sha256;

use super::http::{by_status, retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::{Accepted, OutboundMessage, ProviderError};
pub mod config;

pub use self::config::{PusherConfig, PROFILE};
use crate::secret::Secret;

/// "All of our multi-tenant clusters accept up to 10 events per request."
/// https://pusher.com/blog/publish-batches-of-events-at-scale-with-the-batch-events-api/
pub const MAX_EVENTS_PER_CALL: usize = 10;

/// "The event data should not be larger than 10KB."
/// https://pusher.com/docs/channels/library_auth_reference/rest-api/#post-event-trigger-an-event
pub const MAX_DATA_BYTES: usize = 10 * 1024;

/// "Channel names may contain a maximum of 164 characters."
/// https://pusher.com/docs/channels/using_channels/channels/#channel-naming-conventions
pub const MAX_CHANNEL_NAME: usize = 164;

/// Event names are "limited to 200 characters" (HTTP API reference, `name`).
pub const MAX_EVENT_NAME: usize = 200;

/// Batch calls in flight at once for one `send_batch`: enough to keep a large
/// claim moving, few enough not to open dozens of connections per worker.
const MAX_CALLS_IN_FLIGHT: usize = 8;

#[derive(Clone, Debug)]
pub struct Pusher {
    http: reqwest::Client,
    endpoint: String,
    app_id: String,
    key: String,
    secret: Secret,
    timeout: Duration,
}

/// One element of the `batch` array, as Pusher wants it: `data` is the
/// payload JSON *as a string*, which subscribers' libraries parse back.
#[derive(Clone, Debug, Serialize)]
struct BatchEvent {
    name: String,
    channel: String,
    data: String,
}

#[derive(Serialize)]
struct BatchBody<'a> {
    batch: &'a [BatchEvent],
}

impl Pusher {
    pub fn build(cfg: &PusherConfig, ctx: &super::BuildContext) -> Result<Pusher, ProviderError> {
        Ok(Pusher::new(cfg, ctx.http.clone()))
    }

    pub fn new(cfg: &PusherConfig, http: reqwest::Client) -> Pusher {
        Pusher {
            http,
            endpoint: cfg.endpoint(),
            app_id: cfg.app_id.clone(),
            key: cfg.key.clone(),
            secret: cfg.secret.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// One result per message, same order. A failed call fails every message
    /// that was in it; messages refused before sending fail alone.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let mut results: Vec<Option<Result<Accepted, ProviderError>>> = vec![None; messages.len()];
        let mut ready: Vec<(usize, BatchEvent)> = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match prepare(m) {
                Ok(event) => ready.push((i, event)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }

        // Collected before polling: a lazy iterator of closures here would make
        // the dispatch worker's future non-`Send` (higher-ranked lifetimes).
        let calls: Vec<_> = ready
            .chunks(MAX_EVENTS_PER_CALL)
            .map(|chunk| {
                let events: Vec<BatchEvent> = chunk.iter().map(|(_, e)| e.clone()).collect();
                let indices: Vec<usize> = chunk.iter().map(|(i, _)| *i).collect();
                async move { (indices, self.post_batch(&events).await) }
            })
            .collect();
        let outcomes: Vec<_> = stream::iter(calls).buffer_unordered(MAX_CALLS_IN_FLIGHT).collect().await;
        for (indices, outcome) in outcomes {
            for i in indices {
                results[i] = Some(outcome.clone());
            }
        }

        results
            .into_iter()
            .map(|r| {
                // Every slot is filled above; this only guards the contract.
                r.unwrap_or_else(|| Err(ProviderError::Permanent { reason: "pusher: message was not sent".into() }))
            })
            .collect()
    }

    async fn post_batch(&self, events: &[BatchEvent]) -> Result<Accepted, ProviderError> {
        let body = serde_json::to_vec(&BatchBody { batch: events })
            .map_err(|e| ProviderError::Permanent { reason: format!("pusher: cannot encode batch: {e}") })?;
        let path = format!("/apps/{}/batch_events", self.app_id);
        let mut params = vec![
            ("auth_key", self.key.clone()),
            ("auth_timestamp", chrono::Utc::now().timestamp().to_string()),
            ("auth_version", "1.0".to_string()),
            ("body_md5", hex::encode(Md5::digest(&body))),
        ];
        let signature = sign(self.secret.expose(), "POST", &path, &params);
        params.push(("auth_signature", signature));

        let response = self
            .http
            .post(format!("{}{}", self.endpoint, path))
            .query(&params)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error("pusher", e, self.timeout))?;

        let status = response.status();
        let wait = retry_after(response.headers());
        // Read the body even on success so the connection goes back to the pool.
        let text = response.text().await.unwrap_or_default();
        classify(status, wait, &text)
    }
}

/// Turns one message into a batch element, or says why Pusher would refuse it.
fn prepare(m: &OutboundMessage) -> Result<BatchEvent, ProviderError> {
    let permanent = |reason: String| Err(ProviderError::Permanent { reason });
    if let Some(why) = invalid_channel(&m.channel_name) {
        return permanent(format!("pusher: channel {:?} {why}", m.channel_name));
    }
    if m.event.is_empty() || m.event.chars().count() > MAX_EVENT_NAME {
        return permanent(format!("pusher: event name must be 1 to {MAX_EVENT_NAME} characters"));
    }
    let data = serde_json::to_string(&m.payload)
        .map_err(|e| ProviderError::Permanent { reason: format!("pusher: cannot encode payload: {e}") })?;
    if data.len() > MAX_DATA_BYTES {
        return permanent(format!("payload of {} bytes exceeds Pusher's 10 KB limit", data.len()));
    }
    Ok(BatchEvent { name: m.event.clone(), channel: m.channel_name.clone(), data })
}

/// `None` if Pusher accepts the name, else why not.
/// https://pusher.com/docs/channels/using_channels/channels/#channel-naming-conventions
fn invalid_channel(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > MAX_CHANNEL_NAME {
        return Some(format!("is longer than Pusher's {MAX_CHANNEL_NAME} characters"));
    }
    if let Some(c) = name.chars().find(|c| !is_channel_char(*c)) {
        return Some(format!("contains {c:?}; Pusher allows letters, digits and _ - = @ , . ;"));
    }
    // Clients decrypt these with a key derived from the channel's shared
    // secret; a plaintext event would reach them as undecryptable noise.
    // https://pusher.com/docs/channels/using_channels/encrypted-channels/
    if name.starts_with("private-encrypted-") {
        return Some("is an end-to-end encrypted channel, which the relay does not encrypt for".into());
    }
    None
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ',' | '.' | ';')
}

/// `auth_signature`: hex HMAC-SHA256 over "METHOD\nPATH\nQUERY", where QUERY is
/// every parameter but the signature, keys lowercased and sorted, not escaped.
/// https://pusher.com/docs/channels/library_auth_reference/rest-api/#generating-authentication-signatures
fn sign(secret: &str, method: &str, path: &str, params: &[(&str, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = params.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str())).collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let to_sign = format!("{method}\n{path}\n{}", query.join("&"));
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        // HMAC takes keys of any length; this arm cannot be reached.
        return String::new();
    };
    mac.update(to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Status codes per the HTTP API reference's "HTTP status codes" table.
fn classify(status: StatusCode, wait: Option<std::time::Duration>, body: &str) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        // Pusher answers `{}` (or channel info when asked); no per-event id.
        return Ok(Accepted { provider_message_id: None });
    }
    let reason = format!("pusher answered {}: {}", status.as_u16(), truncate(body, MAX_REASON_BODY));
    // 401: bad signature or key; 403: app disabled or over quota. Either
    // way the same call keeps failing until someone changes something.
    Err(by_status(status.as_u16(), reason, wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The worked example from
    /// https://pusher.com/docs/channels/library_auth_reference/rest-api/#worked-authentication-example
    #[test]
    fn signature_matches_pushers_worked_example() {
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let md5 = hex::encode(Md5::digest(body.as_bytes()));
        assert_eq!(md5, "ec365a775a4cd0599faeb73354201b6f");
        // Given out of order to show the sort is ours, not the caller's.
        let params = [
            ("body_md5", md5),
            ("auth_version", "1.0".to_string()),
            ("auth_key", "278d425bdf160c739803".to_string()),
            ("auth_timestamp", "1353088179".to_string()),
        ];
        assert_eq!(
            sign("7ad3773142a6692b25b8", "POST", "/apps/3/events", &params),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    fn msg(channel: &str, payload: serde_json::Value) -> OutboundMessage {
        OutboundMessage {
            delivery_id: 1,
            idempotency_key: "k".into(),
            channel_name: channel.into(),
            event: "created".into(),
            payload,
            contact: None,
            bus: None,
            devices: Vec::new(),
        }
    }

    #[test]
    fn data_is_the_payload_as_a_json_string() {
        let ev = prepare(&msg("private-user-42", json!({"id": 7}))).unwrap();
        assert_eq!(ev.data, r#"{"id":7}"#);
        assert_eq!(ev.channel, "private-user-42");
    }

    #[test]
    fn channel_names_outside_pushers_rules_are_permanent() {
        for bad in ["", "user 42", "user/42", "ü", "private-encrypted-user-1"] {
            let err = prepare(&msg(bad, json!({}))).unwrap_err();
            assert!(matches!(err, ProviderError::Permanent { .. }), "{bad:?}: {err:?}");
        }
        assert!(prepare(&msg(&"a".repeat(MAX_CHANNEL_NAME), json!({}))).is_ok());
        assert!(prepare(&msg(&"a".repeat(MAX_CHANNEL_NAME + 1), json!({}))).is_err());
        assert!(prepare(&msg("foo-bar_1234@=,.;", json!({}))).is_ok());
    }

    #[test]
    fn data_over_ten_kib_is_permanent_and_says_its_size() {
        // {"s":"…"} is 8 bytes of framing around the string.
        let at_limit = json!({ "s": "x".repeat(MAX_DATA_BYTES - 8) });
        assert!(prepare(&msg("c", at_limit)).is_ok());
        let over = json!({ "s": "x".repeat(MAX_DATA_BYTES - 7) });
        match prepare(&msg("c", over)) {
            Err(ProviderError::Permanent { reason }) => {
                assert_eq!(reason, "payload of 10241 bytes exceeds Pusher's 10 KB limit")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statuses_map_to_retry_decisions() {
        let wait = Some(Duration::from_secs(3));
        assert!(classify(StatusCode::OK, None, "{}").is_ok());
        assert!(matches!(classify(StatusCode::UNAUTHORIZED, None, "bad sig"), Err(ProviderError::Unauthorized { .. })));
        assert!(matches!(classify(StatusCode::FORBIDDEN, None, "quota"), Err(ProviderError::Unauthorized { .. })));
        assert!(matches!(classify(StatusCode::PAYLOAD_TOO_LARGE, None, "big"), Err(ProviderError::Permanent { .. })));
        assert!(matches!(classify(StatusCode::BAD_REQUEST, None, "no"), Err(ProviderError::Permanent { .. })));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, wait, "slow down"),
            Err(ProviderError::Retryable { reason: "pusher answered 429: slow down".into(), retry_after: wait })
        );
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, None, ""), Err(ProviderError::Retryable { .. })));
    }
}
