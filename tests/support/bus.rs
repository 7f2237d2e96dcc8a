//! Real brokers for the bus sinks' tests: RabbitMQ, Redis and NATS with
//! JetStream on this machine (`.ci/run` starts any that is down). Each test
//! gets its own names from a random tag — a RabbitMQ vhost (made with
//! rabbitmqctl) holding its exchange and queue, a Redis key prefix, a NATS
//! stream and subject prefix — reads what the relay put there as a consumer
//! would, and removes it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::relay::Env;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    Rabbitmq,
    Redis,
    Nats,
}

impl Sink {
    pub fn name(self) -> &'static str {
        match self {
            Sink::Rabbitmq => "rabbitmq",
            Sink::Redis => "redis",
            Sink::Nats => "nats",
        }
    }

    /// Header prefix of binary mode on this bus.
    pub fn ce_prefix(self) -> &'static str {
        match self {
            Sink::Rabbitmq => "cloudEvents:",
            Sink::Redis | Sink::Nats => "ce-",
        }
    }
}

/// One message as a consumer of the bus sees it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Routing key, stream key or subject.
    pub destination: String,
    pub content_type: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// AMQP `message_id`, `Nats-Msg-Id`.
    pub message_id: Option<String>,
    /// AMQP delivery mode 2.
    pub persistent: Option<bool>,
}

/// The CloudEvents attributes and data of a received message, either mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub kind: String,
    pub subject: Option<String>,
    pub time: String,
    pub partitionkey: Option<String>,
    pub data: Value,
}

impl Received {
    pub fn event(&self, prefix: &str) -> Event {
        if self.content_type == "application/cloudevents+json" {
            let v: Value = serde_json::from_slice(&self.body).expect("structured body is JSON");
            assert_eq!(v["specversion"], "1.0");
            assert_eq!(v["datacontenttype"], "application/json");
            let s = |k: &str| v[k].as_str().map(str::to_string);
            Event {
                id: s("id").unwrap(),
                source: s("source").unwrap(),
                kind: s("type").unwrap(),
                subject: s("subject"),
                time: s("time").unwrap(),
                partitionkey: s("partitionkey"),
                data: v["data"].clone(),
            }
        } else {
            assert_eq!(self.content_type, "application/json", "{self:?}");
            let h = |k: &str| self.headers.get(&format!("{prefix}{k}")).cloned();
            assert_eq!(h("specversion").as_deref(), Some("1.0"), "{self:?}");
            Event {
                id: h("id").unwrap(),
                source: h("source").unwrap(),
                kind: h("type").unwrap(),
                subject: h("subject"),
                time: h("time").unwrap(),
                partitionkey: h("partitionkey"),
                data: serde_json::from_slice(&self.body).unwrap(),
            }
        }
    }
}

/// An `XRANGE` entry: id, then field and value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// One test's corner of a broker.
pub struct Bus {
    pub sink: Sink,
    /// Unique per test: exchange and queue, key prefix, stream and subject prefix.
    pub tag: String,
    /// RabbitMQ: the test's own vhost (URL-encoded), `%2f` if it could not be made.
    pub vhost: String,
    amqp: Option<(lapin::Connection, lapin::Channel)>,
}

/// `rabbitmqctl`, which needs the broker's Erlang cookie (root, or the
/// rabbitmq user): true when it succeeded.
fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Bus {
    pub async fn new(sink: Sink, prefix: &str) -> Bus {
        let tag = format!("t{}{:08x}", prefix.replace(['-', '.', '_'], ""), rand::random::<u32>());
        let mut bus = Bus { sink, tag, vhost: "%2f".into(), amqp: None };
        match sink {
            Sink::Rabbitmq => {
                // A vhost of its own when rabbitmqctl may make one; otherwise the
                // exchange and queue names alone keep tests apart.
                let tag = bus.tag.clone();
                let made = tokio::task::spawn_blocking(move || {
                    rabbitmqctl(&["add_vhost", &tag])
                        && rabbitmqctl(&["set_permissions", "-p", &tag, "guest", ".*", ".*", ".*"])
                })
                .await
                .unwrap();
                if made {
                    bus.vhost = bus.tag.clone();
                } else {
                    eprintln!("rabbitmqctl could not make a vhost: this test uses \"/\" with names of its own");
                }
                let conn = lapin::Connection::connect(&bus.amqp_url(), lapin::ConnectionProperties::default())
                    .await
                    .expect("RabbitMQ on 127.0.0.1:5672 (guest/guest)");
                let ch = conn.create_channel().await.unwrap();
                ch.exchange_declare(
                    &bus.tag,
                    lapin::ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                ch.queue_declare(&bus.tag, QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
                ch.queue_bind(&bus.tag, &bus.tag, "#", QueueBindOptions::default(), FieldTable::default())
                    .await
                    .unwrap();
                bus.amqp = Some((conn, ch));
            }
            Sink::Redis => {}
            Sink::Nats => {
                let js = nats().await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: bus.tag.clone(),
                    subjects: vec![format!("{}.>", bus.tag)],
                    ..Default::default()
                })
                .await
                .expect("NATS with JetStream on 127.0.0.1:4222");
            }
        }
        bus
    }

    /// `[providers.<sink>]` for the relay's config.
    pub fn provider_toml(&self) -> String {
        match self.sink {
            Sink::Rabbitmq => format!("[providers.rabbitmq]\nurl = \"{}\"\ntimeout_ms = 5000\n", self.amqp_url()),
            Sink::Redis => format!("[providers.redis]\nurl = \"{REDIS_URL}\"\ntimeout_ms = 5000\n"),
            Sink::Nats => format!("[providers.nats]\nurl = \"{NATS_URL}\"\ntimeout_ms = 5000\n"),
        }
    }

    /// guest on the test's vhost.
    pub fn amqp_url(&self) -> String {
        self.amqp_url_at("guest:guest@127.0.0.1:5672")
    }

    /// `amqp://<userinfo_and_host>/<vhost>`: another port (a proxy), another password.
    pub fn amqp_url_at(&self, userinfo_and_host: &str) -> String {
        format!("amqp://{userinfo_and_host}/{}", self.vhost)
    }

    /// The channel's `bus = {...}` (an inline table), with placeholders.
    pub fn route_toml(&self, mode: &str) -> String {
        let tag = &self.tag;
        match self.sink {
            Sink::Rabbitmq => format!(
                r#"bus = {{ exchange = "{tag}", destination = "notify.{{event}}.{{recipient}}", mode = "{mode}", headers = {{ team = "t-{{recipient}}" }} }}"#
            ),
            Sink::Redis => format!(
                r#"bus = {{ destination = "{tag}:{{event}}", mode = "{mode}", headers = {{ team = "t-{{recipient}}" }} }}"#
            ),
            Sink::Nats => format!(
                r#"bus = {{ destination = "{tag}.{{event}}.{{recipient}}", mode = "{mode}", headers = {{ team = "t-{{recipient}}" }} }}"#
            ),
        }
    }

    /// The relay's TOML: `env`'s, with the `in_app` channel on this bus.
    pub fn relay_toml(&self, env: &Env, metrics: &str, mode: &str) -> String {
        let toml = env.config_toml(metrics);
        let channel = format!("provider = \"{}\"\n{}", self.sink.name(), self.route_toml(mode));
        assert!(toml.contains("provider = \"pusher\""));
        format!("{}\n{}", toml.replacen("provider = \"pusher\"", &channel, 1), self.provider_toml())
    }

    /// Everything on this test's destination so far, oldest first.
    pub async fn read_all(&self) -> Vec<Received> {
        match self.sink {
            Sink::Rabbitmq => {
                let (_, ch) = self.amqp.as_ref().unwrap();
                let mut out = vec![];
                while let Some(m) = ch.basic_get(&self.tag, BasicGetOptions { no_ack: true }).await.unwrap() {
                    let p = &m.delivery.properties;
                    let headers = p
                        .headers()
                        .as_ref()
                        .map(|t| {
                            t.inner()
                                .iter()
                                .map(|(k, v)| {
                                    let v = match v {
                                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                                        other => format!("{other:?}"),
                                    };
                                    (k.to_string(), v)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(Received {
                        destination: m.delivery.routing_key.to_string(),
                        content_type: p.content_type().as_ref().map(|c| c.to_string()).unwrap_or_default(),
                        headers,
                        body: m.delivery.data.clone(),
                        message_id: p.message_id().as_ref().map(|c| c.to_string()),
                        persistent: p.delivery_mode().map(|d| d == 2),
                    });
                }
                out
            }
            Sink::Redis => {
                let mut conn = redis_conn().await;
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{}:*", self.tag)).query_async(&mut conn).await.unwrap();
                let mut out = vec![];
                for key in keys.iter().filter(|k| !k.ends_with(":outbox-relay-dedup")) {
                    let entries: Vec<StreamEntry> =
                        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(&mut conn).await.unwrap();
                    for (_, fields) in entries {
                        let mut headers: BTreeMap<String, String> = BTreeMap::new();
                        let mut body = vec![];
                        for (k, v) in fields {
                            if k == "body" {
                                body = v;
                            } else {
                                headers.insert(k, String::from_utf8(v).unwrap());
                            }
                        }
                        out.push(Received {
                            destination: key.clone(),
                            content_type: headers.remove("content-type").unwrap_or_default(),
                            headers,
                            body,
                            message_id: None,
                            persistent: None,
                        });
                    }
                }
                out
            }
            Sink::Nats => {
                let js = nats().await;
                let mut stream = js.get_stream(&self.tag).await.unwrap();
                let last = stream.info().await.unwrap().state.last_sequence;
                let mut out = vec![];
                for seq in 1..=last {
                    let Ok(m) = stream.get_raw_message(seq).await else { continue };
                    let mut headers: BTreeMap<String, String> =
                        m.headers.iter().map(|(k, v)| (k.to_string(), v[0].as_str().to_string())).collect();
                    out.push(Received {
                        destination: m.subject.to_string(),
                        content_type: headers.remove("Content-Type").unwrap_or_default(),
                        message_id: headers.remove("Nats-Msg-Id"),
                        headers,
                        body: m.payload.to_vec(),
                        persistent: None,
                    });
                }
                out
            }
        }
    }

    /// Reads until `n` messages arrived (or panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = vec![];
        loop {
            // RabbitMQ's queue drains as it is read; Redis and NATS hand back everything each time.
            if self.sink == Sink::Rabbitmq {
                got.extend(self.read_all().await);
            } else {
                got = self.read_all().await;
            }
            if got.len() >= n {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{} of {n} messages on {} in {timeout:?}", got.len(), self.sink.name());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn cleanup(self) {
        match self.sink {
            Sink::Rabbitmq => {
                let (conn, ch) = self.amqp.unwrap();
                let _ = ch.queue_delete(&self.tag, Default::default()).await;
                let _ = ch.exchange_delete(&self.tag, Default::default()).await;
                let _ = conn.close(200, "done").await;
                if self.vhost != "%2f" {
                    let vhost = self.vhost.clone();
                    let _ = tokio::task::spawn_blocking(move || rabbitmqctl(&["delete_vhost", &vhost])).await;
                }
            }
            Sink::Redis => {
                let mut conn = redis_conn().await;
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{}*", self.tag)).query_async(&mut conn).await.unwrap();
                if !keys.is_empty() {
                    let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.unwrap();
                }
            }
            Sink::Nats => {
                let _ = nats().await.delete_stream(&self.tag).await;
            }
        }
    }
}

pub async fn nats() -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(NATS_URL).await.expect("NATS on 127.0.0.1:4222"))
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL).unwrap().get_multiplexed_async_connection().await.expect("Redis on 127.0.0.1:6379")
}

/// The relay binary on a config of the test's own (kill -9 tests).
pub fn spawn_relay(env: &Env, toml: &str) -> Child {
    let path = env.dir.path().join("relay-bus.toml");
    std::fs::write(&path, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the relay binary")
}

/// A TCP proxy in front of a broker: `cut` drops every connection and refuses
/// new ones, as a broker going down does; `restore` lets them through again,
/// as a broker back from a restart. Restarting the machine's shared brokers
/// would disturb other tests; through the proxy only this test sees it.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy { addr, upstream: upstream.parse().unwrap(), tasks: Arc::default() };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(pipe);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Every connection dropped, the port closed.
    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// The port open again, on the same address.
    pub async fn restore(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Notification ids in the events' data, counted.
pub fn counts_by_id(events: &[Event]) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        if let Some(id) = e.data.get("id").and_then(Value::as_i64) {
            *out.entry(id).or_default() += 1;
        }
    }
    out
}
