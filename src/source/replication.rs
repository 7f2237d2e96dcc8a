//! The streaming replication connection: a logical slot read with pgoutput.
//!
//! tokio-postgres cannot speak the replication sub-protocol, so this drives the
//! wire by hand with `postgres-protocol`'s message codecs over a TCP socket
//! (TLS as `sslmode` says, negotiated by [`crate::db::tls::negotiate`]) or a
//! Unix socket: startup with `replication=database`, authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256, SCRAM-SHA-256-PLUS over TLS),
//! `START_REPLICATION ... LOGICAL`, then the
//! CopyBoth stream of XLogData / keepalive messages one way and standby status
//! updates the other
//! (<https://www.postgresql.org/docs/15/protocol-replication.html>).
//!
//! TLS follows libpq: `prefer` uses it when the server offers it, `require`
//! and the `verify-*` modes fail rather than fall back to clear text, and the
//! SCRAM exchange is bound to the server certificate when the server offers
//! SCRAM-SHA-256-PLUS (`channel_binding=require` insists on that).
//!
//! Errors say whether reconnecting can help ([`ReplicationError::is_retryable`]):
//! a dropped connection or a server restart is retried; a missing slot, a
//! missing publication, `wal_level` not `logical` or refused credentials need an
//! operator, and their message says what to change.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use chrono::Utc;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Header, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, Host};

use crate::db::tls::{self as pg_tls, Negotiated, SslMode};
use crate::db::{quote_ident, quote_literal};

use super::pgoutput::{self, DecodeError, TxAssembler};
use super::{CommittedTx, Lsn};

/// How long `close` waits for the server to acknowledge the end of streaming
/// before dropping the connection anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Why the replication connection failed, and whether reconnecting can help.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// No connection could be made to any host. Retryable.
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: io::Error },
    /// The connection broke mid-stream. Retryable.
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// The server ended the stream without an error (shutdown, CopyDone). Retryable.
    #[error("replication connection closed by the server: {0}")]
    Closed(String),
    /// The server sent an ErrorResponse; retryable or not by its SQLSTATE.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// We cannot satisfy the server's authentication request. Permanent.
    #[error("authentication: {0}")]
    Auth(String),
    /// The connection settings cannot work (no host, ...). Permanent.
    #[error("replication settings: {0}")]
    Config(String),
    /// TLS could not be set up (certificate, server without TLS, network);
    /// the error says whether that is retryable.
    #[error("replication connection: {0}")]
    Tls(#[from] crate::db::ConnectError),
    /// The server sent something this client does not expect. Permanent: a
    /// reconnect replays the same conversation.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// A pgoutput message could not be decoded. Permanent, for the same reason.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl ReplicationError {
    /// Whether reconnecting (after a backoff) may succeed without a human.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Connect { .. } | ReplicationError::Io(_) | ReplicationError::Closed(_) => true,
            ReplicationError::Server(e) => e.is_retryable(),
            ReplicationError::Tls(e) => e.is_retryable(),
            ReplicationError::Auth(_)
            | ReplicationError::Config(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::Decode(_) => false,
        }
    }

    /// The SQLSTATE, when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// An ErrorResponse from the server, fields as sent
/// (<https://www.postgresql.org/docs/15/protocol-error-fields.html>).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    fn from_fields(mut fields: ErrorFields<'_>) -> ServerError {
        let mut e = ServerError::default();
        let mut localized_severity = String::new();
        // A malformed field list still yields what was readable: the message
        // matters more than the framing error.
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => e.severity = value,
                b'S' => localized_severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity;
        }
        e
    }

    /// Whether the same request can succeed later. Errors that describe the
    /// setup (credentials, missing objects, server settings, unsupported
    /// features, bad data) are permanent; connection trouble, shutdowns,
    /// resource exhaustion and anything unknown are retried.
    pub fn is_retryable(&self) -> bool {
        const PERMANENT_CLASSES: [&str; 8] = ["0A", "22", "28", "2B", "3D", "3F", "42", "55"];
        const PERMANENT_CODES: [&str; 3] = ["57P04", "XX001", "XX002"];
        let class = self.code.get(..2).unwrap_or("");
        !(PERMANENT_CLASSES.contains(&class) || PERMANENT_CODES.contains(&self.code.as_str()))
    }

    /// What the operator should change, for the permanent errors this
    /// service is known to meet.
    pub fn operator_hint(&self) -> Option<&'static str> {
        let msg = self.message.to_ascii_lowercase();
        Some(match self.code.as_str() {
            "42704" if msg.contains("publication") => {
                "create the publication on the source database (CREATE PUBLICATION <name> FOR TABLE <tables>) \
                 or fix source.publication"
            }
            "42704" => {
                "create the slot on the source database \
                 (SELECT pg_create_logical_replication_slot('<slot>', 'pgoutput')) or fix source.slot"
            }
            "55000" if msg.contains("wal_level") => "set wal_level = logical in postgresql.conf and restart PostgreSQL",
            "55000" if msg.contains("can no longer get changes") || msg.contains("invalidated") => {
                "the slot was invalidated (max_slot_wal_keep_size, or removed WAL): the changes it kept are gone; \
                 see docs/operations.md \"A gap in the stream\""
            }
            "55000" => {
                "the slot cannot serve this connection: it must be a logical slot using pgoutput, \
                 created in the database named in source.database_url"
            }
            "55006" => {
                "another process is already streaming from this slot (a second relay, or a walsender \
                 whose client died and which ends after wal_sender_timeout); run a single relay per slot"
            }
            "28P01" | "28000" => {
                "check the user and password in source.database_url, and that pg_hba.conf lets this user \
                 connect to this database from this host"
            }
            "42501" => {
                "give the user the REPLICATION attribute: ALTER ROLE <user> REPLICATION \
                 (on RDS and Aurora: GRANT rds_replication TO <user>; see docs/managed-postgres.md)"
            }
            "3D000" => "fix the database name in source.database_url",
            "22023" if msg.contains("option") => {
                "the slot does not use the pgoutput plugin: recreate it with \
                 pg_create_logical_replication_slot('<slot>', 'pgoutput')"
            }
            _ => return None,
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL {}: {} (SQLSTATE {})", self.severity, self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; server hint: {hint}")?;
        }
        if let Some(hint) = self.operator_hint() {
            write!(f, "; to fix: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// What the stream yields.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicationEvent {
    /// A whole committed transaction, in commit order.
    Tx(CommittedTx),
    /// The server's heartbeat. When `reply_requested`, answer with
    /// [`ReplicationStream::send_status`] soon or the server drops the
    /// connection at `wal_sender_timeout`.
    ///
    /// On a clean server shutdown the walsender asks again and again until
    /// the confirmed position reaches `wal_end`: a relay that has made every
    /// received transaction durable should confirm `wal_end`, or the server's
    /// shutdown waits on it (and the two ping-pong keepalives meanwhile).
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// A byte stream to the server: TCP or a Unix socket (or an in-memory pipe in tests).
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// What the socket offers SCRAM to bind to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Binding {
    /// Clear text: nothing to bind to.
    NoTls,
    /// TLS, with the `tls-server-end-point` hash when the certificate's
    /// signature algorithm defines one.
    Tls(Option<Vec<u8>>),
}

/// One backend message, plus the CopyBothResponse (`W`) that
/// `postgres_protocol`'s parser does not know.
enum Incoming {
    CopyBoth,
    Msg(Message),
}

/// Framing over the socket: reads are buffered in a `BytesMut` and cut into
/// whole messages; writes gather in another and go out on `flush`.
struct Conn {
    socket: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    fn new(socket: Box<dyn Socket>) -> Self {
        Conn { socket, rbuf: BytesMut::with_capacity(64 * 1024), wbuf: BytesMut::with_capacity(1024) }
    }

    /// The next whole message. Cancel-safe: the only await is `read_buf`,
    /// which reads nothing if dropped, and a message leaves the buffer only
    /// when it is returned.
    async fn read(&mut self) -> Result<(u8, Incoming), ReplicationError> {
        loop {
            if let Some(header) = Header::parse(&self.rbuf).map_err(protocol)? {
                let tag = header.tag();
                if tag == b'W' {
                    // CopyBothResponse: format and per-column formats, which
                    // for replication carry nothing we act on.
                    let total = header.len() as usize + 1;
                    if self.rbuf.len() >= total {
                        let _ = self.rbuf.split_to(total);
                        return Ok((tag, Incoming::CopyBoth));
                    }
                    self.rbuf.reserve(total - self.rbuf.len());
                } else if let Some(msg) = Message::parse(&mut self.rbuf).map_err(protocol)? {
                    return Ok((tag, Incoming::Msg(msg)));
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < 8 * 1024 {
                self.rbuf.reserve(64 * 1024);
            }
            if self.socket.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReplicationError::Closed("connection closed (end of file)".into()));
            }
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.socket.write_all_buf(&mut self.wbuf).await?;
        self.socket.flush().await?;
        Ok(())
    }
}

fn protocol(e: io::Error) -> ReplicationError {
    ReplicationError::Protocol(e.to_string())
}

/// Error for a message that has no business arriving now.
fn unexpected(tag: u8, msg: &Incoming, during: &str) -> ReplicationError {
    if let Incoming::Msg(Message::ErrorResponse(body)) = msg {
        return ServerError::from_fields(body.fields()).into();
    }
    ReplicationError::Protocol(format!("unexpected message {:?} {during}", tag as char))
}

fn log_notice(msg: &Message) -> bool {
    if let Message::NoticeResponse(body) = msg {
        let notice = ServerError::from_fields(body.fields());
        tracing::warn!(severity = %notice.severity, code = %notice.code, "{}", notice.message);
        true
    } else {
        false
    }
}

fn start_replication_command(slot: &str, publication: &str, start: Lsn) -> Result<String, ReplicationError> {
    for (what, name) in [("slot", slot), ("publication", publication)] {
        if name.is_empty() || name.contains('\0') {
            return Err(ReplicationError::Config(format!("{what} name {name:?} is empty or contains NUL")));
        }
    }
    // publication_names is a string holding a comma-separated identifier list:
    // quote the identifier first, then the whole as a literal.
    Ok(format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {})",
        quote_ident(slot),
        quote_literal(&quote_ident(publication)),
    ))
}

/// Standby status update body (`r`), as CopyData payload.
fn status_update(position: Lsn, reply_requested: bool) -> BytesMut {
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(position.0); // written
    body.put_u64(position.0); // flushed
    body.put_u64(position.0); // applied
    body.put_i64(pgoutput::to_pg_timestamp(Utc::now()));
    body.put_u8(u8::from(reply_requested));
    body
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at + 8)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// A logical replication stream from one slot, decoded into transactions.
pub struct ReplicationStream {
    conn: Conn,
    assembler: TxAssembler,
    server_wal_end: Lsn,
    /// Highest position confirmed so far: confirmations never go backwards.
    sent_flush: Lsn,
}

impl ReplicationStream {
    /// Connects with `replication=database`, authenticates (trust, cleartext,
    /// MD5, SCRAM-SHA-256) and runs
    /// `START_REPLICATION SLOT "slot" LOGICAL start (proto_version '1', publication_names '"publication"')`.
    ///
    /// `start` is the position already durably handled; `Lsn(0)` means "from
    /// the slot's confirmed position". The server never sends transactions
    /// committed before the slot's confirmed position, whatever `start` says.
    pub async fn start(
        target: &crate::db::PgTarget,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<Self, ReplicationError> {
        let command = start_replication_command(slot, publication, start)?;
        let (socket, binding) = connect(target, false).await?;
        match Self::start_on(socket, binding, &target.pg, &command, start).await {
            // libpq's `allow`: clear text first, TLS when pg_hba.conf turns that away.
            Err(e) if target.tls.mode == SslMode::Allow && e.sqlstate() == Some("28000") => {
                let (socket, binding) = connect(target, true).await?;
                Self::start_on(socket, binding, &target.pg, &command, start).await
            }
            other => other,
        }
    }

    /// The protocol part of `start`, on any byte stream.
    async fn start_on(
        socket: Box<dyn Socket>,
        binding: Binding,
        config: &tokio_postgres::Config,
        command: &str,
        start: Lsn,
    ) -> Result<Self, ReplicationError> {
        let mut conn = Conn::new(socket);
        let user = match config.get_user() {
            Some(u) => u.to_owned(),
            None => {
                std::env::var("USER").map_err(|_| ReplicationError::Config("no user in source.database_url".into()))?
            }
        };
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let application_name = config.get_application_name().unwrap_or("outbox-relay");
        let mut params = vec![
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            // Tuple text is converted to the client encoding: ask for UTF-8 so
            // every value is a valid Rust string whatever the server's encoding.
            ("client_encoding", "UTF8"),
        ];
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        frontend::startup_message(params, &mut conn.wbuf)
            .map_err(|e| ReplicationError::Config(format!("startup parameters: {e}")))?;
        conn.flush().await?;

        authenticate(&mut conn, config, &user, &binding).await?;

        // Until ReadyForQuery: server parameters and the cancel key, which a
        // replication stream has no use for.
        loop {
            let (tag, msg) = conn.read().await?;
            match &msg {
                Incoming::Msg(Message::ReadyForQuery(_)) => break,
                Incoming::Msg(Message::ParameterStatus(_) | Message::BackendKeyData(_)) => {}
                Incoming::Msg(m) if log_notice(m) => {}
                _ => return Err(unexpected(tag, &msg, "after authentication")),
            }
        }

        frontend::query(command, &mut conn.wbuf)
            .map_err(|e| ReplicationError::Config(format!("START_REPLICATION: {e}")))?;
        conn.flush().await?;
        loop {
            let (tag, msg) = conn.read().await?;
            match &msg {
                Incoming::CopyBoth => break,
                Incoming::Msg(m) if log_notice(m) => {}
                _ => {
                    // The session is still open after a refused command: say
                    // goodbye so the server logs no "connection lost".
                    frontend::terminate(&mut conn.wbuf);
                    let _ = conn.flush().await;
                    return Err(unexpected(tag, &msg, "in reply to START_REPLICATION"));
                }
            }
        }
        tracing::info!(%start, "logical replication started");
        Ok(ReplicationStream { conn, assembler: TxAssembler::new(), server_wal_end: start, sent_flush: start })
    }

    /// Next complete committed transaction or keepalive.
    ///
    /// Cancel-safe: dropping the future (in a `select!` against a status
    /// timer, say) loses nothing; partial transactions stay buffered in
    /// `self`. After an error the stream is unusable: reconnect with a new one,
    /// which receives the interrupted transaction again from its start.
    pub async fn next_event(&mut self) -> Result<ReplicationEvent, ReplicationError> {
        loop {
            let (tag, msg) = self.conn.read().await?;
            let body = match msg {
                Incoming::Msg(Message::CopyData(body)) => body,
                Incoming::Msg(Message::CopyDone) => {
                    return Err(ReplicationError::Closed("the server ended the stream (CopyDone)".into()))
                }
                Incoming::Msg(Message::CommandComplete(_) | Message::ReadyForQuery(_)) => {
                    return Err(ReplicationError::Closed(
                        "the server ended the replication command (shutting down?)".into(),
                    ))
                }
                Incoming::Msg(Message::ParameterStatus(_)) => continue,
                Incoming::Msg(ref m) if log_notice(m) => continue,
                other => return Err(unexpected(tag, &other, "during streaming")),
            };
            let data = body.data();
            match data.first() {
                // XLogData: start (8), wal end (8), send time (8), then one pgoutput message.
                Some(b'w') => {
                    let (Some(wal_end), Some(payload)) = (read_u64(data, 9), data.get(25..)) else {
                        return Err(ReplicationError::Protocol("short XLogData header".into()));
                    };
                    self.server_wal_end = self.server_wal_end.max(Lsn(wal_end));
                    let message = pgoutput::decode(payload)?;
                    if let Some(tx) = self.assembler.push(message)? {
                        return Ok(ReplicationEvent::Tx(tx));
                    }
                }
                // Primary keepalive: wal end (8), send time (8), reply requested (1).
                Some(b'k') => {
                    let (Some(wal_end), Some(&reply)) = (read_u64(data, 1), data.get(17)) else {
                        return Err(ReplicationError::Protocol("short keepalive message".into()));
                    };
                    self.server_wal_end = self.server_wal_end.max(Lsn(wal_end));
                    return Ok(ReplicationEvent::Keepalive { wal_end: Lsn(wal_end), reply_requested: reply != 0 });
                }
                Some(&other) => {
                    return Err(ReplicationError::Protocol(format!("unknown replication message {:?}", other as char)))
                }
                None => return Err(ReplicationError::Protocol("empty CopyData".into())),
            }
        }
    }

    /// Standby status update: written = flushed = applied = `flushed`, which
    /// lets the server recycle WAL up to there. Never goes backwards: a value
    /// below one sent before (or below `start`) re-sends the earlier one.
    ///
    /// Confirm only positions whose transactions are durably handled. When
    /// idle, a keepalive's `wal_end` is safe to confirm once every transaction
    /// received so far is: pgoutput sends nothing for unpublished tables, and
    /// without that the slot would hold their WAL forever.
    ///
    /// Not cancel-safe: a dropped call may leave a partial message behind.
    pub async fn send_status(&mut self, flushed: Lsn, reply_requested: bool) -> Result<(), ReplicationError> {
        self.sent_flush = self.sent_flush.max(flushed);
        let body = status_update(self.sent_flush, reply_requested);
        frontend::CopyData::new(body).map_err(protocol)?.write(&mut self.conn.wbuf);
        self.conn.flush().await
    }

    /// Highest WAL position the server reported (XLogData and keepalives), for lag metrics.
    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// Highest position confirmed with `send_status` (or the start position).
    /// True while a transaction is half received (Begin seen, Commit not yet).
    pub fn in_transaction(&self) -> bool {
        self.assembler.in_transaction()
    }

    pub fn confirmed(&self) -> Lsn {
        self.sent_flush
    }

    /// Ends streaming politely (CopyDone, then Terminate) and closes. Waits a
    /// bounded time for the server's acknowledgement, discarding data still in
    /// flight; a half-received transaction is simply sent again next time.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.conn.wbuf);
        self.conn.flush().await?;
        let conn = &mut self.conn;
        let drained = tokio::time::timeout(CLOSE_GRACE, async {
            loop {
                match conn.read().await {
                    Ok((_, Incoming::Msg(Message::ReadyForQuery(_)))) => return true,
                    Ok((_, Incoming::Msg(Message::ErrorResponse(body)))) => {
                        let e = ServerError::from_fields(body.fields());
                        tracing::debug!(error = %e, "error while ending replication");
                        return false;
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if drained {
            frontend::terminate(&mut self.conn.wbuf);
            self.conn.flush().await?;
        }
        // The server may already have closed its side; nothing left to lose.
        let _ = self.conn.socket.shutdown().await;
        Ok(())
    }
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("server_wal_end", &self.server_wal_end)
            .field("confirmed", &self.sent_flush)
            .finish_non_exhaustive()
    }
}

/// Opens a socket to the first reachable host, in the order libpq would try
/// them: `hostaddr` over `host` when both are given, per-host ports; then TLS
/// as `sslmode` says (`force_tls` for `allow`'s second try). A certificate the
/// settings reject ends the search: another host of the same service would
/// be refused the same way.
async fn connect(
    target: &crate::db::PgTarget,
    force_tls: bool,
) -> Result<(Box<dyn Socket>, Binding), ReplicationError> {
    let config = &target.pg;
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(ReplicationError::Config("no host in source.database_url".into()));
    }
    let mut last = None;
    for i in 0..count {
        let port = ports.get(i).or_else(|| ports.first()).copied().unwrap_or(5432);
        // The certificate must name `host`; `hostaddr` only says where to dial.
        let result = match (addrs.get(i), hosts.get(i)) {
            (Some(ip), host) => {
                let name = match host {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => ip.to_string(),
                };
                match connect_tcp(&ip.to_string(), port, config).await {
                    Ok(s) => with_tls(s, target, &name, force_tls).await,
                    Err(e) => Err(e),
                }
            }
            (None, Some(Host::Tcp(host))) => match connect_tcp(host, port, config).await {
                Ok(s) => with_tls(s, target, host, force_tls).await,
                Err(e) => Err(e),
            },
            // libpq never speaks TLS over a Unix socket.
            (None, Some(Host::Unix(dir))) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let target = path.display().to_string();
                with_timeout(config, tokio::net::UnixStream::connect(&path))
                    .await
                    .map(|s| (Box::new(s) as Box<dyn Socket>, Binding::NoTls))
                    .map_err(|source| ReplicationError::Connect { target, source })
            }
            (None, None) => continue,
        };
        match result {
            Ok(pair) => return Ok(pair),
            Err(e @ ReplicationError::Tls(_)) if !e.is_retryable() => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "replication connection attempt failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ReplicationError::Config("no host in source.database_url".into())))
}

async fn with_tls(
    socket: tokio::net::TcpStream,
    target: &crate::db::PgTarget,
    host: &str,
    force_tls: bool,
) -> Result<(Box<dyn Socket>, Binding), ReplicationError> {
    let direct = target.pg.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Direct;
    Ok(match pg_tls::negotiate(socket, &target.tls, host, force_tls, direct).await? {
        Negotiated::Plain(s) => (Box::new(s), Binding::NoTls),
        Negotiated::Tls(s) => {
            let hash = s.server_end_point();
            (s, Binding::Tls(hash))
        }
    })
}

async fn connect_tcp(
    host: &str,
    port: u16,
    config: &tokio_postgres::Config,
) -> Result<tokio::net::TcpStream, ReplicationError> {
    let target = format!("{host}:{port}");
    let stream = with_timeout(config, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|source| ReplicationError::Connect { target: target.clone(), source })?;
    // Status updates are tiny and latency matters more than packet count.
    stream.set_nodelay(true).map_err(|source| ReplicationError::Connect { target, source })?;
    Ok(stream)
}

async fn with_timeout<T>(
    config: &tokio_postgres::Config,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match config.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(*limit, fut)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))),
        None => fut.await,
    }
}

async fn authenticate(
    conn: &mut Conn,
    config: &tokio_postgres::Config,
    user: &str,
    binding: &Binding,
) -> Result<(), ReplicationError> {
    let mut bound = false;
    let password = || {
        config.get_password().ok_or_else(|| {
            ReplicationError::Auth("the server asks for a password and source.database_url has none".into())
        })
    };
    loop {
        let (tag, msg) = conn.read().await?;
        match msg {
            Incoming::Msg(Message::AuthenticationOk) => {
                if config.get_channel_binding() == ChannelBinding::Require && !bound {
                    // As libpq: a server that skipped SCRAM-PLUS (trust, md5, no TLS)
                    // has not proven it holds the certificate's key.
                    return Err(ReplicationError::Auth(
                        "channel_binding=require, but the server authenticated without channel binding: \
                         use sslmode=require or stronger and scram-sha-256 in pg_hba.conf"
                            .into(),
                    ));
                }
                return Ok(());
            }
            Incoming::Msg(Message::AuthenticationCleartextPassword) => {
                frontend::password_message(password()?, &mut conn.wbuf).map_err(protocol)?;
                conn.flush().await?;
            }
            Incoming::Msg(Message::AuthenticationMd5Password(body)) => {
                let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut conn.wbuf).map_err(protocol)?;
                conn.flush().await?;
            }
            Incoming::Msg(Message::AuthenticationSasl(body)) => {
                let mut offered = Vec::new();
                let mut mechanisms = body.mechanisms();
                while let Some(m) = mechanisms.next().map_err(protocol)? {
                    offered.push(m.to_owned());
                }
                let plus = offered.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                let plain = offered.iter().any(|m| m == sasl::SCRAM_SHA_256);
                let (mechanism, channel) = match (binding, plus, config.get_channel_binding()) {
                    (Binding::Tls(Some(hash)), true, ChannelBinding::Prefer | ChannelBinding::Require) => {
                        (sasl::SCRAM_SHA_256_PLUS, sasl::ChannelBinding::tls_server_end_point(hash.clone()))
                    }
                    (_, _, ChannelBinding::Require) => {
                        return Err(ReplicationError::Auth(
                            "channel_binding=require, but SCRAM-SHA-256-PLUS is not possible on this connection \
                             (needs TLS, a server offering it, and an RSA or ECDSA server certificate)"
                                .into(),
                        ))
                    }
                    // We could bind but the server did not offer it: say so, per RFC 5802 ("y").
                    (Binding::Tls(Some(_)), false, ChannelBinding::Prefer) => {
                        (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                    }
                    _ => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                };
                if mechanism == sasl::SCRAM_SHA_256 && !plain {
                    return Err(ReplicationError::Auth(format!(
                        "the server offers SASL mechanisms {offered:?}; this client speaks {} and {} (with TLS)",
                        sasl::SCRAM_SHA_256,
                        sasl::SCRAM_SHA_256_PLUS
                    )));
                }
                scram(conn, password()?, mechanism, channel).await?;
                bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
            }
            Incoming::Msg(Message::ErrorResponse(body)) => {
                return Err(ServerError::from_fields(body.fields()).into());
            }
            Incoming::Msg(
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential,
            ) => {
                return Err(ReplicationError::Auth(
                    "the server asks for GSSAPI/Kerberos/SSPI, which this client does not support; \
                     use scram-sha-256 or md5 in pg_hba.conf"
                        .into(),
                ))
            }
            other => return Err(unexpected(tag, &other, "during authentication")),
        }
    }
}

/// SCRAM-SHA-256, bound to the TLS session when `mechanism` is the -PLUS one.
async fn scram(
    conn: &mut Conn,
    password: &[u8],
    mechanism: &str,
    channel: sasl::ChannelBinding,
) -> Result<(), ReplicationError> {
    let mut scram = ScramSha256::new(password, channel);
    frontend::sasl_initial_response(mechanism, scram.message(), &mut conn.wbuf).map_err(protocol)?;
    conn.flush().await?;

    let (tag, msg) = conn.read().await?;
    match msg {
        Incoming::Msg(Message::AuthenticationSaslContinue(body)) => {
            scram.update(body.data()).map_err(|e| ReplicationError::Auth(format!("SCRAM exchange: {e}")))?;
        }
        other => return Err(unexpected(tag, &other, "during SCRAM authentication")),
    }
    frontend::sasl_response(scram.message(), &mut conn.wbuf).map_err(protocol)?;
    conn.flush().await?;

    let (tag, msg) = conn.read().await?;
    match msg {
        Incoming::Msg(Message::AuthenticationSaslFinal(body)) => scram
            .finish(body.data())
            .map_err(|e| ReplicationError::Auth(format!("the server did not prove it knows the password: {e}"))),
        other => Err(unexpected(tag, &other, "during SCRAM authentication")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::tests::{begin, commit, insert_text, relation};
    use crate::source::{Operation, Value};
    use futures_util::FutureExt;
    use tokio::io::DuplexStream;

    #[test]
    fn start_command_quotes_names() {
        let cmd = start_replication_command("my\"slot", "pub'x\"y", "16/B374D848".parse().unwrap()).unwrap();
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"my\"\"slot\" LOGICAL 16/B374D848 \
             (proto_version '1', publication_names '\"pub''x\"\"y\"')"
        );
        assert!(matches!(start_replication_command("a\0b", "p", Lsn(0)), Err(ReplicationError::Config(_))));
        assert!(matches!(start_replication_command("s", "", Lsn(0)), Err(ReplicationError::Config(_))));
    }

    fn server_error(code: &str, message: &str) -> ServerError {
        ServerError { severity: "ERROR".into(), code: code.into(), message: message.into(), ..Default::default() }
    }

    #[test]
    fn server_errors_are_classified() {
        for code in ["57P01", "57P02", "57P03", "08006", "53300", "58030", "XX000"] {
            assert!(server_error(code, "x").is_retryable(), "{code} should be retryable");
        }
        for code in ["42704", "55000", "55006", "28P01", "28000", "42501", "3D000", "0A000", "57P04"] {
            assert!(!server_error(code, "x").is_retryable(), "{code} should be permanent");
        }
        let slot = server_error("42704", "replication slot \"s\" does not exist").to_string();
        assert!(slot.contains("SQLSTATE 42704") && slot.contains("pg_create_logical_replication_slot"), "{slot}");
        let publication = server_error("42704", "publication \"p\" does not exist").to_string();
        assert!(publication.contains("CREATE PUBLICATION"), "{publication}");
        let wal = server_error("55000", "logical decoding requires wal_level >= logical").to_string();
        assert!(wal.contains("wal_level = logical"), "{wal}");
        assert!(server_error("55006", "replication slot \"s\" is active for PID 7")
            .to_string()
            .contains("single relay"));
        assert!(server_error("28P01", "password authentication failed").to_string().contains("pg_hba.conf"));
        assert!(ReplicationError::Server(server_error("57P01", "terminating")).is_retryable());
        assert!(ReplicationError::Closed("eof".into()).is_retryable());
        assert!(!ReplicationError::Decode(DecodeError::Empty).is_retryable());
    }

    /// The server end of an in-memory connection, speaking the backend side
    /// of the protocol (https://www.postgresql.org/docs/15/protocol-message-formats.html).
    struct FakeServer(DuplexStream);

    impl FakeServer {
        async fn send(&mut self, tag: u8, body: &[u8]) {
            let mut frame = vec![tag];
            frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            frame.extend_from_slice(body);
            self.0.write_all(&frame).await.unwrap();
        }

        async fn send_error(&mut self, code: &str, message: &str) {
            let mut body = Vec::new();
            for (t, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
                body.push(t);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            }
            body.push(0);
            self.send(b'E', &body).await;
        }

        async fn read_startup(&mut self) -> Vec<(String, String)> {
            let len = self.0.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            self.0.read_exact(&mut body).await.unwrap();
            assert_eq!(&body[..4], &196_608i32.to_be_bytes(), "protocol 3.0");
            let strings: Vec<String> =
                body[4..].split(|&b| b == 0).map(|s| String::from_utf8(s.to_vec()).unwrap()).collect();
            strings
                .chunks(2)
                .filter(|kv| kv.len() == 2 && !kv[0].is_empty())
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect()
        }

        async fn read(&mut self) -> (u8, Vec<u8>) {
            let tag = self.0.read_u8().await.unwrap();
            let len = self.0.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            self.0.read_exact(&mut body).await.unwrap();
            (tag, body)
        }

        async fn ready(&mut self) {
            self.send(b'R', &0i32.to_be_bytes()).await;
            self.send(b'S', b"server_version\x0015.6\x00").await;
            self.send(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]).await;
            self.send(b'Z', b"I").await;
        }

        async fn xlog(&mut self, wal_end: u64, payload: &[u8]) {
            let mut body = vec![b'w'];
            body.extend_from_slice(&wal_end.to_be_bytes());
            body.extend_from_slice(&wal_end.to_be_bytes());
            body.extend_from_slice(&0i64.to_be_bytes());
            body.extend_from_slice(payload);
            self.send(b'd', &body).await;
        }

        async fn keepalive(&mut self, wal_end: u64, reply: bool) {
            let mut body = vec![b'k'];
            body.extend_from_slice(&wal_end.to_be_bytes());
            body.extend_from_slice(&0i64.to_be_bytes());
            body.push(u8::from(reply));
            self.send(b'd', &body).await;
        }
    }

    fn fake_pair() -> (Box<dyn Socket>, FakeServer) {
        let (client, server) = tokio::io::duplex(1 << 20);
        (Box::new(client), FakeServer(server))
    }

    const COMMAND: &str = "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1', publication_names '\"p\"')";

    #[tokio::test]
    async fn md5_startup_then_streams_transactions_and_status() {
        let config: tokio_postgres::Config = "user=alice password=s3cret dbname=app".parse().unwrap();
        let (socket, mut server) = fake_pair();
        let server_side = async {
            let params = server.read_startup().await;
            for expected in
                [("user", "alice"), ("database", "app"), ("replication", "database"), ("client_encoding", "UTF8")]
            {
                assert!(params.iter().any(|(k, v)| (k.as_str(), v.as_str()) == expected), "{expected:?} in {params:?}");
            }
            let salt = [1u8, 2, 3, 4];
            let mut body = 5i32.to_be_bytes().to_vec();
            body.extend_from_slice(&salt);
            server.send(b'R', &body).await;
            // https://www.postgresql.org/docs/15/protocol-flow.html#id-1.10.6.7.3:
            // concat('md5', md5(concat(md5(concat(password, username)), random-salt)))
            use md5::Digest;
            let inner = hex::encode(md5::Md5::digest(b"s3cretalice"));
            let mut outer = inner.into_bytes();
            outer.extend_from_slice(&salt);
            let expected = format!("md5{}\0", hex::encode(md5::Md5::digest(&outer)));
            assert_eq!(server.read().await, (b'p', expected.into_bytes()));
            server.ready().await;
            let (tag, query) = server.read().await;
            assert_eq!(tag, b'Q');
            assert_eq!(query, format!("{COMMAND}\0").into_bytes());
            server.send(b'W', &[0, 0, 0]).await;
            server
        };
        let (stream, mut server) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        let mut stream = stream.unwrap();

        server.keepalive(0x100, true).await;
        assert_eq!(
            stream.next_event().await.unwrap(),
            ReplicationEvent::Keepalive { wal_end: Lsn(0x100), reply_requested: true }
        );

        let rel = relation(16384, "public", "outbox", &[(1, "id", 20), (0, "body", 25)]);
        for (end, payload) in [
            (0x200, begin(0x240, 0, 7)),
            (0x200, rel),
            (0x210, insert_text(16384, &["1", "hé"])),
            (0x260, commit(0x240, 0x260, 0)),
        ] {
            server.xlog(end, &payload).await;
        }
        let ReplicationEvent::Tx(tx) = stream.next_event().await.unwrap() else { panic!("expected a transaction") };
        assert_eq!((tx.xid, tx.end_lsn), (7, Lsn(0x260)));
        assert_eq!(tx.changes.len(), 1);
        assert_eq!(tx.changes[0].op, Operation::Insert);
        assert_eq!(tx.changes[0].values, vec![Value::Text("1".into()), Value::Text("hé".into())]);
        assert_eq!(stream.server_wal_end(), Lsn(0x260));

        // Status: 'd' wrapping 'r' + write/flush/apply + clock + reply flag
        // (https://www.postgresql.org/docs/15/protocol-replication.html).
        stream.send_status(Lsn(0x260), false).await.unwrap();
        stream.send_status(Lsn(0x100), true).await.unwrap();
        for reply in [0u8, 1] {
            let (tag, body) = server.read().await;
            assert_eq!(tag, b'd');
            assert_eq!(body.len(), 34);
            assert_eq!(body[0], b'r');
            for at in [1, 9, 17] {
                assert_eq!(read_u64(&body, at), Some(0x260), "never moves backwards");
            }
            assert_eq!(body[33], reply);
        }
        assert_eq!(stream.confirmed(), Lsn(0x260));

        server.send_error("57P01", "terminating connection due to administrator command").await;
        let err = stream.next_event().await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(err.sqlstate(), Some("57P01"));
    }

    /// AuthenticationSASL offering `mechanisms`; returns the client's
    /// SASLInitialResponse as (mechanism, client-first-message).
    async fn sasl_first(server: &mut FakeServer, mechanisms: &[&str]) -> Option<(String, String)> {
        server.read_startup().await;
        let mut body = 10i32.to_be_bytes().to_vec();
        for m in mechanisms {
            body.extend_from_slice(m.as_bytes());
            body.push(0);
        }
        body.push(0);
        server.send(b'R', &body).await;
        // The client may refuse and hang up instead of answering.
        let tag = server.0.read_u8().await.ok()?;
        let len = server.0.read_i32().await.ok()? as usize;
        let mut body = vec![0; len - 4];
        server.0.read_exact(&mut body).await.ok()?;
        if tag != b'p' {
            return None;
        }
        let nul = body.iter().position(|b| *b == 0).unwrap();
        let mechanism = String::from_utf8(body[..nul].to_vec()).unwrap();
        let first = String::from_utf8(body[nul + 5..].to_vec()).unwrap();
        Some((mechanism, first))
    }

    #[tokio::test]
    async fn scram_plus_binds_to_the_certificate_when_offered() {
        let config: tokio_postgres::Config = "user=alice password=pw dbname=app".parse().unwrap();
        let both = [sasl::SCRAM_SHA_256_PLUS, sasl::SCRAM_SHA_256];
        for (binding, offered, mechanism, gs2) in [
            (Binding::Tls(Some(vec![7; 32])), &both[..], sasl::SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,"),
            // TLS, but the server offers no -PLUS: "y" tells it we could have bound.
            (Binding::Tls(Some(vec![7; 32])), &both[1..], sasl::SCRAM_SHA_256, "y,,"),
            (Binding::NoTls, &both[..], sasl::SCRAM_SHA_256, "n,,"),
        ] {
            let (socket, mut server) = fake_pair();
            let (result, first) =
                tokio::join!(ReplicationStream::start_on(socket, binding, &config, COMMAND, Lsn(0)), async {
                    let first = sasl_first(&mut server, offered).await;
                    drop(server); // the exchange stops here; only the first message matters
                    first
                });
            assert!(result.is_err());
            let (got_mechanism, client_first) = first.expect("a SASLInitialResponse");
            assert_eq!(got_mechanism, mechanism);
            assert!(client_first.starts_with(gs2), "{client_first}");
        }
    }

    #[tokio::test]
    async fn channel_binding_require_refuses_what_cannot_bind() {
        let config: tokio_postgres::Config =
            "user=alice password=pw dbname=app channel_binding=require".parse().unwrap();
        // SCRAM without -PLUS on offer: refused before anything is sent.
        let (socket, mut server) = fake_pair();
        let (result, first) = tokio::join!(
            ReplicationStream::start_on(socket, Binding::Tls(Some(vec![7; 32])), &config, COMMAND, Lsn(0)),
            async {
                let first = sasl_first(&mut server, &[sasl::SCRAM_SHA_256]).await;
                drop(server);
                first
            }
        );
        let err = result.unwrap_err();
        assert!(
            matches!(err, ReplicationError::Auth(_)) && err.to_string().contains("channel_binding=require"),
            "{err}"
        );
        assert!(first.is_none(), "no password exchange started");

        // A server that lets us in without SCRAM (trust) has proven nothing.
        let (socket, mut server) = fake_pair();
        let server_side = async {
            server.read_startup().await;
            server.ready().await;
        };
        let (result, ()) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        let err = result.unwrap_err();
        assert!(err.to_string().contains("without channel binding"), "{err}");
    }

    #[tokio::test]
    async fn missing_slot_is_permanent_with_a_hint() {
        let config: tokio_postgres::Config = "user=alice dbname=app".parse().unwrap();
        let (socket, mut server) = fake_pair();
        let server_side = async {
            server.read_startup().await;
            server.ready().await;
            server.read().await;
            server.send_error("42704", "replication slot \"s\" does not exist").await;
        };
        let (result, ()) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        let err = result.unwrap_err();
        assert!(!err.is_retryable());
        let text = err.to_string();
        assert!(
            text.contains("SQLSTATE 42704")
                && text.contains("does not exist")
                && text.contains("pg_create_logical_replication_slot"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn password_requested_but_missing_is_an_auth_error() {
        let config: tokio_postgres::Config = "user=alice dbname=app".parse().unwrap();
        let (socket, mut server) = fake_pair();
        let server_side = async {
            server.read_startup().await;
            server.send(b'R', &3i32.to_be_bytes()).await;
        };
        let (result, ()) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        assert!(matches!(result, Err(ReplicationError::Auth(_))));
    }

    #[tokio::test]
    async fn cleartext_password_and_server_auth_failure() {
        let config: tokio_postgres::Config = "user=alice password=wrong dbname=app".parse().unwrap();
        let (socket, mut server) = fake_pair();
        let server_side = async {
            server.read_startup().await;
            server.send(b'R', &3i32.to_be_bytes()).await;
            assert_eq!(server.read().await, (b'p', b"wrong\0".to_vec()));
            server.send_error("28P01", "password authentication failed for user \"alice\"").await;
        };
        let (result, ()) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        let err = result.unwrap_err();
        assert_eq!(err.sqlstate(), Some("28P01"));
        assert!(!err.is_retryable());
        assert!(!err.to_string().contains("wrong"), "the password must not appear in errors");
    }

    #[tokio::test]
    async fn next_event_is_cancel_safe() {
        let config: tokio_postgres::Config = "user=alice dbname=app".parse().unwrap();
        let (socket, mut server) = fake_pair();
        let server_side = async {
            server.read_startup().await;
            server.ready().await;
            server.read().await;
            server.send(b'W', &[0, 0, 0]).await;
        };
        let (stream, ()) =
            tokio::join!(ReplicationStream::start_on(socket, Binding::NoTls, &config, COMMAND, Lsn(0)), server_side);
        let mut stream = stream.unwrap();

        // A transaction whose bytes arrive in pieces, with the reader dropped
        // while waiting between them: nothing may be lost or duplicated.
        let mut wire = Vec::new();
        for payload in [
            begin(0x10, 0, 1),
            relation(1, "public", "t", &[(1, "id", 20)]),
            insert_text(1, &["1"]),
            insert_text(1, &["2"]),
            commit(0x10, 0x20, 0),
        ] {
            let mut body = vec![b'w'];
            body.extend_from_slice(&[0; 24]);
            body.extend_from_slice(&payload);
            wire.push(b'd');
            wire.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            wire.extend_from_slice(&body);
        }
        let chunks: Vec<&[u8]> = wire.chunks(7).collect();
        let (last, pieces) = chunks.split_last().unwrap();
        for chunk in pieces {
            server.0.write_all(chunk).await.unwrap();
            assert!(stream.next_event().now_or_never().is_none(), "incomplete transaction yielded");
        }
        server.0.write_all(last).await.unwrap();
        let ReplicationEvent::Tx(tx) = stream.next_event().now_or_never().unwrap().unwrap() else {
            panic!("expected a transaction")
        };
        assert_eq!(tx.changes.len(), 2);
        assert_eq!(tx.changes[0].values, vec![Value::Text("1".into())]);
        assert_eq!(tx.changes[1].values, vec![Value::Text("2".into())]);
        assert_eq!(tx.end_lsn, Lsn(0x20));
        assert!(stream.next_event().now_or_never().is_none(), "nothing left over");
    }

    /// Against a real server, when `REPL_TEST_DATABASE_URL` names one (a
    /// superuser on a cluster with wal_level=logical). Everything it creates
    /// carries this process id and is dropped at the end.
    #[tokio::test]
    async fn streams_from_a_real_server() {
        let Ok(url) = std::env::var("REPL_TEST_DATABASE_URL") else {
            println!("skipping streams_from_a_real_server: REPL_TEST_DATABASE_URL is not set");
            return;
        };
        let mut config = crate::db::PgTarget::parse(&url).expect("REPL_TEST_DATABASE_URL");
        let (client, connection) = config.connect().await.expect("connect");
        tokio::spawn(connection);
        // Idle keepalives come at half of wal_sender_timeout: make that short
        // for this session only (the setting is per connection).
        config.pg.options("-c wal_sender_timeout=2s");

        let id = std::process::id();
        let (table, publication, slot, slot2) = (
            format!("repl_test_{id}"),
            format!("repl_pub_{id}"),
            format!("repl_slot_{id}"),
            format!("repl_slot2_{id}"),
        );
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL, note text);
                 CREATE PUBLICATION {publication} FOR TABLE {table};"
            ))
            .await
            .unwrap();
        for s in [&slot, &slot2] {
            client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[s]).await.unwrap();
        }

        let mut stream = ReplicationStream::start(&config, &slot, &publication, Lsn(0)).await.unwrap();
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO {table} (body) VALUES ('rolled back'); ROLLBACK;
                 BEGIN; INSERT INTO {table} (body, note) VALUES ('héllo 世界 🎉', NULL), ('second', 'n'); COMMIT;"
            ))
            .await
            .unwrap();
        let tx = next_tx(&mut stream).await;
        assert_eq!(tx.changes.len(), 2, "the rolled-back row must not appear: {tx:?}");
        let first = &tx.changes[0];
        assert_eq!(first.table.qualified_name(), format!("public.{table}"));
        let key: Vec<_> = first.table.columns.iter().map(|c| (c.name.as_str(), c.is_key)).collect();
        assert_eq!(key, [("id", true), ("body", false), ("note", false)]);
        assert_eq!(first.op, Operation::Insert);
        assert_eq!(first.values[1..], [Value::Text("héllo 世界 🎉".into()), Value::Null]);
        assert_eq!(tx.changes[1].values[1..], [Value::Text("second".into()), Value::Text("n".into())]);
        assert!(stream.server_wal_end() >= tx.end_lsn);

        // Confirming moves the slot. A status asking for a reply is answered
        // with a keepalive once processed; a periodic keepalive might beat it,
        // so look again a bounded number of times.
        let mut confirmed = Lsn(0);
        for _ in 0..10 {
            stream.send_status(tx.end_lsn, true).await.unwrap();
            next_keepalive(&mut stream).await;
            confirmed = slot_confirmed(&client, &slot).await;
            if confirmed == tx.end_lsn {
                break;
            }
        }
        assert_eq!(confirmed, tx.end_lsn);

        // Idle: the server asks for replies on its own (keepalives that only
        // report a new WAL end come in between); answering keeps us connected.
        let mut asked = 0;
        for _ in 0..50 {
            let (wal_end, reply_requested) = next_keepalive(&mut stream).await;
            assert!(wal_end >= tx.end_lsn);
            if reply_requested {
                asked += 1;
                stream.send_status(tx.end_lsn, false).await.unwrap();
                if asked == 2 {
                    break;
                }
            }
        }
        assert_eq!(asked, 2, "the server never asked for a reply");

        // The slot is busy: a second reader is refused for good.
        let err = ReplicationStream::start(&config, &slot, &publication, Lsn(0)).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("55006"), "{err}");
        assert!(!err.is_retryable());
        let err = ReplicationStream::start(&config, "repl_no_such_slot", &publication, Lsn(0)).await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("42704"), "{err}");
        assert!(!err.is_retryable() && err.to_string().contains("pg_create_logical_replication_slot"), "{err}");

        // A clean close releases the slot at once; a new stream resumes after
        // the confirmed transaction.
        stream.close().await.unwrap();
        let mut stream = ReplicationStream::start(&config, &slot, &publication, Lsn(0)).await.unwrap();
        client.batch_execute(&format!("INSERT INTO {table} (body) VALUES ('third')")).await.unwrap();
        let tx2 = next_tx(&mut stream).await;
        assert!(tx2.commit_lsn > tx.end_lsn);
        assert_eq!(tx2.changes.len(), 1);
        assert_eq!(tx2.changes[0].values[1], Value::Text("third".into()));
        stream.close().await.unwrap();

        // A missing publication surfaces at the first change, permanent.
        let mut stream = ReplicationStream::start(&config, &slot2, "repl_no_such_pub", Lsn(0)).await.unwrap();
        client.batch_execute(&format!("INSERT INTO {table} (body) VALUES ('fourth')")).await.unwrap();
        let err = loop {
            match stream.next_event().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.sqlstate(), Some("42704"), "{err}");
        assert!(!err.is_retryable() && err.to_string().contains("CREATE PUBLICATION"), "{err}");
        drop(stream);

        for s in [&slot, &slot2] {
            // The walsender of a dropped connection may still hold the slot a moment.
            for _ in 0..100 {
                if client.execute("SELECT pg_drop_replication_slot($1)", &[s]).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        client.batch_execute(&format!("DROP PUBLICATION {publication}; DROP TABLE {table};")).await.unwrap();
    }

    async fn next_tx(stream: &mut ReplicationStream) -> CommittedTx {
        loop {
            match stream.next_event().await.unwrap() {
                ReplicationEvent::Tx(tx) => return tx,
                ReplicationEvent::Keepalive { reply_requested, .. } => {
                    if reply_requested {
                        let confirmed = stream.confirmed();
                        stream.send_status(confirmed, false).await.unwrap();
                    }
                }
            }
        }
    }

    async fn next_keepalive(stream: &mut ReplicationStream) -> (Lsn, bool) {
        match stream.next_event().await.unwrap() {
            ReplicationEvent::Keepalive { wal_end, reply_requested } => (wal_end, reply_requested),
            ReplicationEvent::Tx(tx) => panic!("unexpected transaction {tx:?}"),
        }
    }

    async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str) -> Lsn {
        let row = client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap();
        row.get::<_, String>(0).parse().unwrap()
    }
}
