//! Google service-account authentication, shared by the Google providers
//! (Pub/Sub, FCM): an OAuth 2.0 access token minted from a service-account
//! key, cached until shortly before it expires.
//!
//! The flow is Google's "server to server" one
//! (https://developers.google.com/identity/protocols/oauth2/service-account#httprest):
//! a JWT with header `{"alg":"RS256","typ":"JWT"}` and claims `iss` = the
//! key's `client_email`, `scope`, `aud` = the key's `token_uri`, `iat` and
//! `exp` = `iat` + 3600, signed RSASSA-PKCS1-v1_5 SHA-256 with the key's
//! PKCS#8 private key, POSTed form-encoded to `token_uri` as
//! `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>`.
//! The answer's `access_token` goes out as `Authorization: Bearer` until
//! [`REFRESH_MARGIN`] before its `expires_in`.
//!
//! One token per client (per scope), shared by every worker; a refresh holds
//! the lock, so a burst of workers after expiry makes one token request, not
//! one each. A 401 from the API makes the caller [`GoogleAuth::forget`] the
//! token, so the next call mints a fresh one (a key rotated mid-hour).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use serde_json::json;

use super::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use super::ProviderError;
use crate::secret::{read_secret_file, Secret};

/// Google's token endpoint, for keys that do not name one.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// "The maximum value is 1 hour after the issued time" (the `exp` claim).
pub const ASSERTION_LIFETIME_S: i64 = 3600;

/// A token is renewed this long before Google says it expires: a call that
/// starts with it must not reach Google after expiry, and clocks drift.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// The JWT grant type Google's token endpoint takes for service accounts.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a service-account JSON key file that the flow needs
/// (the file holds more: `client_id`, `auth_uri`, ...; ignored).
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: String,
    client_email: String,
    token_uri: Option<String>,
}

/// A parsed service-account key. The private key lives only inside ring's
/// key pair, so neither `Debug` nor a log line can print it.
#[derive(Clone)]
pub struct ServiceAccountKey {
    /// The JWT's `iss`; also what error messages name (an identity, not a secret).
    pub client_email: String,
    /// Default project for providers whose config leaves it out.
    pub project_id: Option<String>,
    /// The JWT's `aud` and where the assertion is POSTed.
    pub token_uri: String,
    /// Sent as the JWT header's `kid`, so Google picks the key without trying each.
    pub private_key_id: Option<String>,
    key_pair: Arc<RsaKeyPair>,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

fn bad_key(reason: impl std::fmt::Display) -> ProviderError {
    ProviderError::Permanent { reason: format!("google service account key: {reason}") }
}

impl ServiceAccountKey {
    /// From `service_account_file` (a path) or `service_account_json` (the
    /// JSON itself, a secret, `file:` allowed): exactly one of them.
    pub fn load(file: Option<&str>, inline: Option<&Secret>) -> Result<ServiceAccountKey, ProviderError> {
        let json = match (file, inline) {
            (Some(path), None) => read_secret_file(std::path::Path::new(path)).map_err(bad_key)?,
            (None, Some(json)) => json.expose().to_string(),
            _ => return Err(bad_key("set exactly one of service_account_file and service_account_json")),
        };
        ServiceAccountKey::from_json(&json)
    }

    /// Parses the JSON key Google's console downloads.
    pub fn from_json(json: &str) -> Result<ServiceAccountKey, ProviderError> {
        // serde's error quotes the input near the fault: keep only its position.
        let file: KeyFile = serde_json::from_str(json).map_err(|e| {
            bad_key(format!("not a service-account JSON key (line {}, column {})", e.line(), e.column()))
        })?;
        if file.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(bad_key(format!("type is {:?}, expected \"service_account\"", file.kind.unwrap_or_default())));
        }
        let der = pem_pkcs8(&file.private_key).ok_or_else(|| bad_key("private_key is not a PEM \"PRIVATE KEY\""))?;
        let key_pair = RsaKeyPair::from_pkcs8(&der).map_err(|e| bad_key(format!("private_key: {e}")))?;
        Ok(ServiceAccountKey {
            client_email: file.client_email,
            project_id: file.project_id,
            token_uri: file.token_uri.unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string()),
            private_key_id: file.private_key_id,
            key_pair: Arc::new(key_pair),
        })
    }

    /// The signed JWT asking for `scope`, issued at `now` (Unix seconds).
    pub fn assertion(&self, scope: &str, now: i64) -> Result<String, ProviderError> {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        });
        let signing_input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0u8; self.key_pair.public().modulus_len()];
        self.key_pair
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut signature)
            .map_err(|_| bad_key("RSA signing failed"))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// The DER inside a PEM `-----BEGIN PRIVATE KEY-----` block (PKCS#8, what
/// Google's key files hold; `\n` escapes are already newlines after JSON).
pub fn pem_pkcs8(pem: &str) -> Option<Vec<u8>> {
    let begin = "-----BEGIN PRIVATE KEY-----";
    let end = "-----END PRIVATE KEY-----";
    let start = pem.find(begin)? + begin.len();
    let stop = start + pem[start..].find(end)?;
    let body: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(body).ok()
}

/// A token minted from one key for one scope, shared by clones.
#[derive(Clone)]
pub struct GoogleAuth {
    inner: Arc<Inner>,
}

struct Inner {
    key: ServiceAccountKey,
    scope: String,
    http: reqwest::Client,
    /// The token endpoint call's own timeout (the provider's `timeout_ms`).
    timeout: Duration,
    /// `None` until the first call, and after [`GoogleAuth::forget`].
    cached: tokio::sync::Mutex<Option<Cached>>,
}

struct Cached {
    token: Secret,
    /// When to mint the next one: expiry less the margin.
    renew_at: Instant,
}

impl std::fmt::Debug for GoogleAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleAuth").field("key", &self.inner.key).field("scope", &self.inner.scope).finish()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

fn default_expires_in() -> u64 {
    3600
}

impl GoogleAuth {
    pub fn new(key: ServiceAccountKey, scope: &str, http: reqwest::Client, timeout: Duration) -> GoogleAuth {
        GoogleAuth {
            inner: Arc::new(Inner {
                key,
                scope: scope.to_string(),
                http,
                timeout,
                cached: tokio::sync::Mutex::new(None),
            }),
        }
    }

    pub fn key(&self) -> &ServiceAccountKey {
        &self.inner.key
    }

    /// A valid access token: the cached one, or a new one from the token
    /// endpoint (one request at a time: the others wait for its answer).
    pub async fn token(&self) -> Result<Secret, ProviderError> {
        let mut slot = self.inner.cached.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| Instant::now() < c.renew_at) {
            return Ok(c.token.clone());
        }
        let started = Instant::now();
        let answer = self.mint().await?;
        let lifetime = Duration::from_secs(answer.expires_in);
        // A token shorter-lived than twice the margin is used for half its life.
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let token = Secret::new(answer.access_token);
        *slot = Some(Cached { token: token.clone(), renew_at: started + lifetime - margin });
        Ok(token)
    }

    /// Drops `token` if it is still the cached one: the API refused it (401),
    /// so the next [`GoogleAuth::token`] mints another.
    pub async fn forget(&self, token: &Secret) {
        let mut slot = self.inner.cached.lock().await;
        if slot.as_ref().is_some_and(|c| &c.token == token) {
            *slot = None;
        }
    }

    async fn mint(&self) -> Result<TokenAnswer, ProviderError> {
        let key = &self.inner.key;
        let now = chrono::Utc::now().timestamp();
        let assertion = key.assertion(&self.inner.scope, now)?;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", GRANT_TYPE)
            .append_pair("assertion", &assertion)
            .finish();
        let response = self
            .inner
            .http
            .post(&key.token_uri)
            .timeout(self.inner.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("google token endpoint", e, self.inner.timeout))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        if (200..300).contains(&status) {
            return serde_json::from_str::<TokenAnswer>(&text).map_err(|_| ProviderError::Retryable {
                reason: "google token endpoint: answer without access_token".into(),
                retry_after: None,
            });
        }
        Err(token_error(status, &text, &key.client_email, wait))
    }
}

/// The token endpoint's refusal classed: OAuth 2.0 errors (RFC 6749 §5.2)
/// `invalid_grant` (bad signature, unknown or deleted key, clock skew),
/// `invalid_client`, `unauthorized_client` need a human; 429 and 5xx pass.
fn token_error(status: u16, body: &str, email: &str, wait: Option<Duration>) -> ProviderError {
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_default();
    let reason = format!("google token endpoint answered {status} for {email}: {}", truncate(body, MAX_REASON_BODY));
    match (status, error.as_str()) {
        (429 | 500..=599, _) => ProviderError::Retryable { reason, retry_after: wait },
        (400 | 401 | 403, "invalid_grant" | "invalid_client" | "unauthorized_client" | "access_denied") => {
            ProviderError::Unauthorized { reason }
        }
        (401 | 403, _) => ProviderError::Unauthorized { reason },
        _ => ProviderError::Permanent { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_PEM: &str = include_str!("../../tests/fixtures/google-test-sa-key.pem");

    fn key_json(token_uri: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": "demo-project",
            "private_key_id": "kid-1",
            "private_key": KEY_PEM,
            "client_email": "relay@demo-project.iam.gserviceaccount.com",
            "token_uri": token_uri,
        })
        .to_string()
    }

    #[test]
    fn assertion_is_a_signed_rs256_jwt_with_googles_claims() {
        let key = ServiceAccountKey::from_json(&key_json("https://oauth2.googleapis.com/token")).unwrap();
        let jwt = key.assertion("https://www.googleapis.com/auth/pubsub", 1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, json!({"alg": "RS256", "typ": "JWT", "kid": "kid-1"}));
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            json!({"iss": "relay@demo-project.iam.gserviceaccount.com", "scope": "https://www.googleapis.com/auth/pubsub",
                   "aud": "https://oauth2.googleapis.com/token", "iat": 1_700_000_000, "exp": 1_700_003_600})
        );
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.key_pair.public().as_ref().to_vec(),
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        public.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("signature verifies");
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        let e = ServiceAccountKey::from_json("{\"private_key\": \"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\", \"client_email\": \"x\"}").unwrap_err();
        assert!(matches!(&e, ProviderError::Permanent { reason } if reason.contains("private_key")), "{e:?}");
        let e = ServiceAccountKey::from_json(
            "{\"type\": \"authorized_user\", \"private_key\": \"\", \"client_email\": \"x\"}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("authorized_user"), "{e}");
        let e = ServiceAccountKey::from_json("{\"private_key\": \"s3cr3t-material\" ").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        let e = ServiceAccountKey::load(None, None).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let key = ServiceAccountKey::from_json(&key_json("https://t")).unwrap();
        assert!(!format!("{key:?}").contains("PRIVATE"), "Debug never shows the key");
    }

    #[test]
    fn token_endpoint_refusals_are_classed() {
        let e = |status, body: &str| token_error(status, body, "a@b", None);
        assert!(matches!(
            e(400, r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#),
            ProviderError::Unauthorized { .. }
        ));
        assert!(matches!(e(401, r#"{"error":"invalid_client"}"#), ProviderError::Unauthorized { .. }));
        assert!(matches!(e(400, r#"{"error":"invalid_scope"}"#), ProviderError::Permanent { .. }));
        assert!(e(503, "").is_retryable());
        assert!(e(429, "").is_retryable());
    }
}
