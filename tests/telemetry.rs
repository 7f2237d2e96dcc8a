//! Issue 13 item 8: a route's correlation column reaches the delivery's log
//! lines (in both source modes), its trace (OTLP, linked to the Django
//! request's traceparent), and Sentry hears of dead letters and startup
//! failures, with ids and names only.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_relay::config::Config;
use support::fakes::otlp::FakeCollector;
use support::fakes::sentry::FakeSentry;
use support::relay::{free_port, sigterm, Env, Mode};

/// Django's side: the request id (or traceparent) saved with the outbox row.
const ADD_COLUMN: &str = "ALTER TABLE operators_outboxevent ADD COLUMN request_id text";
const ROUTE: &str = "correlation_column = \"request_id\"";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn insert_outbox(env: &Env, recipient: i32, payload: &str, request_id: &str) {
    env.db
        .client()
        .await
        .execute(
            "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload, request_id)
             VALUES ('order_shipped', $1, '{in_app}', $2::text::jsonb, $3)",
            &[&recipient, &payload, &request_id],
        )
        .await
        .unwrap();
}

/// The real binary's JSON log: the line recording the delivery carries the
/// row's request id, and so does the ledger row.
async fn the_request_id_is_in_the_delivery_log_line(mode: Mode) {
    let env = Env::prepared_route(mode, "corr_log", ADD_COLUMN, ROUTE, "").await;
    let path = env.dir.path().join("relay.toml");
    std::fs::write(&path, env.config_toml(&format!("127.0.0.1:{}", free_port()))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn,outbox_relay::dispatch=debug")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    env.wait_streaming().await;
    let request_id = format!("req-{}-7f3a9c", mode_name(mode));
    insert_outbox(&env, 5, r#"{"order": 1042}"#, &request_id).await;
    env.wait_settled(1, Duration::from_secs(30)).await;

    let mut found = None;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if v["message"] == "delivered" {
            found = Some(v);
            break;
        }
    }
    sigterm(&child);
    let _ = child.wait();
    let line = found.expect("a JSON `delivered` log line");
    assert_eq!(line["correlation"], request_id.as_str(), "{line}");
    let stored: Option<String> =
        env.db.client().await.query_one("SELECT correlation FROM outbox_relay.deliveries", &[]).await.unwrap().get(0);
    assert_eq!(stored.as_deref(), Some(request_id.as_str()));
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Logical => "logical",
        Mode::Listen => "listen",
    }
}

#[tokio::test]
async fn the_request_id_is_in_the_delivery_log_line_logical() {
    the_request_id_is_in_the_delivery_log_line(Mode::Logical).await;
}

#[tokio::test]
async fn the_request_id_is_in_the_delivery_log_line_listen() {
    the_request_id_is_in_the_delivery_log_line(Mode::Listen).await;
}

/// A row written by a traced Django request: the delivery's spans (ingest,
/// ledger write, provider call) reach the collector in the request's trace,
/// `ingest` a child of the request's span and the others of `ingest`.
#[tokio::test]
async fn the_delivery_trace_is_a_child_of_the_django_request() {
    let collector = FakeCollector::start();
    let telemetry =
        format!("\n[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"relay-test\"\n", collector.endpoint());
    let env = Env::prepared_route(Mode::Logical, "corr_otlp", ADD_COLUMN, ROUTE, &telemetry).await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    insert_outbox(&env, 6, r#"{"order": 7}"#, TRACEPARENT).await;
    env.wait_settled(1, Duration::from_secs(30)).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let spans = collector
        .wait_for("ingest, ledger.write and provider.send in the request's trace", |spans| {
            ["ingest", "ledger.write", "provider.send"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n && s.trace_id == trace_id))
        })
        .await;
    relay.stop().await;
    let by_name = |n: &str| spans.iter().find(|s| s.name == n && s.trace_id == trace_id).unwrap().clone();
    let ingest = by_name("ingest");
    assert_eq!(ingest.parent_span_id.as_deref(), Some("00f067aa0ba902b7"), "linked to the Django request");
    assert_eq!(by_name("ledger.write").parent_span_id.as_ref(), Some(&ingest.span_id));
    let send = by_name("provider.send");
    assert_eq!(send.parent_span_id.as_ref(), Some(&ingest.span_id));
    assert_eq!(send.service, "relay-test");
    let attr = |s: &support::fakes::otlp::ReceivedSpan, k: &str| {
        s.attributes.as_array().unwrap().iter().find(|a| a["key"] == k).map(|a| a["value"].clone())
    };
    assert_eq!(attr(&send, "outbox_relay.provider").unwrap()["stringValue"], "pusher");
    assert_eq!(attr(&send, "outbox_relay.outcome").unwrap()["stringValue"], "sent");
    assert!(collector.rejections().is_empty(), "{:?}", collector.rejections());
}

/// A delivery whose provider keeps failing goes dead; Sentry gets one event
/// with its channel, provider, event and key as tags, and nothing personal:
/// no recipient, no channel name (which holds the recipient), no payload.
#[tokio::test]
async fn a_dead_letter_is_reported_to_sentry_without_personal_data() {
    let sentry = FakeSentry::start("publickey123", "42");
    let telemetry = format!("\n[telemetry]\nsentry_dsn = \"{}\"\nsentry_environment = \"test\"\n", sentry.dsn());
    let env = Env::prepared_route(Mode::Logical, "corr_sentry", ADD_COLUMN, ROUTE, &telemetry).await;
    env.pusher.fail_next(1000, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let payload = r#"{"note": "Jane Doe, jane.doe@example.com"}"#;
    insert_outbox(&env, 987_654, payload, "req-sentry-1").await;
    let statuses = env.wait_settled(1, Duration::from_secs(60)).await;
    assert_eq!(statuses.get("dead"), Some(&1), "{statuses:?}");

    let got = sentry.wait_for("for the dead letter", |e| e["tags"]["status"] == "dead").await;
    relay.stop().await;
    let key: String = env
        .db
        .client()
        .await
        .query_one("SELECT idempotency_key FROM outbox_relay.deliveries", &[])
        .await
        .unwrap()
        .get(0);
    let tags = &got.event["tags"];
    assert_eq!(tags["channel"], "in_app");
    assert_eq!(tags["provider"], "pusher");
    assert_eq!(tags["event"], "order_shipped");
    assert_eq!(tags["delivery_key"], key.as_str());
    assert_eq!(tags["correlation"], "req-sentry-1");
    assert_eq!(got.event["environment"], "test");
    for personal in ["987654", "Jane Doe", "jane.doe@example.com"] {
        assert!(!got.envelope.contains(personal), "{personal} reached Sentry: {}", got.envelope);
    }
    assert!(got.auth.contains("sentry_key=publickey123"));
    assert!(sentry.rejections().is_empty(), "{:?}", sentry.rejections());
}

/// A relay that cannot start (its database unreachable) reports it before
/// exiting.
#[tokio::test]
async fn a_startup_failure_is_reported_to_sentry() {
    let sentry = FakeSentry::start("publickey123", "7");
    let port = free_port();
    let toml = format!(
        r#"
[source]
database_url = "postgres://relay@127.0.0.1:{port}/app?connect_timeout=2"
[[routes]]
table = "public.orders"
recipient_column = "user_id"
event = "created"
channels = ["log"]
payload_columns = ["id"]
[channels.log]
provider = "log"
[providers.log]
[metrics]
listen = ""
[telemetry]
sentry_dsn = "{}"
"#,
        sentry.dsn()
    );
    let cfg = Config::from_toml(&toml).unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = outbox_relay::app::run(cfg, rx).await.unwrap_err();
    // Reported before `run` returned: no waiting needed.
    let events = sentry.events();
    assert_eq!(events.len(), 1, "{:?}", sentry.rejections());
    let e = &events[0].event;
    assert_eq!(e["level"], "fatal");
    assert_eq!(e["tags"]["phase"], "startup", "it never got to work");
    let message = e["message"]["formatted"].as_str().unwrap();
    assert!(message.contains(&err.to_string()), "{message} / {err}");
}

/// The DSN is a secret: a config with one never prints it.
#[test]
fn the_sentry_dsn_never_prints() {
    let text = outbox_relay::config::README_EXAMPLE.to_string()
        + "\n[telemetry]\nsentry_dsn = \"https://verysecretkey@o1.ingest.sentry.io/42\"\n";
    let cfg = Config::from_toml(&text).unwrap();
    assert!(!format!("{cfg:?}").contains("verysecretkey"));
    let bad = Config::from_toml(&text.replace("/42\"", "/x\"")).unwrap_err().to_string();
    assert!(bad.contains("telemetry.sentry_dsn") && !bad.contains("verysecretkey"), "{bad}");
}
