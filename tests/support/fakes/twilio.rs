//! Twilio's Messages API at the wire, checking what Twilio checks
//! (https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource):
//! - HTTP Basic auth with the account SID and auth token (401, error 20003);
//! - a form-encoded body, not JSON (400);
//! - `To` in E.164 (400, error 21211), `Body` present (21602) and at most
//!   1,600 characters (21617);
//! - `From` or `MessagingServiceSid` (21603), `whatsapp:` on both or neither;
//! - the account in the path matching the credentials (20003).
//!
//! Accepted messages answer 201 with a `sid` (`SM` + 32 hex digits).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::json;
use tokio::task::JoinHandle;

use super::http::{form_decode, serve, with_retry_after, Conn, Faults};

/// One message Twilio accepted.
#[derive(Clone, Debug)]
pub struct TwilioMessage {
    pub sid: String,
    pub to: String,
    pub from: String,
    pub body: String,
    pub status_callback: Option<String>,
}

#[derive(Default)]
struct Record {
    accepted: Vec<TwilioMessage>,
    rejections: Vec<(u16, i64)>,
}

struct Shared {
    sid: String,
    token: String,
    faults: Faults,
    record: Mutex<Record>,
    /// Numbers Twilio answers 21211 for (invalid), as a real account would for unreachable ones.
    invalid: Mutex<Vec<String>>,
}

pub struct FakeTwilio {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeTwilio {
    pub fn start(account_sid: &str, auth_token: &str) -> FakeTwilio {
        let shared = Arc::new(Shared {
            sid: account_sid.into(),
            token: auth_token.into(),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
            invalid: Mutex::new(vec![]),
        });
        let router =
            Router::new().route("/2010-04-01/Accounts/{sid}/Messages.json", post(create)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeTwilio { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn messages(&self) -> Vec<TwilioMessage> {
        self.shared.record.lock().unwrap().accepted.clone()
    }

    /// (HTTP status, Twilio error code) of each refusal.
    pub fn rejections(&self) -> Vec<(u16, i64)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }

    pub fn mark_invalid(&self, number: &str) {
        self.shared.invalid.lock().unwrap().push(number.to_string());
    }

    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        self.shared.faults.fail_next(n, status, retry_after);
    }

    /// Calls the message's StatusCallback as Twilio does: a form-encoded POST
    /// signed with `X-Twilio-Signature`, base64(HMAC-SHA1(auth token, URL
    /// followed by each parameter name and value, sorted by name))
    /// (https://www.twilio.com/docs/usage/security#validating-requests).
    /// `forge` signs with another token. Returns the HTTP status.
    pub async fn report(&self, message: &TwilioMessage, status: &str, error_code: Option<&str>, forge: bool) -> u16 {
        use hmac::{Hmac, Mac};
        let url = message.status_callback.as_deref().expect("the message asked for a StatusCallback");
        let mut params = vec![
            ("AccountSid", self.shared.sid.as_str()),
            ("From", message.from.as_str()),
            ("MessageSid", message.sid.as_str()),
            ("MessageStatus", status),
            ("SmsSid", message.sid.as_str()),
            ("To", message.to.as_str()),
        ];
        if let Some(code) = error_code {
            params.push(("ErrorCode", code));
        }
        params.sort();
        let token = if forge { "not-the-token" } else { self.shared.token.as_str() };
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
        mac.update(url.as_bytes());
        for (k, v) in &params {
            mac.update(k.as_bytes());
            mac.update(v.as_bytes());
        }
        let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&params).finish();
        reqwest::Client::new()
            .post(url)
            .header("X-Twilio-Signature", signature)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }
}

fn refuse(shared: &Shared, status: StatusCode, code: i64, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), code));
    let body = json!({"code": code, "message": message, "status": status.as_u16(),
                      "more_info": format!("https://www.twilio.com/docs/errors/{code}")});
    (status, Json(body)).into_response()
}

fn e164(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

async fn create(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let body = Json(json!({"code": 20500, "message": "injected failure"})).into_response();
        with_retry_after(status, retry_after, body)
    });
    if let Some(response) = injected.await {
        return response;
    }
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", shared.sid, shared.token))
    );
    let auth_ok = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(expected.as_str());
    if !auth_ok || sid != shared.sid {
        return refuse(&shared, StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return refuse(&shared, StatusCode::BAD_REQUEST, 20001, "body must be application/x-www-form-urlencoded");
    }
    let text = String::from_utf8_lossy(&body);
    let fields: HashMap<String, String> = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((form_decode(k)?, form_decode(v)?)))
        .collect();
    let to = fields.get("To").cloned().unwrap_or_default();
    let from = fields.get("From").cloned();
    let service = fields.get("MessagingServiceSid").cloned();
    let body = fields.get("Body").cloned().unwrap_or_default();
    if body.is_empty() {
        return refuse(&shared, StatusCode::BAD_REQUEST, 21602, "Message body is required");
    }
    // https://www.twilio.com/docs/api/errors/21617: 1,600 characters, emoji counting double.
    if body.encode_utf16().count() > 1600 {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            21617,
            "The concatenated message body exceeds the 1600 character limit",
        );
    }
    if from.is_none() && service.is_none() {
        return refuse(&shared, StatusCode::BAD_REQUEST, 21603, "A 'From' or 'MessagingServiceSid' is required");
    }
    let to_whatsapp = to.starts_with("whatsapp:");
    let from_whatsapp = from.as_deref().is_some_and(|f| f.starts_with("whatsapp:"));
    if from.is_some() && to_whatsapp != from_whatsapp {
        return refuse(&shared, StatusCode::BAD_REQUEST, 21910, "Invalid From and To pair: channels differ");
    }
    let number = to.strip_prefix("whatsapp:").unwrap_or(&to);
    if !e164(number) || shared.invalid.lock().unwrap().iter().any(|n| n == number) {
        // Twilio quotes the number back in this message.
        let message = format!("The 'To' number {to} is not a valid phone number.");
        return refuse(&shared, StatusCode::BAD_REQUEST, 21211, &message);
    }
    let mut record = shared.record.lock().unwrap();
    let sid = format!("SM{:032x}", record.accepted.len() as u128 + 1 + ((std::process::id() as u128) << 64));
    record.accepted.push(TwilioMessage {
        sid: sid.clone(),
        to,
        from: from.or(service).unwrap_or_default(),
        body,
        status_callback: fields.get("StatusCallback").cloned(),
    });
    (StatusCode::CREATED, Json(json!({"sid": sid, "status": "queued"}))).into_response()
}
