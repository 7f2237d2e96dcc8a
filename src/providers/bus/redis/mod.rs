//! Redis Streams sink: `XADD` under a script that adds a delivery only once.
//!
//! Next to each stream a sorted set remembers the delivery keys added in the
//! last `dedup_window_s` (at most `dedup_max` of them). The script checks the
//! set, adds the entry and records the key in one atomic step — Redis runs a
//! script whole, with nothing in between — so a re-send after a crash finds
//! its key and adds nothing. A message is `sent` once the script replied;
//! durability beyond that is the server's persistence (AOF) setting.
//! https://redis.io/docs/latest/develop/interact/programmability/eval-intro/

mod config;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, Script};

pub use self::config::{RedisConfig, PROFILE};
use super::envelope;
use super::{retryable, short, too_large, Lazy};
use crate::providers::{Accepted, OutboundMessage, ProviderError};

/// CloudEvents has no Redis binding; stream fields take HTTP's `ce-` prefix.
const CE_PREFIX: &str = "ce-";

/// Suffix of the de-dup set's key, beside the stream's.
pub const DEDUP_SUFFIX: &str = ":outbox-relay-dedup";

/// KEYS[1] the stream, KEYS[2] its de-dup set (member: delivery key, score:
/// µs when added). ARGV: key, window ms, max keys, mkstream (1/0), maxlen
/// (0 = none), then field, value, ... Returns {1, entry id}, {0, ""} for a
/// key already added, {-1, ""} for a missing stream under NOMKSTREAM.
/// TIME is read inside so every relay shares the server's clock; scores
/// strictly increase (ties would be evicted in member order, not age order).
const ADD_ONCE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window_ms = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window_ms * 1000)
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {0, ''}
end
local args = {'XADD', KEYS[1]}
if ARGV[4] == '0' then table.insert(args, 'NOMKSTREAM') end
if ARGV[5] ~= '0' then
  table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, ARGV[5])
end
table.insert(args, '*')
for i = 6, #ARGV do table.insert(args, ARGV[i]) end
local id = redis.call(unpack(args))
if not id then return {-1, ''} end
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= now then now = tonumber(newest[2]) + 1 end
redis.call('ZADD', KEYS[2], now, ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) end
redis.call('PEXPIRE', KEYS[2], window_ms)
return {1, id}
"#;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADD_ONCE));

#[derive(Clone)]
pub struct RedisStreams {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RedisConfig,
    conn: Lazy<MultiplexedConnection>,
}

impl std::fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreams").field("url", &crate::secret::redact_url(self.inner.cfg.url.expose())).finish()
    }
}

impl RedisStreams {
    pub fn build(cfg: &RedisConfig, _: &crate::providers::BuildContext) -> Result<RedisStreams, ProviderError> {
        Ok(RedisStreams::new(cfg))
    }

    pub fn new(cfg: &RedisConfig) -> RedisStreams {
        RedisStreams { inner: Arc::new(Inner { cfg: cfg.clone(), conn: Lazy::default() }) }
    }

    /// One result per message, same order; the scripts are pipelined on one connection.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        join_all(messages.iter().map(|m| self.send(m))).await
    }

    async fn send(&self, m: &OutboundMessage) -> Result<Accepted, ProviderError> {
        let cfg = &self.inner.cfg;
        let out = envelope::build(m, CE_PREFIX)?;
        let size = envelope::size(&out);
        if size > cfg.max_message_bytes {
            return Err(too_large("redis", size, cfg.max_message_bytes));
        }
        let mut conn = self.connection().await?;
        let mut call = SCRIPT.key(&out.destination);
        call.key(format!("{}{DEDUP_SUFFIX}", out.destination))
            .arg(&out.id)
            .arg(cfg.dedup_window_s.saturating_mul(1000).max(1))
            .arg(cfg.dedup_max.max(1))
            .arg(if cfg.create_missing { "1" } else { "0" })
            .arg(cfg.maxlen)
            .arg("content-type")
            .arg(out.content_type);
        for (k, v) in &out.headers {
            call.arg(k).arg(v);
        }
        call.arg("body").arg(&out.body);
        let (status, entry): (i64, String) = match call.invoke_async(&mut conn).await {
            Ok(reply) => reply,
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.inner.conn.reset().await;
                }
                return Err(classify(e));
            }
        };
        match status {
            1 => Ok(Accepted { provider_message_id: Some(entry) }),
            // Added before (a re-send after a crash): the stream has it once.
            0 => Ok(Accepted { provider_message_id: None }),
            _ => Err(retryable(format!(
                "redis: stream {:?} does not exist (providers.redis.create_missing = false)",
                out.destination
            ))),
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, ProviderError> {
        let cfg = &self.inner.cfg;
        self.inner
            .conn
            .get(|| async {
                let client = redis::Client::open(cfg.url.expose()).map_err(|e| ProviderError::Permanent {
                    reason: short(format!("redis: providers.redis.url: {e}")),
                })?;
                let timeout = Duration::from_millis(cfg.timeout_ms);
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout));
                client.get_multiplexed_async_connection_with_config(&config).await.map_err(classify)
            })
            .await
    }
}

/// Credentials and permissions need a human; a script or type error (the
/// key holds something else than a stream) repeats; the rest — I/O, LOADING,
/// READONLY after a fail-over, OOM — may pass later.
fn classify(e: RedisError) -> ProviderError {
    let reason = short(format!("redis: {e}"));
    let code = e.code().unwrap_or("");
    if e.kind() == ErrorKind::AuthenticationFailed || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM") {
        return ProviderError::Unauthorized { reason };
    }
    if matches!(code, "WRONGTYPE") || e.kind() == ErrorKind::InvalidClientConfig {
        return ProviderError::Permanent { reason };
    }
    retryable(reason)
}
