//! Pure decoder of the pgoutput logical replication protocol, version 1
//! (<https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>),
//! and the assembler that turns a Begin..Commit run of messages into one
//! [`CommittedTx`].
//!
//! No I/O here: `replication` feeds the XLogData payloads in. Every read is
//! bounds-checked, so truncated or hostile input is a [`DecodeError`], never a
//! panic. Values are requested in text format; a binary value is an error
//! rather than something silently mis-rendered downstream.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{ChangeId, Column, CommittedTx, Lsn, Operation, RowChange, Table, Value};

/// Why a pgoutput message could not be decoded or assembled. Always permanent:
/// the server replays the same bytes after a reconnect, so retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput: empty message")]
    Empty,
    #[error("pgoutput: message ends early while reading {what}")]
    UnexpectedEof { what: &'static str },
    #[error("pgoutput: unknown message type {0:?} (only protocol version 1 is supported)")]
    UnknownMessage(char),
    #[error("pgoutput: {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("pgoutput: {what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("pgoutput: negative length {len} for {what}")]
    NegativeLength { what: &'static str, len: i64 },
    #[error("pgoutput: unknown tuple column kind {0:?}")]
    UnknownColumnKind(char),
    #[error("pgoutput: column {column} is in binary format; the stream must be requested in text")]
    BinaryValue { column: usize },
    #[error("pgoutput: expected {expected} but found {found:?}")]
    UnexpectedMarker { expected: &'static str, found: char },
    #[error("pgoutput: timestamp {0} µs since 2000-01-01 is out of range")]
    InvalidTimestamp(i64),
    #[error("pgoutput: change for relation id {0} that no Relation message described")]
    UnknownRelation(u32),
    #[error("pgoutput: row for {table} has {got} columns, its Relation message has {expected}")]
    ColumnCountMismatch { table: String, expected: usize, got: usize },
    #[error("pgoutput: {0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("pgoutput: Begin of xid {xid} while xid {open} is still open")]
    NestedBegin { xid: u32, open: u32 },
}

/// The old row an Update or Delete carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity columns are set, the others are null.
    Key(Vec<Value>),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

impl OldTuple {
    pub fn values(&self) -> &[Value] {
        match self {
            OldTuple::Key(v) | OldTuple::Full(v) => v,
        }
    }

    fn into_values(self) -> Vec<Value> {
        match self {
            OldTuple::Key(v) | OldTuple::Full(v) => v,
        }
    }
}

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin {
        final_lsn: Lsn,
        commit_time: DateTime<Utc>,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: DateTime<Utc>,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation {
        rel_id: u32,
        /// `d` default, `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        table: Table,
    },
    Type {
        type_oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        rel_id: u32,
        new: Vec<Value>,
    },
    Update {
        rel_id: u32,
        old: Option<OldTuple>,
        new: Vec<Value>,
    },
    Delete {
        rel_id: u32,
        old: OldTuple,
    },
    Truncate {
        rel_ids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// `pg_logical_emit_message` output; the content is not kept.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
    },
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL timestamp (µs since 2000-01-01 UTC) to a `DateTime`.
pub fn pg_timestamp(micros: i64) -> Result<DateTime<Utc>, DecodeError> {
    micros
        .checked_add(PG_EPOCH_OFFSET_MICROS)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or(DecodeError::InvalidTimestamp(micros))
}

/// `DateTime` to a PostgreSQL timestamp, for standby status updates.
pub fn to_pg_timestamp(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Bounds-checked big-endian reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::UnexpectedEof { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    fn timestamp(&mut self, what: &'static str) -> Result<DateTime<Utc>, DecodeError> {
        pg_timestamp(self.i64(what)?)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(DecodeError::UnexpectedEof { what })?;
        let bytes = self.take(end, what)?;
        self.take(1, what)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// A length field that must not be negative.
    fn len_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len: len.into() })
    }

    fn len_i16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i16(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len: len.into() })
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Decodes one pgoutput message (the payload of one XLogData).
pub fn decode(buf: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let (&tag, rest) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf: rest };
    let msg = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time: r.timestamp("Begin commit timestamp")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => {
            // Flags byte: currently unused by the server, so not interpreted.
            r.u8("Commit flags")?;
            PgOutputMessage::Commit {
                commit_lsn: r.lsn("Commit LSN")?,
                end_lsn: r.lsn("Commit end LSN")?,
                commit_time: r.timestamp("Commit timestamp")?,
            }
        }
        b'O' => PgOutputMessage::Origin { commit_lsn: r.lsn("Origin commit LSN")?, name: r.cstr("Origin name")? },
        b'R' => decode_relation(&mut r)?,
        b'Y' => PgOutputMessage::Type {
            type_oid: r.u32("Type OID")?,
            schema: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        },
        b'I' => {
            let rel_id = r.u32("Insert relation id")?;
            expect_marker(&mut r, b"N", "'N' before Insert tuple")?;
            PgOutputMessage::Insert { rel_id, new: decode_tuple(&mut r)? }
        }
        b'U' => {
            let rel_id = r.u32("Update relation id")?;
            let marker = r.u8("Update tuple marker")?;
            let (old, marker) = match marker {
                b'K' | b'O' => {
                    let values = decode_tuple(&mut r)?;
                    let old = if marker == b'K' { OldTuple::Key(values) } else { OldTuple::Full(values) };
                    (Some(old), r.u8("Update new tuple marker")?)
                }
                other => (None, other),
            };
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker {
                    expected: "'N' before Update new tuple",
                    found: marker as char,
                });
            }
            PgOutputMessage::Update { rel_id, old, new: decode_tuple(&mut r)? }
        }
        b'D' => {
            let rel_id = r.u32("Delete relation id")?;
            let marker = expect_marker(&mut r, b"KO", "'K' or 'O' before Delete tuple")?;
            let values = decode_tuple(&mut r)?;
            let old = if marker == b'K' { OldTuple::Key(values) } else { OldTuple::Full(values) };
            PgOutputMessage::Delete { rel_id, old }
        }
        b'T' => {
            let n = r.len_i32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            // Cap the preallocation by what the buffer can hold, so a forged
            // count cannot make us allocate gigabytes before failing.
            let mut rel_ids = Vec::with_capacity(n.min(r.buf.len() / 4));
            for _ in 0..n {
                rel_ids.push(r.u32("Truncate relation id")?);
            }
            PgOutputMessage::Truncate { rel_ids, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let flags = r.u8("Message flags")?;
            let lsn = r.lsn("Message LSN")?;
            let prefix = r.cstr("Message prefix")?;
            let len = r.len_i32("Message content length")?;
            r.take(len, "Message content")?;
            PgOutputMessage::Message { transactional: flags & 1 != 0, lsn, prefix }
        }
        other => return Err(DecodeError::UnknownMessage(other as char)),
    };
    r.finish()?;
    Ok(msg)
}

fn expect_marker(r: &mut Reader<'_>, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
    let found = r.u8(expected)?;
    if allowed.contains(&found) {
        Ok(found)
    } else {
        Err(DecodeError::UnexpectedMarker { expected, found: found as char })
    }
}

fn decode_relation(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let rel_id = r.u32("Relation id")?;
    let mut schema = r.cstr("Relation namespace")?;
    // The protocol sends an empty namespace for pg_catalog.
    if schema.is_empty() {
        schema = "pg_catalog".to_owned();
    }
    let name = r.cstr("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let ncols = r.len_i16("Relation column count")?;
    let mut columns = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        let flags = r.u8("column flags")?;
        let name = r.cstr("column name")?;
        let type_oid = r.u32("column type OID")?;
        r.i32("column type modifier")?;
        columns.push(Column { name, type_oid, is_key: flags & 1 != 0 });
    }
    Ok(PgOutputMessage::Relation { rel_id, replica_identity, table: Table { schema, name, columns } })
}

fn decode_tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, DecodeError> {
    let ncols = r.len_i16("tuple column count")?;
    let mut values = Vec::with_capacity(ncols);
    for column in 0..ncols {
        let kind = r.u8("tuple column kind")?;
        values.push(match kind {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.len_i32("text value length")?;
                let bytes = r.take(len, "text value")?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what: "text value" })?;
                Value::Text(text.to_owned())
            }
            b'b' => return Err(DecodeError::BinaryValue { column }),
            other => return Err(DecodeError::UnknownColumnKind(other as char)),
        });
    }
    Ok(values)
}

/// The transaction being assembled.
struct OpenTx {
    xid: u32,
    /// From Begin: where the transaction commits and when (pgoutput v1 only
    /// sends committed transactions), so parts can be routed before Commit.
    commit_lsn: Lsn,
    commit_time: DateTime<Utc>,
    changes: Vec<RowChange>,
    /// Changes seen so far, parts already handed out included: the next
    /// change's position in the transaction (its [`ChangeId`]).
    seq: u32,
}

/// Changes handed out before Commit once a transaction has this many: memory
/// stays bounded by this, not by the largest transaction (a 1M-row bulk_create).
pub const PART_ROWS: usize = 1000;

/// Keeps the relation cache and gathers one transaction's changes until its
/// Commit. Rolled-back transactions never reach pgoutput, so every Begin is
/// followed by a Commit on a healthy stream.
///
/// The whole transaction is held in memory (protocol version 1 does not stream
/// in-progress transactions): a single huge transaction costs memory in
/// proportion to its size.
///
/// A new connection starts a new `TxAssembler`: the server re-sends Relation
/// messages on every new walsender, and a half-received transaction from a
/// broken connection must be dropped, not completed by another stream.
#[derive(Default)]
pub struct TxAssembler {
    relations: HashMap<u32, Arc<Table>>,
    open: Option<OpenTx>,
}

impl TxAssembler {
    /// Between Begin and Commit: some of a transaction has arrived, not all.
    /// The stream's position must not be confirmed past it then.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// The table a relation id currently stands for.
    pub fn relation(&self, rel_id: u32) -> Option<&Arc<Table>> {
        self.relations.get(&rel_id)
    }

    /// Feeds one message; returns the transaction when `msg` is its Commit.
    ///
    /// A transaction without published changes still comes out (empty
    /// `changes`): confirming its `end_lsn` lets the slot advance.
    pub fn push(&mut self, msg: PgOutputMessage) -> Result<Option<CommittedTx>, DecodeError> {
        match msg {
            PgOutputMessage::Begin { xid, commit_time, final_lsn } => {
                if let Some(open) = &self.open {
                    return Err(DecodeError::NestedBegin { xid, open: open.xid });
                }
                self.open = Some(OpenTx { xid, commit_lsn: final_lsn, commit_time, changes: Vec::new(), seq: 0 });
                Ok(None)
            }
            PgOutputMessage::Commit { commit_lsn, end_lsn, commit_time } => {
                let open = self.open.take().ok_or(DecodeError::OutsideTransaction("Commit"))?;
                Ok(Some(CommittedTx {
                    end_lsn,
                    commit_lsn,
                    commit_time,
                    xid: open.xid,
                    changes: open.changes,
                    complete: true,
                }))
            }
            PgOutputMessage::Relation { rel_id, table, .. } => {
                // Replaced, not merged: a Relation message always describes the
                // table's whole current shape (after ALTER TABLE, say), and rows
                // already assembled keep the Arc of the shape they were sent with.
                self.relations.insert(rel_id, Arc::new(table));
                Ok(None)
            }
            PgOutputMessage::Insert { rel_id, new } => {
                self.add_change(rel_id, Operation::Insert, new, "Insert")?;
                Ok(self.take_part())
            }
            PgOutputMessage::Update { rel_id, old, new } => {
                let new = match old {
                    // An untouched TOASTed column arrives as 'u' in the new row;
                    // with REPLICA IDENTITY FULL the old row has its value, which
                    // is by definition the current one.
                    Some(OldTuple::Full(old)) if old.len() == new.len() => new
                        .into_iter()
                        .zip(old)
                        .map(|(n, o)| match (n, o) {
                            (Value::Unchanged, o @ Value::Text(_)) => o,
                            (n, _) => n,
                        })
                        .collect(),
                    _ => new,
                };
                self.add_change(rel_id, Operation::Update, new, "Update")?;
                Ok(self.take_part())
            }
            PgOutputMessage::Delete { rel_id, old } => {
                self.add_change(rel_id, Operation::Delete, old.into_values(), "Delete")?;
                Ok(self.take_part())
            }
            PgOutputMessage::Truncate { rel_ids, .. } => {
                // Not a row change: nothing to route. Said in the log so an
                // operator can tell why a truncated outbox produced nothing.
                tracing::info!(relations = ?rel_ids, "TRUNCATE on a published table ignored");
                Ok(None)
            }
            PgOutputMessage::Origin { .. } | PgOutputMessage::Type { .. } | PgOutputMessage::Message { .. } => Ok(None),
        }
    }

    /// A part of the open transaction once it holds [`PART_ROWS`] changes.
    fn take_part(&mut self) -> Option<CommittedTx> {
        let open = self.open.as_mut().filter(|o| o.changes.len() >= PART_ROWS)?;
        Some(CommittedTx {
            end_lsn: Lsn::default(),
            commit_lsn: open.commit_lsn,
            commit_time: open.commit_time,
            xid: open.xid,
            changes: std::mem::take(&mut open.changes),
            complete: false,
        })
    }

    fn add_change(
        &mut self,
        rel_id: u32,
        op: Operation,
        values: Vec<Value>,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let table = self.relations.get(&rel_id).ok_or(DecodeError::UnknownRelation(rel_id))?;
        if values.len() != table.columns.len() {
            return Err(DecodeError::ColumnCountMismatch {
                table: table.qualified_name(),
                expected: table.columns.len(),
                got: values.len(),
            });
        }
        let table = Arc::clone(table);
        let open = self.open.as_mut().ok_or(DecodeError::OutsideTransaction(what))?;
        let id = ChangeId::Wal { commit_lsn: open.commit_lsn, seq: open.seq };
        open.seq += 1;
        open.changes.push(RowChange { id, table, op, values });
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn a_large_transaction_comes_out_in_parts_then_whole_at_commit() {
        use chrono::TimeZone;
        let mut a = TxAssembler::new();
        let when = Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap();
        let table = Table {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![Column { name: "id".into(), type_oid: 20, is_key: true }],
        };
        a.push(PgOutputMessage::Relation { rel_id: 1, replica_identity: b'd', table }).unwrap();
        a.push(PgOutputMessage::Begin { final_lsn: Lsn(500), commit_time: when, xid: 9 }).unwrap();
        let mut parts = vec![];
        for i in 0..(PART_ROWS * 2 + 3) {
            let new = vec![Value::Text(i.to_string())];
            if let Some(part) = a.push(PgOutputMessage::Insert { rel_id: 1, new }).unwrap() {
                parts.push(part);
            }
        }
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| !p.complete && p.changes.len() == PART_ROWS && p.commit_lsn == Lsn(500)));
        assert_eq!(parts[0].commit_time, when);
        assert!(a.in_transaction());
        let last = a
            .push(PgOutputMessage::Commit { commit_lsn: Lsn(500), end_lsn: Lsn(560), commit_time: when })
            .unwrap()
            .unwrap();
        assert!(last.complete);
        assert_eq!((last.changes.len(), last.end_lsn), (3, Lsn(560)));
        assert!(!a.in_transaction());
    }
    use super::*;

    /// Builds pgoutput message bytes the way the server lays them out.
    #[derive(Default)]
    pub(crate) struct Msg(pub(crate) Vec<u8>);

    impl Msg {
        pub(crate) fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(self, s: &str) -> Self {
            let mut m = self.u8(b't').i32(s.len() as i32);
            m.0.extend_from_slice(s.as_bytes());
            m
        }
    }

    pub(crate) fn begin(final_lsn: i64, ts: i64, xid: i32) -> Vec<u8> {
        Msg::new(b'B').i64(final_lsn).i64(ts).i32(xid).0
    }

    pub(crate) fn commit(commit_lsn: i64, end_lsn: i64, ts: i64) -> Vec<u8> {
        Msg::new(b'C').u8(0).i64(commit_lsn).i64(end_lsn).i64(ts).0
    }

    /// Relation with columns (flags, name, type oid).
    pub(crate) fn relation(rel_id: i32, schema: &str, name: &str, cols: &[(u8, &str, i32)]) -> Vec<u8> {
        let mut m = Msg::new(b'R').i32(rel_id).str(schema).str(name).u8(b'd').i16(cols.len() as i16);
        for (flags, col, oid) in cols {
            m = m.u8(*flags).str(col).i32(*oid).i32(-1);
        }
        m.0
    }

    pub(crate) fn insert_text(rel_id: i32, values: &[&str]) -> Vec<u8> {
        let mut m = Msg::new(b'I').i32(rel_id).u8(b'N').i16(values.len() as i16);
        for v in values {
            m = m.text(v);
        }
        m.0
    }

    fn outbox_cols() -> Vec<(u8, &'static str, i32)> {
        vec![(1, "id", 20), (0, "body", 25), (0, "user_id", 23)]
    }

    // 2024-01-02 03:04:05.123456 UTC in µs since 2000-01-01.
    const TS: i64 = 757_479_845_123_456;

    #[test]
    fn timestamps_count_from_2000() {
        assert_eq!(pg_timestamp(0).unwrap().to_rfc3339(), "2000-01-01T00:00:00+00:00");
        let t = pg_timestamp(TS).unwrap();
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05.123456+00:00");
        assert_eq!(to_pg_timestamp(t), TS);
        assert!(pg_timestamp(i64::MAX).is_err());
    }

    #[test]
    fn decodes_begin_and_commit() {
        let m = decode(&begin(0x16_B374_D848, TS, 771)).unwrap();
        assert_eq!(
            m,
            PgOutputMessage::Begin {
                final_lsn: "16/B374D848".parse().unwrap(),
                commit_time: pg_timestamp(TS).unwrap(),
                xid: 771,
            }
        );
        let m = decode(&commit(0x100, 0x180, TS)).unwrap();
        assert_eq!(
            m,
            PgOutputMessage::Commit {
                commit_lsn: Lsn(0x100),
                end_lsn: Lsn(0x180),
                commit_time: pg_timestamp(TS).unwrap(),
            }
        );
    }

    #[test]
    fn decodes_origin_type_message_truncate() {
        let m = decode(&Msg::new(b'O').i64(42).str("node_a").0).unwrap();
        assert_eq!(m, PgOutputMessage::Origin { commit_lsn: Lsn(42), name: "node_a".into() });

        let m = decode(&Msg::new(b'Y').i32(16500).str("public").str("mood").0).unwrap();
        assert_eq!(m, PgOutputMessage::Type { type_oid: 16500, schema: "public".into(), name: "mood".into() });

        let mut raw = Msg::new(b'M').u8(1).i64(99).str("app").i32(3).0;
        raw.extend_from_slice(b"\x00\xff\x01");
        let m = decode(&raw).unwrap();
        assert_eq!(m, PgOutputMessage::Message { transactional: true, lsn: Lsn(99), prefix: "app".into() });

        let m = decode(&Msg::new(b'T').i32(2).u8(3).i32(16384).i32(16390).0).unwrap();
        assert_eq!(m, PgOutputMessage::Truncate { rel_ids: vec![16384, 16390], cascade: true, restart_identity: true });
    }

    #[test]
    fn decodes_relation_with_key_flags() {
        let m = decode(&relation(16384, "public", "notifications_outbox", &outbox_cols())).unwrap();
        let PgOutputMessage::Relation { rel_id, replica_identity, table } = m else {
            panic!("not a relation: {m:?}");
        };
        assert_eq!(rel_id, 16384);
        assert_eq!(replica_identity, b'd');
        assert_eq!(table.qualified_name(), "public.notifications_outbox");
        assert_eq!(
            table.columns,
            vec![
                Column { name: "id".into(), type_oid: 20, is_key: true },
                Column { name: "body".into(), type_oid: 25, is_key: false },
                Column { name: "user_id".into(), type_oid: 23, is_key: false },
            ]
        );
    }

    #[test]
    fn empty_namespace_means_pg_catalog() {
        let m = decode(&relation(1, "", "pg_thing", &[(0, "a", 25)])).unwrap();
        let PgOutputMessage::Relation { table, .. } = m else { panic!() };
        assert_eq!(table.schema, "pg_catalog");
    }

    #[test]
    fn decodes_insert_with_null_and_multibyte_text() {
        let raw = Msg::new(b'I').i32(16384).u8(b'N').i16(3).text("7").text("héllo → 世界 🎉").u8(b'n').0;
        assert_eq!(
            decode(&raw).unwrap(),
            PgOutputMessage::Insert {
                rel_id: 16384,
                new: vec![Value::Text("7".into()), Value::Text("héllo → 世界 🎉".into()), Value::Null,],
            }
        );
    }

    #[test]
    fn decodes_update_without_with_key_and_with_full_old_tuple() {
        let new = |m: Msg| m.u8(b'N').i16(2).text("1").u8(b'u');
        let plain = new(Msg::new(b'U').i32(5)).0;
        assert_eq!(
            decode(&plain).unwrap(),
            PgOutputMessage::Update { rel_id: 5, old: None, new: vec![Value::Text("1".into()), Value::Unchanged] }
        );

        let keyed = new(Msg::new(b'U').i32(5).u8(b'K').i16(2).text("0").u8(b'n')).0;
        assert_eq!(
            decode(&keyed).unwrap(),
            PgOutputMessage::Update {
                rel_id: 5,
                old: Some(OldTuple::Key(vec![Value::Text("0".into()), Value::Null])),
                new: vec![Value::Text("1".into()), Value::Unchanged],
            }
        );

        let full = new(Msg::new(b'U').i32(5).u8(b'O').i16(2).text("0").text("big")).0;
        assert_eq!(
            decode(&full).unwrap(),
            PgOutputMessage::Update {
                rel_id: 5,
                old: Some(OldTuple::Full(vec![Value::Text("0".into()), Value::Text("big".into())])),
                new: vec![Value::Text("1".into()), Value::Unchanged],
            }
        );
    }

    #[test]
    fn decodes_delete_key_and_full() {
        let raw = Msg::new(b'D').i32(9).u8(b'K').i16(2).text("3").u8(b'n').0;
        assert_eq!(
            decode(&raw).unwrap(),
            PgOutputMessage::Delete { rel_id: 9, old: OldTuple::Key(vec![Value::Text("3".into()), Value::Null]) }
        );
        let raw = Msg::new(b'D').i32(9).u8(b'O').i16(1).text("3").0;
        assert_eq!(
            decode(&raw).unwrap(),
            PgOutputMessage::Delete { rel_id: 9, old: OldTuple::Full(vec![Value::Text("3".into())]) }
        );
        let raw = Msg::new(b'D').i32(9).u8(b'N').i16(1).text("3").0;
        assert!(matches!(decode(&raw), Err(DecodeError::UnexpectedMarker { .. })));
    }

    #[test]
    fn binary_values_are_refused() {
        let raw = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b'b').i32(1).u8(7).0;
        assert_eq!(decode(&raw), Err(DecodeError::BinaryValue { column: 0 }));
    }

    #[test]
    fn invalid_utf8_text_is_an_error() {
        let mut raw = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(2).0;
        raw.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(decode(&raw), Err(DecodeError::InvalidUtf8 { what: "text value" }));
    }

    #[test]
    fn every_truncation_of_valid_messages_is_an_error_not_a_panic() {
        let full_update =
            Msg::new(b'U').i32(5).u8(b'O').i16(2).text("0").text("é").u8(b'N').i16(2).text("1").u8(b'u').0;
        let mut message = Msg::new(b'M').u8(0).i64(1).str("p").i32(2).0;
        message.extend_from_slice(b"ab");
        let samples = [
            begin(1, TS, 2),
            commit(1, 2, TS),
            Msg::new(b'O').i64(42).str("x").0,
            relation(1, "public", "t", &outbox_cols()),
            Msg::new(b'Y').i32(1).str("s").str("n").0,
            insert_text(1, &["1", "two", "3"]),
            full_update,
            Msg::new(b'D').i32(9).u8(b'K').i16(1).text("3").0,
            Msg::new(b'T').i32(1).u8(0).i32(16384).0,
            message,
        ];
        for sample in &samples {
            assert!(decode(sample).is_ok(), "sample must decode whole: {sample:?}");
            for cut in 0..sample.len() {
                assert!(decode(&sample[..cut]).is_err(), "prefix of {cut} bytes of {sample:?} decoded");
            }
            let mut longer = sample.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(DecodeError::TrailingBytes(1)));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Zzz"), Err(DecodeError::UnknownMessage('Z')));
        // Negative lengths and counts.
        let raw = Msg::new(b'I').i32(1).u8(b'N').i16(-1).0;
        assert!(matches!(decode(&raw), Err(DecodeError::NegativeLength { .. })));
        let raw = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(-5).0;
        assert!(matches!(decode(&raw), Err(DecodeError::NegativeLength { .. })));
        // A huge claimed length with nothing behind it.
        let raw = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX).0;
        assert!(matches!(decode(&raw), Err(DecodeError::UnexpectedEof { .. })));
        let raw = Msg::new(b'T').i32(i32::MAX).u8(0).0;
        assert!(matches!(decode(&raw), Err(DecodeError::UnexpectedEof { .. })));
        let raw = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b'x').0;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownColumnKind('x')));
        // A pseudo-random byte soup of every tag: only errors or values, no panic.
        let mut seed: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            let len = (seed % 40) as usize;
            let mut buf = Vec::with_capacity(len + 1);
            buf.push(b"BCORYIUDTM"[(seed % 10) as usize]);
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                buf.push((seed >> 16) as u8);
            }
            let _ = decode(&buf);
        }
    }

    fn push_all(asm: &mut TxAssembler, msgs: &[Vec<u8>]) -> Result<Vec<CommittedTx>, DecodeError> {
        let mut out = Vec::new();
        for raw in msgs {
            if let Some(tx) = asm.push(decode(raw)?)? {
                out.push(tx);
            }
        }
        Ok(out)
    }

    #[test]
    fn assembles_a_transaction() {
        let mut asm = TxAssembler::new();
        let txs = push_all(
            &mut asm,
            &[
                begin(0x200, TS, 900),
                relation(16384, "public", "outbox", &outbox_cols()),
                insert_text(16384, &["1", "hi", "42"]),
                Msg::new(b'U').i32(16384).u8(b'N').i16(3).text("1").text("bye").u8(b'n').0,
                Msg::new(b'D').i32(16384).u8(b'K').i16(3).text("1").u8(b'n').u8(b'n').0,
                commit(0x200, 0x230, TS),
            ],
        )
        .unwrap();
        assert_eq!(txs.len(), 1);
        let tx = &txs[0];
        assert_eq!((tx.commit_lsn, tx.end_lsn, tx.xid), (Lsn(0x200), Lsn(0x230), 900));
        assert_eq!(tx.commit_time, pg_timestamp(TS).unwrap());
        let ops: Vec<_> = tx.changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, [Operation::Insert, Operation::Update, Operation::Delete]);
        assert_eq!(tx.changes[0].table.qualified_name(), "public.outbox");
        assert_eq!(
            tx.changes[0].values,
            vec![Value::Text("1".into()), Value::Text("hi".into()), Value::Text("42".into())]
        );
        assert_eq!(tx.changes[2].values, vec![Value::Text("1".into()), Value::Null, Value::Null]);
        // Shared shape, not copies.
        assert!(Arc::ptr_eq(&tx.changes[0].table, &tx.changes[2].table));
    }

    #[test]
    fn empty_transaction_still_yields_its_lsn() {
        let mut asm = TxAssembler::new();
        let txs = push_all(&mut asm, &[begin(0x10, TS, 1), commit(0x10, 0x28, TS)]).unwrap();
        assert_eq!(txs.len(), 1);
        assert_eq!(txs[0].end_lsn, Lsn(0x28));
        assert!(txs[0].changes.is_empty());
    }

    #[test]
    fn relation_replaced_mid_stream() {
        let mut asm = TxAssembler::new();
        let txs = push_all(
            &mut asm,
            &[
                relation(7, "public", "outbox", &[(1, "id", 20), (0, "body", 25)]),
                begin(0x10, TS, 1),
                insert_text(7, &["1", "a"]),
                // ALTER TABLE ... ADD COLUMN, ALTER ... RENAME: the server re-sends.
                relation(7, "public", "outbox2", &[(1, "id", 20), (0, "body", 25), (0, "extra", 16)]),
                insert_text(7, &["2", "b", "t"]),
                commit(0x10, 0x20, TS),
            ],
        )
        .unwrap();
        let changes = &txs[0].changes;
        assert_eq!(changes[0].table.name, "outbox");
        assert_eq!(changes[0].table.columns.len(), 2);
        assert_eq!(changes[1].table.name, "outbox2");
        assert_eq!(changes[1].table.columns[2].name, "extra");
        assert_eq!(asm.relation(7).unwrap().name, "outbox2");
        // A row shaped like the old relation no longer fits.
        let err = push_all(&mut asm, &[begin(0x30, TS, 2), insert_text(7, &["3", "c"])]).unwrap_err();
        assert!(matches!(err, DecodeError::ColumnCountMismatch { expected: 3, got: 2, .. }));
    }

    #[test]
    fn change_for_unknown_relation_is_an_error() {
        let mut asm = TxAssembler::new();
        let err = push_all(&mut asm, &[begin(0x10, TS, 1), insert_text(99, &["1"])]).unwrap_err();
        assert_eq!(err, DecodeError::UnknownRelation(99));
    }

    #[test]
    fn framing_errors_are_caught() {
        let mut asm = TxAssembler::new();
        let rel = relation(1, "public", "t", &[(1, "id", 20)]);
        assert_eq!(
            push_all(&mut asm, &[rel.clone(), insert_text(1, &["1"])]).unwrap_err(),
            DecodeError::OutsideTransaction("Insert")
        );
        assert_eq!(push_all(&mut asm, &[commit(1, 2, TS)]).unwrap_err(), DecodeError::OutsideTransaction("Commit"));
        assert_eq!(
            push_all(&mut asm, &[begin(1, TS, 5), begin(2, TS, 6)]).unwrap_err(),
            DecodeError::NestedBegin { xid: 6, open: 5 }
        );
    }

    #[test]
    fn unchanged_toast_is_filled_from_a_full_old_row_only() {
        let mut asm = TxAssembler::new();
        let cols = [(1, "id", 20), (0, "body", 25)];
        let keyed_update = Msg::new(b'U').i32(1).u8(b'N').i16(2).text("1").u8(b'u').0;
        let full_update =
            Msg::new(b'U').i32(1).u8(b'O').i16(2).text("1").text("long body").u8(b'N').i16(2).text("1").u8(b'u').0;
        let txs = push_all(
            &mut asm,
            &[relation(1, "public", "t", &cols), begin(1, TS, 1), keyed_update, full_update, commit(1, 2, TS)],
        )
        .unwrap();
        assert_eq!(txs[0].changes[0].values, vec![Value::Text("1".into()), Value::Unchanged]);
        assert_eq!(txs[0].changes[1].values, vec![Value::Text("1".into()), Value::Text("long body".into())]);
    }

    #[test]
    fn ignores_non_row_messages_inside_a_transaction() {
        let mut asm = TxAssembler::new();
        let mut message = Msg::new(b'M').u8(1).i64(1).str("p").i32(1).0;
        message.push(b'x');
        let txs = push_all(
            &mut asm,
            &[
                begin(1, TS, 1),
                Msg::new(b'O').i64(1).str("o").0,
                Msg::new(b'Y').i32(1).str("s").str("n").0,
                message,
                Msg::new(b'T').i32(1).u8(0).i32(16384).0,
                commit(1, 2, TS),
            ],
        )
        .unwrap();
        assert_eq!(txs.len(), 1);
        assert!(txs[0].changes.is_empty());
    }
}
