//! Bus sinks benchmark: the release binary puts rows on each bus, and we time
//! until the ledger has them all `sent` (i.e. confirmed by the broker:
//! publisher confirm, script reply, PubAck, acks=all).
//!
//! `cargo bench --bench bus` — for each sink in BENCH_SINKS (default
//! `rabbitmq,redis,nats,kafka`): BENCH_ROWS (default 20 000) rows inserted in
//! transactions of 1 000 into a fresh database, relay started, time from the
//! first insert to the last delivery `sent`, deliveries/s printed for
//! docs/benchmarks.md. RabbitMQ, Redis and NATS are the machine's servers;
//! Kafka is librdkafka's mock cluster in this process (3 brokers, topic
//! replicated 3 times) — a real wire protocol, but an in-memory broker, so its
//! figure says what the relay's side costs, not what a Kafka cluster does.

#[path = "../tests/support/bus.rs"]
mod bus_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bus_support::{Bus, Sink};
use outbox_relay::demo::embedded_pg::{self, EmbeddedPg, DJANGO_FIXTURE};

/// The relay child, killed if the bench panics (it would otherwise outlive the cluster).
struct Relay(std::process::Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(url: &str, slot: &str, channel: &str, provider: &str) -> String {
    format!(
        r#"
[source]
database_url = "{url}"
slot = "{slot}"
publication = "{slot}"

[[routes]]
table = "public.operators_notificationoperateur"
recipient_column = "user_id"
event = "notification_created"
channels = ["bus"]
payload_columns = ["id", "kind", "title", "level", "url", "created_at"]

[channels.bus]
{channel}

{provider}

[metrics]
listen = ""
"#
    )
}

async fn count_sent(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE status = 'sent'", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

async fn run(pg: &EmbeddedPg, sink: &str, rows: i64) -> f64 {
    let slot = format!("bench_bus_{sink}");
    let url = pg.create_database(&slot).await.unwrap();
    let client = embedded_pg::connect(&url).await.unwrap();
    client.batch_execute(DJANGO_FIXTURE).await.unwrap();

    // Kafka's mock cluster lives as long as this value.
    let mut mock = None;
    let mut bus = None;
    let (channel, provider) = if sink == "kafka" {
        let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
        cluster.create_topic("bench", 3, 3).unwrap();
        let brokers = cluster.bootstrap_servers();
        mock = Some(cluster);
        (
            "provider = \"kafka\"\nbus = { destination = \"bench\" }".to_string(),
            format!("[providers.kafka]\nbrokers = \"{brokers}\""),
        )
    } else {
        let kind = match sink {
            "rabbitmq" => Sink::Rabbitmq,
            "redis" => Sink::Redis,
            "nats" => Sink::Nats,
            other => panic!("BENCH_SINKS: unknown sink {other:?}"),
        };
        let b = Bus::new(kind, "bench").await;
        let out = (format!("provider = \"{sink}\"\n{}", b.route_toml("structured")), b.provider_toml());
        bus = Some(b);
        out
    };
    let text = config(&url, &slot, &channel, &provider);
    let cfg = outbox_relay::config::Config::from_toml(&text).unwrap();
    outbox_relay::setup::apply(&mut embedded_pg::connect(&url).await.unwrap(), &cfg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    loop {
        let active = client
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, bool>(0));
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    let mut inserted = 0;
    while inserted < rows {
        let k = (rows - inserted).min(1000);
        client
            .execute(
                "INSERT INTO operators_notificationoperateur (user_id, kind, title, level, url)
                 SELECT 1 + (g % 20), 'order_ready', 'Commande ' || g, 'info', '/orders/' || g
                 FROM generate_series(1, $1::int) g",
                &[&(k as i32)],
            )
            .await
            .unwrap();
        inserted += k;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    // Polled every 100 ms: often enough for a run of seconds, rarely enough not to load PostgreSQL.
    while count_sent(&client).await < rows {
        assert!(Instant::now() < deadline, "{sink}: not all deliveries sent within 10 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(relay);
    if let Some(b) = bus {
        b.cleanup().await;
    }
    drop(mock);
    let _ = client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
    rows as f64 / secs
}

#[tokio::main]
async fn main() {
    let rows = std::env::var("BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000i64);
    let sinks = std::env::var("BENCH_SINKS").unwrap_or_else(|_| "rabbitmq,redis,nats,kafka".into());
    let pg = tokio::task::spawn_blocking(EmbeddedPg::start).await.unwrap().expect("PostgreSQL");
    let mut table = vec![];
    for sink in sinks.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let rate = run(&pg, sink, rows).await;
        eprintln!("{sink}: {rows} rows, {rate:.0} deliveries/s");
        table.push((sink.to_string(), rate));
    }
    println!("| bus | deliveries/s ({rows} rows) |\n|---|---|");
    for (sink, rate) in table {
        println!("| {sink} | {rate:.0} |");
    }
}
