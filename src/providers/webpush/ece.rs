//! Web Push message encryption (RFC 8291) in the `aes128gcm` content coding
//! (RFC 8188), with `ring`.
//!
//! The key agreement (an ephemeral P-256 key per message, ECDH with the
//! subscription's `p256dh`) is apart from the derivation and the record
//! ([`derive`], [`seal`]), which take the shared secret as input: ring will
//! not import a fixed ephemeral key, and the RFC's worked example (Appendix
//! A) fixes one. The example then checks everything but the ECDH itself,
//! which ring does and the demo's push service (src/demo/push_service.rs)
//! redoes with the browser's side of the keys.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// Record size written in the header. One record holds the whole message:
/// a push message is at most [`MAX_RECORD`] octets, below this.
pub const RECORD_SIZE: u32 = 4096;

/// Header: salt (16) ‖ rs (4) ‖ idlen (1) ‖ keyid = the sender's public key (65).
pub const HEADER_LEN: usize = 16 + 4 + 1 + 65;

/// AES-GCM tag (16) and the last-record padding delimiter (1).
const OVERHEAD: usize = 16 + 1;

/// RFC 8291 §4: push services must accept 4096 octets of payload, the whole
/// encrypted body; they may refuse more (413). Larger messages are refused
/// before sending.
pub const MAX_RECORD: usize = 4096;

/// The longest plaintext that fits in [`MAX_RECORD`]: 3993 octets.
pub const MAX_PLAINTEXT: usize = MAX_RECORD - HEADER_LEN - OVERHEAD;

/// Why a message could not be encrypted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EceError {
    /// The subscription's keys are not what a browser gives (`p256dh`: a
    /// 65-byte uncompressed P-256 point, `auth`: 16 bytes). Permanent.
    #[error("subscription keys: {0}")]
    BadKeys(&'static str),
    /// Over [`MAX_PLAINTEXT`]: no push service has to take it. Permanent.
    #[error(
        "payload of {0} bytes is over the {MAX_PLAINTEXT} a Web Push message can carry (RFC 8291 §4: 4096 encrypted)"
    )]
    TooLarge(usize),
    /// The system's random source or the cipher failed: not the message's fault.
    #[error("encryption failed: {0}")]
    Crypto(&'static str),
}

/// Key and nonce for the one record (RFC 8291 §3.3, §3.4; RFC 8188 §2.2, §2.3).
pub struct Keys {
    pub cek: [u8; 16],
    pub nonce: [u8; 12],
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]], out: &mut [u8]) -> Result<(), EceError> {
    prk.expand(info, Len(out.len())).and_then(|okm| okm.fill(out)).map_err(|_| EceError::Crypto("HKDF expand"))
}

/// From the ECDH shared secret: `IKM = HKDF(auth, ecdh, "WebPush: info" ‖ 0 ‖
/// ua_public ‖ as_public, 32)`, then `CEK = HKDF(salt, IKM, "Content-Encoding:
/// aes128gcm" ‖ 0, 16)` and `NONCE = HKDF(salt, IKM, "Content-Encoding: nonce" ‖ 0, 12)`.
pub fn derive(
    ecdh_secret: &[u8],
    auth: &[u8],
    ua_public: &[u8],
    as_public: &[u8],
    salt: &[u8],
) -> Result<Keys, EceError> {
    let prk_key = hkdf::Salt::new(hkdf::HKDF_SHA256, auth).extract(ecdh_secret);
    let mut ikm = [0u8; 32];
    expand(&prk_key, &[b"WebPush: info\0", ua_public, as_public], &mut ikm)?;
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&ikm);
    let mut keys = Keys { cek: [0; 16], nonce: [0; 12] };
    expand(&prk, &[b"Content-Encoding: aes128gcm\0"], &mut keys.cek)?;
    expand(&prk, &[b"Content-Encoding: nonce\0"], &mut keys.nonce)?;
    Ok(keys)
}

/// The body: header, then `plaintext ‖ 0x02` encrypted as the one (last) record.
pub fn seal(keys: &Keys, salt: &[u8; 16], as_public: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, EceError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EceError::TooLarge(plaintext.len()));
    }
    let idlen = u8::try_from(as_public.len()).map_err(|_| EceError::Crypto("key id over 255 bytes"))?;
    let mut body = Vec::with_capacity(HEADER_LEN + plaintext.len() + OVERHEAD);
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(idlen);
    body.extend_from_slice(as_public);
    let mut record = Vec::with_capacity(plaintext.len() + OVERHEAD);
    record.extend_from_slice(plaintext);
    // RFC 8188 §2: the last record's padding starts with 0x02 (no more padding here).
    record.push(2);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &keys.cek).map_err(|_| EceError::Crypto("AES key"))?);
    // One record: its sequence number is 0, so the nonce is NONCE itself.
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(keys.nonce), Aad::empty(), &mut record)
        .map_err(|_| EceError::Crypto("AES-GCM seal"))?;
    body.extend_from_slice(&record);
    Ok(body)
}

/// Encrypts `plaintext` to a subscription (`p256dh`, `auth`, decoded): a
/// fresh P-256 key and salt per message, as RFC 8291 §3.1 requires.
pub fn encrypt(plaintext: &[u8], ua_public: &[u8], auth: &[u8], rng: &SystemRandom) -> Result<Vec<u8>, EceError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EceError::TooLarge(plaintext.len()));
    }
    if ua_public.len() != 65 || ua_public[0] != 4 {
        return Err(EceError::BadKeys("p256dh is not a 65-byte uncompressed P-256 point"));
    }
    if auth.len() != 16 {
        return Err(EceError::BadKeys("auth is not 16 bytes"));
    }
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| EceError::Crypto("random salt"))?;
    let private = EphemeralPrivateKey::generate(&ECDH_P256, rng).map_err(|_| EceError::Crypto("ephemeral key"))?;
    let as_public = private.compute_public_key().map_err(|_| EceError::Crypto("ephemeral public key"))?;
    let as_public = as_public.as_ref().to_vec();
    let peer = UnparsedPublicKey::new(&ECDH_P256, ua_public);
    let keys = agree_ephemeral(private, &peer, |secret| derive(secret, auth, ua_public, &as_public, &salt))
        .map_err(|_| EceError::BadKeys("p256dh is not a point on P-256"))??;
    seal(&keys, &salt, &as_public, plaintext)
}

/// The receiving side of [`seal`], for whoever holds the keys (the demo's
/// push service, tests): the header's parts and the plaintext.
pub fn open(keys: &Keys, body: &[u8]) -> Result<Vec<u8>, EceError> {
    if body.len() < HEADER_LEN + OVERHEAD {
        return Err(EceError::Crypto("body shorter than a header and a record"));
    }
    let idlen = body[20] as usize;
    let mut record = body.get(21 + idlen..).ok_or(EceError::Crypto("key id past the end"))?.to_vec();
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &keys.cek).map_err(|_| EceError::Crypto("AES key"))?);
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(keys.nonce), Aad::empty(), &mut record)
        .map_err(|_| EceError::Crypto("AES-GCM open: wrong keys or altered body"))?;
    // Strip the padding: trailing zeros, then the delimiter (0x02 for the last record).
    let end = plain.iter().rposition(|&b| b != 0).ok_or(EceError::Crypto("no padding delimiter"))?;
    if plain[end] != 2 {
        return Err(EceError::Crypto("the only record does not end with the last-record delimiter 0x02"));
    }
    Ok(plain[..end].to_vec())
}

/// The header's salt and sender key (keyid), to derive the keys for [`open`].
pub fn header(body: &[u8]) -> Result<(&[u8], u32, &[u8]), EceError> {
    if body.len() < 21 {
        return Err(EceError::Crypto("body shorter than a header"));
    }
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]);
    let idlen = body[20] as usize;
    let keyid = body.get(21..21 + idlen).ok_or(EceError::Crypto("key id past the end"))?;
    Ok((&body[..16], rs, keyid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn b(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap()
    }

    // RFC 8291 Appendix A (https://www.rfc-editor.org/rfc/rfc8291#appendix-A).
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const AS_PUBLIC: &str = "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    /// The ECDH the example fixes, done with the sender's static key (p256:
    /// ring will not take a given ephemeral key), then derivation and record
    /// with the code that sends: byte for byte the RFC's body.
    #[test]
    fn rfc_8291_appendix_a_byte_for_byte() {
        let as_secret = p256::SecretKey::from_slice(&b(AS_PRIVATE)).unwrap();
        let ua_public = p256::PublicKey::from_sec1_bytes(&b(UA_PUBLIC)).unwrap();
        let shared = p256::ecdh::diffie_hellman(as_secret.to_nonzero_scalar(), ua_public.as_affine());
        let salt: [u8; 16] = b(SALT).try_into().unwrap();
        let keys = derive(shared.raw_secret_bytes(), &b(AUTH), &b(UA_PUBLIC), &b(AS_PUBLIC), &salt).unwrap();
        let body = seal(&keys, &salt, &b(AS_PUBLIC), PLAINTEXT.as_bytes()).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(&body), BODY);

        // And the browser's side reads it back, from its own private key.
        let ua_secret = p256::SecretKey::from_slice(&b(UA_PRIVATE)).unwrap();
        let (salt, rs, keyid) = header(&body).unwrap();
        assert_eq!((rs, keyid.len()), (4096, 65));
        let sender = p256::PublicKey::from_sec1_bytes(keyid).unwrap();
        let shared = p256::ecdh::diffie_hellman(ua_secret.to_nonzero_scalar(), sender.as_affine());
        let keys = derive(shared.raw_secret_bytes(), &b(AUTH), &b(UA_PUBLIC), keyid, salt).unwrap();
        assert_eq!(open(&keys, &body).unwrap(), PLAINTEXT.as_bytes());
    }

    /// ring's side: a fresh key and salt each time, and the subscriber decrypts.
    #[test]
    fn encrypt_with_ring_decrypts_with_the_subscribers_key() {
        let rng = SystemRandom::new();
        let one = encrypt(PLAINTEXT.as_bytes(), &b(UA_PUBLIC), &b(AUTH), &rng).unwrap();
        let two = encrypt(PLAINTEXT.as_bytes(), &b(UA_PUBLIC), &b(AUTH), &rng).unwrap();
        assert_ne!(one[..16], two[..16], "a fresh salt per message");
        assert_ne!(one[21..86], two[21..86], "a fresh sender key per message");
        let ua_secret = p256::SecretKey::from_slice(&b(UA_PRIVATE)).unwrap();
        let (salt, _, keyid) = header(&one).unwrap();
        let sender = p256::PublicKey::from_sec1_bytes(keyid).unwrap();
        let shared = p256::ecdh::diffie_hellman(ua_secret.to_nonzero_scalar(), sender.as_affine());
        let keys = derive(shared.raw_secret_bytes(), &b(AUTH), &b(UA_PUBLIC), keyid, salt).unwrap();
        assert_eq!(open(&keys, &one).unwrap(), PLAINTEXT.as_bytes());
    }

    #[test]
    fn the_4096_octet_limit_and_bad_keys() {
        let rng = SystemRandom::new();
        let fits = vec![b'x'; MAX_PLAINTEXT];
        assert_eq!(encrypt(&fits, &b(UA_PUBLIC), &b(AUTH), &rng).unwrap().len(), MAX_RECORD);
        let over = vec![b'x'; MAX_PLAINTEXT + 1];
        assert_eq!(encrypt(&over, &b(UA_PUBLIC), &b(AUTH), &rng), Err(EceError::TooLarge(MAX_PLAINTEXT + 1)));
        assert!(matches!(encrypt(b"hi", &b(UA_PUBLIC)[..64], &b(AUTH), &rng), Err(EceError::BadKeys(_))));
        assert!(matches!(encrypt(b"hi", &b(UA_PUBLIC), &b(AUTH)[..8], &rng), Err(EceError::BadKeys(_))));
        let mut off_curve = b(UA_PUBLIC);
        off_curve[40] ^= 1;
        assert!(matches!(encrypt(b"hi", &off_curve, &b(AUTH), &rng), Err(EceError::BadKeys(_))));
    }
}
