//! Managed services' ways of granting replication and of turning on logical
//! decoding, as preflight sees them. Each service is recognised by the roles it
//! installs; a private cluster with `wal_level = replica` and those roles
//! created by hand stands in for it (the real services were not reachable from
//! here: docs/managed-postgres.md says what was checked against what).

use outbox_relay::config::Config;
use outbox_relay::demo::embedded_pg::{self, ClusterOptions, EmbeddedPg, DJANGO_FIXTURE};
use outbox_relay::preflight;

fn config(url: &str) -> Config {
    Config::from_toml(&format!(
        r#"
[source]
database_url = "{url}"
[[routes]]
table = "public.operators_notificationoperateur"
recipient_column = "user_id"
event = "notification_created"
channels = ["in_app"]
payload_columns = ["id", "title"]
[channels.in_app]
provider = "log"
[metrics]
listen = ""
"#
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_words_each_fix_in_the_providers_terms() {
    // Its own cluster: the roles below are cluster-wide and would change other tests' messages.
    let options = ClusterOptions { extra_conf: "wal_level = replica\n".into(), ..Default::default() };
    let pg = tokio::task::spawn_blocking(move || EmbeddedPg::start_with(options)).await.unwrap().unwrap();
    let admin = embedded_pg::connect(&pg.create_database("app").await.unwrap()).await.unwrap();
    admin.batch_execute(DJANGO_FIXTURE).await.unwrap();
    admin
        .batch_execute("CREATE ROLE relay LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO relay;")
        .await
        .unwrap();
    let url = format!("postgres://relay@127.0.0.1:{}/app", pg.port());
    let relay = embedded_pg::connect(&url).await.unwrap();
    let cfg = config(&url);
    let problems = || async { preflight::check(&relay, &cfg).await.unwrap_err().to_string() };

    let plain = problems().await;
    for wanted in ["ALTER SYSTEM SET wal_level = logical", "mode = \"listen\"", "ALTER ROLE relay REPLICATION"] {
        assert!(plain.contains(wanted), "{wanted:?} missing from {plain}");
    }

    for (marker, wal_fix, grant_fix) in [
        ("rds_replication", "rds.logical_replication = 1", "GRANT rds_replication TO relay;"),
        ("cloudsqlsuperuser", "cloudsql.logical_decoding = on", "ALTER USER relay WITH REPLICATION;"),
        ("azure_pg_admin", "max_worker_processes", "as the server admin (azure_pg_admin): ALTER ROLE relay"),
        ("neon_superuser", "Neon project settings", "Neon console"),
    ] {
        admin.batch_execute(&format!("CREATE ROLE {marker} NOLOGIN")).await.unwrap();
        let text = problems().await;
        assert!(text.contains(wal_fix) && text.contains(grant_fix), "{marker}: {text}");
        assert!(text.contains("mode = \"listen\""), "{marker}: listen mode is offered: {text}");
        if marker == "rds_replication" {
            // On RDS, membership is the grant: preflight accepts it.
            admin.batch_execute("GRANT rds_replication TO relay").await.unwrap();
            let text = problems().await;
            assert!(!text.contains("cannot replicate"), "rds_replication membership accepted: {text}");
            admin.batch_execute("REVOKE rds_replication FROM relay").await.unwrap();
        }
        admin.batch_execute(&format!("DROP ROLE {marker}")).await.unwrap();
    }
}
