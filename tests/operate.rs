//! Operator commands against a real ledger: `check`, `erase`, `export`.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::relay::{Env, Mode};

fn relay(env: &Env, args: &[&str]) -> Output {
    let path = env.dir.path().join("operate.toml");
    std::fs::write(&path, env.config_toml("127.0.0.1:0")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

crate::both_modes!(check_says_whether_run_would_start);
async fn check_says_whether_run_would_start(mode: Mode) {
    let env = Env::in_mode(mode, "check").await;
    let ok = tokio::task::block_in_place(|| relay(&env, &["check"]));
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("would start"), "{}", text(&ok));
    // Broken on purpose: the slot (logical) or a capture trigger (listen) is gone.
    let client = env.db.client().await;
    match mode {
        Mode::Logical => {
            client.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot]).await.unwrap();
        }
        Mode::Listen => {
            client
                .batch_execute("DROP TRIGGER outbox_relay_capture_insert ON operators_notificationoperateur")
                .await
                .unwrap();
        }
    }
    let bad = tokio::task::block_in_place(|| relay(&env, &["check"]));
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("outbox-relay setup"), "names the fix: {}", text(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_a_persons_data_and_export_shows_it_first() {
    let env = Env::in_mode(Mode::Logical, "gdpr").await;
    let relay_task = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    client
        .batch_execute(
            r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES
               ('order_shipped', 3, '{in_app}', '{"order": 1, "name": "Alice Martin"}'),
               ('order_shipped', 3, '{in_app}', '{"order": 2, "name": "Alice Martin"}'),
               ('order_shipped', 4, '{in_app}', '{"order": 3, "name": "Bob"}')"#,
        )
        .await
        .unwrap();
    env.wait_settled(3, Duration::from_secs(30)).await;
    relay_task.stop().await;

    let export = tokio::task::block_in_place(|| relay(&env, &["export", "--recipient", "3"]));
    assert_eq!(export.status.code(), Some(0), "{}", text(&export));
    let json: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    let rows = json["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{json}");
    assert!(rows.iter().all(|r| r["payload"]["name"] == "Alice Martin" && r["status"] == "sent"));

    let erased = tokio::task::block_in_place(|| relay(&env, &["erase", "--recipient", "3"]));
    assert_eq!(erased.status.code(), Some(0), "{}", text(&erased));
    let said = text(&erased);
    assert!(said.contains("2 ledger row(s) anonymised"), "{said}");
    assert!(!said.contains("Alice") && !said.contains("recipient 3"), "no personal data in what it prints: {said}");

    let left = client
        .query("SELECT recipient, payload::text, status FROM outbox_relay.deliveries ORDER BY id", &[])
        .await
        .unwrap();
    let left: Vec<(Option<String>, String, String)> = left.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(left[0], (Some("(erased)".into()), "{}".into(), "sent".into()), "kept as proof of delivery");
    assert_eq!(left[1].1, "{}");
    assert_eq!(left[2].0.as_deref(), Some("4"), "others untouched");
    let all =
        client.query_one("SELECT string_agg(payload::text, ' ') FROM outbox_relay.deliveries", &[]).await.unwrap();
    assert!(!all.get::<_, String>(0).contains("Alice"));

    // Idempotent; and export now finds nothing.
    let again = tokio::task::block_in_place(|| relay(&env, &["erase", "--recipient", "3"]));
    assert!(text(&again).contains("0 ledger row(s) anonymised"), "{}", text(&again));
    let export = tokio::task::block_in_place(|| relay(&env, &["export", "--recipient", "3"]));
    let json: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(json["deliveries"], serde_json::json!([]));
}

crate::both_modes!(prune_deletes_only_what_is_settled_old_and_beyond_replay);
async fn prune_deletes_only_what_is_settled_old_and_beyond_replay(mode: Mode) {
    let env = Env::in_mode(mode, "prune").await;
    let relay_task = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    support::relay::insert_notifications(&client, 6, 3).await;
    env.wait_settled(6, Duration::from_secs(30)).await;
    relay_task.stop().await;
    client
        .batch_execute(
            "UPDATE outbox_relay.deliveries SET updated_at = now() - interval '40 days'
              WHERE id IN (SELECT id FROM outbox_relay.deliveries ORDER BY id LIMIT 4);
             -- Old but not settled: still to be sent.
             UPDATE outbox_relay.deliveries SET status = 'pending', updated_at = now() - interval '40 days'
              WHERE id = (SELECT max(id) FROM outbox_relay.deliveries);
             -- Old and settled, but its change lies past the stored offset: a replay could bring it back.
             INSERT INTO outbox_relay.deliveries (source_table, source_pk, channel, idempotency_key, event, payload,
                    status, commit_lsn, committed_at, updated_at)
             VALUES ('public.t', '1', 'in_app', 'past-offset', 'e', '{}', 'sent', 'FFFFFFFF/0', now(),
                     now() - interval '40 days');",
        )
        .await
        .unwrap();
    // Listen mode keeps no offset in WAL terms: its change log is never re-read
    // behind the watermark, so the row "past the offset" is prunable there.
    let prunable = if mode == Mode::Logical { 4 } else { 5 };
    let dry = tokio::task::block_in_place(|| relay(&env, &["prune", "--dry-run"]));
    assert!(text(&dry).contains(&format!("would delete {prunable} ")), "{}", text(&dry));
    let count = || async {
        env.db
            .client()
            .await
            .query_one("SELECT count(*) FROM outbox_relay.deliveries", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(count().await, 7, "a dry run deletes nothing");
    let done = tokio::task::block_in_place(|| relay(&env, &["prune"]));
    assert!(text(&done).contains(&format!("deleted {prunable} ")), "{}", text(&done));
    let left: Vec<String> = client
        .query("SELECT idempotency_key || ':' || status FROM outbox_relay.deliveries ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), 7 - prunable, "{left:?}");
    assert!(left.iter().any(|k| k.ends_with(":pending")), "{left:?}");
    let past_offset_kept = left.iter().any(|k| k.starts_with("past-offset"));
    assert_eq!(past_offset_kept, mode == Mode::Logical, "{left:?}");
}

crate::both_modes!(backfill_fills_a_gap_without_sending_anything_twice);
async fn backfill_fills_a_gap_without_sending_anything_twice(mode: Mode) {
    let env = Env::in_mode(mode, "backfill").await;
    let client = env.db.client().await;
    let relay_task = env.start_in_process();
    env.wait_streaming().await;
    let before = support::relay::insert_notifications(&client, 5, 5).await;
    env.wait_settled(5, Duration::from_secs(30)).await;
    relay_task.stop().await;

    // Rows the stream will never give: written while the slot was gone (logical)
    // or while the capture trigger was off (listen).
    let table = "operators_notificationoperateur";
    let lost = match mode {
        Mode::Logical => {
            client.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot]).await.unwrap();
            let lost = support::relay::insert_notifications(&client, 3, 3).await;
            client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&env.slot]).await.unwrap();
            lost
        }
        Mode::Listen => {
            client.batch_execute(&format!("ALTER TABLE {table} DISABLE TRIGGER USER")).await.unwrap();
            let lost = support::relay::insert_notifications(&client, 3, 3).await;
            client.batch_execute(&format!("ALTER TABLE {table} ENABLE TRIGGER USER")).await.unwrap();
            lost
        }
    };
    let qualified = format!("public.{table}");
    let dry = tokio::task::block_in_place(|| relay(&env, &["backfill", "--table", &qualified, "--dry-run"]));
    assert!(
        text(&dry).contains("8 rows; would write 3 new deliveries, 5 already delivered, 0 failed"),
        "{}",
        text(&dry)
    );
    let done = tokio::task::block_in_place(|| relay(&env, &["backfill", "--table", &qualified, "--page-rows", "2"]));
    assert_eq!(done.status.code(), Some(0), "{}", text(&done));
    assert!(text(&done).contains("wrote 3 new deliveries, 5 already delivered"), "{}", text(&done));
    let again = tokio::task::block_in_place(|| relay(&env, &["backfill", "--table", &qualified]));
    assert!(text(&again).contains("wrote 0 new deliveries, 8 already delivered"), "{}", text(&again));

    if mode == Mode::Logical {
        let accepted = tokio::task::block_in_place(|| relay(&env, &["accept-gap"]));
        assert_eq!(accepted.status.code(), Some(0), "{}", text(&accepted));
    }
    let relay_task = env.start_in_process();
    env.wait_streaming().await;
    env.wait_settled(8, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = env.pusher_counts();
    for id in before.iter().chain(&lost) {
        assert_eq!(counts.get(id), Some(&1), "{id}: 0 lost, 0 sent twice ({counts:?})");
    }
    relay_task.stop().await;
}

crate::both_modes!(a_frozen_relay_is_taken_over_within_takeover_ms);
async fn a_frozen_relay_is_taken_over_within_takeover_ms(mode: Mode) {
    // SIGSTOP: the process keeps its sockets (the kernel still answers TCP),
    // so only the server's idle_session_timeout on the lock session ends it.
    let env = Env::in_mode(mode, "frozen").await;
    let fast = [("OUTBOX_RELAY__RELAY__TAKEOVER_MS", "2000")];
    let (port_a, port_b) = (support::relay::free_port(), support::relay::free_port());
    let mut a = env.spawn_binary_env(port_a, &fast);
    env.wait_streaming().await;
    let mut b = env.spawn_binary_env(port_b, &fast);
    let client = env.db.client().await;
    let mut ids = support::relay::insert_notifications(&client, 20, 10).await;
    env.wait_settled(20, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // B is up and standing by

    let stop = |sig: &str, pid: u32| Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(stop("-STOP", a.id()).success());
    let frozen = std::time::Instant::now();
    let ready = |port: u16| async move {
        reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    while ready(port_b).await != 200 {
        assert!(frozen.elapsed() < Duration::from_secs(30), "the standby never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = frozen.elapsed();
    ids.extend(support::relay::insert_notifications(&client, 20, 10).await);
    env.wait_settled(40, Duration::from_secs(30)).await;

    // The frozen one wakes up, finds its lock gone to B, and stops.
    assert!(stop("-CONT", a.id()).success());
    let status = tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = a.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = a.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    support::relay::sigterm(&b);
    assert!(b.wait().unwrap().success());
    eprintln!("takeover of a frozen relay ({mode:?}): {took:?}");
    assert!(took < Duration::from_secs(8), "takeover in {took:?} with takeover_ms = 2000");
    let status = status.expect("the relay that lost its lock exits");
    assert_eq!(status.code(), Some(1), "{status:?}");
    let counts = env.pusher_counts();
    for id in &ids {
        assert!(counts.contains_key(id), "{id} lost");
    }
}
