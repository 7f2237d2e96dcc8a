//! Google Cloud Pub/Sub sink: `POST /v1/projects/{project}/topics/{topic}:publish`
//! (https://cloud.google.com/pubsub/docs/reference/rest/v1/projects.topics/publish)
//! with a bearer token from the service account ([`crate::providers::google_auth`]).
//!
//! Each delivery is one `PubsubMessage`: `data` = the CloudEvents envelope
//! (structured) or the payload (binary, `ce-` attributes as the CloudEvents
//! Pub/Sub binding says), `attributes` = the route's headers plus `event`,
//! `recipient` and `key` (the delivery key), `orderingKey` = the message key
//! when the route sets `ordering = true`. A batch goes out as one call per
//! topic (and ordering key), at most 1,000 messages and 10 MB each; the
//! answer's `messageIds` come back in request order, one per message, and a
//! refused call refuses each of its messages alike.
//!
//! Pub/Sub has no publish-side de-duplication: a re-send after a crash is a
//! second message with a new `messageId`. Those re-sends are counted
//! (`resends_after_restart`), and carry the same `key` attribute (and
//! CloudEvents `id`) for consumers to drop.

mod config;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::future::join_all;
use serde::Serialize;

pub use self::config::{PubSubConfig, PROFILE};
use super::envelope;
use crate::providers::google_auth::{GoogleAuth, ServiceAccountKey};
use crate::providers::http::{retry_after, transport_error, truncate, MAX_REASON_BODY};
use crate::providers::{Accepted, BuildContext, OutboundMessage, ProviderError};

/// Pub/Sub binding of CloudEvents, binary mode: `ce-` attributes.
const CE_PREFIX: &str = "ce-";

/// The OAuth scope publishing needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/pubsub";

/// Resource limits (https://cloud.google.com/pubsub/quotas#resource_limits):
/// a publish request holds at most 1,000 messages and 10 MB...
pub const MAX_MESSAGES_PER_CALL: usize = 1000;
pub const MAX_REQUEST_BYTES: usize = 10_000_000;
/// ...a message at most 100 attributes, keys of 256 bytes, values of 1,024 bytes...
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
/// ...and an ordering key of at most 1,024 bytes.
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Message {
    data: String,
    attributes: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    ordering_key: String,
}

#[derive(Clone, Debug)]
pub struct PubSub {
    http: reqwest::Client,
    auth: GoogleAuth,
    /// `<base>/v1/projects/<project>/topics/`; the topic and `:publish` follow.
    project_url: String,
    /// `projects/<project>`: a destination naming a whole topic path must be in it.
    project_path: String,
    timeout: Duration,
}

impl PubSub {
    pub fn build(cfg: &PubSubConfig, ctx: &BuildContext) -> Result<PubSub, ProviderError> {
        let key = ServiceAccountKey::load(cfg.service_account_file.as_deref(), cfg.service_account_json.as_ref())?;
        PubSub::new(cfg, key, ctx.http.clone())
    }

    pub fn new(cfg: &PubSubConfig, key: ServiceAccountKey, http: reqwest::Client) -> Result<PubSub, ProviderError> {
        let project =
            cfg.project.clone().or_else(|| key.project_id.clone()).ok_or_else(|| ProviderError::Permanent {
                reason: "providers.pubsub.project is not set and the key has no project_id".into(),
            })?;
        let base = cfg.base_url.as_deref().unwrap_or("https://pubsub.googleapis.com").trim_end_matches('/');
        let timeout = Duration::from_millis(cfg.timeout_ms);
        Ok(PubSub {
            auth: GoogleAuth::new(key, SCOPE, http.clone(), timeout),
            http,
            project_url: format!("{base}/v1/projects/{project}/topics/"),
            project_path: format!("projects/{project}"),
            timeout,
        })
    }

    /// One result per message, same order: one publish call per topic (and
    /// ordering key) and size-bounded chunk, all at once.
    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let mut results: Vec<Option<Result<Accepted, ProviderError>>> = vec![None; messages.len()];
        // (topic, ordering key) -> [(index, message, encoded size)], in input order.
        let mut groups: BTreeMap<(String, String), Vec<(usize, Message, usize)>> = BTreeMap::new();
        for (i, m) in messages.iter().enumerate() {
            match self.prepare(m) {
                Ok((topic, msg)) => {
                    let size = serde_json::to_vec(&msg).map(|v| v.len()).unwrap_or(usize::MAX);
                    if size > MAX_REQUEST_BYTES - 64 {
                        results[i] = Some(Err(super::too_large("pubsub", size, MAX_REQUEST_BYTES)));
                        continue;
                    }
                    groups.entry((topic, msg.ordering_key.clone())).or_default().push((i, msg, size));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let calls = groups
            .into_iter()
            .flat_map(|((topic, _), items)| chunk(items).into_iter().map(move |c| (topic.clone(), c)));
        let answers = join_all(calls.map(|(topic, items)| async move {
            let (indexes, batch): (Vec<usize>, Vec<Message>) = items.into_iter().unzip();
            let outcome = self.publish(&topic, &batch).await;
            (indexes, outcome)
        }))
        .await;
        for (indexes, outcome) in answers {
            match outcome {
                Ok(ids) => {
                    for (n, i) in indexes.into_iter().enumerate() {
                        results[i] = Some(Ok(Accepted { provider_message_id: ids.get(n).cloned() }));
                    }
                }
                Err(e) => {
                    for i in indexes {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ProviderError::Permanent { reason: "pubsub: message not sent".into() })))
            .collect()
    }

    /// The message for `m` and its topic, or why Pub/Sub would refuse it.
    fn prepare(&self, m: &OutboundMessage) -> Result<(String, Message), ProviderError> {
        let out = envelope::build(m, CE_PREFIX)?;
        let bus = m.bus.as_ref().expect("envelope::build checked the route");
        let topic = self.topic(&out.destination)?;
        let mut attributes: BTreeMap<String, String> = out.headers.into_iter().collect();
        attributes.insert("content-type".into(), out.content_type.into());
        attributes.insert("event".into(), m.event.clone());
        if let Some(r) = &bus.recipient {
            attributes.insert("recipient".into(), r.clone());
        }
        // Consumers drop repeats on it: Pub/Sub itself does not.
        attributes.insert("key".into(), m.idempotency_key.clone());
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(refused(format!("{} attributes, Pub/Sub takes at most {MAX_ATTRIBUTES}", attributes.len())));
        }
        for (k, v) in &attributes {
            if k.len() > MAX_ATTRIBUTE_KEY_BYTES || v.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(refused(format!(
                    "attribute {:?} over Pub/Sub's limits ({MAX_ATTRIBUTE_KEY_BYTES} bytes a key, {MAX_ATTRIBUTE_VALUE_BYTES} a value)",
                    truncate(k, 40)
                )));
            }
            if k.starts_with("goog") {
                return Err(refused(format!("attribute {k:?}: keys starting with goog are Google's")));
            }
        }
        let ordering_key = if bus.route.ordering { out.key } else { String::new() };
        if ordering_key.len() > MAX_ORDERING_KEY_BYTES {
            return Err(refused(format!("ordering key over {MAX_ORDERING_KEY_BYTES} bytes")));
        }
        Ok((topic, Message { data: STANDARD.encode(&out.body), attributes, ordering_key }))
    }

    /// The topic id from a route's destination: a bare id, or
    /// `projects/<this project>/topics/<id>`. Ids: 3 to 255 characters, a
    /// letter first, then letters, digits and `-_.~+%`, never `goog…`
    /// (https://cloud.google.com/pubsub/docs/pubsub-basics#resource_names).
    fn topic(&self, destination: &str) -> Result<String, ProviderError> {
        let id = match destination.strip_prefix(&format!("{}/topics/", self.project_path)) {
            Some(id) => id,
            None if destination.starts_with("projects/") => {
                return Err(refused(format!("topic {destination:?} is outside {}", self.project_path)))
            }
            None => destination,
        };
        let ok = (3..=255).contains(&id.len())
            && id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c))
            && !id.starts_with("goog");
        if !ok {
            return Err(refused(format!("{:?} is not a valid topic id", truncate(id, 80))));
        }
        Ok(id.to_string())
    }

    /// One publish call; a 401 on a cached token mints a fresh one and tries once more.
    async fn publish(&self, topic: &str, messages: &[Message]) -> Result<Vec<String>, ProviderError> {
        let url = format!("{}{topic}:publish", self.project_url);
        let body = serde_json::json!({ "messages": messages });
        let mut refreshed = false;
        loop {
            let token = self.auth.token().await?;
            let response = self
                .http
                .post(&url)
                .timeout(self.timeout)
                .bearer_auth(token.expose())
                .json(&body)
                .send()
                .await
                .map_err(|e| transport_error("pubsub", e, self.timeout))?;
            let status = response.status().as_u16();
            let wait = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                let ids = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("messageIds").and_then(|a| a.as_array()).cloned())
                    .unwrap_or_default();
                let ids: Vec<String> = ids.iter().filter_map(|i| i.as_str().map(str::to_string)).collect();
                if ids.len() != messages.len() {
                    // Accepted (2xx) but the answer does not say which: taken
                    // as sent, as Pub/Sub stored them; ids left out.
                    return Ok(Vec::new());
                }
                return Ok(ids);
            }
            if status == 401 && !refreshed {
                self.auth.forget(&token).await;
                refreshed = true;
                continue;
            }
            return Err(classify(status, &text, topic, wait));
        }
    }
}

fn refused(reason: String) -> ProviderError {
    ProviderError::Permanent { reason: format!("pubsub: {reason}") }
}

/// Splits a group into calls within Pub/Sub's request limits, in order.
fn chunk<T>(items: Vec<(usize, T, usize)>) -> Vec<Vec<(usize, T)>> {
    let mut calls: Vec<Vec<(usize, T)>> = Vec::new();
    let mut bytes = 0usize;
    for (i, item, size) in items {
        // 16: the `{"messages":[...]}` wrapper and a comma, generously.
        let full =
            calls.last().is_none_or(|c| c.len() >= MAX_MESSAGES_PER_CALL || bytes + size + 16 > MAX_REQUEST_BYTES);
        if full {
            calls.push(Vec::new());
            bytes = 16;
        }
        bytes += size + 1;
        calls.last_mut().expect("pushed above").push((i, item));
    }
    calls
}

/// Google API errors (https://cloud.google.com/pubsub/docs/reference/error-codes):
/// 401/403 (UNAUTHENTICATED, PERMISSION_DENIED: the account lacks
/// `pubsub.topics.publish`) need a human; 404 (topic missing) waits for
/// someone to create it, as a missing destination does on every bus; 408,
/// 409 (ABORTED), 429 (RESOURCE_EXHAUSTED), 5xx (INTERNAL, UNAVAILABLE,
/// DEADLINE_EXCEEDED) pass later; 400 INVALID_ARGUMENT fails again.
fn classify(status: u16, body: &str, topic: &str, wait: Option<Duration>) -> ProviderError {
    let reason = format!("pubsub answered {status} for topic {topic}: {}", truncate(body, MAX_REASON_BODY));
    match status {
        401 | 403 => ProviderError::Unauthorized { reason },
        404 => ProviderError::Retryable { reason: format!("{reason} (topic does not exist)"), retry_after: wait },
        408 | 409 | 429 | 500..=599 => ProviderError::Retryable { reason, retry_after: wait },
        _ => ProviderError::Permanent { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_count_and_bytes_in_order() {
        let items: Vec<(usize, (), usize)> = (0..2500).map(|i| (i, (), 10)).collect();
        let calls = chunk(items);
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 1000, 500]);
        assert_eq!(calls[1][0].0, 1000);
        let big: Vec<(usize, (), usize)> = (0..5).map(|i| (i, (), 3_000_000)).collect();
        let calls = chunk(big);
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2]);
    }

    #[test]
    fn errors_are_classed() {
        assert!(matches!(classify(403, "", "t", None), ProviderError::Unauthorized { .. }));
        assert!(classify(404, "", "t", None).to_string().contains("does not exist"));
        assert!(classify(404, "", "t", None).is_retryable());
        assert!(classify(429, "", "t", None).is_retryable());
        assert!(classify(503, "", "t", None).is_retryable());
        assert!(matches!(classify(400, "", "t", None), ProviderError::Permanent { .. }));
    }
}
