//! The commands as an operator types them: setup and migrate twice, status,
//! and startup errors that exit 2 with one line naming the fix.

#[path = "support/pg.rs"]
mod pg;

use std::process::{Command, Output};

fn relay(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .output()
        .expect("running outbox-relay")
}

fn config(url: &str, slot: &str, extra_route: &str) -> String {
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
channels = ["in_app"]
payload_columns = ["id", "title"{extra_route}]

[channels.in_app]
provider = "log"

[metrics]
listen = ""
"#
    )
}

struct Case {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn write(text: &str) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    Case { _dir: dir, path }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn setup_and_migrate_are_safe_to_run_twice() {
    let db = pg::fresh_db("cli_twice").await;
    let case = write(&config(&db.url, &db.name, ""));
    let sql = relay(&case.path, &["setup", "--print-sql"]);
    assert!(sql.status.success(), "{}", stderr(&sql));
    let sql = String::from_utf8(sql.stdout).unwrap();
    assert!(sql.contains("CREATE PUBLICATION") && sql.contains("pg_create_logical_replication_slot"), "{sql}");
    for _ in 0..2 {
        let o = relay(&case.path, &["setup"]);
        assert!(o.status.success(), "setup: {}", stderr(&o));
        let o = relay(&case.path, &["migrate"]);
        assert!(o.status.success(), "migrate: {}", stderr(&o));
    }
    let client = db.client().await;
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
    let status = relay(&case.path, &["status", "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["slot"]["name"], db.name.as_str());
    assert_eq!(v["backlog"], 0);
}

#[tokio::test]
async fn startup_errors_exit_2_naming_the_fix() {
    let db = pg::fresh_db("cli_errors").await;
    // No setup yet: slot and publication are missing.
    let case = write(&config(&db.url, &db.name, ""));
    let o = relay(&case.path, &["run"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist: run `outbox-relay setup`"), "{}", stderr(&o));

    // A column that is not in the table.
    let case = write(&config(&db.url, &db.name, ", \"colour\""));
    assert!(relay(&case.path, &["setup"]).status.success());
    let o = relay(&case.path, &["run"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("column \"colour\" does not exist"), "{}", stderr(&o));

    // Unknown key, wrong type, missing provider section: caught before connecting.
    let good = config(&db.url, &db.name, "");
    for (text, want) in [
        (good.replace("slot =", "slott ="), "slott"),
        (good.replace("[metrics]", "[relay]\ndispatch_workers = \"many\"\n[metrics]"), "dispatch_workers"),
        (good.replace("provider = \"log\"", "provider = \"pusher\""), "[providers.pusher]"),
    ] {
        let case = write(&text);
        let o = relay(&case.path, &["run"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim().lines().count(), 1, "one line: {}", stderr(&o));
    }
}

#[test]
fn env_overrides_the_file() {
    let case = write(&config("postgres://nobody@127.0.0.1:1/none", "s", ""));
    let o = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["--config", case.path.to_str().unwrap(), "setup", "--print-sql"])
        .env("OUTBOX_RELAY__SOURCE__PUBLICATION", "from_env")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("CREATE PUBLICATION \"from_env\""));
}

#[tokio::test]
async fn listen_mode_setup_installs_triggers_and_status_shows_the_watermark() {
    let db = pg::fresh_db("cli_listen").await;
    let text = config(&db.url, &db.name, "").replace("[source]", "[source]\nmode = \"listen\"");
    let case = write(&text);
    for _ in 0..2 {
        let o = relay(&case.path, &["setup"]);
        assert!(o.status.success(), "setup: {}", stderr(&o));
    }
    let client = db.client().await;
    let triggers: Vec<(String, i16)> = client
        .query("SELECT tgname::text, tgnargs FROM pg_trigger WHERE tgname LIKE 'outbox_relay_capture%'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The notify flag, then the route's columns and the primary key, each once:
    // user_id, id, title. Looked up once by setup, not per statement.
    assert_eq!(triggers, [("outbox_relay_capture_insert".to_string(), 4)], "one trigger, even after two runs");
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "listen mode needs no slot");
    client
        .batch_execute("INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'k', 't')")
        .await
        .unwrap();
    let status = relay(&case.path, &["status", "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["mode"], "listen");
    assert_eq!(v["change_log_unread"], 1, "the insert waits in the change log: {v}");
    let captured: serde_json::Value =
        client.query_one("SELECT row_data FROM outbox_relay.changes", &[]).await.unwrap().get(0);
    assert_eq!(
        captured,
        serde_json::json!({"id": "1", "user_id": "1", "title": "t"}),
        "the route's columns as text output, nothing else (body, ... stay out of the change log)"
    );
}

/// `teardown` leaves no trigger, change log, function, slot or publication
/// behind, in either mode; the ledger goes only with --ledger; `setup` works
/// again afterwards.
#[tokio::test]
async fn teardown_removes_what_setup_made_in_both_modes() {
    for mode in ["listen", "logical"] {
        let db = pg::fresh_db(&format!("cli_teardown_{mode}")).await;
        let text = config(&db.url, &db.name, "").replace("[source]", &format!("[source]\nmode = \"{mode}\""));
        let case = write(&text);
        for command in ["setup", "migrate"] {
            let o = relay(&case.path, &[command]);
            assert!(o.status.success(), "{command}: {}", stderr(&o));
        }
        let client = db.client().await;
        let count = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        const TRIGGERS: &str = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'outbox_relay_capture%'";
        const LISTEN_OBJECTS: &str = "SELECT (SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture%'
            AND pronamespace = to_regnamespace('outbox_relay')) + (SELECT count(*) FROM pg_class WHERE relname IN
            ('changes', 'listen_progress', 'listen_doorbell') AND relnamespace = to_regnamespace('outbox_relay'))";
        const SLOTS: &str = "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()";
        const PUBLICATIONS: &str = "SELECT count(*) FROM pg_publication";
        let (triggers, slots) = (count(TRIGGERS).await, count(SLOTS).await);
        assert_eq!((triggers, slots), if mode == "listen" { (1, 0) } else { (0, 1) }, "{mode}: setup made them");

        let printed = relay(&case.path, &["teardown", "--print-sql"]);
        assert!(String::from_utf8_lossy(&printed.stdout).contains("DROP PUBLICATION IF EXISTS"));
        for _ in 0..2 {
            let o = relay(&case.path, &["teardown"]);
            assert!(o.status.success(), "{mode}: teardown (safe twice): {}", stderr(&o));
        }
        assert_eq!(count(TRIGGERS).await, 0, "{mode}");
        assert_eq!(count(LISTEN_OBJECTS).await, 0, "{mode}");
        assert_eq!(count(SLOTS).await, 0, "{mode}");
        assert_eq!(count(PUBLICATIONS).await, 0, "{mode}");
        let ledger = "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox_relay'";
        assert_eq!(client.query_one(ledger, &[]).await.unwrap().get::<_, i64>(0), 1, "the ledger stays");

        // setup again makes everything again (the listen migrations were forgotten).
        let o = relay(&case.path, &["setup"]);
        assert!(o.status.success(), "{mode}: setup after teardown: {}", stderr(&o));
        if mode == "listen" {
            assert_eq!(count(TRIGGERS).await, 1);
            client
                .batch_execute(
                    "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'k', 't')",
                )
                .await
                .unwrap();
            assert_eq!(count("SELECT count(*) FROM outbox_relay.changes").await, 1);
        }
        let o = relay(&case.path, &["teardown", "--ledger"]);
        assert!(o.status.success(), "{mode}: teardown --ledger: {}", stderr(&o));
        assert_eq!(client.query_one(ledger, &[]).await.unwrap().get::<_, i64>(0), 0, "--ledger drops the schema");
        assert_eq!(count(SLOTS).await + count(TRIGGERS).await, 0);
        // Django's writes go on without the relay.
        client
            .batch_execute("INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'k', 't')")
            .await
            .unwrap();
    }
}

/// The README's first command: a throwaway PostgreSQL, the Django tables, in-app
/// deliveries on stdout and e-mail into a local SMTP sink, all without an account.
#[test]
fn demo_runs_end_to_end_on_a_fresh_machine() {
    let o = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("demo")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .output()
        .expect("running outbox-relay demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("{\"provider\":\"log\"")).count(),
        4,
        "four in-app deliveries: {out}"
    );
    assert!(!out.contains("rolled back\""), "the rolled-back insert is never delivered");
    assert!(out.contains("the local SMTP sink received 2 e-mail(s)"), "{out}");
    assert!(
        out.contains("To: operator3@example.com") && out.contains("Subject: [critical] Nouvelle session ouverte 🔐"),
        "{out}"
    );
    assert!(
        out.contains("Subject: Commande 1042 expédiée")
            && out.contains("| Votre commande 1042 est partie avec Colissimo."),
        "{out}"
    );
    // Browser push: decrypted by the local push service with each browser's key.
    assert!(out.contains("the local push service received 2 push message(s)"), "{out}");
    assert!(out.contains("→ browser-1 (TTL 86400 s, Urgency high, from mailto:alerts@example.com)"), "{out}");
    assert!(out.contains("\"title\":\"Nouvelle session ouverte 🔐\"") && out.contains("→ browser-3"), "{out}");
    assert!(out.contains("✗ old-browser-3: 410 (unsubscribed) → on_invalid_token deleted its subscription"), "{out}");
    assert!(out.contains("push_subscription now holds 2 row(s)"), "{out}");
}

/// `vapid-keys --out FILE`: a PKCS#8 key only its owner can read, never
/// overwritten, and the public key the provider derives from it printed.
#[test]
fn vapid_keys_writes_a_private_key_file_and_prints_the_public_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vapid.pem");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["vapid-keys", "--out", path.to_str().unwrap()])
            .output()
            .expect("running vapid-keys")
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let public = out.lines().last().unwrap().trim().to_string();
    assert_eq!(public.len(), 87, "65 bytes base64url: {out}");
    assert!(!out.contains("PRIVATE KEY"), "the private key goes to the file only: {out}");
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let vapid = outbox_relay::providers::webpush::vapid::Vapid::new(
        &pem,
        Some(&public),
        "mailto:ops@example.com",
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    assert_eq!(vapid.public_key(), public);
    let again = run();
    assert_eq!(again.status.code(), Some(2), "an existing key is never overwritten");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);
}
