//! `run --only dispatch`: extra processes that send what the ledger holds,
//! beside the relay that works the slot. They take no lock and give back no
//! claim but their own (by lease); the slot's relay leaves theirs alone.

mod support;

use std::time::Duration;

use support::relay::{free_port, insert_notifications, sigterm, Env};
use tokio::sync::watch;

/// `n` deliveries written straight into the ledger as `pending`, as a
/// backlog left by a provider outage would be.
async fn backlog(client: &tokio_postgres::Client, n: i32) {
    client
        .execute(
            r#"INSERT INTO outbox_relay.deliveries (source_table, source_pk, channel, idempotency_key, event,
                   recipient, payload, status, attempts, commit_lsn, committed_at, next_attempt_at)
               SELECT 'public.operators_notificationoperateur', g::text, 'in_app', 'backlog-' || g,
                      'notification_created', '7', jsonb_build_object('id', g), 'pending', 0, '0/1', now(), now()
               FROM generate_series(1, $1::int) g"#,
            &[&n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_only_processes_drain_the_ledger_each_delivery_once() {
    let env = Env::new("dispatchonly").await;
    let mut client = env.db.client().await;
    outbox_relay::ledger::migrate(&mut client, "outbox_relay").await.unwrap();
    backlog(&client, 300).await;
    // Two of them side by side, in-process: SKIP LOCKED keeps them apart.
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (stop, rx) = watch::channel(false);
        let mut cfg = env.config();
        cfg.metrics.listen = String::new();
        runs.push((stop, tokio::spawn(outbox_relay::app::run_dispatch_only(cfg, rx))));
    }
    env.wait_settled(300, Duration::from_secs(60)).await;
    for (stop, handle) in runs {
        let _ = stop.send(true);
        handle.await.unwrap().expect("dispatch-only run");
    }
    let counts = env.pusher_counts();
    assert_eq!(counts.len(), 300, "every delivery sent");
    assert!(counts.values().all(|&n| n == 1), "none twice: {counts:?}");
    let by: i64 = client
        .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE claimed_by LIKE 'dispatch:%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, 300, "each claim names the dispatch-only process that held it");
    // No stream was read: the slot was never used.
    let active: Option<String> = client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&env.slot])
        .await
        .unwrap()
        .get(0);
    assert!(active.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slots_relay_leaves_a_dispatch_only_claim_alone() {
    let env = Env::new("dispatchclaim").await;
    let mut client = env.db.client().await;
    outbox_relay::ledger::migrate(&mut client, "outbox_relay").await.unwrap();
    // One claim held by a dispatch-only process (maybe sending right now),
    // one left by an earlier run of the slot's relay (an orphan).
    client
        .batch_execute(
            r#"INSERT INTO outbox_relay.deliveries (source_table, source_pk, channel, idempotency_key, event,
                   recipient, payload, status, attempts, commit_lsn, committed_at, next_attempt_at, claimed_by)
               VALUES ('public.operators_notificationoperateur', '1', 'in_app', 'held-elsewhere', 'e', '7',
                       '{"id": 100001}', 'sending', 1, '0/1', now(), now() + interval '10 minutes', 'dispatch:other'),
                      ('public.operators_notificationoperateur', '2', 'in_app', 'orphan', 'e', '7',
                       '{"id": 100002}', 'sending', 1, '0/1', now(), now() + interval '10 minutes', NULL)"#,
        )
        .await
        .unwrap();
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;
    // Something through the stream too, so the relay is seen working.
    insert_notifications(&client, 5, 5).await;
    env.wait_settled(6, Duration::from_secs(60)).await;
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let row = client
        .query_one("SELECT status, attempts FROM outbox_relay.deliveries WHERE idempotency_key = 'held-elsewhere'", &[])
        .await
        .unwrap();
    let held: (String, i32) = (row.get(0), row.get(1));
    assert_eq!(held, ("sending".to_string(), 1), "still the other process's claim, until its lease ends");
    let counts = env.pusher_counts();
    assert_eq!(counts.get(&100002), Some(&1), "the relay's own orphan went out: {counts:?}");
    assert_eq!(counts.get(&100001), None, "the other process's claim was not sent by this one");
}
