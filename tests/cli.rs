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
    let triggers: i64 = client
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_relay_capture'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 1, "one routed table, one trigger, even after two runs");
    let args: i16 = client
        .query_one("SELECT tgnargs FROM pg_trigger WHERE tgname = 'outbox_relay_capture'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(args, 1, "the primary key column is passed to the trigger, not looked up per row");
    // A composite key, and a trigger installed without arguments (as before
    // migration 5): both yield the key columns in index order, comma-joined.
    client
        .batch_execute(
            "CREATE TABLE two_keys (b int, a text, n int, PRIMARY KEY (b, a));
             CREATE TRIGGER with_args AFTER INSERT ON two_keys FOR EACH ROW EXECUTE FUNCTION outbox_relay.capture('b', 'a');
             INSERT INTO two_keys VALUES (7, 'x', 1);
             DROP TRIGGER with_args ON two_keys;
             CREATE TRIGGER without_args AFTER INSERT ON two_keys FOR EACH ROW EXECUTE FUNCTION outbox_relay.capture();
             INSERT INTO two_keys VALUES (8, 'y', 2);",
        )
        .await
        .unwrap();
    let keys: Vec<String> = client
        .query("SELECT source_pk FROM outbox_relay.changes WHERE source_table = 'public.two_keys' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["7,x", "8,y"]);
    client.batch_execute("DELETE FROM outbox_relay.changes; DROP TABLE two_keys").await.unwrap();
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
}
