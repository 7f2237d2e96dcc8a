//! A committed change, as both source modes hand it to routing: the values
//! and offsets every later stage speaks of. Plain data with no I/O, so that
//! routing, the ledger and the configuration can name a change without
//! depending on the code that reads one.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A PostgreSQL WAL position. Ordered, so "never move backwards" is a `max`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("not an LSN: {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("not an LSN: {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("not an LSN: {s:?}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("not an LSN: {s:?}"));
        }
        Ok(Lsn((hi << 32) | lo))
    }
}

/// The kind of row change, as routes name it in `operations`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

/// One column of a table, as the source describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type OID decides how the text value becomes JSON (numbers stay numbers).
    pub type_oid: u32,
    /// Part of the replica identity (the primary key by default): builds the ledger key.
    pub is_key: bool,
}

/// A table's shape. Shared by every change of that table, so a 100k-row
/// transaction does not clone column lists 100k times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
}

impl Table {
    /// `schema.name`, the form routes use.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A column value in PostgreSQL's text output format; `None` is SQL NULL.
/// `Unchanged` is a TOASTed value an UPDATE did not touch (pgoutput omits it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Null,
    Text(String),
    Unchanged,
}

/// Names one committed change, the same on every replay of it: the ledger's
/// key is built from it (docs/design.md, "The key"). Not the row's primary
/// key, which names a row, not a change: a row updated twice, or a key reused
/// after a delete or `TRUNCATE ... RESTART IDENTITY`, is several changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeId {
    /// Logical mode: the transaction's commit LSN and the change's position in
    /// it (0-based, counted over every change pgoutput sends for it). A replay
    /// decodes the same WAL into the same changes in the same order.
    Wal { commit_lsn: Lsn, seq: u32 },
    /// Listen mode: the change-log row's id, written once by the capture
    /// trigger inside the writer's transaction.
    Log(i64),
    /// `backfill`: a row read from its table, named by a hash of the table and
    /// its primary key (the commit that wrote it is not known any more).
    Backfill(u64),
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeId::Wal { commit_lsn, seq } => write!(f, "wal:{commit_lsn}#{seq}"),
            ChangeId::Log(id) => write!(f, "log:{id}"),
            ChangeId::Backfill(h) => write!(f, "backfill:{h:016x}"),
        }
    }
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// One row change inside a committed transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChange {
    /// Which change this is, stable across replays.
    pub id: ChangeId,
    pub table: Arc<Table>,
    pub op: Operation,
    /// New values for inserts and updates, old key values for deletes; same
    /// order as `table.columns`.
    pub values: Vec<Value>,
}

/// A committed transaction, complete. Rolled-back transactions never appear.
#[derive(Clone, Debug, PartialEq)]
pub struct CommittedTx {
    /// Position to confirm to PostgreSQL once this transaction's deliveries are
    /// durable: the end of its commit record.
    pub end_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub commit_time: DateTime<Utc>,
    pub xid: u32,
    pub changes: Vec<RowChange>,
    /// False for a part of a large transaction whose Commit has not arrived
    /// yet: more changes follow, and `end_lsn` is unknown (zero) — nothing may
    /// be confirmed on its account.
    pub complete: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
    }
}
