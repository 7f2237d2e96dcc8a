//! Google's OAuth 2.0 token endpoint at the wire, for service accounts
//! (https://developers.google.com/identity/protocols/oauth2/service-account#httprest):
//! - `POST`, form-encoded, `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`
//!   and `assertion` = a JWT (400 `invalid_request` / `unsupported_grant_type` otherwise);
//! - JWT header `alg` RS256; claims `iss` = the account's e-mail, `aud` = this
//!   endpoint, `scope` naming an allowed scope, `exp` − `iat` ≤ 3600, `iat`
//!   near now (400 `invalid_grant` otherwise);
//! - the RS256 signature, checked with the account's public key (400
//!   `invalid_grant` "Invalid JWT Signature." otherwise).
//!
//! Minted tokens are what the Pub/Sub and FCM fakes accept as `Bearer`;
//! [`FakeGoogleToken::revoke_all`] makes them refuse every token so far
//! (a rotated key), which the relay must survive by minting another.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{KeyPair, RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::http::{serve, with_retry_after, Conn, Faults};

/// The service account's key, PKCS#8 PEM (a throwaway made for these tests).
pub const KEY_PEM: &str = include_str!("../../fixtures/google-test-sa-key.pem");
/// Another key: assertions signed with it must be refused.
pub const OTHER_KEY_PEM: &str = include_str!("../../fixtures/google-test-other-key.pem");
pub const CLIENT_EMAIL: &str = "relay@demo-project.iam.gserviceaccount.com";
pub const PROJECT: &str = "demo-project";

#[derive(Default)]
struct Record {
    /// Tokens minted and still good.
    valid: Vec<String>,
    minted: usize,
    requests: usize,
    rejections: Vec<String>,
}

pub struct TokenState {
    public_key: Vec<u8>,
    /// Scopes this account may ask for.
    scopes: Vec<String>,
    /// `expires_in` of minted tokens.
    expires_in: Mutex<u64>,
    url: Mutex<String>,
    faults: Faults,
    record: Mutex<Record>,
}

impl TokenState {
    /// Whether `Authorization: Bearer <token>` carries a token this endpoint minted (and did not revoke).
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
        let Some(token) = token.strip_prefix("Bearer ") else { return false };
        self.record.lock().unwrap().valid.iter().any(|t| t == token)
    }
}

pub struct FakeGoogleToken {
    pub state: Arc<TokenState>,
    task: JoinHandle<()>,
}

impl Drop for FakeGoogleToken {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn der(pem: &str) -> Vec<u8> {
    outbox_relay::providers::google_auth::pem_pkcs8(pem).expect("fixture PEM")
}

impl FakeGoogleToken {
    /// A token endpoint for [`CLIENT_EMAIL`] holding [`KEY_PEM`]'s public half.
    pub fn start(scopes: &[&str]) -> FakeGoogleToken {
        let pair = RsaKeyPair::from_pkcs8(&der(KEY_PEM)).expect("fixture key");
        let state = Arc::new(TokenState {
            public_key: pair.public_key().as_ref().to_vec(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_in: Mutex::new(3599),
            url: Mutex::new(String::new()),
            faults: Faults::default(),
            record: Mutex::new(Record::default()),
        });
        let router = Router::new().route("/token", post(token)).with_state(state.clone());
        let (base, task) = serve(router);
        *state.url.lock().unwrap() = format!("{base}/token");
        FakeGoogleToken { state, task }
    }

    pub fn token_uri(&self) -> String {
        self.state.url.lock().unwrap().clone()
    }

    /// The service-account JSON key Google's console hands out, pointing here.
    pub fn key_json(&self) -> String {
        self.key_json_with(KEY_PEM)
    }

    pub fn key_json_with(&self, pem: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
        })
        .to_string()
    }

    pub fn set_expires_in(&self, secs: u64) {
        *self.state.expires_in.lock().unwrap() = secs;
    }

    /// Token requests answered so far (minted or refused).
    pub fn requests(&self) -> usize {
        self.state.record.lock().unwrap().requests
    }

    pub fn minted(&self) -> usize {
        self.state.record.lock().unwrap().minted
    }

    pub fn rejections(&self) -> Vec<String> {
        self.state.record.lock().unwrap().rejections.clone()
    }

    /// Every token minted so far stops working.
    pub fn revoke_all(&self) {
        self.state.record.lock().unwrap().valid.clear();
    }

    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        self.state.faults.fail_next(n, status, retry_after);
    }
}

fn oauth_error(state: &TokenState, status: StatusCode, error: &str, description: &str) -> Response {
    state.record.lock().unwrap().rejections.push(format!("{error}: {description}"));
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
}

async fn token(
    State(state): State<Arc<TokenState>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.record.lock().unwrap().requests += 1;
    let injected = state.faults.intercept(&conn, |status, retry_after| {
        with_retry_after(status, retry_after, Json(json!({"error": "internal_failure"})).into_response())
    });
    if let Some(response) = injected.await {
        return response;
    }
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(&state, StatusCode::BAD_REQUEST, "invalid_request", "form-encoded body required");
    }
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return oauth_error(&state, StatusCode::BAD_REQUEST, "unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error(
            &state,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    if let Err(why) = check_jwt(&state, assertion) {
        return oauth_error(&state, StatusCode::BAD_REQUEST, "invalid_grant", &why);
    }
    let mut record = state.record.lock().unwrap();
    record.minted += 1;
    let token = format!("ya29.fake-{}-{}", record.minted, std::process::id());
    record.valid.push(token.clone());
    let expires_in = *state.expires_in.lock().unwrap();
    Json(json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"})).into_response()
}

fn check_jwt(state: &TokenState, jwt: &str) -> Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("Invalid JWT: not three segments".into());
    }
    let decode = |s: &str| -> Result<Value, String> {
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| "Invalid JWT: not base64url".to_string())?;
        serde_json::from_slice(&bytes).map_err(|_| "Invalid JWT: not JSON".to_string())
    };
    let header = decode(parts[0])?;
    if header["alg"] != "RS256" {
        return Err("Invalid JWT: alg must be RS256".into());
    }
    let signature = URL_SAFE_NO_PAD.decode(parts[2]).map_err(|_| "Invalid JWT Signature.".to_string())?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &state.public_key)
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.".to_string())?;
    let claims = decode(parts[1])?;
    if claims["iss"] != CLIENT_EMAIL {
        return Err("Invalid JWT: unknown iss".into());
    }
    if claims["aud"].as_str() != Some(state.url.lock().unwrap().as_str()) {
        return Err("Invalid JWT: aud must be the token endpoint".into());
    }
    let scope = claims["scope"].as_str().unwrap_or("");
    if scope.split(' ').any(|s| !state.scopes.iter().any(|a| a == s)) || scope.is_empty() {
        return Err("Invalid JWT: scope not allowed for this account".into());
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return Err("Invalid JWT: iat and exp are required".into());
    };
    let now = chrono::Utc::now().timestamp();
    if exp <= iat || exp - iat > 3600 || (iat - now).abs() > 300 {
        return Err("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.".into());
    }
    Ok(())
}
