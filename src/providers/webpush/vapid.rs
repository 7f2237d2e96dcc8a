//! VAPID (RFC 8292): the application server's identity on each push request.
//!
//! `Authorization: vapid t=<JWT>, k=<public key>`: the JWT is signed ES256
//! with the server's P-256 key, its `aud` is the push service's origin, `exp`
//! at most 24 hours ahead (RFC 8292 §2), `sub` a `mailto:` or `https:`
//! contact; `k` is the key the browser was given as `applicationServerKey`
//! when it subscribed, and the push service refuses a request signed by
//! another one.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// How far ahead a token expires: RFC 8292 §2 allows 24 hours at most; half
/// of that leaves room for the push service's clock being ahead of ours.
pub const TOKEN_LIFETIME_S: u64 = 12 * 3600;

/// Why the VAPID key or subject cannot be used. Permanent: a config to fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VapidError {
    #[error("providers.webpush.private_key: {0}")]
    Key(String),
    #[error("providers.webpush.subject {0:?}: must be a mailto: or https: URI (RFC 8292 §2.1)")]
    Subject(String),
    #[error("signing the VAPID token failed")]
    Sign,
}

/// The signing key and what the push service is told about it.
pub struct Vapid {
    key: EcdsaKeyPair,
    /// `k=`: the uncompressed public point, base64url; the browser's applicationServerKey.
    public_b64: String,
    subject: String,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid").field("public_key", &self.public_b64).finish_non_exhaustive()
    }
}

impl Vapid {
    /// `private_key`: PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`, what
    /// `outbox-relay vapid-keys` and `openssl genpkey` write), or the raw
    /// 32-byte scalar in base64url (what `web-push generate-vapid-keys`
    /// prints), which needs `public_key` beside it.
    pub fn new(
        private_key: &str,
        public_key: Option<&str>,
        subject: &str,
        rng: &SystemRandom,
    ) -> Result<Vapid, VapidError> {
        let subject = subject.trim();
        let contact = subject.strip_prefix("mailto:").or_else(|| subject.strip_prefix("https://"));
        if contact.is_none_or(|rest| rest.trim().is_empty()) {
            return Err(VapidError::Subject(subject.to_string()));
        }
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let text = private_key.trim();
        let key = if text.starts_with("-----BEGIN") {
            let der = pem_pkcs8(text)?;
            let key = EcdsaKeyPair::from_pkcs8(alg, &der, rng)
                .map_err(|e| VapidError::Key(format!("not a P-256 PKCS#8 key ({e})")))?;
            if let Some(given) = public_key {
                if decode(given)? != key.public_key().as_ref() {
                    return Err(VapidError::Key("public_key is not the private key's".into()));
                }
            }
            key
        } else {
            let scalar = decode(text)?;
            let Some(public) = public_key else {
                return Err(VapidError::Key(
                    "a raw key needs providers.webpush.public_key too (or give a PEM PKCS#8 key)".into(),
                ));
            };
            EcdsaKeyPair::from_private_key_and_public_key(alg, &scalar, &decode(public)?, rng)
                .map_err(|_| VapidError::Key("the raw private key and public_key are not one P-256 pair".into()))?
        };
        let public_b64 = URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
        Ok(Vapid { key, public_b64, subject: subject.to_string() })
    }

    /// The browser's `applicationServerKey` (base64url).
    pub fn public_key(&self) -> &str {
        &self.public_b64
    }

    /// The `Authorization` header's value for a push service at `origin`
    /// (`https://fcm.googleapis.com`), the token expiring [`TOKEN_LIFETIME_S`] from `now`.
    pub fn authorization(&self, origin: &str, now: SystemTime, rng: &SystemRandom) -> Result<String, VapidError> {
        let exp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + TOKEN_LIFETIME_S;
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": origin, "exp": exp, "sub": self.subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let signature = self.key.sign(rng, signed.as_bytes()).map_err(|_| VapidError::Sign)?;
        Ok(format!("vapid t={signed}.{}, k={}", URL_SAFE_NO_PAD.encode(signature.as_ref()), self.public_b64))
    }
}

/// A new VAPID key pair: the PEM PKCS#8 private key and the base64url
/// public key (for `outbox-relay vapid-keys`).
pub fn generate() -> Result<(String, String), VapidError> {
    let rng = SystemRandom::new();
    let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| VapidError::Key("generation failed".into()))?;
    let key =
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| VapidError::Key("generated key".into()))?;
    let b64 = STANDARD.encode(pkcs8.as_ref());
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"));
    Ok((pem, URL_SAFE_NO_PAD.encode(key.public_key().as_ref())))
}

fn pem_pkcs8(text: &str) -> Result<Vec<u8>, VapidError> {
    if text.contains("BEGIN EC PRIVATE KEY") {
        return Err(VapidError::Key(
            "SEC1 \"EC PRIVATE KEY\": convert it with `openssl pkcs8 -topk8 -nocrypt -in key.pem`".into(),
        ));
    }
    if !text.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(VapidError::Key("PEM must be an unencrypted \"PRIVATE KEY\" (PKCS#8)".into()));
    }
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    STANDARD.decode(body).map_err(|_| VapidError::Key("PEM body is not base64".into()))
}

/// base64url with or without padding; also the standard alphabet, which
/// some tools print.
pub fn decode(text: &str) -> Result<Vec<u8>, VapidError> {
    let t = text.trim().trim_end_matches('=').replace('+', "-").replace('/', "_");
    URL_SAFE_NO_PAD.decode(t).map_err(|_| VapidError::Key("not base64url".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn a_token_a_push_service_accepts() {
        let (pem, public) = generate().unwrap();
        let rng = SystemRandom::new();
        let vapid = Vapid::new(&pem, None, "mailto:ops@example.com", &rng).unwrap();
        assert_eq!(vapid.public_key(), public);
        let now = SystemTime::now();
        let auth = vapid.authorization("https://push.example.net", now, &rng).unwrap();
        let (t, k) = auth.strip_prefix("vapid t=").unwrap().split_once(", k=").unwrap();
        assert_eq!(k, public);
        let (signed, sig) = t.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, decode(k).unwrap())
            .verify(signed.as_bytes(), &decode(sig).unwrap())
            .expect("ES256 over header.claims with the k key");
        let claims: serde_json::Value =
            serde_json::from_slice(&decode(signed.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.net");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let exp = claims["exp"].as_u64().unwrap();
        let at = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(exp > at && exp <= at + 24 * 3600, "in the future, at most 24 h ahead");
    }

    #[test]
    fn raw_keys_need_their_public_half_and_subjects_are_uris() {
        let rng = SystemRandom::new();
        let (pem, public) = generate().unwrap();
        // The raw scalar of a ring PKCS#8 document sits at a fixed offset (36..68).
        let der = pem_pkcs8(&pem).unwrap();
        let raw = URL_SAFE_NO_PAD.encode(&der[36..68]);
        let v = Vapid::new(&raw, Some(&public), "https://example.com/contact", &rng).unwrap();
        assert_eq!(v.public_key(), public);
        assert!(Vapid::new(&raw, None, "mailto:a@b.c", &rng).unwrap_err().to_string().contains("public_key"));
        let (_, other) = generate().unwrap();
        assert!(Vapid::new(&raw, Some(&other), "mailto:a@b.c", &rng).is_err());
        assert!(Vapid::new(&pem, Some(&other), "mailto:a@b.c", &rng).is_err());
        for bad in ["ops@example.com", "mailto:", "http://example.com", ""] {
            assert_eq!(Vapid::new(&pem, None, bad, &rng).unwrap_err(), VapidError::Subject(bad.into()));
        }
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----";
        assert!(Vapid::new(sec1, None, "mailto:a@b.c", &rng).unwrap_err().to_string().contains("pkcs8"));
    }

    #[test]
    fn the_key_never_prints() {
        let (pem, _) = generate().unwrap();
        let v = Vapid::new(&pem, None, "mailto:a@b.c", &SystemRandom::new()).unwrap();
        let body: String = pem.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!format!("{v:?}").contains(&body));
    }
}
