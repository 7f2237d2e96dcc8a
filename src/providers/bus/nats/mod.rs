//! NATS JetStream sink: publishes with `Nats-Msg-Id` = the delivery key and
//! waits for the stream's PubAck.
//!
//! The PubAck comes once the stream stored the message (with its replicas);
//! only then is it `sent`. A re-send of the same key within the stream's
//! duplicate window is acknowledged as a duplicate and not stored again, so a
//! crash between the PubAck and the ledger write costs nothing on the stream.
//! https://docs.nats.io/using-nats/developer/develop_jetstream/model_deep_dive#message-deduplication

mod config;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectErrorKind, HeaderMap};
use futures_util::future::join_all;

pub use self::config::{NatsConfig, StreamSpec, PROFILE};
use super::envelope;
use super::{retryable, short, too_large, Lazy};
use crate::providers::{Accepted, OutboundMessage, ProviderError};

/// NATS binding of CloudEvents, binary mode: HTTP's `ce-` headers.
const CE_PREFIX: &str = "ce-";

#[derive(Clone)]
struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
}

#[derive(Clone)]
pub struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NatsConfig,
    link: Lazy<Link>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").field("url", &crate::secret::redact_url(self.inner.cfg.url.expose())).finish()
    }
}

impl Nats {
    pub fn build(cfg: &NatsConfig, _: &crate::providers::BuildContext) -> Result<Nats, ProviderError> {
        Ok(Nats::new(cfg))
    }

    pub fn new(cfg: &NatsConfig) -> Nats {
        Nats { inner: Arc::new(Inner { cfg: cfg.clone(), link: Lazy::default() }) }
    }

    /// One result per message, same order; published at once, each awaiting its PubAck.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        join_all(messages.iter().map(|m| self.send(m))).await
    }

    async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let out = envelope::build(m, CE_PREFIX)?;
        let link = self.link().await?;
        let max = link.client.server_info().max_payload;
        let size = envelope::size(&out);
        if max > 0 && size > max {
            return Err(too_large("nats", size, max));
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &out.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        headers.insert("Content-Type", out.content_type);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, out.id.as_str());
        let timeout = Duration::from_millis(self.inner.cfg.timeout_ms);
        let publish = async {
            let ack = link.js.publish_with_headers(out.destination.clone(), headers, out.body.clone().into()).await?;
            ack.await
        };
        let ack = match tokio::time::timeout(timeout, publish).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => return Err(classify_publish(e, &out.destination)),
            Err(_) => return Err(retryable(format!("nats: no PubAck within {} ms", timeout.as_millis()))),
        };
        // A duplicate is the stream saying it has this key already: sent, once.
        Ok(Accepted { provider_message_id: Some(format!("{}:{}", ack.stream, ack.sequence)) })
    }

    async fn link(&self) -> Result<Link, ProviderError> {
        let cfg = &self.inner.cfg;
        self.inner
            .link
            .get(|| async {
                let timeout = Duration::from_millis(cfg.timeout_ms);
                let mut options = async_nats::ConnectOptions::new()
                    .name("outbox-relay")
                    .connection_timeout(timeout)
                    .request_timeout(Some(timeout));
                if let Some(token) = &cfg.token {
                    options = options.token(token.expose().to_string());
                }
                // async-nats ignores credentials in the URL: hand them over ourselves.
                let addr: async_nats::ServerAddr = cfg.url.expose().parse().map_err(|e| ProviderError::Permanent {
                    reason: short(format!("nats: providers.nats.url: {e}")),
                })?;
                if let Some(user) = addr.username() {
                    let password = addr.password().map(percent_decode).unwrap_or_default();
                    options = options.user_and_password(percent_decode(user), password);
                }
                // Once connected the client reconnects by itself; a publish
                // meanwhile times out (retryable) rather than failing for good.
                let client = options.connect(cfg.url.expose()).await.map_err(|e| {
                    let reason = short(format!("nats: {e}"));
                    match e.kind() {
                        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                            ProviderError::Unauthorized { reason }
                        }
                        ConnectErrorKind::ServerParse | ConnectErrorKind::Tls => ProviderError::Permanent { reason },
                        _ => retryable(reason),
                    }
                })?;
                let js = jetstream::new(client.clone());
                if let Some(spec) = &cfg.create_stream {
                    create_stream(&js, spec).await?;
                }
                Ok(Link { client, js })
            })
            .await
    }
}

/// `%XX` escapes in URL user info (`p%40ss` → `p@ss`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn create_stream(js: &jetstream::Context, spec: &StreamSpec) -> Result<(), ProviderError> {
    let config = stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(spec.duplicate_window_s),
        max_message_size: if spec.max_message_bytes > 0 { spec.max_message_bytes } else { -1 },
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| retryable(short(format!("nats: creating stream {}: {e}", spec.name))))
}

/// "No responders" = no stream captures the subject: retried, so deliveries
/// wait for the stream. The stream's own refusals (message over
/// `max_msg_size`, JetStream error 10054) repeat; timeouts and broken
/// connections may pass after the client reconnects.
fn classify_publish(e: async_nats::jetstream::context::PublishError, subject: &str) -> ProviderError {
    let text = short(format!("nats: {e}"));
    match e.kind() {
        PublishErrorKind::StreamNotFound => retryable(format!("nats: no stream captures subject {subject:?}")),
        PublishErrorKind::Other if text.contains("10054") || text.contains("maximum") => {
            ProviderError::Permanent { reason: text }
        }
        _ if text.contains("authorization") || text.contains("permissions violation") => {
            ProviderError::Unauthorized { reason: text }
        }
        _ => retryable(text),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_credentials_are_percent_decoded() {
        assert_eq!(super::percent_decode("p%40ss%2Fw0rd"), "p@ss/w0rd");
        assert_eq!(super::percent_decode("100%"), "100%");
    }
}
