//! The throwaway PostgreSQL cluster behaves as the relay's tests and demo need: logical decoding
//! with pgoutput works, each test gets its own database with the Django fixture, a simulated crash
//! keeps committed data and the port, and nothing is left running or on disk afterwards.

#[path = "support/pg.rs"]
mod pg;

use outbox_relay::demo::embedded_pg::EmbeddedPg;

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.expect("count query").get(0)
}

#[tokio::test]
async fn cluster_has_logical_wal_level() {
    let db = pg::fresh_db("wal_level").await;
    let row = db.client().await.query_one("SHOW wal_level", &[]).await.expect("SHOW wal_level");
    assert_eq!(row.get::<_, String>(0), "logical");
}

/// A committed insert comes out of a pgoutput slot as an Insert message — what the relay reads.
#[tokio::test]
async fn pgoutput_slot_decodes_committed_insert() {
    let db = pg::fresh_db("pgoutput").await;
    let client = db.client().await;
    // Separate statements: a slot cannot be created in a transaction that has written.
    for sql in [
        "CREATE PUBLICATION relay_pub FOR TABLE operators_outboxevent",
        "SELECT pg_create_logical_replication_slot('relay_slot', 'pgoutput')",
        "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
         VALUES ('order_shipped', 1, '{in_app}', '{\"order\": 42}')",
    ] {
        client.batch_execute(sql).await.expect(sql);
    }

    // https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html:
    // every pgoutput message starts with a one-byte type: B(egin), R(elation), I(nsert), C(ommit).
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes('relay_slot', NULL, NULL,
                 'proto_version', '1', 'publication_names', 'relay_pub')",
            &[],
        )
        .await
        .expect("read changes from slot");
    let kinds: Vec<u8> = rows.iter().filter_map(|r| r.get::<_, Vec<u8>>(0).first().copied()).collect();
    assert_eq!(kinds, b"BRIC".to_vec(), "pgoutput message types");

    client.batch_execute("SELECT pg_drop_replication_slot('relay_slot')").await.expect("drop slot");
}

#[tokio::test]
async fn fresh_db_loads_the_django_fixture() {
    let db = pg::fresh_db("fixture").await;
    let client = db.client().await;
    assert_eq!(count(&client, "auth_user").await, 20);
    assert_eq!(count(&client, "operators_operatorprofile").await, 20);
    assert_eq!(count(&client, "operators_notificationoperateur").await, 0);
    assert_eq!(count(&client, "operators_outboxevent").await, 0);
    let name: String = client
        .query_one("SELECT first_name FROM auth_user WHERE username = 'operator3'", &[])
        .await
        .expect("operator3")
        .get(0);
    assert_eq!(name, "Opérateur 3", "UTF-8 text survives");
}

#[tokio::test]
async fn fresh_dbs_are_independent() {
    let a = pg::fresh_db("indep").await;
    let b = pg::fresh_db("indep").await;
    assert_ne!(a.name, b.name);
    assert_ne!(a.url, b.url);

    let ca = a.client().await;
    let cb = b.client().await;
    ca.batch_execute("INSERT INTO auth_user (username) VALUES ('only_in_a')").await.expect("insert into a");
    assert_eq!(count(&ca, "auth_user").await, 21);
    assert_eq!(count(&cb, "auth_user").await, 20);
    let current: String = cb.query_one("SELECT current_database()", &[]).await.expect("current_database").get(0);
    assert_eq!(current, b.name);
}

/// Crash tests get their own cluster: restarting the shared one would cut every other test's
/// connections.
#[tokio::test]
async fn restart_immediate_keeps_committed_data_and_port() {
    let own = tokio::task::spawn_blocking(EmbeddedPg::start).await.expect("join").expect("start cluster");
    let port = own.port();
    let url = own.create_database("crash").await.expect("create database");
    assert_eq!(url, format!("postgres://postgres@127.0.0.1:{port}/crash"));

    let client = outbox_relay::demo::embedded_pg::connect(&url).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE ledger (id int PRIMARY KEY, state text NOT NULL);
             INSERT INTO ledger VALUES (1, 'delivered');",
        )
        .await
        .expect("write before crash");

    own.restart_immediate().expect("restart");
    assert_eq!(own.port(), port);

    // The old connection died with the server; a new one on the same URL sees the committed row.
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    let client = outbox_relay::demo::embedded_pg::connect(&url).await.expect("reconnect");
    let state: String =
        client.query_one("SELECT state FROM ledger WHERE id = 1", &[]).await.expect("row after crash").get(0);
    assert_eq!(state, "delivered");

    // The log records crash recovery, i.e. this really was an unclean stop.
    let log = std::fs::read_to_string(own.log_file()).expect("read server log");
    assert!(
        log.contains("not properly shut down") || log.contains("automatic recovery"),
        "server log shows crash recovery:\n{log}"
    );
}

/// Dropping the handle stops the server and deletes its directory.
#[tokio::test]
async fn drop_stops_server_and_removes_directory() {
    let own = tokio::task::spawn_blocking(EmbeddedPg::start).await.expect("join").expect("start cluster");
    let url = own.url("postgres");
    let dir = own.data_dir().parent().expect("data dir has a parent").to_path_buf();
    outbox_relay::demo::embedded_pg::connect(&url).await.expect("server is up");
    assert!(dir.exists());

    drop(own);
    assert!(!dir.exists(), "{} should be removed", dir.display());
    assert!(outbox_relay::demo::embedded_pg::connect(&url).await.is_err(), "server should be stopped");
}

#[test]
fn external_server_urls_keep_credentials_and_parameters() {
    assert_eq!(
        pg::with_dbname("postgres://u:p@h:5433/postgres?sslmode=disable", "t1"),
        "postgres://u:p@h:5433/t1?sslmode=disable"
    );
    assert_eq!(pg::with_dbname("postgres://u@h", "t1"), "postgres://u@h/t1");
}
