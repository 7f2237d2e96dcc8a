//! Sentry reports when `telemetry.sentry_dsn` is set: deliveries given up
//! (refused for good), dead letters (retries exhausted) and startup failures.
//!
//! Events are sent as envelopes to `POST {scheme}://{host}/api/{project}/envelope/`
//! with the `X-Sentry-Auth` header, as https://develop.sentry.dev/sdk/envelopes/
//! and https://develop.sentry.dev/sdk/overview/#authentication describe: a JSON
//! envelope header line, an item header line (`{"type":"event","length":N}`),
//! then the event's JSON.
//!
//! Why not the `sentry` crate: the relay sends three kinds of plain message
//! events and nothing else — no panics, breadcrumbs, sessions or performance
//! data — and the crate brings its own global hub, panic hook and transport
//! thread, all of which would have to be configured away. One envelope POST on
//! the relay's existing HTTP client is smaller, and tested against a fake of
//! the endpoint like every other outbound service.
//!
//! Nothing personal is ever sent: tags name the channel, provider, event and
//! delivery key (and the correlation value: a request id); error texts are
//! scrubbed of the recipient and the channel name by the caller before they
//! come here. No payload, no address, no recipient.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::secret::Secret;

const QUEUE: usize = 256;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Events sent per minute, at most: a provider outage makes thousands of dead
/// letters, and one event per channel, provider and event (the fingerprint)
/// is what an on-call needs; the rest are counted, not sent.
const PER_MINUTE: u32 = 60;

/// A parsed DSN: `{scheme}://{public_key}@{host}[/path]/{project_id}`.
#[derive(Clone)]
pub struct Dsn {
    /// The envelope endpoint, `{scheme}://{host}[/path]/api/{project}/envelope/`.
    pub envelope_url: String,
    /// The DSN's public key: it authenticates the relay to the project.
    pub key: Secret,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsn").field("envelope_url", &self.envelope_url).field("key", &self.key).finish()
    }
}

impl Dsn {
    /// The error never repeats the DSN (its key is a credential).
    pub fn parse(dsn: &str) -> Result<Dsn, String> {
        let bad = |why: &str| {
            Err(format!("telemetry.sentry_dsn is not a Sentry DSN ({why}); expected https://KEY@HOST/PROJECT"))
        };
        let Some((scheme, rest)) = dsn.trim().split_once("://") else { return bad("no scheme") };
        if scheme != "https" && scheme != "http" {
            return bad("scheme is not http or https");
        }
        let Some((userinfo, location)) = rest.rsplit_once('@') else { return bad("no key") };
        // A legacy DSN has `key:secret`; only the key is used.
        let key = userinfo.split(':').next().unwrap_or_default();
        let Some((host_and_path, project)) = location.trim_end_matches('/').rsplit_once('/') else {
            return bad("no project id");
        };
        if key.is_empty()
            || host_and_path.is_empty()
            || project.is_empty()
            || !project.bytes().all(|b| b.is_ascii_digit())
        {
            return bad("empty key or host, or a project id that is not a number");
        }
        Ok(Dsn { envelope_url: format!("{scheme}://{host_and_path}/api/{project}/envelope/"), key: Secret::new(key) })
    }

    /// `X-Sentry-Auth` (https://develop.sentry.dev/sdk/overview/#authentication).
    pub fn auth_header(&self) -> String {
        format!(
            "Sentry sentry_version=7, sentry_key={}, sentry_client=outbox-relay/{}",
            self.key.expose(),
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// What happened, as Sentry shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// A delivery given up: `status` is `failed` (refused for good) or `dead`
    /// (retries exhausted). `error` is already scrubbed of personal data.
    Delivery { status: &'static str, tags: DeliveryTags, error: String },
    /// A failure that stopped the relay: `phase` is `startup` (it never got
    /// to work: database unreachable, refused configuration) or `running`.
    Fatal { error: String, phase: &'static str },
}

/// The tags of a delivery event: ids and names, nothing personal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryTags {
    pub channel: String,
    pub provider: String,
    pub event: String,
    pub delivery_key: String,
    pub correlation: Option<String>,
}

impl Report {
    /// The event JSON (https://develop.sentry.dev/sdk/event-payloads/).
    pub fn event(&self, event_id: &str, environment: Option<&str>) -> Json {
        let (level, message, tags, fingerprint) = match self {
            Report::Delivery { status, tags, error } => {
                let what =
                    if *status == "dead" { "dead letter: retries exhausted" } else { "delivery refused for good" };
                let mut t = BTreeMap::from([
                    ("channel", tags.channel.clone()),
                    ("provider", tags.provider.clone()),
                    ("event", tags.event.clone()),
                    ("delivery_key", tags.delivery_key.clone()),
                    ("status", status.to_string()),
                ]);
                if let Some(c) = &tags.correlation {
                    t.insert("correlation", c.clone());
                }
                let message = format!("{what} ({} via {}, event {}): {error}", tags.channel, tags.provider, tags.event);
                // One issue per channel, provider, event and outcome; each delivery an event in it.
                let fingerprint = json!(["outbox-relay", status, tags.channel, tags.provider, tags.event]);
                ("error", message, t, fingerprint)
            }
            Report::Fatal { error, phase } => {
                let t = BTreeMap::from([("phase", phase.to_string())]);
                let what = if *phase == "startup" { "could not start" } else { "stopped" };
                ("fatal", format!("outbox-relay {what}: {error}"), t, json!(["outbox-relay", "fatal", phase]))
            }
        };
        let mut event = json!({
            "event_id": event_id,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "platform": "other",
            "level": level,
            "logger": "outbox_relay",
            "release": concat!("outbox-relay@", env!("CARGO_PKG_VERSION")),
            "message": {"formatted": message},
            "tags": tags,
            "fingerprint": fingerprint,
            "sdk": {"name": "outbox-relay", "version": env!("CARGO_PKG_VERSION")},
        });
        if let Some(env) = environment {
            event["environment"] = json!(env);
        }
        event
    }
}

/// The envelope carrying one event: header line, item header, payload.
pub fn envelope(event_id: &str, event: &Json) -> Vec<u8> {
    let payload = event.to_string();
    let sent_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let header = json!({"event_id": event_id, "sent_at": sent_at});
    let item = json!({"type": "event", "length": payload.len(), "content_type": "application/json"});
    format!("{header}\n{item}\n{payload}\n").into_bytes()
}

/// Sends reports; cheap to clone. Delivery reports are queued and sent in
/// the background (never slowing dispatch); a startup failure is sent at once
/// with [`Reporter::send_now`], as the process is about to exit.
#[derive(Clone, Debug)]
pub struct Reporter {
    client: Client,
    queue: mpsc::Sender<Report>,
}

#[derive(Clone, Debug)]
struct Client {
    dsn: Dsn,
    http: reqwest::Client,
    environment: Option<String>,
}

impl Client {
    async fn send(&self, report: &Report) -> Result<(), SendError> {
        let event_id = uuid::Uuid::new_v4().simple().to_string();
        let body = envelope(&event_id, &report.event(&event_id, self.environment.as_deref()));
        let mut auth = reqwest::header::HeaderValue::from_str(&self.dsn.auth_header())
            .map_err(|_| SendError::Other("the DSN's key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let response = self
            .http
            .post(&self.dsn.envelope_url)
            .timeout(SEND_TIMEOUT)
            .header("X-Sentry-Auth", auth)
            .header(reqwest::header::CONTENT_TYPE, "application/x-sentry-envelope")
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Other(e.without_url().to_string()))?;
        let status = response.status();
        if status.as_u16() == 429 {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(60);
            return Err(SendError::RateLimited(Duration::from_secs(wait.min(3600))));
        }
        if !status.is_success() {
            return Err(SendError::Other(format!("HTTP {status}")));
        }
        Ok(())
    }
}

#[derive(Debug)]
enum SendError {
    RateLimited(Duration),
    Other(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::RateLimited(d) => write!(f, "rate limited by Sentry for {} s", d.as_secs()),
            SendError::Other(e) => f.write_str(e),
        }
    }
}

impl Reporter {
    /// Starts the background sender; it ends when `stop` turns true, after
    /// sending what is queued (await the handle, bounded, at shutdown).
    pub fn start(
        dsn: Dsn,
        environment: Option<String>,
        http: reqwest::Client,
        stop: watch::Receiver<bool>,
    ) -> (Reporter, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let client = Client { dsn, http, environment };
        let handle = tokio::spawn(send_loop(client.clone(), rx, stop));
        (Reporter { client, queue }, handle)
    }

    /// Queues a report; drops it (counted) if the queue is full.
    pub fn report(&self, report: Report) {
        if self.queue.try_send(report).is_err() {
            metrics::counter!(super::metric::SENTRY_DROPPED).increment(1);
        }
    }

    /// Sends now and waits (bounded by the send timeout).
    pub async fn send_now(&self, report: &Report) {
        send_once(&self.client, report).await
    }
}

/// One report, sent at once: for a failure the process is about to exit on.
pub async fn send_now(dsn: Dsn, environment: Option<String>, http: reqwest::Client, report: &Report) {
    send_once(&Client { dsn, http, environment }, report).await
}

async fn send_once(client: &Client, report: &Report) {
    if let Err(e) = client.send(report).await {
        warn!(error = %e, "could not report to Sentry");
    }
}

/// How many reports may go out now: [`PER_MINUTE`] per minute, none while
/// Sentry asked to wait (429 with `Retry-After`).
#[derive(Debug)]
struct Budget {
    window: tokio::time::Instant,
    sent: u32,
    paused_until: Option<tokio::time::Instant>,
}

impl Budget {
    fn new(now: tokio::time::Instant) -> Budget {
        Budget { window: now, sent: 0, paused_until: None }
    }

    /// Takes one report's worth, if there is one.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(60) {
            self.window = now;
            self.sent = 0;
        }
        if self.paused_until.is_some_and(|t| now < t) || self.sent >= PER_MINUTE {
            return false;
        }
        self.sent += 1;
        true
    }

    fn pause(&mut self, now: tokio::time::Instant, wait: Duration) {
        self.paused_until = Some(now + wait);
    }
}

async fn send_loop(client: Client, mut rx: mpsc::Receiver<Report>, mut stop: watch::Receiver<bool>) {
    let mut budget = Budget::new(tokio::time::Instant::now());
    let mut failing = false;
    loop {
        let report = tokio::select! {
            r = rx.recv() => r,
            _ = crate::stopped(&mut stop) => rx.try_recv().ok(),
        };
        let Some(report) = report else { return };
        let now = tokio::time::Instant::now();
        if !budget.take(now) {
            metrics::counter!(super::metric::SENTRY_DROPPED).increment(1);
            continue;
        }
        match client.send(&report).await {
            Ok(()) => failing = false,
            Err(e) => {
                metrics::counter!(super::metric::SENTRY_DROPPED).increment(1);
                if let SendError::RateLimited(d) = &e {
                    budget.pause(now, *d);
                }
                if !failing {
                    warn!(error = %e, "could not report to Sentry; reports are dropped until it answers");
                }
                failing = true;
            }
        }
    }
}

/// `text` with each of `personal` (recipient id, channel name, address)
/// replaced where it stands as a word (not inside a longer one: a recipient
/// `4` must not turn "404" into "[redacted]0[redacted]"), for error texts
/// sent out of the relay.
pub fn scrub(text: &str, personal: &[&str]) -> String {
    let mut out = text.to_string();
    for p in personal.iter().filter(|p| !p.is_empty()) {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        let mut before: Option<char> = None;
        while let Some(i) = rest.find(p) {
            let prev = rest[..i].chars().next_back().or(before);
            let next = rest[i + p.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
            result.push_str(&rest[..i]);
            if word(prev) || word(next) {
                result.push_str(p);
            } else {
                result.push_str("[redacted]");
            }
            before = p.chars().next_back();
            rest = &rest[i + p.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsns_parse_into_the_envelope_url_and_errors_never_repeat_them() {
        let d = Dsn::parse("https://abc123@o1.ingest.sentry.io/42").unwrap();
        assert_eq!(d.envelope_url, "https://o1.ingest.sentry.io/api/42/envelope/");
        assert_eq!(d.key.expose(), "abc123");
        assert!(d.auth_header().starts_with("Sentry sentry_version=7, sentry_key=abc123, sentry_client=outbox-relay/"));
        let hosted = Dsn::parse("http://k:legacy@127.0.0.1:9000/sentry/7").unwrap();
        assert_eq!(hosted.envelope_url, "http://127.0.0.1:9000/sentry/api/7/envelope/");
        assert_eq!(hosted.key.expose(), "k");
        assert!(!format!("{hosted:?}").contains("legacy") && !format!("{hosted:?}").contains("\"k\""));
        for bad in ["", "abc@host/1", "ftp://k@h/1", "https://host/1", "https://k@host/", "https://k@host/proj"] {
            let e = Dsn::parse(bad).unwrap_err();
            assert!(!bad.contains('@') || !e.contains(bad), "{e}");
        }
        let e = Dsn::parse("https://s3cretkey@host/notanumber").unwrap_err();
        assert!(!e.contains("s3cretkey"), "{e}");
    }

    #[test]
    fn an_envelope_is_three_lines_with_the_item_length() {
        let tags = DeliveryTags {
            channel: "in_app".into(),
            provider: "pusher".into(),
            event: "order_shipped".into(),
            delivery_key: "or2-1".into(),
            correlation: Some("req-9".into()),
        };
        let report = Report::Delivery { status: "dead", tags, error: "gave up after 6 attempts: 503".into() };
        let event = report.event("0123456789abcdef0123456789abcdef", Some("prod"));
        let bytes = envelope("0123456789abcdef0123456789abcdef", &event);
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
        assert_eq!(lines.len(), 3, "{text}");
        let header: Json = serde_json::from_str(lines[0]).unwrap();
        let item: Json = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(header["event_id"], "0123456789abcdef0123456789abcdef");
        assert_eq!(item["type"], "event");
        assert_eq!(item["length"].as_u64().unwrap() as usize, lines[2].len());
        let e: Json = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(e["tags"]["channel"], "in_app");
        assert_eq!(e["tags"]["delivery_key"], "or2-1");
        assert_eq!(e["tags"]["correlation"], "req-9");
        assert_eq!(e["environment"], "prod");
        assert_eq!(e["level"], "error");
    }

    #[test]
    fn at_most_sixty_reports_a_minute_and_none_while_sentry_asks_to_wait() {
        let t0 = tokio::time::Instant::now();
        let mut b = Budget::new(t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 60);
        assert!(!b.take(t0 + Duration::from_secs(59)));
        assert!(b.take(t0 + Duration::from_secs(60)), "a new minute");
        b.pause(t0 + Duration::from_secs(60), Duration::from_secs(120));
        assert!(!b.take(t0 + Duration::from_secs(150)), "Retry-After honoured");
        assert!(b.take(t0 + Duration::from_secs(181)));
    }

    #[test]
    fn scrub_removes_personal_values() {
        let s = scrub("channel private-user-42 for 42 refused: 420", &["private-user-42", "42", ""]);
        assert_eq!(s, "channel [redacted] for [redacted] refused: 420");
        assert_eq!(scrub("to a@b.example: 550", &["a@b.example"]), "to [redacted]: 550");
    }
}
