//! The Kafka sink against librdkafka's mock cluster: a Kafka-protocol broker
//! (three brokers, replicated topics) started inside the test process, which
//! the relay — in-process or the real binary — reaches over TCP like any
//! cluster. A consumer in the test reads what the relay produced.

#[path = "support/bus.rs"]
mod bus_support;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_support::{counts_by_id, spawn_relay, Received};
use chrono::Utc;
use outbox_relay::config::Config;
use outbox_relay::providers::bus::kafka::{Kafka, KafkaConfig};
use outbox_relay::providers::bus::{BusMessage, BusRoute, EnvelopeMode};
use outbox_relay::providers::{OutboundMessage, Provider, ProviderError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use support::relay::{
    free_port, insert_notifications, kill_9_rounds, scrape_counter, sigterm, stream_notifications, Env,
};
use tokio::sync::watch;

const PARTITIONS: i32 = 3;

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(3).expect("librdkafka mock cluster")
}

fn tag(prefix: &str) -> String {
    format!("t{prefix}{:08x}", rand::random::<u32>())
}

/// The relay's TOML: `env`'s, with `in_app` on Kafka, topic `<topic>`.
fn relay_toml(env: &Env, metrics: &str, brokers: &str, topic: &str, mode: &str) -> String {
    let toml = env.config_toml(metrics);
    let channel = format!(
        "provider = \"kafka\"\nbus = {{ destination = \"{topic}\", mode = \"{mode}\", headers = {{ team = \"t-{{recipient}}\" }} }}"
    );
    format!(
        "{}\n[providers.kafka]\nbrokers = \"{brokers}\"\ntimeout_ms = 10000\n",
        toml.replacen("provider = \"pusher\"", &channel, 1)
    )
}

/// Everything in `topic`, read from the beginning of every partition, until
/// `n` messages or `timeout`.
async fn consume(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<(Option<String>, Received)> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "bus-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = vec![];
        while out.len() < n && Instant::now() < deadline {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
            let mut headers: BTreeMap<String, String> = BTreeMap::new();
            if let Some(h) = m.headers() {
                use rdkafka::message::Headers;
                for header in h.iter() {
                    let v = header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                    headers.insert(header.key.to_string(), v);
                }
            }
            let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
            out.push((
                key,
                Received {
                    destination: m.topic().to_string(),
                    content_type: headers.remove("content-type").unwrap_or_default(),
                    headers,
                    body: m.payload().unwrap_or_default().to_vec(),
                    message_id: None,
                    persistent: None,
                },
            ));
        }
        out
    })
    .await
    .unwrap()
}

async fn end_to_end(mode: &str) {
    let mock = cluster();
    let brokers = mock.bootstrap_servers();
    let topic = tag(mode);
    mock.create_topic(&topic, PARTITIONS, 3).unwrap();
    let env = Env::new(&format!("buskafka{mode}")).await;
    let cfg = Config::from_toml(&relay_toml(&env, "127.0.0.1:0", &brokers, &topic, mode)).unwrap();
    let (stop, rx) = watch::channel(false);
    let relay = tokio::spawn(outbox_relay::app::run(cfg, rx));
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 20, 5).await;
    let statuses = env.wait_settled(20, Duration::from_secs(60)).await;
    assert_eq!(statuses.get("sent"), Some(&20), "{statuses:?}");

    let received = consume(&brokers, &topic, 20, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 20);
    let ledger = client
        .query("SELECT idempotency_key, recipient, committed_at FROM outbox_relay.deliveries", &[])
        .await
        .unwrap();
    let keys: std::collections::HashMap<String, (String, chrono::DateTime<Utc>)> =
        ledger.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    for (key, r) in &received {
        let e = r.event("ce_");
        let (recipient, committed) = &keys[&e.id];
        assert_eq!(key.as_deref(), Some(recipient.as_str()), "Kafka key = the recipient");
        assert_eq!(e.kind, "notification_created");
        assert_eq!(e.source, format!("/{}/public.operators_notificationoperateur", env.db.name));
        assert_eq!(e.subject.as_deref(), Some(recipient.as_str()));
        let time = chrono::DateTime::parse_from_rfc3339(&e.time).unwrap();
        assert_eq!(time.timestamp_micros(), committed.timestamp_micros());
        assert!(ids.contains(&e.data["id"].as_i64().unwrap()));
        assert_eq!(r.headers.get("team"), Some(&format!("t-{recipient}")));
    }
    let _ = stop.send(true);
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_end_to_end_structured() {
    end_to_end("structured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_end_to_end_binary() {
    end_to_end("binary").await;
}

fn message(key: &str, topic: &str, payload: serde_json::Value) -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: key.into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload,
        contact: None,
        bus: Some(BusMessage {
            route: Arc::new(BusRoute {
                destination: topic.into(),
                exchange: String::new(),
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

fn kafka_client(brokers: &str, create_missing: bool) -> Kafka {
    let cfg = KafkaConfig {
        brokers: brokers.into(),
        timeout_ms: 3000,
        create_missing,
        max_message_bytes: 1_000_000,
        properties: Default::default(),
    };
    Kafka::new(&cfg).unwrap()
}

/// librdkafka's own test hook puts the idempotent producer in the fatal state
/// it enters when it cannot repair a sequence: the send that meets it is
/// retryable, and the next one goes through a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_producer_is_replaced_after_a_fatal_error() {
    let mock = cluster();
    let brokers = mock.bootstrap_servers();
    let topic = tag("fatal");
    mock.create_topic(&topic, PARTITIONS, 3).unwrap();
    let k = kafka_client(&brokers, false);
    let p = Provider::Kafka(k.clone());
    send_one(&p, message("k1", &topic, json!({"id": 1}))).await.expect("before");
    let reason = std::ffi::CString::new("test: fatal").unwrap();
    let broken = k.producer();
    // SAFETY: a live client handle and a NUL-terminated reason, as librdkafka's test API asks.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            broken.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    let r = send_one(&p, message("k2", &topic, json!({"id": 2}))).await;
    assert!(matches!(&r, Err(ProviderError::Retryable { reason, .. }) if reason.contains("fatal")), "{r:?}");
    send_one(&p, message("k2", &topic, json!({"id": 2}))).await.expect("through the new producer");
    let got = consume(&brokers, &topic, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
}

fn kafka(brokers: &str, create_missing: bool) -> Provider {
    let cfg = KafkaConfig {
        brokers: brokers.into(),
        timeout_ms: 3000,
        create_missing,
        max_message_bytes: 1_000_000,
        properties: Default::default(),
    };
    Provider::Kafka(Kafka::new(&cfg).unwrap())
}

async fn send_one(p: &Provider, m: OutboundMessage) -> Result<(), ProviderError> {
    p.send_batch(&[m]).await.remove(0).map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_faults_have_the_providers_error_classes() {
    let mock = cluster();
    let brokers = mock.bootstrap_servers();
    let topic = tag("faults");
    mock.create_topic(&topic, PARTITIONS, 3).unwrap();
    let p = kafka(&brokers, false);
    send_one(&p, message("k1", &topic, json!({"id": 1}))).await.expect("a plain send");

    // Too large: permanent, without a send.
    let r = send_one(&p, message("k2", &topic, json!({"blob": "x".repeat(1_100_000)}))).await;
    assert!(matches!(r, Err(ProviderError::Permanent { .. })), "too large: {r:?}");

    // Topic missing, refused: retryable (waits for the topic).
    let r = send_one(&p, message("k3", &format!("{topic}-missing"), json!({"id": 3}))).await;
    assert!(matches!(r, Err(ProviderError::Retryable { .. })), "missing topic: {r:?}");
    // ...created by the broker when the config allows it.
    let creating = kafka(&brokers, true);
    send_one(&creating, message("k4", &format!("{topic}-created"), json!({"id": 4}))).await.expect("auto-created");

    // Every broker down, then back (a restart): retryable, then the same producer delivers.
    for b in 1..=3 {
        mock.broker_down(b).unwrap();
    }
    let r = send_one(&p, message("k5", &topic, json!({"id": 5}))).await;
    assert!(matches!(r, Err(ProviderError::Retryable { .. })), "brokers down: {r:?}");
    for b in 1..=3 {
        mock.broker_up(b).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match send_one(&p, message("k5", &topic, json!({"id": 5}))).await {
            Ok(()) => break,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {}
            Err(e) => panic!("after the brokers came back: {e:?}"),
        }
    }
    let got = consume(&brokers, &topic, 3, Duration::from_secs(10)).await;
    let ids: Vec<_> = got.iter().map(|(_, r)| r.event("ce_").id).collect();
    assert!(ids.contains(&"k1".to_string()) && ids.contains(&"k5".to_string()), "{ids:?}");

    // No broker at all: retryable.
    let nobody = kafka(&format!("127.0.0.1:{}", free_port()), false);
    let r = send_one(&nobody, message("k6", &topic, json!({"id": 6}))).await;
    assert!(matches!(r, Err(ProviderError::Retryable { .. })), "no broker: {r:?}");
}

/// kill -9 while rows flow to Kafka: nothing lost; every duplicate is a
/// counted re-send (a new producer session cannot be de-duplicated by Kafka).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_kill_9_loses_nothing_and_counts_every_resend() {
    let mock = cluster();
    let brokers = mock.bootstrap_servers();
    let topic = tag("k9");
    mock.create_topic(&topic, PARTITIONS, 3).unwrap();
    let env = Env::new("buskafkak9").await;
    let port = free_port();
    let toml = relay_toml(&env, &format!("127.0.0.1:{port}"), &brokers, &topic, "structured");
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

    let got = consume(&brokers, &topic, ids.len() + resends as usize, Duration::from_secs(15)).await;
    let events: Vec<_> = got.iter().map(|(_, r)| r.event("ce_")).collect();
    let counts = counts_by_id(&events);
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "kafka kill -9 x4: rows {}, on the bus {}, duplicates {duplicates}, counted re-sends {resends}, lost {}",
        ids.len(),
        counts.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost after kill -9: {lost:?}");
    assert!(duplicates as f64 <= resends, "{duplicates} duplicates, {resends} counted");
}
