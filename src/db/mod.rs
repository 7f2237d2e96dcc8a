//! How the relay connects to PostgreSQL: one place for every connection (ledger,
//! dispatch, listen, status, setup, and the replication stream's socket).
//!
//! A connection string is read the way libpq reads it ([`dsn`]), TLS is
//! negotiated the way libpq's `sslmode` says ([`tls`]), and a failure comes
//! back as a [`ConnectError`] that says whether retrying can help and, when it
//! cannot, what to change — without ever quoting the password.

pub mod dsn;
pub mod tls;

use std::io;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Connection, Socket};

use self::tls::{HandshakeError, MakeRustls, RustlsStream, SslMode, TlsSettings};

/// A connection failure, already worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{message}{}", fix.as_ref().map(|f| format!("; to fix: {f}")).unwrap_or_default())]
pub struct ConnectError {
    message: String,
    fix: Option<String>,
    retryable: bool,
    sqlstate: Option<String>,
}

impl ConnectError {
    /// Settings that cannot work (a bad key, an unreadable CA file). Permanent.
    pub fn settings(message: String) -> ConnectError {
        ConnectError { message, fix: None, retryable: false, sqlstate: None }
    }

    /// The network failed. Retryable.
    pub fn io(host: &str, e: io::Error) -> ConnectError {
        ConnectError {
            message: format!("cannot reach PostgreSQL at {host}: {e}"),
            fix: None,
            retryable: true,
            sqlstate: None,
        }
    }

    pub(crate) fn no_tls_on_server() -> ConnectError {
        ConnectError {
            message: "the server does not accept TLS connections (ssl = off)".into(),
            fix: Some(
                "turn ssl on at the server, or lower sslmode to prefer in source.database_url \
                 (encryption only when offered)"
                    .into(),
            ),
            retryable: false,
            sqlstate: None,
        }
    }

    /// A failed handshake; permanent when the peer or the certificate said no.
    pub(crate) fn handshake(e: &HandshakeError, settings: &TlsSettings) -> ConnectError {
        use rustls::CertificateError as C;
        let root = match &settings.root {
            tls::RootCert::File(p) => format!("sslrootcert={}", p.display()),
            tls::RootCert::System => "the system trust store (sslrootcert=system)".into(),
            tls::RootCert::None => "the default CA (~/.postgresql/root.crt)".into(),
        };
        let fix = match e.certificate() {
            Some(C::UnknownIssuer | C::BadSignature) => Some(format!(
                "the server's certificate is not signed by a CA in {root}: point sslrootcert at the CA bundle \
                 that issued it (your provider's bundle, see docs/managed-postgres.md)"
            )),
            Some(C::NotValidForName | C::NotValidForNameContext { .. }) => Some(
                "the server's certificate is not issued for the host in source.database_url: connect with \
                 the name the certificate carries (the provider's endpoint, not an IP address or a CNAME \
                 of your own), or use sslmode=verify-ca to check the CA only"
                    .into(),
            ),
            Some(C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }) => Some(
                "the server's certificate is expired or not yet valid: renew it on the server \
                 (and check this machine's clock)"
                    .into(),
            ),
            Some(_) => Some(format!("check the server's certificate against {root}")),
            None if e.is_permanent() => Some(
                "the TLS handshake was refused: if the server asks for a client certificate, set sslcert \
                 and sslkey to a certificate its ssl_ca_file trusts, whose CN is the user name"
                    .into(),
            ),
            None => None,
        };
        let retryable = !e.is_permanent();
        ConnectError { message: e.to_string(), fix, retryable, sqlstate: None }
    }

    fn from_pg(e: tokio_postgres::Error, target: &PgTarget) -> ConnectError {
        let source = std::error::Error::source(&e);
        if let Some(h) = source.and_then(|s| s.downcast_ref::<HandshakeError>()) {
            return ConnectError::handshake(h, &target.tls);
        }
        // tokio-postgres' own Display stops at "db error": the server's words are in the source.
        let mut message = e.to_string();
        if let Some(cause) = source.map(|c| c.to_string()).filter(|c| !message.contains(c.as_str())) {
            message = format!("{message}: {cause}");
        }
        let message = target.scrub(&message);
        if message.contains("server does not support TLS") {
            return ConnectError::no_tls_on_server();
        }
        let db = e.as_db_error();
        let sqlstate = e.code().map(|c| c.code().to_string());
        let text = db.map(|d| d.message().to_string()).unwrap_or_default();
        let fix = match sqlstate.as_deref() {
            Some("28000") if text.contains("no encryption") => Some(format!(
                "the server accepts this user only over TLS (hostssl in pg_hba.conf) and sslmode is {}: set \
                 sslmode=verify-full and sslrootcert=<CA bundle> (at least sslmode=require) in source.database_url",
                target.tls.mode.as_str()
            )),
            Some("28000") if text.contains("SSL encryption") => Some(
                "the server accepts this user only without TLS (hostnossl in pg_hba.conf): add a hostssl line \
                 for it, or lower sslmode"
                    .into(),
            ),
            Some("28000") => Some(
                "pg_hba.conf has no line letting this user reach this database from this host \
                 (or the certificate's CN does not match the user): add one, or fix the user in source.database_url"
                    .into(),
            ),
            Some("28P01") => Some("check the user and password in source.database_url".into()),
            Some("3D000") => Some("fix the database name in source.database_url".into()),
            _ if message.contains("channel binding") => Some(
                "channel_binding=require needs TLS (sslmode=require or stronger) and a server offering \
                 SCRAM-SHA-256-PLUS (password_encryption = scram-sha-256)"
                    .into(),
            ),
            _ if message.contains("no hostname provided") => {
                Some("TLS needs a host name to check: give host=<name> along with hostaddr".into())
            }
            _ => None,
        };
        let retryable = if e.is_closed() {
            true
        } else {
            match sqlstate.as_deref() {
                // An error without a SQLSTATE is the network's, except our own
                // wording above (TLS settings), which will not change by itself.
                None => fix.is_none(),
                Some(c) => c.starts_with("08") || c.starts_with("57P") || c == "53300",
            }
        };
        ConnectError { message, fix, retryable, sqlstate }
    }

    /// Whether trying again later may succeed without a human.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The server's SQLSTATE, when it refused the connection itself.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }
}

/// A parsed connection string: what tokio-postgres understands, plus the TLS
/// settings it does not.
#[derive(Clone)]
pub struct PgTarget {
    pub pg: tokio_postgres::Config,
    pub tls: TlsSettings,
    password: Option<String>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.pg.get_hosts())
            .field("user", &self.pg.get_user())
            .field("dbname", &self.pg.get_dbname())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Reads a URL or key=value string, libpq's TLS keys included.
    pub fn parse(dsn: &str) -> Result<PgTarget, ConnectError> {
        let password = dsn::password(dsn);
        let scrub = |m: String| match &password {
            Some(p) if p.len() >= 3 => m.replace(p.as_str(), "***"),
            _ => m,
        };
        let (rest, keys) =
            dsn::split(dsn).map_err(|e| ConnectError::settings(scrub(format!("source.database_url: {e}"))))?;
        let tls = TlsSettings::from_keys(&keys)?;
        let mut pg: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| ConnectError::settings(scrub(format!("source.database_url: {e}"))))?;
        let unix_only = pg.get_hostaddrs().is_empty() && pg.get_hosts().iter().all(|h| !matches!(h, Host::Tcp(_)));
        // libpq never speaks TLS on a Unix socket, whatever sslmode says.
        let mode = if unix_only { SslMode::Disable } else { tls.mode };
        pg.ssl_mode(match mode {
            SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgTarget { pg, tls, password })
    }

    /// `text` with the password, should it appear, replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        match &self.password {
            // Very short passwords would blank out ordinary words; they are
            // not worth protecting from a substring search anyway.
            Some(p) if p.len() >= 3 => text.replace(p.as_str(), "***"),
            _ => text.to_string(),
        }
    }

    /// Opens a connection. The caller drives the returned `Connection`.
    pub async fn connect(&self) -> Result<(Client, Connection<Socket, RustlsStream<Socket>>), ConnectError> {
        let plain =
            self.pg.get_ssl_mode() == tokio_postgres::config::SslMode::Disable && self.tls.mode != SslMode::Allow;
        let config = if plain {
            // Never used for a handshake (and sslrootcert & co. are ignored, as
            // libpq does with sslmode=disable), but tokio-postgres wants a connector.
            TlsSettings { mode: SslMode::Prefer, root: tls::RootCert::None, client: None, sni: true }.client_config()?
        } else {
            self.tls.client_config()?
        };
        let tls = MakeRustls::new(config);
        match self.pg.connect(tls.clone()).await {
            Ok(pair) => Ok(pair),
            // libpq's `allow`: clear text first, TLS when the server turns that away.
            Err(e) if self.tls.mode == SslMode::Allow && e.code().is_some_and(|c| c.code() == "28000") => {
                let mut with_tls = self.pg.clone();
                with_tls.ssl_mode(tokio_postgres::config::SslMode::Require);
                with_tls.connect(tls).await.map_err(|e| ConnectError::from_pg(e, self))
            }
            Err(e) => Err(ConnectError::from_pg(e, self)),
        }
    }
}

/// Parses `dsn` and connects: the one door to PostgreSQL for everything but
/// the replication stream (which uses [`tls::negotiate`] on its own socket).
pub async fn connect(dsn: &str) -> Result<(Client, Connection<Socket, RustlsStream<Socket>>), ConnectError> {
    PgTarget::parse(dsn)?.connect().await
}

/// `name` as a SQL identifier, always quoted (safe for any configured name).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as a SQL literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Connection trouble, server restarts and serialization conflicts pass;
/// anything else (missing privilege, missing schema) needs a human.
pub fn db_error_is_retryable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O errors carry no SQLSTATE
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01" || c == "53300"
        }
    }
}

/// Pause before the `failures`-th reconnection attempt to PostgreSQL:
/// exponential from 200 ms, at most 10 s with jitter, so that the relay's
/// connections do not all knock at once when the server comes back.
pub fn reconnect_delay(failures: u32) -> Duration {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        // backon's jitter adds up to one more delay: 5 s cap, 10 s at worst.
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
        .nth(failures.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_secs(10))
}
