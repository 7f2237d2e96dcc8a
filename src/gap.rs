//! Is the source still the one the ledger's offset came from?
//!
//! The relay resumes from its stored offset. That is only sound if the server
//! still holds every change after it: a slot dropped and recreated starts at
//! the WAL's end, one invalidated by `max_slot_wal_keep_size` has thrown WAL
//! away, and a database restored from a backup into a cluster with lower LSNs
//! (or xids) has never seen the offset at all. Streaming on in any of these
//! cases would skip changes without a word; the relay refuses instead, names
//! the gap, and leaves the decision to an operator (docs/operations.md, "A gap
//! in the stream"): fill it (backfill), then `outbox-relay accept-gap`.

use tokio_postgres::Client;

use crate::change::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum GapError {
    #[error("{0}\nfix: see docs/operations.md, \"A gap in the stream\": fill the gap (backfill), then run `outbox-relay accept-gap` to resume from the slot")]
    Gap(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

impl GapError {
    /// A gap needs a human; a database error may pass.
    pub fn is_retryable(&self) -> bool {
        match self {
            GapError::Gap(_) => false,
            GapError::Db(e) => crate::db::db_error_is_retryable(e),
        }
    }
}

/// What the server says about a logical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotState {
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved`, `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    pub server_wal_end: Lsn,
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, wal_status::text, pg_current_wal_lsn()::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        confirmed_flush: r.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()),
        wal_status: r.get(1),
        server_wal_end: r.get::<_, String>(2).parse().unwrap_or_default(),
    }))
}

/// The rule, without I/O: `stored` is the ledger's offset (`None` on a first
/// start, which has nothing to miss).
pub fn judge_slot(slot: &str, stored: Option<Lsn>, state: &SlotState) -> Result<(), String> {
    if state.wal_status.as_deref() == Some("lost") {
        return Err(format!(
            "slot {slot} was invalidated (wal_status = lost, usually max_slot_wal_keep_size): the WAL after the \
             relay's offset {} is gone, so the changes committed since then cannot be read",
            stored.map_or("(none)".to_string(), |l| l.to_string())
        ));
    }
    let Some(stored) = stored else { return Ok(()) };
    if stored > state.server_wal_end {
        return Err(format!(
            "the relay's offset {stored} is ahead of the server's WAL ({}): the database was restored or \
             replaced since the relay last ran; the changes between are unknown",
            state.server_wal_end
        ));
    }
    // The relay confirms to the slot only what its ledger already holds, so a
    // slot ahead of the ledger was moved by someone else: recreated, or advanced.
    if let Some(confirmed) = state.confirmed_flush.filter(|c| *c > stored) {
        return Err(format!(
            "slot {slot} starts at {confirmed} but the relay recorded changes only up to {stored}: the slot was \
             dropped and recreated (or advanced) since; changes committed between {stored} and {confirmed} are \
             not in it"
        ));
    }
    Ok(())
}

/// Logical mode: the stored offset against the slot.
pub async fn check_slot(client: &Client, slot: &str, stored: Option<Lsn>) -> Result<(), GapError> {
    match slot_state(client, slot).await? {
        // A missing slot is preflight's and the stream's to report, with its own fix.
        None => Ok(()),
        Some(state) => judge_slot(slot, stored, &state).map_err(GapError::Gap),
    }
}

/// Listen mode: the stored watermark against the server's transaction ids,
/// which only move forward on one cluster (xid8 carries the epoch).
pub async fn check_watermark(client: &Client, schema: &str, name: &str) -> Result<(), GapError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT watermark::text, pg_current_xact_id()::text, watermark > pg_current_xact_id()
                 FROM {schema}.listen_progress WHERE name = $1"
            ),
            &[&name],
        )
        .await?;
    match row {
        Some(r) if r.get::<_, bool>(2) => Err(GapError::Gap(format!(
            "the relay's listen watermark {} is ahead of the server's transaction ids ({}): the database was \
             restored or replaced since the relay last ran; the changes between are unknown",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ))),
        _ => Ok(()),
    }
}

/// `accept-gap`: the operator has dealt with the gap; resume from where the
/// server is. Logical: the stored offset becomes the slot's position (which
/// may move it backwards, after a restore: the one place that is allowed).
/// Listen: the watermark becomes the server's oldest running transaction.
/// Returns a description of what changed, for the operator.
pub async fn accept(client: &Client, schema: &str, slot: &str, logical: bool) -> Result<String, GapError> {
    if logical {
        let state = slot_state(client, slot)
            .await?
            .ok_or_else(|| GapError::Gap(format!("slot {slot} does not exist: run `outbox-relay setup` first")))?;
        let to = state.confirmed_flush.unwrap_or(state.server_wal_end);
        let from: Option<String> = client
            .query_opt(&format!("SELECT confirmed_lsn::text FROM {schema}.progress WHERE slot = $1"), &[&slot])
            .await?
            .map(|r| r.get(0));
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.progress (slot, confirmed_lsn) VALUES ($1, $2::text::pg_lsn)
                     ON CONFLICT (slot) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, updated_at = now()"
                ),
                &[&slot, &to.to_string()],
            )
            .await?;
        Ok(format!("offset of slot {slot}: {} -> {to}", from.as_deref().unwrap_or("(none)")))
    } else {
        let w: String = client
            .query_one(
                &format!(
                    "INSERT INTO {schema}.listen_progress AS p (name, watermark)
                     VALUES ($1, pg_snapshot_xmin(pg_current_snapshot()))
                     ON CONFLICT (name) DO UPDATE SET watermark = EXCLUDED.watermark, updated_at = now()
                     RETURNING p.watermark::text"
                ),
                &[&slot],
            )
            .await?
            .get(0);
        Ok(format!("listen watermark of {slot}: -> {w}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(confirmed: u64, status: &str, end: u64) -> SlotState {
        SlotState { confirmed_flush: Some(Lsn(confirmed)), wal_status: Some(status.into()), server_wal_end: Lsn(end) }
    }

    #[test]
    fn a_slot_behind_or_at_the_offset_is_fine() {
        assert_eq!(judge_slot("s", Some(Lsn(100)), &state(90, "reserved", 200)), Ok(()));
        assert_eq!(judge_slot("s", Some(Lsn(100)), &state(100, "reserved", 200)), Ok(()));
        assert_eq!(judge_slot("s", None, &state(500, "reserved", 600)), Ok(()), "first start");
    }

    #[test]
    fn each_gap_is_named() {
        let recreated = judge_slot("s", Some(Lsn(100)), &state(300, "reserved", 400)).unwrap_err();
        assert!(
            recreated.contains("dropped and recreated") && recreated.contains("0/64") && recreated.contains("0/12C")
        );
        let lost = judge_slot("s", Some(Lsn(100)), &state(100, "lost", 400)).unwrap_err();
        assert!(lost.contains("invalidated"), "{lost}");
        let restored = judge_slot("s", Some(Lsn(500)), &state(100, "reserved", 200)).unwrap_err();
        assert!(restored.contains("restored"), "{restored}");
    }
}
