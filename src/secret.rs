//! Secret values and the `file:` indirection that keeps them out of config
//! files: the one place that reads a secret, and the type that cannot print one.
//! A leaf module, so provider configs can hold secrets without depending on
//! the configuration that composes them.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer};

/// A string that never prints: passwords, API secrets, tokens. A value
/// `file:/path` is read from that file (see the module docs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        read_file_value(&raw).map(Secret).map_err(serde::de::Error::custom)
    }
}

/// `file:/path` → the file's content without its trailing newline; anything
/// else as is. The error names the path, never a value.
pub fn read_file_value(value: &str) -> Result<String, String> {
    match value.strip_prefix("file:") {
        Some(path) => read_secret_file(Path::new(path)),
        None => Ok(value.to_string()),
    }
}

pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    // `echo secret > file` and Kubernetes' editors leave a newline the secret never had.
    Ok(text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string())
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `postgres://user:pw@host/db` → `postgres://user:***@host/db`, for logs; also
/// `?password=` and key=value `password='...'` ([`crate::db::dsn::redact`]).
pub fn redact_url(url: &str) -> String {
    crate::db::dsn::redact(url)
}
