//! `outbox-relay status`: the slot, the stored offset and the ledger, at a glance.

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::ledger::{Ledger, LedgerError, PausedChannel};

#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: &'static str,
    pub slot: Option<SlotStatus>,
    /// Listen mode: every transaction below this xid has been read.
    pub watermark: Option<String>,
    /// Listen mode: change-log rows not yet read.
    pub change_log_unread: Option<i64>,
    pub stored_offset: Option<String>,
    /// Pending or in flight, paused channels left out (as the gauge).
    pub backlog: i64,
    /// Paused channels left out, likewise.
    pub oldest_pending_seconds: Option<f64>,
    /// Channels an operator paused: their rows wait (counted in `deliveries`).
    pub paused: Vec<PausedChannel>,
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
        .map(|r| SlotStatus {
            name: r.get(0),
            active: r.get(1),
            confirmed_flush_lsn: r.get(2),
            retained_wal_bytes: r.get(3),
        });
    let listen = cfg.source.mode == crate::config::SourceMode::Listen;
    let (watermark, change_log_unread) = if listen {
        let row = client
            .query_one(
                &format!(
                    "SELECT (SELECT watermark::text FROM {s}.listen_progress WHERE name = $1),
                            (SELECT count(*) FROM {s}.changes c WHERE c.xid >= coalesce(
                                (SELECT watermark FROM {s}.listen_progress WHERE name = $1), '0'::xid8))",
                    s = cfg.relay.schema
                ),
                &[&cfg.source.slot],
            )
            .await?;
        (row.get(0), Some(row.get(1)))
    } else {
        (None, None)
    };
    let ledger = Ledger::new(client, &cfg.relay.schema);
    Ok(Status {
        mode: if listen { "listen" } else { "logical" },
        slot,
        watermark,
        change_log_unread,
        stored_offset: ledger.load_offset(&cfg.source.slot).await?.map(|l| l.to_string()),
        backlog: ledger.backlog().await?,
        oldest_pending_seconds: ledger.oldest_pending_age().await?.map(|d| d.as_secs_f64()),
        paused: ledger.paused_channels().await?,
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
    match (&s.slot, s.mode) {
        (_, "listen") => out.push_str(&format!(
            "listen mode: watermark {}, {} change-log row(s) unread\n",
            s.watermark.as_deref().unwrap_or("none yet"),
            s.change_log_unread.unwrap_or(0)
        )),
        (Some(slot), _) => out.push_str(&format!(
            "slot {}: {}, confirmed {}, retaining {} of WAL\n",
            slot.name,
            if slot.active { "active" } else { "INACTIVE (no relay connected)" },
            slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            slot.retained_wal_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
        )),
        (None, _) => out.push_str("slot: MISSING (run `outbox-relay setup`)\n"),
    }
    if s.mode == "logical" {
        out.push_str(&format!("stored offset: {}\n", s.stored_offset.as_deref().unwrap_or("none yet")));
    }
    out.push_str(&format!("backlog: {} deliveries", s.backlog));
    if let Some(age) = s.oldest_pending_seconds {
        out.push_str(&format!(", oldest waiting {age:.1} s"));
    }
    if !s.paused.is_empty() {
        out.push_str(" (paused channels left out)");
    }
    out.push('\n');
    for p in &s.paused {
        out.push_str(&format!(
            "channel {} PAUSED since {} by {}: its deliveries wait (`outbox-relay resume {}`)\n",
            p.channel,
            p.paused_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            p.paused_by,
            p.channel
        ));
    }
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
