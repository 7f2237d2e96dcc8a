//! `log`: one JSON line per delivery on stdout, for development and the demo.
//! Never fails, so it is also a safe stand-in while a real provider is configured.

use std::io::Write;

use super::{Accepted, OutboundMessage, ProviderError};

#[derive(Clone, Debug, Default)]
pub struct Log;

impl Log {
    pub fn new() -> Self {
        Log
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let mut out = String::new();
        for m in messages {
            let line = serde_json::json!({
                "provider": "log",
                "delivery_id": m.delivery_id,
                "idempotency_key": m.idempotency_key,
                "channel": m.channel_name,
                "event": m.event,
                "data": m.payload,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        // One locked write per batch: lines from concurrent workers never interleave.
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush());
        messages.iter().map(|_| Ok(Accepted::default())).collect()
    }
}
