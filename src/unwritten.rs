//! Deliveries handed to dispatch before the ledger has them.
//!
//! While dispatch keeps up, ingestion does not write a fresh delivery and
//! then its outcome: it hands the delivery over in memory, and the outcome's
//! write *is* the delivery's first and only row (`sent`, `pending` with a
//! backoff, `failed`…). One row version per delivery instead of two. What
//! keeps that exactly once is the offset: the slot may let a change go only
//! when every delivery of it is in the ledger, so the stored (and confirmed)
//! offset moves only over a *prefix* of batches whose deliveries are all
//! written — [`Prefix`]. A crash before that replays them from the slot, and
//! the ledger's unique key skips those already written.
//!
//! The rest of the crash story is the same as for a claimed row: a delivery
//! handed over, maybe sent, not yet written, is sent again after a crash and
//! counted as a possible re-send. To count it, ingestion stores — before
//! handing a batch over — the highest commit position it handed over unwritten
//! (`progress.unwritten_lsn`, migration 012). On replay, changes up to there
//! are written the ordinary way (skipping what is in the ledger), and what is
//! new among them is counted (`ingest.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::change::Lsn;
use crate::routing::NewDelivery;

/// How many handed-over deliveries are still unwritten, overall and per batch.
/// Shared by ingestion (which waits on it) and dispatch (which writes).
#[derive(Debug, Default)]
pub struct Unwritten {
    /// Handed over and not yet written, over every batch and session: what
    /// a new session waits for before it replays.
    outstanding: AtomicUsize,
    /// Rung whenever a batch's last delivery is written. One waiter at a time
    /// (the ingestion writer, or a new source session before it starts), and
    /// `notify_one` keeps a permit for it when nobody waits yet.
    written: Notify,
}

/// One handed-over batch: its deliveries not yet written.
#[derive(Debug)]
pub struct Batch {
    /// Its deliveries not yet written: the offset may pass the batch at 0.
    remaining: AtomicUsize,
    shared: Arc<Unwritten>,
}

/// One delivery handed over unwritten: what its outcome's write needs.
#[derive(Debug)]
pub struct Row {
    /// Its payload moved to the claim dispatch works with; see `payload`.
    pub delivery: NewDelivery,
    /// The payload as JSON text: what the write needs, a fraction of the
    /// memory of the parsed value (thousands of these are in flight).
    pub payload: String,
    batch: Arc<Batch>,
    /// Counted out once, whatever calls [`Row::written`] again.
    done: std::sync::atomic::AtomicBool,
}

impl Unwritten {
    /// A batch of `rows` deliveries about to be handed over.
    pub fn batch(self: &Arc<Self>, rows: usize) -> Arc<Batch> {
        self.outstanding.fetch_add(rows, Ordering::AcqRel);
        Arc::new(Batch { remaining: AtomicUsize::new(rows), shared: self.clone() })
    }

    /// Until every delivery handed over so far is written: a new source
    /// session replays from the stored offset, and must find in the ledger
    /// what the previous one left in dispatch's hands.
    pub async fn all_written(&self) {
        while self.outstanding.load(Ordering::Acquire) > 0 {
            self.written.notified().await;
        }
    }

    /// Resolves when some batch has been written since the last call (or
    /// before the first): the caller then looks again at what it waits for.
    pub async fn some_written(&self) {
        self.written.notified().await
    }
}

impl Drop for Row {
    /// Every path through dispatch ends in an outcome, written; a row dropped
    /// without one (a task aborted) is not in the ledger. Its batch then
    /// never counts as written — the offset does not pass it, and the next
    /// session replays it — but a new session must not wait for it forever.
    fn drop(&mut self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            tracing::warn!(key = %self.delivery.idempotency_key, "a delivery handed over was dropped unwritten; it is replayed from the slot");
            self.batch.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            self.batch.shared.written.notify_one();
        }
    }
}

impl Batch {
    pub fn row(self: &Arc<Self>, delivery: NewDelivery) -> Row {
        let payload = delivery.payload.to_string();
        Row { delivery, payload, batch: self.clone(), done: Default::default() }
    }

    pub fn is_written(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }
}

impl Row {
    /// Called once the ledger has this delivery (its outcome committed).
    pub fn written(&self) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let b = &self.batch;
        b.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
        if b.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            b.shared.written.notify_one();
        }
    }
}

/// The offsets of batches in the order they were read, each known durable
/// only when its deliveries are all written; the offset that may be stored
/// and confirmed is the end of the longest finished prefix.
#[derive(Debug, Default)]
pub struct Prefix {
    queue: VecDeque<(Lsn, Option<Arc<Batch>>)>,
}

impl Prefix {
    /// A batch recorded up to `end`; `unwritten`: its deliveries still in dispatch's hands.
    pub fn push(&mut self, end: Lsn, unwritten: Option<Arc<Batch>>) {
        self.queue.push_back((end, unwritten));
    }

    /// Drops the finished batches at the front; returns the highest end among them.
    pub fn advance(&mut self) -> Option<Lsn> {
        let mut end = None;
        while let Some((lsn, batch)) = self.queue.front() {
            if batch.as_ref().is_some_and(|b| !b.is_written()) {
                break;
            }
            end = Some(end.map_or(*lsn, |e: Lsn| e.max(*lsn)));
            self.queue.pop_front();
        }
        end
    }

    /// A batch is still waiting for its deliveries.
    pub fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(key: &str) -> NewDelivery {
        NewDelivery {
            change: crate::change::ChangeId::Log(1),
            operation: crate::change::Operation::Insert,
            source_table: "public.t".into(),
            source_pk: "1".into(),
            channel: "in_app".into(),
            idempotency_key: key.into(),
            event: "e".into(),
            recipient: None,
            payload: serde_json::json!({"id": 1}),
            disposition: crate::routing::Disposition::Pending,
            commit_lsn: Lsn(1),
            committed_at: chrono::Utc::now(),
            correlation: None,
        }
    }

    #[test]
    fn the_offset_moves_only_over_batches_written_in_full() {
        let shared = Arc::new(Unwritten::default());
        let mut prefix = Prefix::default();
        prefix.push(Lsn(10), None);
        let b = shared.batch(2);
        let (r1, r2) = (b.row(delivery("a")), b.row(delivery("b")));
        prefix.push(Lsn(20), Some(b));
        prefix.push(Lsn(30), None);
        assert_eq!(prefix.advance(), Some(Lsn(10)), "up to the first unwritten batch");
        assert_eq!(prefix.advance(), None);
        r1.written();
        r1.written();
        assert_eq!(prefix.advance(), None, "one of two written, however often it is said");
        r2.written();
        assert_eq!(prefix.advance(), Some(Lsn(30)), "then past it and what followed");
        assert!(!prefix.waiting());
    }

    #[tokio::test]
    async fn a_row_dropped_unwritten_holds_the_offset_but_not_the_next_session() {
        let shared = Arc::new(Unwritten::default());
        let mut prefix = Prefix::default();
        let b = shared.batch(1);
        prefix.push(Lsn(10), Some(b.clone()));
        drop(b.row(delivery("a")));
        assert_eq!(prefix.advance(), None, "not in the ledger: the slot must replay it");
        tokio::time::timeout(std::time::Duration::from_secs(5), shared.all_written()).await.unwrap();
    }

    #[tokio::test]
    async fn a_new_session_waits_for_what_the_last_one_handed_over() {
        let shared = Arc::new(Unwritten::default());
        let b = shared.batch(1);
        let row = b.row(delivery("a"));
        assert_eq!(row.payload, r#"{"id":1}"#, "kept as text for its write");
        let waiting = tokio::spawn({
            let shared = shared.clone();
            async move { shared.all_written().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        row.written();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    }
}
