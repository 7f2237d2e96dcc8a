//! A relay under test: a fresh database with the Django tables, setup done, a
//! fake Pusher, and the relay either in-process or as the real binary (for
//! kill -9 and SIGTERM).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_relay::config::Config;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::fakes::pusher::FakePusher;
use super::pg::{fresh_db, TestDb};

/// Which source the relay under test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Logical,
    Listen,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Logical => "logical",
            Mode::Listen => "listen",
        }
    }
}

pub struct Env {
    pub mode: Mode,
    pub db: TestDb,
    pub pusher: FakePusher,
    /// Slot and publication names; unique per test (slots are cluster-wide).
    pub slot: String,
    /// Extra TOML appended to the config, inside `[relay]` (then any new tables).
    pub extra: String,
    /// Extra keys inside `[channels.in_app]` (fallback, max_attempts, ...).
    pub channel_extra: String,
    /// Extra keys inside the outbox route (`only = ...`).
    pub route_extra: String,
    pub dir: tempfile::TempDir,
    /// `source.database_url` of the relay: `db.url` unless the test connects
    /// the relay differently from its own admin connections (TLS, another role).
    pub database_url: String,
    /// `[providers.pusher] timeout_ms` and `relay.claim_lease_ms`: short, so
    /// that fault tests run fast. A test that loads the machine raises them:
    /// a call that times out has an unknown outcome, which Pusher cannot
    /// deduplicate (the counted window), and is not what such a test checks.
    pub pusher_timeout_ms: u64,
    pub claim_lease_ms: u64,
}

pub struct InProcess {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Result<(), outbox_relay::app::RunError>>,
}

impl InProcess {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle.await.expect("relay task panicked").expect("relay failed");
    }
}

impl Env {
    pub async fn new(prefix: &str) -> Env {
        Env::with_extra(prefix, "").await
    }

    pub async fn with_extra(prefix: &str, extra: &str) -> Env {
        Env::with(prefix, "", extra).await
    }

    pub async fn with(prefix: &str, channel_extra: &str, extra: &str) -> Env {
        Env::with_mode(Mode::Logical, prefix, channel_extra, extra).await
    }

    pub async fn in_mode(mode: Mode, prefix: &str) -> Env {
        Env::with_mode(mode, prefix, "", "").await
    }

    pub async fn with_mode(mode: Mode, prefix: &str, channel_extra: &str, extra: &str) -> Env {
        Env::build(mode, prefix, "", channel_extra, extra).await
    }

    /// `route_extra` goes inside the outbox route; `extra` as in [`Env::with_mode`].
    pub async fn with_route(mode: Mode, prefix: &str, route_extra: &str, extra: &str) -> Env {
        Env::build(mode, prefix, route_extra, "", extra).await
    }

    /// `prepare` runs on the fresh database before setup (tables for routes in `extra`).
    pub async fn prepared(mode: Mode, prefix: &str, prepare: &str, extra: &str) -> Env {
        Env::build_on(mode, prefix, prepare, "", "", extra).await
    }

    /// [`Env::prepared`] with keys inside the outbox route too.
    pub async fn prepared_route(mode: Mode, prefix: &str, prepare: &str, route_extra: &str, extra: &str) -> Env {
        Env::build_on(mode, prefix, prepare, route_extra, "", extra).await
    }

    async fn build(mode: Mode, prefix: &str, route_extra: &str, channel_extra: &str, extra: &str) -> Env {
        Env::build_on(mode, prefix, "", route_extra, channel_extra, extra).await
    }

    async fn build_on(
        mode: Mode,
        prefix: &str,
        prepare: &str,
        route_extra: &str,
        channel_extra: &str,
        extra: &str,
    ) -> Env {
        let db = fresh_db(prefix).await;
        db.client().await.batch_execute(prepare).await.expect("preparing the database");
        let url = db.url.clone();
        Env::build_with_db(mode, db, url, route_extra, channel_extra, extra).await
    }

    /// On a database the caller made (another cluster), the relay connecting
    /// with `database_url` while setup and the test's checks use `db.url`.
    pub async fn on_db(mode: Mode, db: TestDb, database_url: String) -> Env {
        Env::build_with_db(mode, db, database_url, "", "", "").await
    }

    async fn build_with_db(
        mode: Mode,
        db: TestDb,
        database_url: String,
        route_extra: &str,
        channel_extra: &str,
        extra: &str,
    ) -> Env {
        let pusher = FakePusher::start("123", "key", "secret");
        let env = Env {
            mode,
            slot: db.name.clone(),
            db,
            pusher,
            extra: extra.to_string(),
            channel_extra: channel_extra.to_string(),
            route_extra: route_extra.to_string(),
            dir: tempfile::tempdir().unwrap(),
            database_url,
            pusher_timeout_ms: 2000,
            claim_lease_ms: 3000,
        };
        let cfg = env.config();
        outbox_relay::setup::apply(&mut env.db.client().await, &cfg).await.expect("setup");
        env
    }

    pub fn config_toml(&self, metrics_listen: &str) -> String {
        format!(
            r#"
[source]
database_url = "{url}"
mode = "{mode}"
slot = "{slot}"
publication = "{slot}"
poll_interval_ms = 200

[[routes]]
table = "public.operators_notificationoperateur"
recipient_column = "user_id"
event = "notification_created"
channels = ["in_app"]
payload_columns = ["id", "kind", "title", "level", "url", "created_at"]

[[routes]]
table = "public.operators_outboxevent"
recipient_column = "recipient_id"
event_column = "event_type"
channels_column = "channels"
channels = ["in_app"]
payload_column = "payload"
{route_extra}

[channels.in_app]
provider = "pusher"
channel_name = "private-user-{{recipient}}"
max_attempts = 6
{channel_extra}

[providers.pusher]
app_id = "123"
key = "key"
secret = "secret"
base_url = "{pusher}"
timeout_ms = {pusher_timeout_ms}

[metrics]
listen = "{metrics_listen}"

[relay]
ingest_flush_ms = 5
dispatch_poll_ms = 100
claim_lease_ms = {claim_lease_ms}
retry_base_ms = 50
retry_max_ms = 1000
heartbeat_ms = 1000
circuit_open_ms = 500
{extra}
"#,
            url = self.database_url,
            slot = self.slot,
            pusher = self.pusher.base_url(),
            pusher_timeout_ms = self.pusher_timeout_ms,
            claim_lease_ms = self.claim_lease_ms,
            extra = self.extra,
            channel_extra = self.channel_extra,
            route_extra = self.route_extra,
            mode = self.mode.as_str(),
        )
    }

    pub fn config(&self) -> Config {
        // Port 0: a listener nobody needs to know, but webhooks require one.
        Config::from_toml(&self.config_toml("127.0.0.1:0")).expect("test config is valid")
    }

    pub fn start_in_process(&self) -> InProcess {
        self.run_in_process(self.config())
    }

    /// In-process, serving /metrics and /webhooks on `port`.
    pub fn start_in_process_on(&self, port: u16) -> InProcess {
        let toml = self.config_toml(&format!("127.0.0.1:{port}"));
        self.run_in_process(Config::from_toml(&toml).expect("test config is valid"))
    }

    /// In-process with a config the test built (from [`Env::config_toml`], edited).
    pub fn start_config(&self, cfg: Config) -> InProcess {
        self.run_in_process(cfg)
    }

    fn run_in_process(&self, cfg: Config) -> InProcess {
        let (stop, rx) = watch::channel(false);
        let handle = tokio::spawn(outbox_relay::app::run(cfg, rx));
        InProcess { stop, handle }
    }

    /// The real binary, with its own /metrics on `metrics_port`.
    pub fn spawn_binary(&self, metrics_port: u16) -> Child {
        self.spawn_binary_env(metrics_port, &[])
    }

    /// The real binary with extra environment (`OUTBOX_RELAY__...` overrides).
    pub fn spawn_binary_env(&self, metrics_port: u16, envs: &[(&str, &str)]) -> Child {
        let path = self.dir.path().join("relay.toml");
        std::fs::write(&path, self.config_toml(&format!("127.0.0.1:{metrics_port}"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the relay binary")
    }

    /// Waits until the relay reads its source: the slot has a consumer
    /// (logical), or the listen position exists (listen).
    pub async fn wait_streaming(&self) {
        let client = self.db.client().await;
        let sql = match self.mode {
            Mode::Logical => "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            Mode::Listen => "SELECT true FROM outbox_relay.listen_progress WHERE name = $1",
        };
        for _ in 0..300 {
            let row = client.query_opt(sql, &[&self.slot]).await.ok().flatten();
            if row.is_some_and(|r| r.get::<_, bool>(0)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the relay never started streaming slot {}", self.slot);
    }

    /// Ledger rows by status.
    pub async fn statuses(&self) -> BTreeMap<String, i64> {
        let client = self.db.client().await;
        let rows = client
            .query("SELECT status, count(*) FROM outbox_relay.deliveries GROUP BY 1", &[])
            .await
            .unwrap_or_default();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Waits until some delivery was held back by an open circuit (its
    /// `last_error` says so): from then on, fresh deliveries go to the fallback.
    pub async fn wait_circuit_open(&self, timeout: Duration) {
        let client = self.db.client().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open: i64 = client
                .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE last_error LIKE '%circuit open%'", &[])
                .await
                .unwrap()
                .get(0);
            if open > 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the circuit never opened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `n` ledger rows are settled (sent or later, failed, dead or skipped).
    pub async fn wait_settled(&self, n: i64, timeout: Duration) -> BTreeMap<String, i64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.statuses().await;
            let settled: i64 = ["sent", "delivered", "read", "bounced", "failed", "dead", "skipped"]
                .iter()
                .filter_map(|k| s.get(*k))
                .sum();
            if settled >= n {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("only {settled} of {n} deliveries settled in {timeout:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many times the fake Pusher accepted each notification id (its `id` payload field).
    pub fn pusher_counts(&self) -> BTreeMap<i64, usize> {
        let mut out = BTreeMap::new();
        for e in self.pusher.events() {
            if let Some(id) = e.data.get("id").and_then(|v| v.as_i64()) {
                *out.entry(id).or_default() += 1;
            }
        }
        out
    }
}

/// Inserts `n` notifications in transactions of `per_tx`; returns their ids.
/// synchronous_commit=on: a row the test counts must survive a server crash.
pub async fn insert_notifications(client: &tokio_postgres::Client, n: usize, per_tx: usize) -> Vec<i64> {
    client.batch_execute("SET synchronous_commit = on").await.unwrap();
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let k = left.min(per_tx);
        let rows = client
            .query(
                "INSERT INTO operators_notificationoperateur (user_id, kind, title, level, url)
                 SELECT 1 + (g % 20), 'order_ready', 'Commande ' || g, 'info', '/o/' || g
                 FROM generate_series(1, $1::int) g RETURNING id",
                &[&(k as i32)],
            )
            .await
            .unwrap();
        ids.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        left -= k;
    }
    ids
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Reads one counter from a relay's /metrics (0 when absent).
pub async fn scrape_counter(port: u16, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

pub fn sigterm(child: &Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Runs an async test body `fn name(mode: Mode)` once per source mode, as
/// `name::logical` and `name::listen`.
#[macro_export]
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            use $crate::support::relay::Mode;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn logical() {
                super::$name(Mode::Logical).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn listen() {
                super::$name(Mode::Listen).await
            }
        }
    };
}

/// Routes for every kind of change on the notification table (beside the
/// insert route every test config has): updates and deletes, each its own
/// event, payload enough to tell the changes apart. For `Env`'s `extra`.
pub const CHANGE_ROUTES: &str = r#"
[[routes]]
table = "public.operators_notificationoperateur"
operations = ["update"]
recipient_column = "user_id"
event = "notification_updated"
channels = ["in_app"]
payload_columns = ["id", "title"]

[[routes]]
table = "public.operators_notificationoperateur"
operations = ["delete"]
recipient_column = "user_id"
event = "notification_deleted"
channels = ["in_app"]
payload_columns = ["id", "title"]
"#;

impl Env {
    /// Every kind of change routed ([`CHANGE_ROUTES`]), the notification
    /// table under `REPLICA IDENTITY FULL` so that deletes carry the whole old
    /// row in logical mode (and pgoutput flags every column, NULLs included, as key).
    pub async fn for_every_change(mode: Mode, prefix: &str) -> Env {
        let env = Env::with_mode(mode, prefix, "", CHANGE_ROUTES).await;
        let client = env.db.client().await;
        client.batch_execute("ALTER TABLE operators_notificationoperateur REPLICA IDENTITY FULL").await.unwrap();
        env
    }
}

/// A change as Pusher saw it: (event, row id, title).
pub type SeenChange = (String, i64, String);

impl Env {
    /// How many times the fake Pusher accepted each change.
    pub fn change_counts(&self) -> BTreeMap<SeenChange, usize> {
        let mut out = BTreeMap::new();
        for e in self.pusher.events() {
            let id = e.data.get("id").and_then(|v| v.as_i64()).unwrap_or(-1);
            let title = e.data.get("title").and_then(|v| v.as_str()).unwrap_or("").to_string();
            *out.entry((e.name.clone(), id, title)).or_default() += 1;
        }
        out
    }
}

/// One round of every kind of change, tagged `tag` so rounds differ: `n` rows
/// inserted (two transactions), each updated twice (the second update of half
/// of them in the same transaction as the first), the even ones deleted.
/// Returns the changes a route-everything relay must deliver, once each.
pub async fn churn(client: &tokio_postgres::Client, n: usize, tag: &str) -> Vec<SeenChange> {
    let mut expect = vec![];
    let mut ids: Vec<i64> = vec![];
    for half in [n / 2, n - n / 2] {
        let rows = client
            .query(
                "INSERT INTO operators_notificationoperateur (user_id, kind, title, read_at, extra)
                 SELECT 1 + g % 5, 'churn', $1, NULL, NULL FROM generate_series(1, $2::int) g RETURNING id",
                &[&format!("{tag}-v0"), &(half as i32)],
            )
            .await
            .unwrap();
        ids.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    for id in &ids {
        expect.push(("notification_created".to_string(), *id, format!("{tag}-v0")));
    }
    let (same_tx, own_tx) = ids.split_at(ids.len() / 2);
    let set = |v: &str, ids: &[i64]| {
        format!(
            "UPDATE operators_notificationoperateur SET title = '{tag}-{v}' WHERE id = ANY('{{{}}}'::bigint[]);",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        )
    };
    client.batch_execute(&format!("BEGIN; {} {} COMMIT;", set("v1", same_tx), set("v2", same_tx))).await.unwrap();
    client.batch_execute(&set("v1", own_tx)).await.unwrap();
    client.batch_execute(&set("v2", own_tx)).await.unwrap();
    for id in &ids {
        for v in ["v1", "v2"] {
            expect.push(("notification_updated".to_string(), *id, format!("{tag}-{v}")));
        }
    }
    let even: Vec<i64> = ids.iter().copied().filter(|id| id % 2 == 0).collect();
    client.execute("DELETE FROM operators_notificationoperateur WHERE id = ANY($1)", &[&even]).await.unwrap();
    for id in &even {
        expect.push(("notification_deleted".to_string(), *id, format!("{tag}-v2")));
    }
    expect
}

/// Empties the notification table and restarts its ids, so the next rows
/// reuse keys already delivered (`TRUNCATE ... RESTART IDENTITY`).
pub async fn truncate_notifications(client: &tokio_postgres::Client) {
    client.batch_execute("TRUNCATE operators_notificationoperateur RESTART IDENTITY").await.unwrap();
}

/// The write load the kill -9 tests run under: 60 transactions of 25
/// notifications, 15 ms apart, on their own connection. Yields their ids.
pub fn stream_notifications(db: TestDb) -> JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let client = db.client().await;
        let mut ids = vec![];
        for _ in 0..60 {
            ids.extend(insert_notifications(&client, 25, 25).await);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        ids
    })
}

/// `rounds` times: wait 150 ms plus up to `jitter_ms`, read the possible
/// re-sends the running relay counted, SIGKILL it, start the next with
/// `respawn`. Returns the re-sends counted by the killed processes.
pub async fn kill_9_rounds(
    child: &mut Child,
    port: u16,
    rounds: usize,
    jitter_ms: u64,
    mut respawn: impl FnMut() -> Child,
) -> f64 {
    let mut resends = 0.0;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(150 + rand::random::<u64>() % jitter_ms)).await;
        resends += scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        *child = respawn();
    }
    resends
}
