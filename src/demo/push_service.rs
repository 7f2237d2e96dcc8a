//! A local Web Push service: the demo's browser stand-in and the tests' fake.
//!
//! It holds subscriptions the way a browser and its push service do between
//! them — a P-256 key pair and an `auth` secret per subscription (the
//! browser's side of RFC 8291), an endpoint URL per subscription — and
//! checks each push as a push service would before taking it:
//!
//! - RFC 8030 §5: `POST /push/<id>`, `TTL` present (§5.2), `Urgency` one of
//!   its four values if present (§5.4), `Content-Encoding: aes128gcm`;
//!   `201 Created` with a `Location` on acceptance; 404 for an unknown
//!   subscription, 410 for one unsubscribed (§7.3); 413 over 4096 bytes of
//!   body (RFC 8291 §4).
//! - RFC 8292: `Authorization: vapid t=<JWT>, k=<key>`: ES256 signature
//!   valid for `k`, `aud` this service's origin, `exp` in the future and at
//!   most 24 h ahead, `sub` a `mailto:` or `https:` URI (401 otherwise); `k`
//!   the subscription's `applicationServerKey` when it was given one (403).
//!
//! Then it *decrypts* the body with the subscription's private key, as the
//! browser would, and keeps the plaintext: a push it cannot decrypt is
//! refused (400), so a received message proves the encryption end to end.
//! Tests may make a subscription answer a given status next ([`PushService::fail_next`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use tokio::task::JoinHandle;

use crate::providers::webpush::ece;

/// The browser's side of one subscription: its key pair and auth secret.
pub struct Subscriber {
    secret: p256::SecretKey,
    public: Vec<u8>,
    auth: [u8; 16],
}

impl Subscriber {
    /// A fresh key pair and auth secret, as `pushManager.subscribe()` makes.
    pub fn generate() -> Subscriber {
        let rng = SystemRandom::new();
        let secret = loop {
            let mut scalar = [0u8; 32];
            rng.fill(&mut scalar).expect("system random source");
            // All but a 2^-128 sliver of 32-byte strings are valid scalars.
            if let Ok(s) = p256::SecretKey::from_slice(&scalar) {
                break s;
            }
        };
        let mut auth = [0u8; 16];
        rng.fill(&mut auth).expect("system random source");
        let public = secret.public_key().to_sec1_bytes().to_vec();
        Subscriber { secret, public, auth }
    }

    /// `keys.p256dh` of the subscription's JSON (base64url).
    pub fn p256dh(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.public)
    }

    /// `keys.auth` (base64url).
    pub fn auth(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.auth)
    }

    /// What the browser does with a push body (RFC 8291 §3.4, RFC 8188 §2).
    pub fn decrypt(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let (salt, _rs, keyid) = ece::header(body).map_err(|e| e.to_string())?;
        let sender = p256::PublicKey::from_sec1_bytes(keyid).map_err(|_| "keyid is not a P-256 point".to_string())?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender.as_affine());
        let keys =
            ece::derive(shared.raw_secret_bytes(), &self.auth, &self.public, keyid, salt).map_err(|e| e.to_string())?;
        ece::open(&keys, body).map_err(|e| e.to_string())
    }
}

/// One push as the service took it, decrypted.
#[derive(Clone, Debug)]
pub struct Received {
    /// The subscription's id (the endpoint's last segment).
    pub subscription: String,
    pub ttl: u32,
    pub urgency: Option<String>,
    /// The VAPID token's `sub`.
    pub sender: String,
    /// What the service worker's `push` event reads.
    pub plaintext: String,
}

struct Subscription {
    keys: Subscriber,
    /// The `applicationServerKey` the subscription was made with, if any:
    /// pushes signed with another key are refused (403).
    server_key: Option<String>,
    gone: bool,
    /// Statuses to answer next (with Retry-After), before looking at the push.
    fail: VecDeque<(u16, Option<String>)>,
}

#[derive(Default)]
struct Inner {
    origin: String,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    received: Mutex<Vec<Received>>,
    /// Pushes refused, by status: what each refused request was answered.
    refused: Mutex<Vec<(String, u16, String)>>,
}

/// A subscription's three values, as `tokens_query` would return them.
#[derive(Clone, Debug)]
pub struct SubscriptionInfo {
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
}

/// The running service.
pub struct PushService {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for PushService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PushService {
    /// Listens on 127.0.0.1 (any free port).
    pub async fn start() -> std::io::Result<PushService> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let origin = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Inner { origin, ..Default::default() });
        let app = Router::new().route("/push/{id}", post(push)).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(PushService { inner, task })
    }

    /// `http://127.0.0.1:<port>`: the `aud` a VAPID token for it must carry.
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// A new subscription `id` (a browser calling `pushManager.subscribe`,
    /// with `server_key` as `applicationServerKey` if given).
    pub fn subscribe(&self, id: &str, server_key: Option<&str>) -> SubscriptionInfo {
        let keys = Subscriber::generate();
        let info = SubscriptionInfo {
            endpoint: format!("{}/push/{id}", self.inner.origin),
            p256dh: keys.p256dh(),
            auth: keys.auth(),
        };
        let sub = Subscription { keys, server_key: server_key.map(str::to_string), gone: false, fail: VecDeque::new() };
        self.lock_subs().insert(id.to_string(), sub);
        info
    }

    /// The user unsubscribed (or the browser dropped it): pushes get 410 Gone.
    pub fn unsubscribe(&self, id: &str) {
        if let Some(s) = self.lock_subs().get_mut(id) {
            s.gone = true;
        }
    }

    /// The next `n` pushes to `id` are answered `status` (and Retry-After).
    pub fn fail_next(&self, id: &str, n: usize, status: u16, retry_after: Option<&str>) {
        if let Some(s) = self.lock_subs().get_mut(id) {
            s.fail.extend(std::iter::repeat_n((status, retry_after.map(str::to_string)), n));
        }
    }

    /// Every push taken so far, decrypted, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every push refused so far: (subscription, status, why).
    pub fn refused(&self) -> Vec<(String, u16, String)> {
        self.inner.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock_subs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        self.inner.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn push(State(inner): State<Arc<Inner>>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    match take(&inner, &id, &headers, &body) {
        Ok(received) => {
            inner.received.lock().unwrap_or_else(|p| p.into_inner()).push(received);
            let location = format!("{}/message/{}", inner.origin, uuid::Uuid::new_v4());
            (StatusCode::CREATED, [("location", location)]).into_response()
        }
        Err((status, why, retry_after)) => {
            inner.refused.lock().unwrap_or_else(|p| p.into_inner()).push((id, status.as_u16(), why.clone()));
            let mut response = (status, why).into_response();
            if let Some(v) = retry_after.and_then(|v| v.parse().ok()) {
                response.headers_mut().insert("retry-after", v);
            }
            response
        }
    }
}

type Refusal = (StatusCode, String, Option<String>);

fn take(inner: &Inner, id: &str, headers: &HeaderMap, body: &[u8]) -> Result<Received, Refusal> {
    let refuse = |status: StatusCode, why: &str| (status, why.to_string(), None);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut subs = inner.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sub) = subs.get_mut(id) else { return Err(refuse(StatusCode::NOT_FOUND, "no such subscription")) };
    if let Some((status, retry_after)) = sub.fail.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err((status, "failure asked for by the test".into(), retry_after));
    }
    if sub.gone {
        return Err(refuse(StatusCode::GONE, "subscription expired or unsubscribed"));
    }
    let ttl = header("ttl")
        .and_then(|t| t.parse::<u32>().ok())
        .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "TTL header missing or not a number (RFC 8030 §5.2)"))?;
    let urgency = header("urgency").map(str::to_string);
    if urgency.as_deref().is_some_and(|u| !["very-low", "low", "normal", "high"].contains(&u)) {
        return Err(refuse(StatusCode::BAD_REQUEST, "Urgency is not very-low, low, normal or high (RFC 8030 §5.4)"));
    }
    if header("content-encoding") != Some("aes128gcm") {
        return Err(refuse(StatusCode::BAD_REQUEST, "Content-Encoding must be aes128gcm (RFC 8291 §4)"));
    }
    if body.len() > ece::MAX_RECORD {
        return Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, "body over 4096 bytes (RFC 8291 §4)"));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (key, sender) = check_vapid(header("authorization").unwrap_or(""), &inner.origin, now)
        .map_err(|why| (StatusCode::UNAUTHORIZED, why, None))?;
    if sub.server_key.as_ref().is_some_and(|k| *k != key) {
        return Err(refuse(StatusCode::FORBIDDEN, "VAPID key is not the subscription's applicationServerKey"));
    }
    let plaintext =
        sub.keys.decrypt(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("cannot decrypt: {e}"), None))?;
    let plaintext =
        String::from_utf8(plaintext).map_err(|_| refuse(StatusCode::BAD_REQUEST, "plaintext is not UTF-8"))?;
    Ok(Received { subscription: id.to_string(), ttl, urgency, sender, plaintext })
}

/// Checks `Authorization: vapid t=<JWT>, k=<key>` as RFC 8292 §2–§3 asks;
/// returns the key `k` and the token's `sub`.
pub fn check_vapid(authorization: &str, origin: &str, now: u64) -> Result<(String, String), String> {
    let params = authorization.strip_prefix("vapid ").ok_or("Authorization is not the vapid scheme")?;
    let (mut t, mut k) = (None, None);
    for part in params.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.trim()),
            Some(("k", v)) => k = Some(v.trim()),
            _ => {}
        }
    }
    let (Some(t), Some(k)) = (t, k) else { return Err("vapid needs t= and k=".into()) };
    let b64 = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| "token or key is not base64url".to_string());
    let key = b64(k)?;
    if key.len() != 65 || key[0] != 4 {
        return Err("k is not an uncompressed P-256 public key".into());
    }
    let (signed, signature) = t.rsplit_once('.').ok_or("token is not a JWT")?;
    let (head, claims) = signed.split_once('.').ok_or("token is not a JWT")?;
    let head: serde_json::Value = serde_json::from_slice(&b64(head)?).map_err(|_| "JWT header is not JSON")?;
    if head["alg"] != "ES256" {
        return Err("JWT alg is not ES256".into());
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key)
        .verify(signed.as_bytes(), &b64(signature)?)
        .map_err(|_| "JWT signature does not verify with k")?;
    let claims: serde_json::Value = serde_json::from_slice(&b64(claims)?).map_err(|_| "JWT claims are not JSON")?;
    if claims["aud"] != origin {
        return Err(format!("JWT aud {} is not this push service's origin {origin}", claims["aud"]));
    }
    let exp = claims["exp"].as_u64().ok_or("JWT has no exp")?;
    if exp <= now {
        return Err("JWT expired".into());
    }
    if exp > now + 24 * 3600 {
        return Err("JWT exp is more than 24 hours ahead (RFC 8292 §2)".into());
    }
    let sub = claims["sub"].as_str().unwrap_or("");
    if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
        return Err("JWT sub is not a mailto: or https: URI".into());
    }
    Ok((k.to_string(), sub.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::webpush::vapid::{generate, Vapid};

    #[test]
    fn vapid_tokens_are_checked() {
        let rng = SystemRandom::new();
        let (pem, public) = generate().unwrap();
        let vapid = Vapid::new(&pem, None, "mailto:ops@example.com", &rng).unwrap();
        let at = SystemTime::now();
        let now = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let auth = vapid.authorization("http://127.0.0.1:1", at, &rng).unwrap();
        assert_eq!(
            check_vapid(&auth, "http://127.0.0.1:1", now),
            Ok((public.clone(), "mailto:ops@example.com".into()))
        );
        assert!(check_vapid(&auth, "http://127.0.0.1:2", now).unwrap_err().contains("aud"));
        assert!(check_vapid(&auth, "http://127.0.0.1:1", now + 13 * 3600).unwrap_err().contains("expired"));
        assert!(check_vapid(&auth, "http://127.0.0.1:1", now - 13 * 3600).unwrap_err().contains("24 hours"));
        let (_, other) = generate().unwrap();
        let forged = auth.replace(&public, &other);
        assert!(check_vapid(&forged, "http://127.0.0.1:1", now).unwrap_err().contains("signature"));
    }

    #[test]
    fn a_subscriber_reads_what_the_relay_encrypts() {
        let s = Subscriber::generate();
        let body = ece::encrypt(
            b"{\"hello\":1}",
            &URL_SAFE_NO_PAD.decode(s.p256dh()).unwrap(),
            &URL_SAFE_NO_PAD.decode(s.auth()).unwrap(),
            &SystemRandom::new(),
        )
        .unwrap();
        assert_eq!(s.decrypt(&body).unwrap(), b"{\"hello\":1}");
        assert!(Subscriber::generate().decrypt(&body).is_err(), "another subscriber's key cannot");
    }
}
