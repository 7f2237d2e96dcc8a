//! The `log` provider: prints each delivery as one JSON line on stdout.
//!
//! For trying the relay without provider accounts, and for piping deliveries
//! into another tool. It accepts everything: there is no remote side to
//! refuse, and a broken stdout is an operator problem that retrying a
//! delivery would not fix.

use std::io::Write;

use serde::Serialize;

use super::{Accepted, OutboundMessage, ProviderError};

pub mod config;

pub use self::config::{LogConfig, PROFILE};

#[derive(Clone, Debug, Default)]
pub struct Log;

#[derive(Serialize)]
struct Line<'a> {
    provider: &'static str,
    delivery_id: i64,
    channel: &'a str,
    event: &'a str,
    data: &'a serde_json::Value,
}

impl Log {
    pub fn build(_: &LogConfig, _: &super::BuildContext) -> Result<Log, ProviderError> {
        Ok(Log)
    }

    pub fn new() -> Log {
        Log
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        // One lock for the batch keeps its lines together and unbroken by
        // concurrent workers' lines.
        write_lines(&mut std::io::stdout().lock(), messages);
        messages.iter().map(|_| Ok(Accepted::default())).collect()
    }
}

fn write_lines(out: &mut impl Write, messages: &[OutboundMessage]) {
    for m in messages {
        let line = Line {
            provider: "log",
            delivery_id: m.delivery_id,
            channel: &m.channel_name,
            event: &m.event,
            data: &m.payload,
        };
        // Errors ignored on purpose: see the module comment.
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            let _ = out.write_all(b"\n");
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(id: i64) -> OutboundMessage {
        OutboundMessage {
            delivery_id: id,
            idempotency_key: format!("k{id}"),
            channel_name: format!("private-user-{id}"),
            event: "created".into(),
            payload: json!({"id": id, "text": "line\nbreak"}),
            contact: None,
            bus: None,
            devices: Vec::new(),
        }
    }

    #[test]
    fn one_parseable_line_per_message() {
        let mut out = Vec::new();
        write_lines(&mut out, &[msg(1), msg(2)]);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            json!({"provider": "log", "delivery_id": 2, "channel": "private-user-2", "event": "created",
                   "data": {"id": 2, "text": "line\nbreak"}})
        );
    }

    #[tokio::test]
    async fn always_accepts() {
        let results = Log::new().send_batch(&[msg(1), msg(2), msg(3)]).await;
        assert_eq!(results, vec![Ok(Accepted::default()); 3]);
    }
}
