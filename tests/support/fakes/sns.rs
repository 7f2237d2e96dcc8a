//! Amazon SNS's Query API at the wire, checking what SNS checks
//! (https://docs.aws.amazon.com/sns/latest/api/API_Publish.html,
//! https://docs.aws.amazon.com/sns/latest/api/CommonErrors.html):
//! - the Signature Version 4 `Authorization`, recomputed here from the
//!   request as received (its own code, not the relay's signer): the access
//!   key (403 `InvalidClientTokenId`), the scope's region and service, the
//!   session token when the fake was given one, the signature itself (403
//!   `SignatureDoesNotMatch`);
//! - a form-encoded body, `Action=Publish`, `Version=2010-03-31` (400 `InvalidAction`);
//! - exactly one of `TopicArn` and `PhoneNumber`, a `Message`
//!   (400 `InvalidParameter`); the phone number in E.164; an SMS of at most
//!   1,600 characters, other messages (attributes included) at most 256 KB;
//!   at most 10 message attributes;
//! - a topic that exists (404 `NotFound`); for a FIFO topic a
//!   `MessageGroupId` and a `MessageDeduplicationId` (no content-based
//!   de-duplication here), a repeated id accepted but not delivered again
//!   (https://docs.aws.amazon.com/sns/latest/dg/fifo-message-dedup.html);
//!   for a standard topic no de-duplication id;
//!
//! answering `<PublishResponse>` with a `MessageId`, errors as
//! `<ErrorResponse><Error><Code>`; `throttle_next` answers 400 `Throttling`,
//! the Query API's "slow down".

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::http::{form_decode, serve, with_retry_after, Conn, Faults};

/// One message SNS took (and delivered: FIFO repeats are not).
#[derive(Clone, Debug)]
pub struct Published {
    pub message_id: String,
    pub params: BTreeMap<String, String>,
}

impl Published {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

#[derive(Default)]
struct Record {
    published: Vec<Published>,
    /// (topic, MessageDeduplicationId) -> MessageId, for FIFO topics.
    dedup: HashMap<(String, String), String>,
    rejections: Vec<(u16, String)>,
    throttle: usize,
}

struct Shared {
    access_key_id: String,
    secret: String,
    session_token: Option<String>,
    region: String,
    topics: Mutex<Vec<String>>,
    faults: Faults,
    record: Mutex<Record>,
}

pub struct FakeSns {
    shared: Arc<Shared>,
    base_url: String,
    task: JoinHandle<()>,
}

impl Drop for FakeSns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSns {
    pub fn start(access_key_id: &str, secret: &str, session_token: Option<&str>, region: &str) -> FakeSns {
        let shared = Arc::new(Shared {
            access_key_id: access_key_id.into(),
            secret: secret.into(),
            session_token: session_token.map(str::to_string),
            region: region.into(),
            topics: Mutex::new(vec![]),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().route("/", post(action)).with_state(shared.clone());
        let (base_url, task) = serve(router);
        FakeSns { shared, base_url, task }
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    pub fn create_topic(&self, arn: &str) {
        self.shared.topics.lock().unwrap().push(arn.to_string());
    }

    /// The next `n` Publish calls get 400 `Throttling`.
    pub fn throttle_next(&self, n: usize) {
        self.shared.record.lock().unwrap().throttle += n;
    }

    pub fn published(&self) -> Vec<Published> {
        self.shared.record.lock().unwrap().published.clone()
    }

    /// (HTTP status, error code) of each refusal.
    pub fn rejections(&self) -> Vec<(u16, String)> {
        self.shared.record.lock().unwrap().rejections.clone()
    }
}

fn error_xml(kind: &str, code: &str, message: &str) -> String {
    let message = message.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<ErrorResponse xmlns=\"https://sns.amazonaws.com/doc/2010-03-31/\"><Error><Type>{kind}</Type>\
         <Code>{code}</Code><Message>{message}</Message></Error><RequestId>fake-request</RequestId></ErrorResponse>"
    )
}

fn refuse(shared: &Shared, status: StatusCode, code: &str, message: &str) -> Response {
    shared.record.lock().unwrap().rejections.push((status.as_u16(), code.to_string()));
    let kind = if status.is_server_error() { "Receiver" } else { "Sender" };
    (status, [(header::CONTENT_TYPE, "text/xml")], error_xml(kind, code, message)).into_response()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Checks the request's SigV4 signature as SNS does; `Err((code, message))` when it fails.
fn check_signature(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<(), (&'static str, String)> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization")
        .ok_or(("MissingAuthenticationToken", "Request is missing Authentication Token".into()))?;
    let rest =
        auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or(("IncompleteSignature", "Unsupported algorithm".to_string()))?;
    let mut parts = BTreeMap::new();
    for p in rest.split(", ") {
        let (k, v) = p.split_once('=').ok_or(("IncompleteSignature", format!("malformed {p:?}")))?;
        parts.insert(k, v);
    }
    let (Some(credential), Some(signed), Some(signature)) =
        (parts.get("Credential"), parts.get("SignedHeaders"), parts.get("Signature"))
    else {
        return Err(("IncompleteSignature", "Credential, SignedHeaders and Signature are required".into()));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[0] != shared.access_key_id {
        return Err(("InvalidClientTokenId", "The security token included in the request is invalid.".into()));
    }
    if scope[2] != shared.region || scope[3] != "sns" || scope[4] != "aws4_request" {
        return Err((
            "SignatureDoesNotMatch",
            format!("Credential should be scoped to region {} and service sns", shared.region),
        ));
    }
    let amz_date = header("x-amz-date").ok_or(("IncompleteSignature", "X-Amz-Date is required".to_string()))?;
    if !amz_date.starts_with(scope[1]) {
        return Err(("SignatureDoesNotMatch", "Date in Credential scope does not match X-Amz-Date".into()));
    }
    let names: Vec<&str> = signed.split(';').collect();
    for required in ["host", "x-amz-date"] {
        if !names.contains(&required) {
            return Err(("SignatureDoesNotMatch", format!("{required} must be signed")));
        }
    }
    match (&shared.session_token, header("x-amz-security-token")) {
        (Some(want), Some(got)) if want == got && names.contains(&"x-amz-security-token") => {}
        (None, None) => {}
        _ => return Err(("InvalidClientTokenId", "The security token included in the request is invalid.".into())),
    }
    let mut canonical_headers = String::new();
    for name in &names {
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(("SignatureDoesNotMatch", format!("signed header {name} is missing")));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let creq = format!("POST\n/\n\n{canonical_headers}\n{signed}\n{}", hex::encode(Sha256::digest(body)));
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}\n{}",
        scope[1..].join("/"),
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{}", shared.secret).as_bytes(), scope[1].as_bytes());
    for s in &scope[2..] {
        key = hmac(&key, s.as_bytes());
    }
    if hex::encode(hmac(&key, sts.as_bytes())) != *signature {
        return Err((
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.".into(),
        ));
    }
    Ok(())
}

fn is_e164(s: &str) -> bool {
    s.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0'))
}

async fn action(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let injected = shared.faults.intercept(&conn, |status, retry_after| {
        let (code, kind) =
            if status.is_server_error() { ("ServiceUnavailable", "Receiver") } else { ("Throttling", "Sender") };
        let body = ([(header::CONTENT_TYPE, "text/xml")], error_xml(kind, code, "injected failure")).into_response();
        with_retry_after(status, retry_after, body)
    });
    if let Some(response) = injected.await {
        return response;
    }
    if let Err((code, message)) = check_signature(&shared, &headers, &body) {
        let status = if code == "IncompleteSignature" { StatusCode::BAD_REQUEST } else { StatusCode::FORBIDDEN };
        return refuse(&shared, status, code, &message);
    }
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let params: Option<BTreeMap<String, String>> = std::str::from_utf8(&body).ok().filter(|_| form).and_then(|text| {
        text.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                Some((form_decode(k)?, form_decode(v)?))
            })
            .collect()
    });
    let Some(params) = params else {
        return refuse(&shared, StatusCode::BAD_REQUEST, "MalformedQueryString", "a form-encoded body is expected");
    };
    let get = |k: &str| params.get(k).map(String::as_str);
    if get("Action") != Some("Publish") || get("Version") != Some("2010-03-31") {
        return refuse(&shared, StatusCode::BAD_REQUEST, "InvalidAction", "Action=Publish&Version=2010-03-31 expected");
    }
    {
        let mut record = shared.record.lock().unwrap();
        if record.throttle > 0 {
            record.throttle -= 1;
            drop(record);
            return refuse(&shared, StatusCode::BAD_REQUEST, "Throttling", "Rate exceeded");
        }
    }
    let bad =
        |m: &str| refuse(&shared, StatusCode::BAD_REQUEST, "InvalidParameter", &format!("Invalid parameter: {m}"));
    let targets = ["TopicArn", "PhoneNumber", "TargetArn"].iter().filter(|k| get(k).is_some()).count();
    if targets != 1 {
        return bad("exactly one of TopicArn, TargetArn and PhoneNumber");
    }
    let Some(message) = get("Message").filter(|m| !m.is_empty()) else { return bad("Empty message") };
    let attributes =
        params.keys().filter(|k| k.starts_with("MessageAttributes.entry.") && k.ends_with(".Name")).count();
    if attributes > 10 {
        return bad("MessageAttributes: at most 10");
    }
    let mut dedup_key = None;
    if let Some(phone) = get("PhoneNumber") {
        if !is_e164(phone) {
            return bad("PhoneNumber Reason: is not a valid phone number");
        }
        if message.encode_utf16().count() > 1600 {
            return bad("Message too long");
        }
    } else if let Some(topic) = get("TopicArn") {
        if !shared.topics.lock().unwrap().iter().any(|t| t == topic) {
            return refuse(&shared, StatusCode::NOT_FOUND, "NotFound", "Topic does not exist");
        }
        let size = message.len()
            + params.iter().filter(|(k, _)| k.starts_with("MessageAttributes.")).map(|(_, v)| v.len()).sum::<usize>();
        if size > 262_144 {
            return bad("Message too long");
        }
        let fifo = topic.ends_with(".fifo");
        match (fifo, get("MessageGroupId"), get("MessageDeduplicationId")) {
            (true, Some(g), Some(d)) if !g.is_empty() && g.len() <= 128 && !d.is_empty() && d.len() <= 128 => {
                dedup_key = Some((topic.to_string(), d.to_string()));
            }
            (true, _, _) => {
                return bad("The MessageGroupId and MessageDeduplicationId parameters are required for FIFO topics (no content-based deduplication)")
            }
            (false, _, Some(_)) => return bad("MessageDeduplicationId Reason: The request includes MessageDeduplicationId parameter that is not valid for this topic type"),
            (false, _, None) => {}
        }
    }
    let mut record = shared.record.lock().unwrap();
    let id = match dedup_key.as_ref().and_then(|k| record.dedup.get(k)) {
        // Accepted, not delivered again.
        Some(first) => first.clone(),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            record.published.push(Published { message_id: id.clone(), params: params.clone() });
            if let Some(k) = dedup_key {
                record.dedup.insert(k, id.clone());
            }
            id
        }
    };
    let xml = format!(
        "<PublishResponse xmlns=\"https://sns.amazonaws.com/doc/2010-03-31/\"><PublishResult><MessageId>{id}</MessageId>\
         </PublishResult><ResponseMetadata><RequestId>fake-request</RequestId></ResponseMetadata></PublishResponse>"
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/xml")], xml).into_response()
}
