//! Bus sinks against real brokers: RabbitMQ, Redis Streams and NATS
//! JetStream on this machine. The relay puts rows on the bus; the test reads
//! them back as a consumer and checks the CloudEvents envelope, the faults'
//! error classes, and what kill -9 does to each bus.

#[path = "support/bus.rs"]
mod bus_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_support::{counts_by_id, spawn_relay, Bus, Proxy, Sink, NATS_URL, REDIS_URL};
use chrono::Utc;
use outbox_relay::config::{Config, Secret};
use outbox_relay::providers::bus::nats::{Nats, NatsConfig, StreamSpec};
use outbox_relay::providers::bus::rabbitmq::{Rabbitmq, RabbitmqConfig};
use outbox_relay::providers::bus::redis::{RedisConfig, RedisStreams};
use outbox_relay::providers::bus::{BusMessage, BusRoute, EnvelopeMode};
use outbox_relay::providers::{OutboundMessage, Provider, ProviderError};
use serde_json::json;
use support::relay::{
    free_port, insert_notifications, kill_9_rounds, scrape_counter, sigterm, stream_notifications, Env,
};
use tokio::sync::watch;

const TABLE: &str = "public.operators_notificationoperateur";

/// Relay in-process on `bus` → 20 notifications → read back: one message
/// each, every envelope attribute as promised.
async fn end_to_end(sink: Sink, mode: &str) {
    let env = Env::new(&format!("bus{}{mode}", sink.name())).await;
    let bus = Bus::new(sink, mode).await;
    let cfg = Config::from_toml(&bus.relay_toml(&env, "127.0.0.1:0", mode)).expect("bus config is valid");
    let (stop, rx) = watch::channel(false);
    let relay = tokio::spawn(outbox_relay::app::run(cfg, rx));
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 20, 5).await;
    let statuses = env.wait_settled(20, Duration::from_secs(30)).await;
    assert_eq!(statuses.get("sent"), Some(&20), "{statuses:?}");

    let received = bus.wait_for(20, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 20, "one message per delivery");
    let ledger = client
        .query("SELECT idempotency_key, recipient, committed_at FROM outbox_relay.deliveries ORDER BY id", &[])
        .await
        .unwrap();
    let keys: std::collections::HashMap<String, (String, chrono::DateTime<Utc>)> =
        ledger.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    let database = &env.db.name;
    for r in &received {
        let e = r.event(sink.ce_prefix());
        let (recipient, committed) = keys.get(&e.id).unwrap_or_else(|| panic!("id {} is a delivery key", e.id));
        assert_eq!(e.kind, "notification_created");
        assert_eq!(e.source, format!("/{database}/{TABLE}"));
        assert_eq!(e.subject.as_deref(), Some(recipient.as_str()));
        assert_eq!(e.partitionkey.as_deref(), Some(recipient.as_str()), "key = recipient by default");
        let time = chrono::DateTime::parse_from_rfc3339(&e.time).unwrap();
        assert_eq!(time.timestamp_micros(), committed.timestamp_micros(), "time = commit time");
        assert!(ids.contains(&e.data["id"].as_i64().unwrap()));
        assert_eq!(e.data["kind"], "order_ready", "data = the allow-listed columns");
        assert_eq!(r.headers.get("team"), Some(&format!("t-{recipient}")), "route headers, placeholders filled");
        let destination = match sink {
            Sink::Rabbitmq => format!("notify.notification_created.{recipient}"),
            Sink::Redis => format!("{}:notification_created", bus.tag),
            Sink::Nats => format!("{}.notification_created.{recipient}", bus.tag),
        };
        assert_eq!(r.destination, destination);
        match sink {
            Sink::Rabbitmq => {
                assert_eq!(r.message_id.as_deref(), Some(e.id.as_str()), "AMQP message_id = delivery key");
                assert_eq!(r.persistent, Some(true), "delivery mode 2");
            }
            Sink::Nats => assert_eq!(r.message_id.as_deref(), Some(e.id.as_str()), "Nats-Msg-Id = delivery key"),
            Sink::Redis => {}
        }
    }
    assert_eq!(counts_by_id(&received.iter().map(|r| r.event(sink.ce_prefix())).collect::<Vec<_>>()).len(), 20);
    let _ = stop.send(true);
    relay.await.unwrap().unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_end_to_end_structured() {
    end_to_end(Sink::Rabbitmq, "structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_end_to_end_binary() {
    end_to_end(Sink::Rabbitmq, "binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_end_to_end_structured() {
    end_to_end(Sink::Redis, "structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_end_to_end_binary() {
    end_to_end(Sink::Redis, "binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_end_to_end_structured() {
    end_to_end(Sink::Nats, "structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_end_to_end_binary() {
    end_to_end(Sink::Nats, "binary").await;
}

// --- Faults, at the provider: what the dispatcher would be told ----------------------------

fn message(key: &str, destination: &str, exchange: &str, payload: serde_json::Value) -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: key.into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload,
        contact: None,
        bus: Some(BusMessage {
            route: Arc::new(BusRoute {
                destination: destination.into(),
                exchange: exchange.into(),
                key: "{recipient}".into(),
                headers: Default::default(),
                mode: EnvelopeMode::Structured,
                source: None,
                events: Default::default(),
                ordering: false,
            }),
            source: "/app/public.orders".into(),
            recipient: Some("42".into()),
            time: Utc::now(),
        }),
        correlation: None,
        devices: Vec::new(),
    }
}

async fn send_one(p: &Provider, m: OutboundMessage) -> Result<(), ProviderError> {
    p.send_batch(&[m]).await.remove(0).map(|_| ())
}

fn rabbitmq(url: &str) -> RabbitmqConfig {
    RabbitmqConfig {
        url: Secret::new(url),
        timeout_ms: 3000,
        create_missing: false,
        exchange_type: "topic".into(),
        max_message_bytes: 16 * 1024 * 1024,
    }
}

fn redis_cfg(url: &str) -> RedisConfig {
    RedisConfig {
        url: Secret::new(url),
        timeout_ms: 3000,
        create_missing: true,
        dedup_window_s: 3600,
        dedup_max: 1000,
        maxlen: 0,
        max_message_bytes: 1024 * 1024,
    }
}

fn nats_cfg(url: &str) -> NatsConfig {
    NatsConfig { url: Secret::new(url), token: None, timeout_ms: 3000, create_stream: None }
}

fn closed_port() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn assert_retryable(r: Result<(), ProviderError>, what: &str) -> String {
    match r {
        Err(ProviderError::Retryable { reason, .. }) => reason,
        other => panic!("{what}: expected a retryable error, got {other:?}"),
    }
}

#[tokio::test]
async fn rabbitmq_faults_have_the_providers_error_classes() {
    let bus = Bus::new(Sink::Rabbitmq, "faults").await;
    let tag = bus.tag.clone();
    let url = bus.amqp_url();
    let ok = Provider::Rabbitmq(Rabbitmq::new(&rabbitmq(&url)));
    let body = json!({"id": 1});

    // Broker down: retryable.
    let down_url = bus.amqp_url_at(&format!("guest:guest@{}", closed_port()));
    let down = Provider::Rabbitmq(Rabbitmq::new(&rabbitmq(&down_url)));
    assert_retryable(send_one(&down, message("k1", "a.b", &tag, body.clone())).await, "broker down");

    // Wrong password: needs a human.
    let auth = Provider::Rabbitmq(Rabbitmq::new(&rabbitmq(&bus.amqp_url_at("guest:wrong@127.0.0.1:5672"))));
    let r = send_one(&auth, message("k1", "a.b", &tag, body.clone())).await;
    assert!(matches!(r, Err(ProviderError::Unauthorized { .. })), "bad credentials: {r:?}");

    // Exchange missing, refused by config: retryable (waits for someone to declare it).
    let missing = format!("{tag}-missing");
    let reason = assert_retryable(send_one(&ok, message("k2", "a.b", &missing, body.clone())).await, "missing");
    assert!(reason.contains("does not exist"), "{reason}");
    // ...and the channel recovers for the next message.
    send_one(&ok, message("k3", "a.b", &tag, body.clone())).await.expect("publish after a channel error");

    // Exchange missing, created by config; the message then has no queue: returned, permanent.
    let mut create = rabbitmq(&url);
    create.create_missing = true;
    let creating = Provider::Rabbitmq(Rabbitmq::new(&create));
    let r = send_one(&creating, message("k4", "a.b", &missing, body.clone())).await;
    match r {
        Err(ProviderError::Permanent { reason }) => assert!(reason.contains("unroutable"), "{reason}"),
        other => panic!("a message no queue takes is returned: {other:?}"),
    }

    // Too large: permanent, before the broker sees it.
    let mut small = rabbitmq(&url);
    small.max_message_bytes = 1000;
    let big = json!({"blob": "x".repeat(2000)});
    let r = send_one(&Provider::Rabbitmq(Rabbitmq::new(&small)), message("k5", "a.b", &tag, big)).await;
    assert!(matches!(r, Err(ProviderError::Permanent { .. })), "too large: {r:?}");

    assert_eq!(bus.read_all().await.len(), 1, "only k3 reached the queue");
    // Clean up the exchange create_missing made (the vhost may be the shared "/").
    let conn = lapin::Connection::connect(&url, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(&missing, Default::default()).await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn redis_faults_have_the_providers_error_classes() {
    let bus = Bus::new(Sink::Redis, "faults").await;
    let tag = bus.tag.clone();
    let body = json!({"id": 1});
    let stream = format!("{tag}:s");

    let down = Provider::Redis(RedisStreams::new(&redis_cfg(&format!("redis://{}", closed_port()))));
    assert_retryable(send_one(&down, message("k1", &stream, "", body.clone())).await, "broker down");

    let auth = Provider::Redis(RedisStreams::new(&redis_cfg("redis://nobody:wrong@127.0.0.1:6379")));
    let r = send_one(&auth, message("k1", &stream, "", body.clone())).await;
    assert!(matches!(r, Err(ProviderError::Unauthorized { .. })), "bad credentials: {r:?}");

    // Missing stream, refused by config.
    let mut refuse = redis_cfg(REDIS_URL);
    refuse.create_missing = false;
    let refusing = Provider::Redis(RedisStreams::new(&refuse));
    let reason = assert_retryable(send_one(&refusing, message("k2", &stream, "", body.clone())).await, "missing");
    assert!(reason.contains("does not exist"), "{reason}");
    // Created by default.
    let ok = Provider::Redis(RedisStreams::new(&redis_cfg(REDIS_URL)));
    send_one(&ok, message("k2", &stream, "", body.clone())).await.unwrap();
    // Now it exists, the refusing client adds too.
    send_one(&refusing, message("k3", &stream, "", body.clone())).await.unwrap();

    // The same key again: accepted, not added.
    send_one(&ok, message("k2", &stream, "", body.clone())).await.unwrap();
    assert_eq!(bus.read_all().await.len(), 2, "k2 once, k3 once");

    // A key holding something else than a stream: permanent.
    let mut conn = bus_support::redis_conn().await;
    let _: () = redis::cmd("SET").arg(format!("{tag}:str")).arg("x").query_async(&mut conn).await.unwrap();
    let r = send_one(&ok, message("k4", &format!("{tag}:str"), "", body.clone())).await;
    assert!(matches!(r, Err(ProviderError::Permanent { .. })), "wrong type: {r:?}");

    let mut small = redis_cfg(REDIS_URL);
    small.max_message_bytes = 1000;
    let big = json!({"blob": "x".repeat(2000)});
    let r = send_one(&Provider::Redis(RedisStreams::new(&small)), message("k5", &stream, "", big)).await;
    assert!(matches!(r, Err(ProviderError::Permanent { .. })), "too large: {r:?}");
    bus.cleanup().await;
}

#[tokio::test]
async fn redis_dedup_set_stays_bounded() {
    let bus = Bus::new(Sink::Redis, "bounded").await;
    let stream = format!("{}:s", bus.tag);
    let mut cfg = redis_cfg(REDIS_URL);
    cfg.dedup_max = 5;
    let p = Provider::Redis(RedisStreams::new(&cfg));
    for i in 0..12 {
        send_one(&p, message(&format!("k{i}"), &stream, "", json!({"id": i}))).await.unwrap();
    }
    let mut conn = bus_support::redis_conn().await;
    let n: u64 = redis::cmd("ZCARD").arg(format!("{stream}:outbox-relay-dedup")).query_async(&mut conn).await.unwrap();
    assert_eq!(n, 5, "at most dedup_max keys remembered");
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{stream}:outbox-relay-dedup")).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "the set expires with its window: {ttl}");
    // MAXLEN ~ trims the stream as it grows (approximately: whole nodes of 100).
    let mut trimmed = redis_cfg(REDIS_URL);
    trimmed.maxlen = 10;
    let t = Provider::Redis(RedisStreams::new(&trimmed));
    let short_stream = format!("{}:trimmed", bus.tag);
    for i in 0..300 {
        send_one(&t, message(&format!("m{i}"), &short_stream, "", json!({"id": i}))).await.unwrap();
    }
    let len: u64 = redis::cmd("XLEN").arg(&short_stream).query_async(&mut conn).await.unwrap();
    assert!(len < 300, "maxlen trims: {len} entries left of 300");
    let _: () = redis::cmd("DEL").arg(&short_stream).query_async(&mut conn).await.unwrap();
    // The newest keys are the remembered ones.
    send_one(&p, message("k11", &stream, "", json!({"id": 11}))).await.unwrap();
    assert_eq!(bus.read_all().await.len(), 12);
    bus.cleanup().await;
}

#[tokio::test]
async fn nats_faults_have_the_providers_error_classes() {
    let bus = Bus::new(Sink::Nats, "faults").await;
    let tag = bus.tag.clone();
    let body = json!({"id": 1});
    let subject = format!("{tag}.x");

    let down = Provider::Nats(Nats::new(&nats_cfg(&format!("nats://{}", closed_port()))));
    assert_retryable(send_one(&down, message("k1", &subject, "", body.clone())).await, "broker down");

    // No stream captures the subject: refused (retryable) without create_stream...
    let other = format!("{tag}missing");
    let ok = Provider::Nats(Nats::new(&nats_cfg(NATS_URL)));
    let reason =
        assert_retryable(send_one(&ok, message("k2", &format!("{other}.x"), "", body.clone())).await, "missing");
    assert!(reason.contains("no stream"), "{reason}");
    // ...created with it, with a small message limit.
    let mut create = nats_cfg(NATS_URL);
    create.create_stream = Some(StreamSpec {
        name: other.clone(),
        subjects: vec![format!("{other}.>")],
        duplicate_window_s: 600,
        max_message_bytes: 1000,
    });
    let creating = Provider::Nats(Nats::new(&create));
    send_one(&creating, message("k2", &format!("{other}.x"), "", body.clone())).await.unwrap();
    let js = bus_support::nats().await;
    let info = js.get_stream(&other).await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(600));
    // Over the stream's max_msg_size: the stream refuses, permanently.
    let big = json!({"blob": "x".repeat(2000)});
    let r = send_one(&creating, message("k3", &format!("{other}.x"), "", big)).await;
    assert!(matches!(r, Err(ProviderError::Permanent { .. })), "too large for the stream: {r:?}");
    js.delete_stream(&other).await.unwrap();

    // The same Nats-Msg-Id twice: stored once.
    send_one(&ok, message("k4", &subject, "", body.clone())).await.unwrap();
    send_one(&ok, message("k4", &subject, "", body.clone())).await.unwrap();
    assert_eq!(bus.read_all().await.len(), 1);
    bus.cleanup().await;
}

/// A NATS server of the test's own (the shared one has no auth and the
/// default `max_payload`): a wrong password is unauthorized; a message over
/// the server's `max_payload` is refused permanently before it is sent.
#[tokio::test]
async fn nats_own_server_refuses_bad_credentials_and_oversized_messages() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!("listen: 127.0.0.1:{port}\nmax_payload: 2048\nauthorization {{ user: relay, password: right }}\n"),
    )
    .unwrap();
    let mut server = std::process::Command::new(nats_server_binary())
        .args(["-c", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server (Debian package nats-server)");
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = Provider::Nats(Nats::new(&nats_cfg(&format!("nats://relay:wrong@127.0.0.1:{port}"))));
    let auth = send_one(&bad, message("k1", "x.y", "", json!({}))).await;
    let good = Provider::Nats(Nats::new(&nats_cfg(&format!("nats://relay:right@127.0.0.1:{port}"))));
    let big = send_one(&good, message("k2", "x.y", "", json!({"blob": "x".repeat(4000)}))).await;
    let _ = server.kill();
    let _ = server.wait();
    assert!(matches!(auth, Err(ProviderError::Unauthorized { .. })), "bad credentials: {auth:?}");
    match big {
        Err(ProviderError::Permanent { reason }) => assert!(reason.contains("2048"), "{reason}"),
        other => panic!("over max_payload: {other:?}"),
    }
}

/// Broker restarted (through a proxy that drops every connection and
/// refuses new ones, then lets them through): retryable while down, and the
/// same client delivers again once it is back — no restart of the relay.
async fn survives_a_broker_restart(sink: Sink, upstream: &str) {
    let bus = Bus::new(sink, "restart").await;
    let proxy = Proxy::start(upstream).await;
    let (p, destination, exchange) = match sink {
        Sink::Rabbitmq => {
            let url = bus.amqp_url_at(&format!("guest:guest@{}", proxy.addr));
            (Provider::Rabbitmq(Rabbitmq::new(&rabbitmq(&url))), "a.b".to_string(), bus.tag.clone())
        }
        Sink::Redis => {
            let url = format!("redis://{}", proxy.addr);
            (Provider::Redis(RedisStreams::new(&redis_cfg(&url))), format!("{}:s", bus.tag), String::new())
        }
        Sink::Nats => {
            let url = format!("nats://{}", proxy.addr);
            (Provider::Nats(Nats::new(&nats_cfg(&url))), format!("{}.x", bus.tag), String::new())
        }
    };
    send_one(&p, message("k1", &destination, &exchange, json!({"id": 1}))).await.expect("before");
    proxy.cut();
    assert_retryable(send_one(&p, message("k2", &destination, &exchange, json!({"id": 2}))).await, "down");
    proxy.restore().await;
    // The client reconnects on its own; allow it a few tries as dispatch would.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match send_one(&p, message("k2", &destination, &exchange, json!({"id": 2}))).await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{} after the restart: {e:?}", sink.name()),
        }
    }
    let ids: Vec<_> = bus.read_all().await.iter().map(|r| r.event(sink.ce_prefix()).id).collect();
    assert!(ids.contains(&"k1".to_string()) && ids.contains(&"k2".to_string()), "{ids:?}");
    bus.cleanup().await;
}

#[tokio::test]
async fn rabbitmq_survives_a_broker_restart() {
    survives_a_broker_restart(Sink::Rabbitmq, "127.0.0.1:5672").await;
}

#[tokio::test]
async fn redis_survives_a_broker_restart() {
    survives_a_broker_restart(Sink::Redis, "127.0.0.1:6379").await;
}

#[tokio::test]
async fn nats_survives_a_broker_restart() {
    survives_a_broker_restart(Sink::Nats, "127.0.0.1:4222").await;
}

// --- kill -9 ---------------------------------------------------------------------------------

/// The relay binary killed at random moments while rows flow onto the bus:
/// nothing lost; on JetStream and Redis no duplicate at all (the bus drops
/// re-sends by key); on RabbitMQ every duplicate is a counted re-send.
async fn kill_9(sink: Sink) {
    let env = Env::new(&format!("busk9{}", sink.name())).await;
    let bus = Bus::new(sink, "k9").await;
    let port = free_port();
    let toml = bus.relay_toml(&env, &format!("127.0.0.1:{port}"), "structured");
    let mut child = spawn_relay(&env, &toml);
    env.wait_streaming().await;

    let inserter = stream_notifications(env.db.clone());
    let mut resends = kill_9_rounds(&mut child, port, 4, 400, || spawn_relay(&env, &toml)).await;
    let ids = inserter.await.unwrap();
    env.wait_settled(ids.len() as i64, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    resends += scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    sigterm(&child);
    assert!(child.wait().unwrap().success(), "clean exit after SIGTERM");

    let received = bus.wait_for(ids.len(), Duration::from_secs(10)).await;
    let events: Vec<_> = received.iter().map(|r| r.event(sink.ce_prefix())).collect();
    let counts = counts_by_id(&events);
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{} kill -9 x4: rows {}, on the bus {}, duplicates {duplicates}, counted re-sends {resends}, lost {}",
        sink.name(),
        ids.len(),
        counts.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost after kill -9: {lost:?}");
    match sink {
        Sink::Nats | Sink::Redis => assert_eq!(duplicates, 0, "the bus drops re-sends by key"),
        Sink::Rabbitmq => assert!(
            duplicates as f64 <= resends,
            "every duplicate must be a counted re-send: {duplicates} duplicates, {resends} counted"
        ),
    }
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_kill_9_loses_nothing_and_counts_every_resend() {
    kill_9(Sink::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_kill_9_loses_nothing_and_duplicates_nothing() {
    kill_9(Sink::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_kill_9_loses_nothing_and_duplicates_nothing() {
    kill_9(Sink::Nats).await;
}

/// `nats-server` from PATH, else where Debian's package puts it (/usr/sbin is
/// not on every user's PATH).
fn nats_server_binary() -> String {
    let on_path = std::process::Command::new("nats-server").arg("--version").output().is_ok();
    if on_path {
        "nats-server".into()
    } else {
        "/usr/sbin/nats-server".into()
    }
}
