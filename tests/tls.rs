//! TLS against a real server: a throwaway cluster with `ssl = on`, a CA and
//! certificates made here with rcgen, and a pg_hba.conf that lets the relay's
//! roles in over `hostssl` only (password + channel binding for `relay`,
//! client certificate for `relay_cert`).
//!
//! The relay runs end to end with `sslmode=verify-full` in both source modes;
//! wrong host name, wrong CA and `sslmode=disable` each stop the binary at
//! start with exit 2 and the fix; `pg_stat_ssl` shows every connection of the
//! relay encrypted, the replication stream's walsender included.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use outbox_relay::db::PgTarget;
use outbox_relay::demo::embedded_pg::{self, ClusterOptions, EmbeddedPg, DJANGO_FIXTURE};
use outbox_relay::source::replication::ReplicationStream;
use outbox_relay::source::Lsn;
use support::pg::TestDb;
use support::pki::TestCa;
use support::relay::{insert_notifications, Env, Mode};

const PASSWORD: &str = "Tls-s3cret-pw";

/// The CA, certificates and keys the client side uses, in a directory whose
/// path has a space (quoting in key=value DSNs gets exercised for free).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

struct TlsCluster {
    pg: EmbeddedPg,
    pki: Pki,
}

static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();

extern "C" fn destroy_at_exit() {
    if let Some(c) = CLUSTER.get() {
        c.pg.destroy();
    }
}

fn cluster() -> &'static TlsCluster {
    CLUSTER.get_or_init(|| {
        let authority = TestCa::new("outbox-relay test CA");
        let other = TestCa::new("some other CA");
        // Issued for "localhost" only: connecting to 127.0.0.1 is the wrong-name case.
        let (server_cert, server_key) = authority.issue(&["localhost"], "localhost");
        // `cert` authentication maps the certificate's CN to the role.
        let (client_cert, client_key) = authority.issue(&[], "relay_cert");

        let dir = tempfile::Builder::new().prefix("tls pki ").tempdir().unwrap();
        let write = |name: &str, text: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path
        };
        let pki = Pki {
            ca: write("root ca.crt", &authority.pem()),
            other_ca: write("other-ca.crt", &other.pem()),
            client_cert: write("client.crt", &client_cert),
            client_key: write("client.key", &client_key),
            _dir: dir,
        };
        let options = ClusterOptions {
            extra_conf: "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n\
                         password_encryption = 'scram-sha-256'\n"
                .into(),
            // The tests' own admin connections (postgres) stay in clear text;
            // the relay's roles get in over TLS or not at all.
            hba: Some(
                "local all all trust\n\
                 host all postgres 127.0.0.1/32 trust\n\
                 hostssl all relay 127.0.0.1/32 scram-sha-256\n\
                 hostssl all relay_cert 127.0.0.1/32 cert\n"
                    .into(),
            ),
            files: vec![
                ("server.crt".into(), server_cert.into_bytes()),
                ("server.key".into(), server_key.into_bytes()),
                ("ca.crt".into(), authority.pem().into_bytes()),
            ],
        };
        let pg = EmbeddedPg::start_with(options).unwrap_or_else(|e| panic!("starting the TLS cluster: {e}"));
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(destroy_at_exit);
        }
        TlsCluster { pg, pki }
    })
}

/// A fresh database with the Django tables, and the relay's roles (cluster-wide, made once).
async fn fresh_db(prefix: &str) -> TestDb {
    let c = cluster();
    let name = format!("tls_{prefix}_{}_{:08x}", std::process::id(), rand::random::<u32>());
    let url = c.pg.create_database(&name).await.unwrap();
    let client = embedded_pg::connect(&url).await.unwrap();
    client.batch_execute(DJANGO_FIXTURE).await.unwrap();
    // Superusers, to keep this file about TLS; preflight's role checks have their own tests.
    for role in [format!("relay LOGIN SUPERUSER PASSWORD '{PASSWORD}'"), "relay_cert LOGIN SUPERUSER".to_string()] {
        let _ = client.batch_execute(&format!("CREATE ROLE {role}")).await;
    }
    TestDb { name, url }
}

fn port() -> u16 {
    cluster().pg.port()
}

/// `postgres://relay:PW@{host}:PORT/{db}?{params}`.
fn url(host: &str, db: &str, params: &str) -> String {
    format!("postgres://relay:{PASSWORD}@{host}:{}/{db}?{params}", port())
}

fn verify_full(db: &str) -> String {
    url("localhost", db, &format!("sslmode=verify-full&sslrootcert={}&channel_binding=require", enc(&cluster().pki.ca)))
}

/// Percent-encodes a path for a URL query.
fn enc(p: &Path) -> String {
    p.display().to_string().replace('%', "%25").replace(' ', "%20").replace('&', "%26")
}

/// The relay's connections and whether each is encrypted.
async fn relay_connections(db: &TestDb, user: &str) -> Vec<(String, bool)> {
    let client = db.client().await;
    client
        .query(
            "SELECT coalesce(a.backend_type, ''), s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
             WHERE a.usename = $1 AND (a.datname = $2 OR a.backend_type = 'walsender')",
            &[&user, &db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn verify_full_end_to_end(mode: Mode) {
    let db = fresh_db(if mode == Mode::Logical { "e2e_logical" } else { "e2e_listen" }).await;
    let dsn = match mode {
        Mode::Logical => verify_full(&db.name),
        // The key=value form, with a quoted path holding a space.
        Mode::Listen => format!(
            "host=localhost port={} dbname={} user=relay password='{PASSWORD}' sslmode=verify-full \
             sslrootcert='{}' channel_binding=require",
            port(),
            db.name,
            cluster().pki.ca.display()
        ),
    };
    let env = Env::on_db(mode, db, dsn).await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let ids = insert_notifications(&env.db.client().await, 30, 10).await;
    env.wait_settled(30, Duration::from_secs(30)).await;
    let counts = env.pusher_counts();
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)), "each notification exactly once: {counts:?}");

    let conns = relay_connections(&env.db, "relay").await;
    assert!(!conns.is_empty());
    assert!(conns.iter().all(|(_, ssl)| *ssl), "every relay connection is encrypted: {conns:?}");
    if mode == Mode::Logical {
        // The replication stream itself: its walsender, as pg_stat_replication names it.
        let client = env.db.client().await;
        let row = client
            .query_one(
                "SELECT s.ssl, s.version FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid
                 JOIN pg_replication_slots sl ON sl.active_pid = r.pid WHERE sl.slot_name = $1",
                &[&env.slot],
            )
            .await
            .expect("the slot's walsender is in pg_stat_replication");
        let (ssl, version): (bool, Option<String>) = (row.get(0), row.get(1));
        assert!(ssl, "the replication stream is encrypted");
        assert!(version.is_some_and(|v| v.starts_with("TLSv1.")), "TLS version reported");
    }
    relay.stop().await;
}
both_modes!(verify_full_end_to_end);

/// The binary on `env`'s config with `database_url` in place of the relay's,
/// output to a file (debug logs can outgrow a pipe).
fn spawn(
    env: &Env,
    database_url: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    edit: &dyn Fn(String) -> String,
) -> Spawned {
    let path = env.dir.path().join(format!("relay-{}.toml", rand::random::<u32>()));
    // The DSN goes inside a TOML basic string.
    let quoted = database_url.replace('\\', "\\\\").replace('"', "\\\"");
    std::fs::write(&path, edit(env.config_toml("").replace(&env.database_url, &quoted))).unwrap();
    let log = env.dir.path().join(format!("out-{}.log", rand::random::<u32>()));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["--config", path.to_str().unwrap(), "--log-format", "text"])
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .envs(envs.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Spawned { child, log }
}

struct Spawned {
    child: std::process::Child,
    log: PathBuf,
}

impl Spawned {
    /// Waits (30 s at most) for the exit; its code and everything printed.
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the relay did not stop on its own: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (self.child.wait().unwrap().code(), std::fs::read_to_string(&self.log).unwrap())
    }
}

fn run_binary(env: &Env, database_url: &str) -> (Option<i32>, String) {
    spawn(env, database_url, &["run"], &[], &|t| t).finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_start_with_the_fix() {
    let db = fresh_db("bad").await;
    let name = db.name.clone();
    let env = Env::on_db(Mode::Logical, db, verify_full(&name)).await;
    let ca = enc(&cluster().pki.ca);
    let other = enc(&cluster().pki.other_ca);
    for (case, dsn, wanted) in [
        (
            "wrong host name",
            url("127.0.0.1", &name, &format!("sslmode=verify-full&sslrootcert={ca}")),
            &["not issued for the host", "sslmode=verify-ca"][..],
        ),
        (
            "wrong CA",
            url("localhost", &name, &format!("sslmode=verify-full&sslrootcert={other}")),
            &["not signed by a CA in sslrootcert=", "point sslrootcert at the CA bundle"][..],
        ),
        ("sslmode=disable", url("localhost", &name, "sslmode=disable"), &["only over TLS", "sslmode=verify-full"][..]),
        (
            "verify-full without a CA",
            url("localhost", &name, "sslmode=verify-full&sslrootcert="),
            &["no CA is given", "sslrootcert=/path/to/ca.pem"][..],
        ),
    ] {
        let (code, stderr) = run_binary(&env, &dsn);
        assert_eq!(code, Some(2), "{case}: {stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "{case}: {w:?} missing from {stderr}");
        }
        assert!(!stderr.contains(PASSWORD), "{case}: the password leaked: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_stream_checks_the_certificate_too() {
    let db = fresh_db("repl").await;
    let admin = db.client().await;
    admin.batch_execute("CREATE PUBLICATION p FOR ALL TABLES").await.unwrap();
    let slot = format!("s_{}", db.name);
    admin.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();

    let other = enc(&cluster().pki.other_ca);
    let wrong =
        PgTarget::parse(&url("localhost", &db.name, &format!("sslmode=verify-ca&sslrootcert={other}"))).unwrap();
    let err = ReplicationStream::start(&wrong, &slot, "p", Lsn(0)).await.unwrap_err();
    assert!(!err.is_retryable() && err.to_string().contains("sslrootcert"), "{err}");

    let plain = PgTarget::parse(&url("localhost", &db.name, "sslmode=disable")).unwrap();
    let err = ReplicationStream::start(&plain, &slot, "p", Lsn(0)).await.unwrap_err();
    assert!(!err.is_retryable() && err.sqlstate() == Some("28000"), "{err}");

    // verify-ca accepts a certificate for another name when the CA is right.
    let ca = enc(&cluster().pki.ca);
    let by_ip = PgTarget::parse(&url(
        "127.0.0.1",
        &db.name,
        &format!("sslmode=verify-ca&sslrootcert={ca}&channel_binding=require"),
    ))
    .unwrap();
    let stream = ReplicationStream::start(&by_ip, &slot, "p", Lsn(0)).await.unwrap();
    stream.close().await.unwrap();

    // prefer (the default) and allow both end up on TLS against a hostssl-only
    // server; require encrypts without checking the certificate (as libpq), so
    // a name the certificate does not carry passes.
    for (host, params) in [("localhost", ""), ("localhost", "sslmode=allow"), ("127.0.0.1", "sslmode=require")] {
        let target = PgTarget::parse(&url(host, &db.name, params)).unwrap();
        let stream = ReplicationStream::start(&target, &slot, "p", Lsn(0)).await.unwrap();
        stream.close().await.unwrap();
        let (client, conn) = target.connect().await.unwrap();
        tokio::spawn(conn);
        let ssl: bool =
            client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl, "{params:?}");
    }
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authentication() {
    let db = fresh_db("cert").await;
    let pki = &cluster().pki;
    let dsn = format!(
        "postgres://relay_cert@localhost:{}/{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        port(),
        db.name,
        enc(&pki.ca),
        enc(&pki.client_cert),
        enc(&pki.client_key)
    );
    let target = PgTarget::parse(&dsn).unwrap();
    let (client, conn) = target.connect().await.unwrap();
    tokio::spawn(conn);
    let dn: String =
        client.query_one("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(dn.contains("CN=relay_cert"), "{dn}");

    // Without the certificate the server says no, for good, and the message says what to set.
    let bare = PgTarget::parse(&dsn[..dsn.find("&sslcert").unwrap()]).unwrap();
    let Err(err) = bare.connect().await else { panic!("connected without a client certificate") };
    assert!(!err.is_retryable(), "{err}");

    // The whole relay (ledger, dispatch, replication) with the certificate.
    let env = Env::on_db(Mode::Logical, db, dsn).await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let ids = insert_notifications(&env.db.client().await, 5, 5).await;
    env.wait_settled(5, Duration::from_secs(30)).await;
    assert_eq!(env.pusher_counts().len(), ids.len());
    let conns = relay_connections(&env.db, "relay_cert").await;
    assert!(conns.iter().any(|(t, _)| t == "walsender"), "{conns:?}");
    assert!(conns.iter().all(|(_, ssl)| *ssl), "{conns:?}");
    relay.stop().await;
}

/// The DSN forms the issue names, each carrying `password`: URL userinfo,
/// `?password=`, key=value with quotes.
fn dsn_forms(db: &str, password: &str) -> Vec<String> {
    let pct = |p: &str| {
        p.bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect::<String>()
    };
    let ca = cluster().pki.ca.display().to_string();
    vec![
        format!(
            "postgres://relay:{}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
            pct(password),
            port(),
            enc(Path::new(&ca))
        ),
        format!("postgres://relay@localhost:{}/{db}?password={}&sslmode=require", port(), pct(password)),
        format!(
            "host=localhost port={} dbname={db} user=relay password='{}' sslmode=verify-ca sslrootcert='{ca}'",
            port(),
            password.replace('\\', "\\\\").replace('\'', "\\'")
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_print_whatever_the_dsn_form() {
    let db = fresh_db("secrets").await;
    let name = db.name.clone();
    let env = Env::on_db(Mode::Logical, db, verify_full(&name)).await;
    // Spaces, quotes, a percent sign: every escaping rule gets its turn.
    let wrong = "Wr0ng pass'w%rd";
    for dsn in dsn_forms(&name, wrong) {
        for args in [&["run"][..], &["status"], &["migrate"], &["setup"]] {
            let (code, out) = spawn(&env, &dsn, args, &[("RUST_LOG", "debug")], &|t| t).finish();
            assert_eq!(code, Some(2), "{args:?} with a wrong password, {dsn}: {out}");
            assert!(out.contains("password"), "{args:?}: the error says what is wrong: {out}");
            assert!(!out.contains(wrong) && !out.contains("Wr0ng"), "{args:?} printed the password: {out}");
        }
    }
    for dsn in dsn_forms(&name, PASSWORD) {
        for args in [&["migrate"][..], &["status"], &["status", "--json"], &["setup", "--print-sql"]] {
            let (code, out) = spawn(&env, &dsn, args, &[("RUST_LOG", "debug")], &|t| t).finish();
            assert_eq!(code, Some(0), "{args:?}, {dsn}: {out}");
            assert!(!out.contains(PASSWORD), "{args:?} printed the password: {out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_files_run_the_relay_with_debug_logs_clean() {
    let db = fresh_db("files").await;
    let name = db.name.clone();
    let env = Env::on_db(Mode::Logical, db, verify_full(&name)).await;
    let dsn_file = env.dir.path().join("database_url");
    std::fs::write(&dsn_file, format!("{}\n", dsn_forms(&name, PASSWORD)[2])).unwrap();
    let secret_file = env.dir.path().join("pusher_secret");
    std::fs::write(&secret_file, "secret\n").unwrap();
    // The file holds the secret the fake Pusher checks signatures with; the
    // config's own value is wrong, and its database URL points nowhere.
    let envs = [
        ("DATABASE_URL_FILE", dsn_file.to_str().unwrap()),
        ("OUTBOX_RELAY__PROVIDERS__PUSHER__SECRET_FILE", secret_file.to_str().unwrap()),
        ("RUST_LOG", "debug"),
    ];
    let edit = |t: String| {
        t.replace("secret = \"secret\"", "").replace(&verify_full(&name), "postgres://nobody@invalid.invalid/x")
    };
    let relay = spawn(&env, &verify_full(&name), &["run"], &envs, &edit);
    env.wait_streaming().await;
    let ids = insert_notifications(&env.db.client().await, 5, 5).await;
    let statuses = env.wait_settled(5, Duration::from_secs(30)).await;
    assert_eq!(statuses.get("sent"), Some(&5), "{statuses:?}");
    assert_eq!(env.pusher_counts().len(), ids.len());
    support::relay::sigterm(&relay.child);
    let (code, out) = relay.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("DEBUG"), "debug logs were on");
    assert!(!out.contains(PASSWORD), "the password appeared in the logs");
}

/// The connection strings README.md and docs/managed-postgres.md show in
/// their `# postgres://...` lines, each with the provider's host, port,
/// database, password and CA path swapped for this cluster's: the rest (user,
/// sslmode, how the CA is named) works as written, and the `[source]` block
/// around it parses.
fn documented_dsns() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (name, text) in [
        ("README.md", include_str!("../README.md")),
        ("docs/managed-postgres.md", include_str!("../docs/managed-postgres.md")),
    ] {
        let mut in_toml = false;
        let mut block = String::new();
        for line in text.lines() {
            if line.starts_with("```toml") {
                in_toml = true;
                block.clear();
            } else if in_toml && line.starts_with("```") {
                in_toml = false;
                if let Some(dsn) = block.lines().find_map(|l| l.trim().strip_prefix("# postgres://")) {
                    found.push((format!("{name}: {}", block.trim()), format!("postgres://{dsn}")));
                }
            } else if in_toml {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    found
}

/// `postgres://user:PASSWORD@host:port/db?...sslrootcert=X...` on this cluster.
fn localise(dsn: &str, db: &str) -> String {
    let rest = dsn.strip_prefix("postgres://").unwrap();
    let (userinfo, rest) = rest.split_once('@').unwrap();
    let (_hostport, rest) = rest.split_once('/').unwrap();
    let (_db, query) = rest.split_once('?').unwrap();
    let query: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some(("sslrootcert", _)) => format!("sslrootcert={}", enc(&cluster().pki.ca)),
            _ => p.to_string(),
        })
        .collect();
    let userinfo = userinfo.replace("PASSWORD", PASSWORD);
    format!("postgres://{userinfo}@localhost:{}/{db}?{}", port(), query.join("&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_rds_and_supabase_configurations_work() {
    let db = fresh_db("docs").await;
    let found = documented_dsns();
    for provider in ["rds.amazonaws.com", "supabase.co"] {
        for doc in ["README.md", "docs/managed-postgres.md"] {
            assert!(
                found.iter().any(|(at, dsn)| at.starts_with(doc) && dsn.contains(provider)),
                "{doc} shows no {provider} configuration"
            );
        }
    }
    for (at, dsn) in &found {
        let tail = "\n[[routes]]\ntable = \"t\"\nrecipient_column = \"r\"\nevent = \"e\"\nchannels = [\"c\"]\n\
                    payload_columns = [\"id\"]\n[channels.c]\nprovider = \"log\"\n";
        let block = at.split_once(": ").unwrap().1;
        // The block reads its URL from a secret file: give it one.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), format!("{dsn}\n")).unwrap();
        let toml = block.replace("/run/secrets/database_url", file.path().to_str().unwrap());
        let cfg =
            outbox_relay::config::Config::from_toml(&format!("{toml}{tail}")).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert_eq!(&cfg.source.database_url, dsn, "{at}");
        let target = PgTarget::parse(dsn).unwrap();
        assert_eq!(target.tls.mode, outbox_relay::db::tls::SslMode::VerifyFull, "{at}");

        let local = PgTarget::parse(&localise(dsn, &db.name)).unwrap();
        let (client, conn) = local.connect().await.unwrap_or_else(|e| panic!("{at}: {e}"));
        tokio::spawn(conn);
        let ssl: bool =
            client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl, "{at}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_without_sslrootcert_uses_libpqs_default_file() {
    let db = fresh_db("home").await;
    let name = db.name.clone();
    let env = Env::on_db(Mode::Logical, db, verify_full(&name)).await;
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    std::fs::copy(&cluster().pki.ca, home.path().join(".postgresql/root.crt")).unwrap();
    let dsn = url("localhost", &name, "sslmode=verify-full");
    let envs = [("HOME", home.path().to_str().unwrap())];
    let (code, out) = spawn(&env, &dsn, &["migrate"], &envs, &|t| t).finish();
    assert_eq!(code, Some(0), "{out}");
    // The same file does not vouch for a name the certificate lacks.
    let (code, out) =
        spawn(&env, &url("127.0.0.1", &name, "sslmode=verify-full"), &["migrate"], &envs, &|t| t).finish();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("not issued for the host"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrootcert_system_reads_the_operating_systems_store() {
    let db = fresh_db("system").await;
    let name = db.name.clone();
    let env = Env::on_db(Mode::Logical, db, verify_full(&name)).await;
    // SSL_CERT_FILE is where OpenSSL, and so the "system" store, look first:
    // it stands in for a CA installed on the machine. verify-full is implied.
    let envs = [("SSL_CERT_FILE", cluster().pki.ca.to_str().unwrap())];
    let (code, out) = spawn(&env, &url("localhost", &name, "sslrootcert=system"), &["migrate"], &envs, &|t| t).finish();
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = spawn(&env, &url("127.0.0.1", &name, "sslrootcert=system"), &["migrate"], &envs, &|t| t).finish();
    assert_eq!(code, Some(2), "the name is checked: {out}");
    let (code, out) =
        spawn(&env, &url("localhost", &name, "sslrootcert=system&sslmode=require"), &["migrate"], &envs, &|t| t)
            .finish();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("sslrootcert=system needs sslmode=verify-full"), "{out}");
}
