//! `pause` and `resume` against real relay processes, in both source modes:
//! a paused channel's rows wait in the ledger (none sent, none skipped) while
//! another channel flows, through a restart, and go out once each on resume.
//! `status` (text and JSON) and /metrics show the pause.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::relay::{free_port, insert_notifications, sigterm, Env, Mode};

/// A second channel, not paused: its rows prove dispatch runs past the paused ones.
const OTHER: &str = r#"
[channels.other]
provider = "pusher"
channel_name = "private-other-{recipient}"
"#;

fn cli(env: &Env, args: &[&str]) -> Output {
    let path = env.dir.path().join("pause-cli.toml");
    std::fs::write(&path, env.config_toml("127.0.0.1:0")).unwrap();
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env_remove("DATABASE_URL")
            .env("USER", "oncall-test")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// One row for the `other` channel, its payload id `id` (negative: no notification has it).
async fn ping(client: &tokio_postgres::Client, id: i64) {
    client
        .execute(
            "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
             VALUES ('ping', 1, '{other}', jsonb_build_object('id', $1::bigint))",
            &[&id],
        )
        .await
        .unwrap();
}

/// Waits until the fake Pusher has `id`, and the ledger holds `rows` rows.
async fn wait_for(env: &Env, id: i64, rows: i64) {
    for _ in 0..600 {
        let held: i64 = env.statuses().await.values().sum();
        if env.pusher_counts().contains_key(&id) && held >= rows {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ping {id} never delivered, or fewer than {rows} ledger rows: {:?}", env.statuses().await);
}

/// The value of one gauge series on a relay's /metrics, once it equals `want`.
async fn wait_gauge(port: u16, series: &str, want: f64) {
    let mut last = None;
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            let body = r.text().await.unwrap_or_default();
            last = body.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
            if last == Some(want) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} is {last:?} on /metrics, not {want}");
}

/// Asserts the paused rows wait: all `pending` in the ledger, none sent.
async fn assert_waiting(env: &Env, held: &[i64]) {
    // A dozen dispatch polls and full queue scans; the claim would have taken them by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = env.pusher_counts();
    let sent: Vec<_> = held.iter().filter(|id| counts.contains_key(id)).collect();
    assert!(sent.is_empty(), "sent while paused: {sent:?}");
    let client = env.db.client().await;
    let pending: i64 = client
        .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE channel = 'in_app' AND status = 'pending'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, held.len() as i64, "{:?}", env.statuses().await);
}

const PAUSED_GAUGE: &str = r#"outbox_relay_channel_paused{channel="in_app"}"#;

crate::both_modes!(a_paused_channel_waits_across_a_restart_and_goes_out_once_on_resume);
async fn a_paused_channel_waits_across_a_restart_and_goes_out_once_on_resume(mode: Mode) {
    let env = Env::with_mode(mode, "pause", "", OTHER).await;
    let port = free_port();
    let mut relay = env.spawn_binary(port);
    env.wait_streaming().await;
    let client = env.db.client().await;
    let before = insert_notifications(&client, 3, 3).await;
    env.wait_settled(3, Duration::from_secs(30)).await;
    wait_gauge(port, PAUSED_GAUGE, 0.0).await;

    // Pause the running relay's channel; twice is fine; a typo is not.
    let paused = cli(&env, &["pause", "in_app"]);
    assert_eq!(paused.status.code(), Some(0), "{}", text(&paused));
    assert!(text(&paused).contains("channel in_app paused"), "{}", text(&paused));
    let again = cli(&env, &["pause", "in_app"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(text(&again).contains("already paused") && text(&again).contains("oncall-test"), "{}", text(&again));
    let typo = cli(&env, &["pause", "in_ap"]);
    assert_eq!(typo.status.code(), Some(2), "{}", text(&typo));
    assert!(text(&typo).contains("\"in_ap\" is not in the relay config"), "{}", text(&typo));

    let mut held = insert_notifications(&client, 10, 5).await;
    ping(&client, -1).await;
    wait_for(&env, -1, 3 + 10 + 1).await;
    assert_waiting(&env, &held).await;
    wait_gauge(port, PAUSED_GAUGE, 1.0).await;

    let status = cli(&env, &["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["paused"][0]["channel"], "in_app", "{json}");
    assert_eq!(json["paused"][0]["paused_by"], "oncall-test", "{json}");
    assert_eq!(json["backlog"], 0, "paused rows are not backlog: {json}");
    assert!(json["oldest_pending_seconds"].is_null(), "nor the oldest pending: {json}");
    let in_app_pending = json["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "in_app" && c["status"] == "pending")
        .map(|c| c["count"].clone());
    assert_eq!(in_app_pending, Some(serde_json::json!(10)), "but listed by channel: {json}");
    // The gauges the alerts watch leave it out too (OutboxRelayChannelPaused watches it).
    wait_gauge(port, "outbox_relay_backlog_deliveries ", 0.0).await;
    wait_gauge(port, "outbox_relay_oldest_pending_age_seconds ", 0.0).await;
    let status = text(&cli(&env, &["status"]));
    assert!(status.contains("channel in_app PAUSED since"), "{status}");

    // A restart (a new process, as a standby taking over would be): still paused.
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let port = free_port();
    relay = env.spawn_binary(port);
    env.wait_streaming().await;
    held.extend(insert_notifications(&client, 5, 5).await);
    ping(&client, -2).await;
    wait_for(&env, -2, 3 + 15 + 2).await;
    assert_waiting(&env, &held).await;
    wait_gauge(port, PAUSED_GAUGE, 1.0).await;

    let resumed = cli(&env, &["resume", "in_app"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    assert!(text(&resumed).contains("channel in_app resumed"), "{}", text(&resumed));
    let again = cli(&env, &["resume", "in_app"]);
    assert!(text(&again).contains("was not paused"), "{}", text(&again));
    env.wait_settled(3 + 15 + 2, Duration::from_secs(30)).await;
    wait_gauge(port, PAUSED_GAUGE, 0.0).await;
    let status = text(&cli(&env, &["status"]));
    assert!(!status.contains("PAUSED"), "{status}");
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());

    let counts = env.pusher_counts();
    for id in before.iter().chain(&held).chain(&[-1, -2]) {
        assert_eq!(counts.get(id), Some(&1), "{id}: once, not lost, not twice ({counts:?})");
    }
    assert_eq!(env.statuses().await.get("skipped"), None, "nothing skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_removed_from_the_config_can_still_be_resumed_and_a_typo_cannot() {
    let env = Env::with_mode(Mode::Logical, "pausenames", "", OTHER).await;
    // A ledger of the version before pausing existed: `pause` migrates it first.
    let mut admin = env.db.client().await;
    outbox_relay::ledger::migrate(&mut admin, "outbox_relay").await.unwrap();
    admin
        .batch_execute(
            "DROP TABLE outbox_relay.paused_channels; DELETE FROM outbox_relay.schema_migrations WHERE version = 9",
        )
        .await
        .unwrap();
    let paused = cli(&env, &["pause", "other"]);
    assert_eq!(paused.status.code(), Some(0), "{}", text(&paused));
    // The channel leaves the config while paused: its row must not stay for ever.
    let without = env.dir.path().join("without-other.toml");
    std::fs::write(&without, env.config_toml("127.0.0.1:0").replace(OTHER, "")).unwrap();
    let resume = |channel: &str| {
        tokio::task::block_in_place(|| {
            Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .arg("--config")
                .arg(&without)
                .args(["resume", channel])
                .env_remove("DATABASE_URL")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let resumed = resume("other");
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    assert!(text(&resumed).contains("channel other resumed"), "{}", text(&resumed));
    // Now neither paused nor configured: a typo, named.
    let typo = resume("other");
    assert_eq!(typo.status.code(), Some(2), "{}", text(&typo));
    assert!(text(&typo).contains("\"other\" is not in the relay config"), "{}", text(&typo));
}
