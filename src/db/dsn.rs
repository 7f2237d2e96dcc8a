//! Connection strings as libpq reads them: `postgres://` URLs and `key=value`
//! lists, with the TLS keys tokio-postgres does not know taken out, and a
//! redacted form for anything that prints.
//!
//! tokio-postgres refuses keys it does not know (`sslrootcert`, `sslcert`,
//! `sslkey`, ...) and knows only three `sslmode`s, so those keys are pulled out
//! here, decoded, and the rest of the string is handed over byte for byte
//! (keeping its quoting and percent-encoding, which tokio-postgres decodes).
//! Grammar: <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING>.

use std::fmt;

/// The libpq keys this module handles itself, decoded.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsKeys {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    pub sslsni: Option<String>,
    /// Present only to refuse it with a useful message: rustls reads no encrypted keys.
    pub sslpassword: Option<String>,
}

impl fmt::Debug for TlsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsKeys")
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("sslsni", &self.sslsni)
            .field("sslpassword", &self.sslpassword.as_ref().map(|_| "***"))
            .finish()
    }
}

impl TlsKeys {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "sslsni" => &mut self.sslsni,
            "sslpassword" => &mut self.sslpassword,
            _ => return None,
        })
    }
}

/// A connection string that cannot be read. The message never quotes values
/// (one of them may be a password).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("connection string: {0}")]
pub struct DsnError(pub String);

/// Splits `dsn` into what tokio-postgres parses and the TLS keys handled here.
pub fn split(dsn: &str) -> Result<(String, TlsKeys), DsnError> {
    let mut keys = TlsKeys::default();
    if is_url(dsn) {
        let Some((base, query)) = dsn.split_once('?') else { return Ok((dsn.to_string(), keys)) };
        let mut kept = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let key = percent_decode(k)?;
            match keys.slot(&key) {
                Some(slot) => *slot = Some(percent_decode(v)?),
                None => kept.push(part),
            }
        }
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((rest, keys));
    }
    let mut rest = String::with_capacity(dsn.len());
    let mut last = 0;
    for pair in pairs(dsn)? {
        if let Some(slot) = keys.slot(&pair.key) {
            *slot = Some(pair.value);
            rest.push_str(&dsn[last..pair.start]);
            last = pair.end;
        }
    }
    rest.push_str(&dsn[last..]);
    Ok((rest.trim().to_string(), keys))
}

/// The string with every password replaced by `***`: the URL's `user:password@`,
/// `?password=` and `?sslpassword=`, and `password=` in key=value form, quoted
/// or not. Something unreadable is shown as `***` whole rather than risk a leak.
/// Works on any `scheme://user:password@host` URL (SMTP's too).
pub fn redact(dsn: &str) -> String {
    const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];
    if let Some(scheme_end) = dsn.find("://") {
        let (head, rest) = dsn.split_at(scheme_end + 3);
        // The authority ends at the first '/', '?' or '#'; its userinfo at the
        // last '@'. A password with an unescaped '/' is malformed, but must not
        // print either: an '@' later in the path moves the end of the userinfo there.
        let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
        let authority_end = match rest[..path_end].rfind('@') {
            Some(at) => rest[at..].find(['/', '?', '#']).map_or(rest.len(), |i| at + i),
            None => rest.find(['/', '?', '#']).unwrap_or(rest.len()),
        };
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let parts: Vec<String> = query
                    .split('&')
                    .map(|part| {
                        let key = part.split_once('=').map_or(part, |(k, _)| k);
                        let decoded = percent_decode(key).unwrap_or_default();
                        if SECRET_KEYS.contains(&decoded.as_str()) {
                            format!("{key}=***")
                        } else {
                            part.to_string()
                        }
                    })
                    .collect();
                format!("{path}?{}", parts.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{head}{authority}{tail}");
    }
    let Ok(found) = pairs(dsn) else { return "***".into() };
    let mut out = String::with_capacity(dsn.len());
    let mut last = 0;
    for pair in found {
        if SECRET_KEYS.contains(&pair.key.as_str()) {
            out.push_str(&dsn[last..pair.value_start]);
            out.push_str("***");
            last = pair.end;
        }
    }
    out.push_str(&dsn[last..]);
    out
}

/// The password the string carries, decoded, if any: lets callers scrub it
/// from messages that quote the server or a library.
pub fn password(dsn: &str) -> Option<String> {
    if is_url(dsn) {
        let rest = &dsn[dsn.find("://")? + 3..];
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        let from_userinfo = authority
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .and_then(|(_, pw)| percent_decode(pw).ok());
        let from_query = dsn.split_once('?').and_then(|(_, q)| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == "password")
                .and_then(|(_, v)| percent_decode(v).ok())
        });
        return from_query.or(from_userinfo).filter(|p| !p.is_empty());
    }
    pairs(dsn).ok()?.into_iter().rev().find(|p| p.key == "password").map(|p| p.value).filter(|p| !p.is_empty())
}

fn is_url(dsn: &str) -> bool {
    dsn.starts_with("postgres://") || dsn.starts_with("postgresql://")
}

/// One `key = value` of the key=value form, with byte offsets into the string:
/// `start..end` covers the whole pair, `value_start..end` the value as written.
struct Pair {
    key: String,
    value: String,
    start: usize,
    value_start: usize,
    end: usize,
}

/// libpq's key=value grammar: whitespace-separated pairs, spaces allowed around
/// `=`, values bare (backslash escapes) or single-quoted (`\'` and `\\`).
fn pairs(s: &str) -> Result<Vec<Pair>, DsnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= bytes.len() {
            return Ok(out);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        i = skip_ws(i);
        if bytes.get(i) != Some(&b'=') {
            // Not quoted: a stray word here is often half of an unquoted password.
            return Err(DsnError(format!(
                "a word at byte {start} has no \"=\" (quote values with spaces: password='a b')"
            )));
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = String::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match s[i..].chars().next() {
                    None => return Err(DsnError(format!("unterminated quoted value for {key:?}"))),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        let Some(c) = s[i + 1..].chars().next() else {
                            return Err(DsnError(format!("unterminated quoted value for {key:?}")));
                        };
                        value.push(c);
                        i += 1 + c.len_utf8();
                    }
                    Some(c) => {
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            while let Some(c) = s[i..].chars().next() {
                if c.is_ascii_whitespace() {
                    break;
                }
                if c == '\\' {
                    if let Some(next) = s[i + 1..].chars().next() {
                        value.push(next);
                        i += 1 + next.len_utf8();
                        continue;
                    }
                }
                value.push(c);
                i += c.len_utf8();
            }
        }
        out.push(Pair { key, value, start, value_start, end: i });
    }
}

fn percent_decode(s: &str) -> Result<String, DsnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else { return Err(DsnError("invalid percent-encoding".into())) };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DsnError("percent-encoding is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_tls_keys_are_taken_out_and_decoded() {
        let (rest, keys) = split(
            "postgres://relay:pw@db.example.com:5432/app?sslmode=verify-full&application_name=r&sslrootcert=%2Fetc%2Fca%20b.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://relay:pw@db.example.com:5432/app?application_name=r");
        assert_eq!(keys.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(keys.sslrootcert.as_deref(), Some("/etc/ca b.pem"));
        let (rest, _) = split("postgresql://h/app?sslcert=/c&sslkey=/k").unwrap();
        assert_eq!(rest, "postgresql://h/app");
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn key_value_tls_keys_are_taken_out_keeping_quotes() {
        let dsn = r"host=db user=relay password='it\'s \\ x' sslmode = require sslrootcert='/etc/my ca.pem' dbname=app";
        let (rest, keys) = split(dsn).unwrap();
        assert_eq!(keys.sslmode.as_deref(), Some("require"));
        assert_eq!(keys.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        assert!(rest.starts_with("host=db user=relay password="), "{rest}");
        assert!(rest.ends_with("dbname=app") && !rest.contains("ssl"), "{rest}");
    }

    #[test]
    fn key_value_errors_quote_no_value() {
        let err = split("host=db password='s3cret").unwrap_err().to_string();
        assert!(!err.contains("s3cret") && err.contains("password"), "{err}");
        let err = split("host=db password=s3cret tail-of-it").unwrap_err().to_string();
        assert!(!err.contains("tail-of-it") && err.contains("quote values"), "{err}");
    }

    #[test]
    fn redacts_every_form() {
        for (dsn, want) in [
            ("postgres://relay:hunter2@db:5432/app", "postgres://relay:***@db:5432/app"),
            ("postgres://relay@db/app", "postgres://relay@db/app"),
            ("postgres://relay:p%40ss@db/app?sslmode=require", "postgres://relay:***@db/app?sslmode=require"),
            (
                "postgres://relay@db/app?password=hunter2&sslmode=require",
                "postgres://relay@db/app?password=***&sslmode=require",
            ),
            ("postgres://relay@db/app?pass%77ord=hunter2", "postgres://relay@db/app?pass%77ord=***"),
            ("postgres://u:a@b@db/app", "postgres://u:***@db/app"),
            ("postgres://u:hunter2/x@db/app", "postgres://u:***@db/app"),
            ("host=db password=hunter2 user=relay", "host=db password=*** user=relay"),
            ("host=db password = 'hun ter\\'2' user=relay", "host=db password = *** user=relay"),
            ("host=db sslpassword=hunter2", "host=db sslpassword=***"),
            ("smtp://mailer:hunter2@mail:25", "smtp://mailer:***@mail:25"),
            ("host=db password='unterminated hunter2", "***"),
        ] {
            let got = redact(dsn);
            assert_eq!(got, want, "{dsn}");
            assert!(!got.contains("hunter2"));
        }
    }

    #[test]
    fn finds_the_password() {
        assert_eq!(password("postgres://u:p%40ss@h/db").as_deref(), Some("p@ss"));
        assert_eq!(password("postgres://u@h/db?password=x%20y").as_deref(), Some("x y"));
        assert_eq!(password("host=h password='a b'").as_deref(), Some("a b"));
        assert_eq!(password("host=h"), None);
    }
}
