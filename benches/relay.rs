//! End-to-end benchmark: the release binary against a throwaway PostgreSQL and
//! an in-process fake Pusher (signature-checking, loopback).
//!
//! `cargo bench --bench relay` — prints a table for docs/benchmarks.md:
//! 1. throughput: 100k rows inserted in transactions of 1000, time until every
//!    delivery is accepted by Pusher (deliveries/s);
//! 2. latency: a steady 1k rows/s of single-row transactions for 20 s,
//!    commit → accepted p50/p99 from the ledger (`sent_at - committed_at`,
//!    `sent_at` being set just after the provider accepted);
//! 3. the relay process's peak RSS (VmHWM) over both.
//!
//! BENCH_ROWS, BENCH_RATE and BENCH_SECONDS override the sizes; BENCH_MODE=listen
//! runs the same on the LISTEN/NOTIFY source; BENCH_RELAY="k = v; k = v" sets
//! `[relay]` keys.
//!
//! BENCH_WRITERS=8 measures instead what listen mode costs the application:
//! that many connections insert notifications as Django does (single-row
//! autocommit transactions, then 100-row `bulk_create` statements) for
//! BENCH_SECONDS each: with no capture trigger; with the trigger while the
//! relay waits for a notification (every transaction notifies) and while it is
//! busy reading (none does); with it under `source.notify = false`. First with
//! fsync off (the bench
//! cluster's setting, where the trigger's own cost shows most), then with
//! fsync on (where the NOTIFY commit lock shows). No relay runs meanwhile.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::embedded_pg::{self, EmbeddedPg, DJANGO_FIXTURE};
use support::fake_pusher::FakePusher;

/// The relay child, killed if the bench panics (it would otherwise outlive the cluster).
struct Relay(std::process::Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config(url: &str, pusher: &str, metrics: u16, mode: &str) -> String {
    format!(
        r#"
[source]
database_url = "{url}"
mode = "{mode}"

[[routes]]
table = "public.operators_notificationoperateur"
recipient_column = "user_id"
event = "notification_created"
channels = ["in_app"]
payload_columns = ["id", "kind", "title", "level", "url", "created_at"]

[channels.in_app]
provider = "pusher"

[providers.pusher]
app_id = "123"
key = "key"
secret = "secret"
base_url = "{pusher}"

[metrics]
listen = "127.0.0.1:{metrics}"
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

/// When the fake Pusher has accepted `n` events. Polled in-process: a `count(*)`
/// on the ledger every few ms would take CPU from the system under test.
async fn wait_accepted(pusher: &FakePusher, n: usize, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if pusher.accepted_count() >= n {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "not all events accepted within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_sent(client: &tokio_postgres::Client, n: i64, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if count_sent(client).await >= n {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "not all deliveries accepted within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts `n` notifications in transactions of `per_tx` rows.
async fn insert_notifications(client: &tokio_postgres::Client, n: i64, per_tx: i64) {
    let mut inserted = 0;
    while inserted < n {
        let k = (n - inserted).min(per_tx);
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
}

/// BENCH_BACKLOG=N: Pusher down, N rows inserted; the relay's memory while
/// the whole backlog sits in the ledger, then while it drains for 45 s.
async fn backlog_memory(client: &tokio_postgres::Client, pusher: &FakePusher, relay: &Relay, n: i64) {
    pusher.fail_next(100_000_000, 503, None);
    let t0 = Instant::now();
    insert_notifications(client, n, 5000).await;
    loop {
        let recorded: i64 = client.query_one("SELECT count(*) FROM outbox_relay.deliveries", &[]).await.unwrap().get(0);
        if recorded >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ingest_secs = t0.elapsed().as_secs_f64();
    let rss_backlog = peak_rss_kib(relay.0.id()) as f64 / 1024.0;
    pusher.recover();
    // The circuit stays open up to relay.circuit_open_ms (30 s) before its probe.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let sent = count_sent(client).await;
    let rss_drain = peak_rss_kib(relay.0.id()) as f64 / 1024.0;
    println!("\n| measure | value |\n|---|---|");
    println!("| backlog | {n} rows recorded with Pusher down, in {ingest_secs:.1} s |");
    println!("| relay peak RSS with the whole backlog in the ledger | {rss_backlog:.1} MiB |");
    println!(
        "| then 45 s after Pusher recovers (circuit probe after ≤ 30 s) | {sent} sent, peak RSS {rss_drain:.1} MiB |"
    );
}

/// Rows committed by `writers` connections in `seconds`, each statement
/// inserting `per_statement` rows in its own (autocommit) transaction.
async fn insert_rate(url: &str, writers: usize, seconds: u64, per_statement: i32) -> f64 {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let url = url.to_string();
        tasks.spawn(async move {
            let c = embedded_pg::connect(&url).await.unwrap();
            let insert = c
                .prepare(
                    "INSERT INTO operators_notificationoperateur (user_id, kind, title, body, level, url)
                     SELECT 1 + (($1::int + g) % 20), 'order_ready', 'Commande ' || g, 'Votre commande est prête',
                            'info', '/orders/' || g
                     FROM generate_series(1, $2::int) g",
                )
                .await
                .unwrap();
            let mut rows = 0u64;
            while Instant::now() < until {
                rows += c.execute(&insert, &[&(w as i32), &per_statement]).await.unwrap();
            }
            rows
        });
    }
    let mut rows = 0;
    while let Some(r) = tasks.join_next().await {
        rows += r.unwrap();
    }
    rows as f64 / seconds as f64
}

/// BENCH_WRITERS: Django's insert rate without the capture trigger, with it,
/// and with it under `source.notify = false`.
async fn writer_costs(url: &str, pusher: &str, metrics: u16, writers: usize, seconds: u64) {
    let client = embedded_pg::connect(url).await.unwrap();
    let listen = config(url, pusher, metrics, "listen");
    // (label, config, doorbell armed): armed is a relay waiting for a
    // notification (every transaction notifies); disarmed is a relay busy
    // reading, as it is under a steady write load (no transaction notifies).
    let quiet = listen.replace("mode = \"listen\"", "mode = \"listen\"\nnotify = false");
    let variants: [(&str, Option<&str>, bool); 4] = [
        ("no trigger", None, false),
        ("capture trigger, NOTIFY, relay waiting (doorbell armed)", Some(&listen), true),
        ("capture trigger, NOTIFY, relay busy (doorbell disarmed)", Some(&listen), false),
        ("capture trigger, source.notify = false", Some(&quiet), false),
    ];
    println!(
        "\n| fsync | statement | variant | rows/s ({writers} writers) | time vs no trigger |\n|---|---|---|---|---|"
    );
    for fsync in ["off", "on"] {
        client.batch_execute(&format!("ALTER SYSTEM SET fsync = {fsync}")).await.unwrap();
        client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (label, per_statement) in [("1 row per transaction", 1), ("100-row bulk_create", 100)] {
            let mut base = 0.0;
            for (variant, cfg, armed) in &variants {
                client
                    .batch_execute(
                        "DROP TRIGGER IF EXISTS outbox_relay_capture_insert ON operators_notificationoperateur;
                         TRUNCATE operators_notificationoperateur",
                    )
                    .await
                    .unwrap();
                if let Some(text) = cfg {
                    let cfg = outbox_relay::config::Config::from_toml(text).unwrap();
                    outbox_relay::setup::apply(&mut embedded_pg::connect(url).await.unwrap(), &cfg).await.unwrap();
                    client.batch_execute("TRUNCATE outbox_relay.changes, outbox_relay.listen_doorbell").await.unwrap();
                    if !armed {
                        client.batch_execute("INSERT INTO outbox_relay.listen_doorbell VALUES (false)").await.unwrap();
                    }
                }
                client.batch_execute("CHECKPOINT").await.unwrap();
                let rate = insert_rate(url, writers, seconds, per_statement).await;
                if cfg.is_none() {
                    base = rate;
                }
                println!("| {fsync} | {label} | {variant} | {rate:.0} | {:.2}x |", base / rate);
            }
        }
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows = env_or("BENCH_ROWS", 100_000) as i64;
    let rate = env_or("BENCH_RATE", 1000);
    let seconds = env_or("BENCH_SECONDS", 20);

    let pg = tokio::task::spawn_blocking(EmbeddedPg::start).await.unwrap().expect("PostgreSQL");
    let url = pg.create_database("bench").await.unwrap();
    let client = embedded_pg::connect(&url).await.unwrap();
    client.batch_execute(DJANGO_FIXTURE).await.unwrap();
    let pusher = FakePusher::start("123", "key", "secret");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mode = std::env::var("BENCH_MODE").unwrap_or_else(|_| "logical".into());
    // BENCH_RELAY="dispatch_workers = 8" and the like: [relay] tuning under test.
    let tuning = std::env::var("BENCH_RELAY").unwrap_or_default().replace(';', "\n");
    let text = config(&url, &pusher.base_url(), metrics_port, &mode) + "\n[relay]\n" + &tuning + "\n";
    let writers = env_or("BENCH_WRITERS", 0) as usize;
    if writers > 0 {
        writer_costs(&url, &pusher.base_url(), metrics_port, writers, env_or("BENCH_SECONDS", 15)).await;
        return;
    }
    let cfg = outbox_relay::config::Config::from_toml(&text).unwrap();
    outbox_relay::setup::apply(&mut embedded_pg::connect(&url).await.unwrap(), &cfg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let mut relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = if mode == "listen" {
        "SELECT true FROM outbox_relay.listen_progress WHERE name = 'outbox_relay'"
    } else {
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    };
    loop {
        let active = client.query_opt(started, &[]).await.ok().flatten().is_some_and(|r| r.get::<_, bool>(0));
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let backlog = env_or("BENCH_BACKLOG", 0) as i64;
    if backlog > 0 {
        backlog_memory(&client, &pusher, &relay, backlog).await;
        return;
    }

    // 1. Throughput.
    let t0 = Instant::now();
    insert_notifications(&client, rows, 1000).await;
    let insert_secs = t0.elapsed().as_secs_f64();
    let done = wait_accepted(&pusher, rows as usize, Duration::from_secs(600)).await;
    let secs = (done - t0).as_secs_f64();
    // Not timed: the ledger agrees that every one was sent.
    wait_sent(&client, rows, Duration::from_secs(60)).await;
    let throughput = rows as f64 / secs;
    // Where the time went: ingestion (all rows in the ledger) vs dispatch.
    let ingested: f64 = client
        .query_one(
            "SELECT extract(epoch FROM max(created_at) - min(committed_at))::float8 FROM outbox_relay.deliveries",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("throughput: {rows} rows, {throughput:.0} deliveries/s ({secs:.2} s; inserts {insert_secs:.2} s)");

    // 2. Latency at a steady rate of single-row transactions.
    let before: i64 =
        client.query_one("SELECT coalesce(max(id), 0) FROM outbox_relay.deliveries", &[]).await.unwrap().get(0);
    let total = (rate * seconds) as i64;
    let mut tasks = tokio::task::JoinSet::new();
    let writers = 4u64;
    for w in 0..writers {
        let url = url.clone();
        tasks.spawn(async move {
            let c = embedded_pg::connect(&url).await.unwrap();
            let per_writer = rate / writers;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_writer as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..(per_writer * seconds) {
                tick.tick().await;
                c.execute(
                    "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES ($1, 'steady', 'tick')",
                    &[&((1 + (w + i) % 20) as i32)],
                )
                .await
                .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    wait_sent(&client, rows + total, Duration::from_secs(120)).await;
    let row = client
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)
             FROM (SELECT (extract(epoch FROM sent_at - committed_at) * 1000)::float8 AS ms
                   FROM outbox_relay.deliveries WHERE id > $1) t",
            &[&before],
        )
        .await
        .unwrap();
    let (p50, p99, max): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    let rss_mib = peak_rss_kib(relay.0.id()) as f64 / 1024.0;

    unsafe {
        libc::kill(relay.0.id() as i32, libc::SIGTERM);
    }
    relay.0.wait().unwrap();
    let accepted = pusher.events().len();

    println!("\n| measure ({mode} mode) | value |\n|---|---|");
    println!("| rows inserted (throughput run) | {rows} in transactions of 1000, inserts took {insert_secs:.2} s |");
    println!("| deliveries/s, first insert → last accepted | {throughput:.0} ({secs:.2} s) |");
    println!("| all rows in the ledger after | {ingested:.2} s (first commit → last ledger write) |");
    println!("| steady load | {rate} single-row transactions/s for {seconds} s ({total} rows) |");
    println!("| commit → accepted p50 | {p50:.1} ms |");
    println!("| commit → accepted p99 | {p99:.1} ms |");
    println!("| commit → accepted max | {max:.1} ms |");
    println!("| relay peak RSS (VmHWM) | {rss_mib:.1} MiB |");
    println!("| events accepted by the fake Pusher | {accepted} |");
    drop(client);
    drop(pg);
}
