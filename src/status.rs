//! `outbox-relay status`: the slot, the stored offset and the ledger, at a glance.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::ledger::{Ledger, LedgerError};

#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: Option<SlotStatus>,
    pub stored_offset: Option<String>,
    pub backlog: i64,
    pub oldest_pending_seconds: Option<f64>,
    pub deliveries: Vec<ChannelCount>,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub active: bool,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the slot keeps on the server's disk: what a stalled relay costs.
    pub retained_wal_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ChannelCount {
    pub channel: String,
    pub status: String,
    pub count: i64,
}

pub async fn gather(client: Client, cfg: &Config) -> Result<Status, LedgerError> {
    let slot = client
        .query_opt(
            "SELECT slot_name::text, active, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?
        .map(|r| SlotStatus { name: r.get(0), active: r.get(1), confirmed_flush_lsn: r.get(2), retained_wal_bytes: r.get(3) });
    let ledger = Ledger::new(client, &cfg.relay.schema);
    Ok(Status {
        slot,
        stored_offset: ledger.load_offset(&cfg.source.slot).await?.map(|l| l.to_string()),
        backlog: ledger.backlog().await?,
        oldest_pending_seconds: ledger.oldest_pending_age().await?.map(|d| d.as_secs_f64()),
        deliveries: ledger
            .counts()
            .await?
            .into_iter()
            .map(|(channel, status, count)| ChannelCount { channel, status, count })
            .collect(),
    })
}

/// For a terminal.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    match &s.slot {
        Some(slot) => out.push_str(&format!(
            "slot {}: {}, confirmed {}, retaining {} of WAL\n",
            slot.name,
            if slot.active { "active" } else { "INACTIVE (no relay connected)" },
            slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            slot.retained_wal_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
        )),
        None => out.push_str("slot: MISSING (run `outbox-relay setup`)\n"),
    }
    out.push_str(&format!("stored offset: {}\n", s.stored_offset.as_deref().unwrap_or("none yet")));
    out.push_str(&format!("backlog: {} deliveries", s.backlog));
    if let Some(age) = s.oldest_pending_seconds {
        out.push_str(&format!(", oldest waiting {age:.1} s"));
    }
    out.push('\n');
    if !s.deliveries.is_empty() {
        out.push_str(&format!("{:<16} {:<10} {:>10}\n", "channel", "status", "count"));
        for c in &s.deliveries {
            out.push_str(&format!("{:<16} {:<10} {:>10}\n", c.channel, c.status, c.count));
        }
    }
    out
}

fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
