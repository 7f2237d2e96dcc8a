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
//! BENCH_DRAIN=N instead drains a backlog of N rows written while the relay
//! was stopped, beside pg_recvlogical on the same WAL, with the CPU split per
//! process and the ledger's size before and after (see [`drain`]).
//!
//! BENCH_BIN=path runs another build of the relay under the same harness;
//! BENCH_PUSHER_CONCURRENCY=n sets `[limits.pusher] concurrency`.
//!
//! BENCH_ROWS, BENCH_RATE and BENCH_SECONDS override the sizes; BENCH_MODE=listen
//! runs the same on the LISTEN/NOTIFY source; BENCH_RELAY="k = v; k = v" sets
//! `[relay]` keys.
//!
//! BENCH_APP=10 measures the application's insert rate (8 connections, 10 s)
//! with the relay stopped and then streaming and delivering beside it.
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

use outbox_relay::demo::embedded_pg::{self, EmbeddedPg, DJANGO_FIXTURE};
use support::fakes::pusher::FakePusher;

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
/// the whole backlog sits in the ledger as `pending` (an outage's backlog:
/// every row takes the claim path), then the time to drain it once Pusher
/// is back, the rate over the drain, the CPU split and the ledger's size.
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
    let size_before = ledger_size(client).await;
    pusher.recover();
    // The circuit stays open up to relay.circuit_open_ms (30 s) before its
    // probe: the drain is timed from the first event accepted.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pusher.accepted_count() == 0 {
        assert!(Instant::now() < deadline, "no event accepted 120 s after Pusher recovered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let (xacts_before, wal_before) = xacts_and_wal(client).await;
    let mut cpu = CpuSplit::start(client, relay.0.id()).await;
    let mut rates = Vec::new();
    let mut last = (Instant::now(), pusher.accepted_count());
    let deadline = Instant::now() + Duration::from_secs(3600);
    let secs = loop {
        // The end is seen within 5 ms; CPU and the rate are sampled each second.
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick && pusher.accepted_count() < n as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        cpu.sample(client, false).await;
        let got = pusher.accepted_count();
        let now = Instant::now();
        rates.push(((got - last.1) as f64 / (now - last.0).as_secs_f64()) as u64);
        last = (now, got);
        if got >= n as usize {
            break secs;
        }
        assert!(now < deadline, "backlog not drained within an hour");
    };
    let split = cpu.finish(secs);
    let (xacts_after, wal_after) = xacts_and_wal(client).await;
    wait_sent(client, n, Duration::from_secs(120)).await;
    let size_after = ledger_size(client).await;
    let rss_drain = peak_rss_kib(relay.0.id()) as f64 / 1024.0;
    let per_window: Vec<String> = rates
        .chunks(rates.len().div_ceil(10).max(1))
        .map(|c| format!("{}", c.iter().sum::<u64>() / c.len() as u64))
        .collect();
    println!("\n| measure (outage backlog, {n} rows) | value |\n|---|---|");
    println!("| backlog | {n} rows recorded `pending` with Pusher down, in {ingest_secs:.1} s |");
    println!("| relay peak RSS with the whole backlog in the ledger | {rss_backlog:.1} MiB |");
    println!(
        "| drained after Pusher recovered (first → last event accepted) | **{:.0} deliveries/s** ({secs:.2} s) |",
        n as f64 / secs
    );
    println!("| accepted per second, averaged over tenths of the drain | {} |", per_window.join(", "));
    println!(
        "| during the drain, per delivery | {:.2} transactions committed, {:.0} bytes of WAL |",
        (xacts_after - xacts_before) as f64 / n as f64,
        (wal_after - wal_before) as f64 / n as f64
    );
    println!("| relay peak RSS after the drain | {rss_drain:.1} MiB |");
    println!("| ledger before the drain | {size_before} |");
    println!("| ledger after | {size_after} |");
    println!("\n{split}");
    eprintln!("outage backlog: {n} rows, drained at {:.0} deliveries/s", n as f64 / secs);
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

/// BENCH_APP: 8 connections insert notification rows (single-row
/// transactions, then 100-row statements) for `seconds` with the relay
/// stopped, then as long again with it streaming and delivering — the rows
/// of the first run included, so it is busy throughout. Logical mode.
async fn app_rate(client: &tokio_postgres::Client, url: &str, spawn: impl Fn() -> Relay, seconds: u64) {
    println!("\n| statement | rows/s, relay stopped | rows/s, relay delivering | with / without |\n|---|---|---|---|");
    for (label, per_statement) in [("1 row per transaction", 1), ("100-row bulk_create", 100)] {
        client.batch_execute("CHECKPOINT").await.unwrap();
        let without = insert_rate(url, 8, seconds, per_statement).await;
        let relay = spawn();
        loop {
            let active = "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'";
            if client.query_opt(active, &[]).await.ok().flatten().is_some_and(|r| r.get::<_, bool>(0)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let with = insert_rate(url, 8, seconds, per_statement).await;
        drop(relay);
        println!("| {label} | {without:.0} | {with:.0} | {:.2} |", with / without);
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

/// CPU ticks (user + system) of one process, from /proc/<pid>/stat; 0 once gone.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the stat line (utime, stime), counted from `state` (field 3).
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// Busy and total ticks of the whole machine (/proc/stat), to show how loaded it was.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Samples CPU per process class while a phase runs: the relay, the bench
/// itself (fake Pusher and harness), and PostgreSQL backends by type (the
/// walsender, client backends — the relay's ledger connections —, autovacuum,
/// the rest). A backend first seen during the phase started during it, so
/// all its ticks count; one that ends between two samples loses its last
/// fraction of a second.
struct CpuSplit {
    relay: u32,
    first: std::collections::HashMap<u32, u64>,
    last: std::collections::HashMap<u32, (String, u64)>,
    relay_start: u64,
    bench_start: u64,
    machine_start: (u64, u64),
}

impl CpuSplit {
    async fn start(client: &tokio_postgres::Client, relay: u32) -> CpuSplit {
        let mut s = CpuSplit {
            relay,
            first: Default::default(),
            last: Default::default(),
            relay_start: cpu_ticks(relay),
            bench_start: cpu_ticks(std::process::id()),
            machine_start: machine_ticks(),
        };
        s.sample(client, true).await;
        s
    }

    async fn sample(&mut self, client: &tokio_postgres::Client, baseline: bool) {
        let own: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.map(|r| r.get(0)).unwrap_or(0);
        let rows =
            client.query("SELECT pid, coalesce(backend_type, '') FROM pg_stat_activity", &[]).await.unwrap_or_default();
        for r in rows {
            let (pid, kind): (i32, String) = (r.get(0), r.get(1));
            let class = match kind.as_str() {
                "walsender" => "walsender",
                "client backend" if pid == own => "bench's own backend",
                "client backend" => "ledger backends (relay's connections)",
                "autovacuum worker" => "autovacuum",
                _ => "other PostgreSQL",
            };
            let ticks = cpu_ticks(pid as u32);
            self.first.entry(pid as u32).or_insert(if baseline { ticks } else { 0 });
            self.last.insert(pid as u32, (class.to_string(), ticks));
        }
    }

    /// Seconds of CPU per class over the phase, and the machine's busy share.
    fn finish(&self, secs: f64) -> String {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut by: std::collections::BTreeMap<String, f64> = Default::default();
        for (pid, (class, ticks)) in &self.last {
            *by.entry(class.clone()).or_default() += ticks.saturating_sub(self.first[pid]) as f64 / hz;
        }
        by.insert("relay process".into(), cpu_ticks(self.relay).saturating_sub(self.relay_start) as f64 / hz);
        by.insert(
            "bench process (fake Pusher, harness)".into(),
            cpu_ticks(std::process::id()).saturating_sub(self.bench_start) as f64 / hz,
        );
        let (busy, total) = machine_ticks();
        let machine = (busy - self.machine_start.0) as f64 / (total - self.machine_start.1).max(1) as f64;
        let ours: f64 = by.values().sum();
        let mut out = String::from("| process | CPU s | share of one core |\n|---|---|---|\n");
        for (class, s) in &by {
            out.push_str(&format!("| {class} | {s:.1} | {:.0} % |\n", 100.0 * s / secs));
        }
        out.push_str(&format!(
            "| all of the above | {ours:.1} | {:.0} % |\n| whole machine busy (other engineers' work included) | | {:.0} % of {} cores |\n",
            100.0 * ours / secs,
            100.0 * machine,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        ));
        out
    }
}

/// Transactions committed in this database, and the WAL position in bytes.
async fn xacts_and_wal(client: &tokio_postgres::Client) -> (i64, i64) {
    let _ = client.batch_execute("SELECT pg_stat_force_next_flush()").await;
    let r = client
        .query_one(
            "SELECT xact_commit, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint FROM pg_stat_database
             WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The ledger's size, its dead tuples and its indexes, for before/after a drain.
async fn ledger_size(client: &tokio_postgres::Client) -> String {
    let _ = client.batch_execute("SELECT pg_stat_force_next_flush()").await;
    let rows = client
        .query(
            "SELECT c.relname, pg_relation_size(c.oid), coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0),
                    coalesce(s.autovacuum_count, 0) + coalesce(s.vacuum_count, 0)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
             WHERE n.nspname = 'outbox_relay' AND c.relkind IN ('r', 'i') AND pg_relation_size(c.oid) > 8192
             ORDER BY pg_relation_size(c.oid) DESC",
            &[],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            let (name, bytes, live, dead, vacuums): (String, i64, i64, i64, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            if live + dead > 0 {
                format!(
                    "{name} {:.1} MiB ({live} live, {dead} dead tuples, {vacuums} vacuums)",
                    bytes as f64 / 1048576.0
                )
            } else {
                format!("{name} {:.1} MiB", bytes as f64 / 1048576.0)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// BENCH_DRAIN=N: the relay is stopped while N rows are committed (5 000 per
/// transaction); then pg_recvlogical streams the same WAL through pgoutput
/// (protocol 1, the relay's publication, to /dev/null) from its own slot,
/// created beside the relay's; then the relay starts and drains the backlog
/// to the fake Pusher. Prints the drain rate, the ingestion rate against
/// pg_recvlogical's, where the CPU went, and the ledger's size before/after.
async fn drain(
    pg: &EmbeddedPg,
    url: &str,
    client: &tokio_postgres::Client,
    pusher: &FakePusher,
    start_relay: impl FnOnce() -> Relay,
    n: i64,
) {
    client.batch_execute("SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')").await.unwrap();
    let t0 = Instant::now();
    insert_notifications(client, n, 5000).await;
    let insert_secs = t0.elapsed().as_secs_f64();
    let end_lsn: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let wal_mib: f64 = client
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 / 1048576 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // pg_recvlogical: the same WAL, the same publication, nothing done with it.
    let t = Instant::now();
    let out = Command::new("pg_recvlogical")
        .args(["-d", url, "--slot", "bench_recvlogical", "--start", "--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=outbox_relay", "--endpos", &end_lsn])
        .stderr(Stdio::piped())
        .output()
        .expect("pg_recvlogical on PATH");
    let recv_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "pg_recvlogical: {}", String::from_utf8_lossy(&out.stderr));
    client.batch_execute("SELECT pg_drop_replication_slot('bench_recvlogical')").await.unwrap();

    let size_before = ledger_size(client).await;
    let (xacts_before, wal_before) = xacts_and_wal(client).await;
    let start_server: chrono::DateTime<chrono::Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let t = Instant::now();
    let relay = start_relay();
    let mut cpu = CpuSplit::start(client, relay.0.id()).await;
    // Sampled every second: backends that come and go are seen, and the drain
    // rate over time shows whether it degrades as `sent` rows pile up.
    let mut rates = Vec::new();
    let mut last = (Instant::now(), 0usize);
    let deadline = Instant::now() + Duration::from_secs(3600);
    let secs = loop {
        // The end is seen within 5 ms; CPU and the rate are sampled each second.
        let tick = Instant::now() + Duration::from_secs(1);
        while Instant::now() < tick && pusher.accepted_count() < n as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        cpu.sample(client, false).await;
        let got = pusher.accepted_count();
        let now = Instant::now();
        rates.push(((got - last.1) as f64 / (now - last.0).as_secs_f64()) as u64);
        last = (now, got);
        if got >= n as usize {
            break secs;
        }
        assert!(now < deadline, "backlog not drained within an hour");
    };
    let split = cpu.finish(secs);
    let ingested: f64 = client
        .query_one(
            "SELECT extract(epoch FROM max(created_at) - $1)::float8 FROM outbox_relay.deliveries",
            &[&start_server],
        )
        .await
        .unwrap()
        .get(0);
    let (xacts_after, wal_after) = xacts_and_wal(client).await;
    wait_sent(client, n, Duration::from_secs(120)).await;
    let size_after = ledger_size(client).await;
    let rss = peak_rss_kib(relay.0.id()) as f64 / 1024.0;
    let per_window: Vec<String> = rates
        .chunks(rates.len().div_ceil(10).max(1))
        .map(|c| format!("{}", c.iter().sum::<u64>() / c.len() as u64))
        .collect();
    let _ = pg;

    println!("\n| measure (backlog drain, {n} rows) | value |\n|---|---|");
    println!("| backlog | {n} rows committed in transactions of 5 000 with the relay stopped ({insert_secs:.1} s), {wal_mib:.0} MiB of WAL |");
    println!(
        "| pg_recvlogical, pgoutput proto 1, same publication, to /dev/null | {:.0} rows/s ({recv_secs:.2} s) |",
        n as f64 / recv_secs
    );
    println!(
        "| relay: every row in the ledger (ingestion) | {:.0} rows/s ({ingested:.2} s after start) |",
        n as f64 / ingested
    );
    println!("| ingestion / pg_recvlogical | {:.2} |", recv_secs / ingested);
    println!(
        "| relay: backlog drained (start → last event accepted by Pusher) | **{:.0} deliveries/s** ({secs:.2} s) |",
        n as f64 / secs
    );
    println!("| accepted per second, averaged over tenths of the drain | {} |", per_window.join(", "));
    println!("| relay peak RSS | {rss:.1} MiB |");
    println!(
        "| during the drain, per delivery | {:.2} transactions committed, {:.0} bytes of WAL (the relay's own: the backlog was written before) |",
        (xacts_after - xacts_before) as f64 / n as f64,
        (wal_after - wal_before) as f64 / n as f64
    );
    println!("| ledger before the drain | {} |", if size_before.is_empty() { "empty" } else { &size_before });
    println!("| ledger after | {size_after} |");
    println!("| {} |", written_once(client).await);
    println!("\n{split}");
    eprintln!(
        "drain: {n} rows, {:.0} deliveries/s, ingestion {:.0}/s, pg_recvlogical {:.0}/s",
        n as f64 / secs,
        n as f64 / ingested,
        n as f64 / recv_secs
    );
    drop(relay);
}

/// How many deliveries were written once — inserted with their outcome
/// (handed over unwritten) — rather than inserted, then given an outcome.
async fn written_once(client: &tokio_postgres::Client) -> String {
    let r = client
        .query_one("SELECT count(*) FILTER (WHERE updated_at = created_at), count(*) FROM outbox_relay.deliveries", &[])
        .await
        .unwrap();
    let (once, all): (i64, i64) = (r.get(0), r.get(1));
    format!("deliveries written once (with their outcome) | {once} of {all}")
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
    let mut text = config(&url, &pusher.base_url(), metrics_port, &mode) + "\n[relay]\n" + &tuning + "\n";
    let writers = env_or("BENCH_WRITERS", 0) as usize;
    if writers > 0 {
        writer_costs(&url, &pusher.base_url(), metrics_port, writers, env_or("BENCH_SECONDS", 15)).await;
        return;
    }
    // BENCH_PUSHER_CONCURRENCY=64: Pusher calls in flight (default 16, 10 events each).
    if let Ok(n) = std::env::var("BENCH_PUSHER_CONCURRENCY") {
        text += &format!("\n[limits.pusher]\nconcurrency = {n}\n");
    }
    let cfg = outbox_relay::config::Config::from_toml(&text).unwrap();
    outbox_relay::setup::apply(&mut embedded_pg::connect(&url).await.unwrap(), &cfg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    // BENCH_BIN: another build of the relay (an earlier commit, say) under
    // the same harness, for before/after figures from the same run.
    let relay_bin = std::env::var("BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outbox-relay").to_string());
    let spawn = || {
        Relay(
            Command::new(&relay_bin)
                .args(["--config", path.to_str().unwrap(), "run"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let drain_rows = env_or("BENCH_DRAIN", 0) as i64;
    if drain_rows > 0 {
        drain(&pg, &url, &client, &pusher, spawn, drain_rows).await;
        return;
    }
    // BENCH_APP=seconds: the application's insert rate with the relay
    // running beside it, against the same without it.
    let app_seconds = env_or("BENCH_APP", 0);
    if app_seconds > 0 && mode == "logical" {
        app_rate(&client, &url, spawn, app_seconds).await;
        return;
    }
    let mut relay = spawn();
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
    println!("| {} |", written_once(&client).await);
    drop(client);
    drop(pg);
}
