//! `outbox-relay demo`: the whole relay on a fresh machine, no accounts.
//!
//! A throwaway PostgreSQL with wal_level=logical, the Django tables of the
//! fixture, `setup`, the relay with the `log` provider for in-app, a local
//! SMTP sink for e-mail and a local Web Push service for browser push, a few
//! notifications inserted (and one rolled back), each delivery shown as it
//! arrives, each e-mail as the sink received it, and each push as the
//! browser would read it: decrypted with the subscription's private key.

pub mod embedded_pg;
pub mod push_service;
pub mod smtp_sink;

use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;

use self::embedded_pg::{EmbeddedPg, DJANGO_FIXTURE};
use self::push_service::PushService;
use self::smtp_sink::SmtpSink;

/// The demo application's table of browser subscriptions (what its
/// `pushManager.subscribe()` endpoint would store): not part of the shared
/// Django fixture, only the demo pushes.
const PUSH_SUBSCRIPTIONS: &str = "CREATE TABLE push_subscription (
    id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES auth_user (id),
    endpoint text NOT NULL UNIQUE,
    p256dh text NOT NULL,
    auth text NOT NULL
)";

const DEMO_CONFIG: &str = r#"
[source]
database_url = "__URL__"
slot = "outbox_relay"
publication = "outbox_relay"

[[routes]]
table = "public.operators_notificationoperateur"
recipient_column = "user_id"
event = "notification_created"
channels = ["in_app", "email", "push"]
payload_columns = ["id", "kind", "title", "level", "url", "created_at"]
only = { email = { level = "critical" } }     # e-mail for critical notifications only

[[routes]]
table = "public.operators_outboxevent"
recipient_column = "recipient_id"
event_column = "event_type"
channels_column = "channels"
channels = ["in_app"]
payload_column = "payload"

[channels.in_app]
provider = "log"
channel_name = "private-user-{recipient}"

[channels.email]
provider = "smtp"
address_query = "SELECT email FROM auth_user WHERE id = $1 AND is_active"
subject = "[{level}] {title}"
body = "{title}\n\nhttps://app.example.com{url}"
texts.order_shipped = { subject = "Commande {order} expédiée", body = "Votre commande {order} est partie avec {carrier}." }

[channels.push]
provider = "webpush"
tokens_query = "SELECT endpoint, p256dh, auth FROM push_subscription WHERE user_id = $1"
on_invalid_token = "DELETE FROM push_subscription WHERE endpoint = $1"

[providers.smtp]
url = "__SMTP__"
from = "Alerts <alerts@example.com>"

[providers.webpush]
private_key = """__VAPID__"""
subject = "mailto:alerts@example.com"
urgency = "high"

[metrics]
listen = ""
"#;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting PostgreSQL: {0}")]
    Pg(#[from] embedded_pg::EmbeddedPgError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Setup(#[from] crate::setup::SetupError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Run(#[from] crate::app::RunError),
    #[error("{0}")]
    Other(String),
}

fn say(s: &str) {
    println!("\n==> {s}");
}

pub async fn run() -> Result<(), DemoError> {
    say("starting a throwaway PostgreSQL (initdb, wal_level=logical)");
    let pg = tokio::task::spawn_blocking(EmbeddedPg::start).await.map_err(|e| DemoError::Other(e.to_string()))??;
    let url = pg.create_database("app").await?;
    println!("    {url}");
    let mut client = embedded_pg::connect(&url).await?;
    client.batch_execute(DJANGO_FIXTURE).await?;
    say("loaded the Django tables (auth_user, operators_notificationoperateur, operators_outboxevent)");

    let sink = SmtpSink::start().await.map_err(|e| DemoError::Other(format!("starting the SMTP sink: {e}")))?;
    say(&format!("a local SMTP sink stands in for the mail server: {}", sink.url()));
    let push = PushService::start().await.map_err(|e| DemoError::Other(format!("starting the push service: {e}")))?;
    let (vapid_key, vapid_public) =
        crate::providers::webpush::vapid::generate().map_err(|e| DemoError::Other(e.to_string()))?;
    say(&format!("a local Web Push service stands in for the browsers' push services: {}", push.origin()));
    println!("    VAPID public key (the browser's applicationServerKey): {vapid_public}");
    client.batch_execute(PUSH_SUBSCRIPTIONS).await?;
    // Operator 1 and operator 3 allowed notifications in their browsers;
    // operator 3 also has an old browser that has since unsubscribed.
    for (user, browser) in [(1, "browser-1"), (3, "browser-3"), (3, "old-browser-3")] {
        let s = push.subscribe(browser, Some(&vapid_public));
        client
            .execute(
                "INSERT INTO push_subscription (user_id, endpoint, p256dh, auth) VALUES ($1, $2, $3, $4)",
                &[&user, &s.endpoint, &s.p256dh, &s.auth],
            )
            .await?;
    }
    push.unsubscribe("old-browser-3");
    println!("    push_subscription: operators 1 and 3 subscribed (3's old browser since unsubscribed)");
    let cfg = Config::from_toml(
        &DEMO_CONFIG.replace("__URL__", &url).replace("__SMTP__", &sink.url()).replace("__VAPID__", &vapid_key),
    )?;
    crate::setup::apply(&mut client, &cfg).await?;
    say("setup: publication and logical slot created; this is the SQL a DBA would run:");
    for line in crate::setup::script(&cfg).lines().filter(|l| !l.starts_with("--") && !l.is_empty()) {
        println!("    {line}");
    }

    say("running the relay (provider: log — one JSON line per delivery below)");
    let (stop_tx, stop_rx) = watch::channel(false);
    let relay = tokio::spawn(crate::app::run(cfg.clone(), stop_rx));
    wait_until(&client, "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'").await?;

    say("Django inserts three notifications, one outbox event, and one transaction that rolls back");
    for (user, kind, title, level) in [
        (1, "order_ready", "Commande 1042 prête", "info"),
        (2, "stock_alert", "Stock bas : gants nitrile", "warning"),
        (3, "session_created", "Nouvelle session ouverte 🔐", "critical"),
    ] {
        client
            .execute(
                "INSERT INTO operators_notificationoperateur (user_id, kind, title, level, url)
                 VALUES ($1, $2, $3, $4, '/notifications')",
                &[&user, &kind, &title, &level],
            )
            .await?;
    }
    client
        .batch_execute(
            "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
             VALUES ('order_shipped', 4, '{in_app,email}', '{\"order\": 1042, \"carrier\": \"Colissimo\"}')",
        )
        .await?;
    // Separate call: inside one multi-statement string, BEGIN would pull the insert above into its transaction.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (5, 'oops', 'rolled back');
             ROLLBACK;",
        )
        .await?;

    let ledger = crate::ledger::Ledger::new(embedded_pg::connect(&url).await?, &cfg.relay.schema);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let sent: i64 = ledger
            .client()
            .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE status = 'sent'", &[])
            .await?
            .get(0);
        // Four in-app, the critical notification's e-mail, the order's
        // e-mail, the pushes to operators 1 and 3.
        if sent >= 8 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    say("outbox-relay status");
    let status = crate::status::gather(embedded_pg::connect(&url).await?, &cfg)
        .await
        .map_err(|e| DemoError::Other(e.to_string()))?;
    print!("{}", crate::status::render(&status));
    say("the ledger (outbox_relay.deliveries), which Django can read for audit");
    for row in ledger
        .client()
        .query(
            "SELECT id, source_table, source_pk, channel, status, attempts,
                    round(extract(epoch FROM sent_at - committed_at) * 1000)::int AS ms
             FROM outbox_relay.deliveries ORDER BY id",
            &[],
        )
        .await?
    {
        let (id, table, pk, channel, status, attempts, ms): (i64, String, String, String, String, i32, Option<i32>) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
        println!(
            "    #{id} {table} pk={pk} → {channel}: {status} after {attempts} attempt(s), {} ms after commit",
            ms.map(|m| m.to_string()).unwrap_or("-".into())
        );
    }
    println!("    (the rolled-back insert has no row: it never reached the relay)");

    let mails = sink.mails();
    say(&format!("the local SMTP sink received {} e-mail(s)", mails.len()));
    for mail in &mails {
        println!("    From: {}  To: {}", mail.from, mail.to.join(", "));
        println!("    Subject: {}", mail.subject());
        for line in mail.text().lines().filter(|l| !l.trim().is_empty()) {
            println!("    | {line}");
        }
    }

    let pushes = push.received();
    say(&format!(
        "the local push service received {} push message(s); decrypted as the browser reads them:",
        pushes.len()
    ));
    for p in &pushes {
        println!(
            "    → {} (TTL {} s, Urgency {}, from {})",
            p.subscription,
            p.ttl,
            p.urgency.as_deref().unwrap_or("-"),
            p.sender
        );
        println!("    | {}", p.plaintext);
    }
    for (browser, status, _) in push.refused() {
        println!("    ✗ {browser}: {status} (unsubscribed) → on_invalid_token deleted its subscription");
    }
    let left: i64 = ledger.client().query_one("SELECT count(*) FROM push_subscription", &[]).await?.get(0);
    println!("    push_subscription now holds {left} row(s); operator 2 has none: its push is skipped (no device)");

    say("stopping the relay (as on SIGTERM) and the throwaway PostgreSQL");
    let _ = stop_tx.send(true);
    relay.await.map_err(|e| DemoError::Other(e.to_string()))??;
    drop((client, ledger));
    drop(pg);
    Ok(())
}

async fn wait_until(client: &tokio_postgres::Client, sql: &str) -> Result<(), DemoError> {
    for _ in 0..200 {
        if let Some(row) = client.query_opt(sql, &[]).await? {
            if row.get::<_, bool>(0) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(DemoError::Other("the relay did not connect to its slot within 10 s".into()))
}
