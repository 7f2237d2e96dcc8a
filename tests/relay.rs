//! The relay's guarantees, end to end: real PostgreSQL with logical
//! replication, the real relay, and a fake Pusher that checks signatures.

mod support;

use std::time::Duration;

use support::relay::{
    free_port, insert_notifications, kill_9_rounds, scrape_counter, sigterm, stream_notifications, Env, Mode,
};

crate::both_modes!(every_committed_insert_is_delivered_once_and_nothing_else);
async fn every_committed_insert_is_delivered_once_and_nothing_else(mode: Mode) {
    let env = Env::in_mode(mode, "once").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;

    let mut ids = insert_notifications(&client, 30, 10).await;
    // Read before they change (listen mode reads rows when it polls).
    env.wait_settled(30, Duration::from_secs(30)).await;
    // Rolled back: never delivered.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'x', 'rolled back');
             ROLLBACK;",
        )
        .await
        .unwrap();
    // Updates and deletes are not in `operations`: nobody is notified.
    client
        .batch_execute(&format!("UPDATE operators_notificationoperateur SET is_read = true WHERE id = {}", ids[0]))
        .await
        .unwrap();
    client.batch_execute(&format!("DELETE FROM operators_notificationoperateur WHERE id = {}", ids[1])).await.unwrap();
    // One multi-statement transaction; the LSN read inside it precedes its commit record.
    let before_commit: String = {
        let tx_client = env.db.client().await;
        tx_client.batch_execute("BEGIN").await.unwrap();
        let rows = tx_client
            .query(
                "INSERT INTO operators_notificationoperateur (user_id, kind, title, body, level, created_at)
                 VALUES (7, 'stock_alert', 'Stock bas ⚠️', 'not for the provider', 'critical', '2026-11-24 17:35:00.5+01')
                 RETURNING id",
                &[],
            )
            .await
            .unwrap();
        ids.push(rows[0].get(0));
        let lsn: String = tx_client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        tx_client.batch_execute("COMMIT").await.unwrap();
        lsn
    };

    env.wait_settled(ids.len() as i64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // anything extra would show up now

    let counts = env.pusher_counts();
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "notification {id} delivered once");
    }
    assert_eq!(counts.len(), ids.len(), "nothing but the committed inserts: {counts:?}");
    assert_eq!(env.statuses().await.get("sent"), Some(&(ids.len() as i64)));

    // What Pusher received for the last row: the allow-list, typed.
    let last = *ids.last().unwrap();
    let event = env.pusher.events().into_iter().find(|e| e.data["id"] == last).unwrap();
    assert_eq!(event.channel, "private-user-7");
    assert_eq!(event.name, "notification_created");
    assert_eq!(
        event.data,
        serde_json::json!({"id": last, "kind": "stock_alert", "title": "Stock bas ⚠️", "level": "critical",
                           "url": "", "created_at": "2026-11-24T16:35:00.500Z"})
    );

    // The slot's confirmed position has moved past the last commit.
    if mode == Mode::Logical {
        let confirmed_past: bool = client
            .query_one(
                "SELECT confirmed_flush_lsn > $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&before_commit, &env.slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(confirmed_past, "confirmed_flush_lsn must pass the delivered commit");
    }
    relay.stop().await;
}

crate::both_modes!(outbox_rows_take_event_channels_and_payload_from_the_row);
async fn outbox_rows_take_event_channels_and_payload_from_the_row(mode: Mode) {
    let env = Env::in_mode(mode, "outbox").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    client
        .batch_execute(
            r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES
               ('order_shipped', 4, '{in_app}', '{"id": 1001, "order": 9, "amount": 12.5, "tags": ["a"]}'),
               ('password_changed', 5, '{}', '{"id": 1002}')"#,
        )
        .await
        .unwrap();
    env.wait_settled(2, Duration::from_secs(30)).await;
    let events = env.pusher.events();
    let shipped = events.iter().find(|e| e.data["id"] == 1001).unwrap();
    assert_eq!((shipped.name.as_str(), shipped.channel.as_str()), ("order_shipped", "private-user-4"));
    assert_eq!(shipped.data, serde_json::json!({"id": 1001, "order": 9, "amount": 12.5, "tags": ["a"]}));
    let changed = events.iter().find(|e| e.data["id"] == 1002).unwrap();
    assert_eq!(changed.name, "password_changed", "an empty channel array falls back to the route's channels");
    relay.stop().await;
}

crate::both_modes!(concurrent_transactions_committing_out_of_order_lose_nothing);
async fn concurrent_transactions_committing_out_of_order_lose_nothing(mode: Mode) {
    let env = Env::in_mode(mode, "concurrent").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u64 {
        let db = env.db.clone();
        tasks.spawn(async move {
            let client = db.client().await;
            let mut ids = vec![];
            for round in 0..3u64 {
                client.batch_execute("BEGIN").await.unwrap();
                for _ in 0..25 {
                    let row = client
                        .query_one(
                            "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES ($1, 'k', 't') RETURNING id",
                            &[&((worker % 20 + 1) as i32)],
                        )
                        .await
                        .unwrap();
                    ids.push(row.get::<_, i64>(0));
                }
                // Hold the transaction open a varying time so commits interleave out of id order.
                tokio::time::sleep(Duration::from_millis((worker * 7 + round * 13) % 40)).await;
                client.batch_execute("COMMIT").await.unwrap();
            }
            ids
        });
    }
    let mut ids = vec![];
    while let Some(r) = tasks.join_next().await {
        ids.extend(r.unwrap());
    }
    assert_eq!(ids.len(), 600);
    env.wait_settled(600, Duration::from_secs(60)).await;
    let counts = env.pusher_counts();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
    relay.stop().await;
}

crate::both_modes!(kill_9_at_random_moments_loses_nothing_and_counts_every_resend);
async fn kill_9_at_random_moments_loses_nothing_and_counts_every_resend(mode: Mode) {
    let env = Env::in_mode(mode, "kill9").await;
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;

    let inserter = stream_notifications(env.db.clone());

    let mut resends = kill_9_rounds(&mut child, port, 4, 400, || env.spawn_binary(port)).await;
    let ids = inserter.await.unwrap();
    env.wait_settled(ids.len() as i64, Duration::from_secs(60)).await;
    // The last process's count, read before stopping it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    resends += scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");

    let counts = env.pusher_counts();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "kill -9 x4: rows {}, delivered {}, duplicates {duplicates}, counted re-sends {resends}, lost {}",
        ids.len(),
        counts.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost after kill -9: {lost:?}");
    assert!(
        duplicates as f64 <= resends,
        "every duplicate must be a counted re-send: {duplicates} duplicates, {resends} counted"
    );
}

crate::both_modes!(sigterm_stops_cleanly_within_10_seconds);
async fn sigterm_stops_cleanly_within_10_seconds(mode: Mode) {
    let env = Env::in_mode(mode, "sigterm").await;
    let mut child = env.spawn_binary(free_port());
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 200, 50).await;
    let started = std::time::Instant::now();
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped in {:?}", started.elapsed());
    // Whatever it had not sent is in the ledger, and a restart finishes the job.
    let mut child = env.spawn_binary(free_port());
    env.wait_settled(ids.len() as i64, Duration::from_secs(30)).await;
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let counts = env.pusher_counts();
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)), "each delivered exactly once across a clean restart");
}

crate::both_modes!(a_slow_provider_never_stalls_the_stream);
async fn a_slow_provider_never_stalls_the_stream(mode: Mode) {
    let env = Env::in_mode(mode, "slow").await;
    env.pusher.set_delay(Duration::from_secs(3));
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 300, 30).await;
    // All recorded and the slot confirmed past their commits while Pusher is
    // still answering its first call. Past the last routed commit, not past
    // the server's WAL end: other databases of the test cluster write WAL too,
    // and an idle stream's position is confirmed only every 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let recorded: i64 = client.query_one("SELECT count(*) FROM outbox_relay.deliveries", &[]).await.unwrap().get(0);
        let confirmed: bool = client
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn > (SELECT max(commit_lsn) FROM outbox_relay.deliveries), false)
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .unwrap()
            .is_some_and(|r| r.get(0));
        if recorded == 300 && (confirmed || mode == Mode::Listen) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingestion stalled behind a slow provider ({recorded} recorded)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.pusher.set_delay(Duration::ZERO);
    env.wait_settled(ids.len() as i64, Duration::from_secs(30)).await;
    relay.stop().await;
}

crate::both_modes!(provider_outage_is_retried_until_it_recovers);
async fn provider_outage_is_retried_until_it_recovers(mode: Mode) {
    let env = Env::in_mode(mode, "outage").await;
    env.pusher.fail_next(3, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 20, 20).await;
    let s = env.wait_settled(ids.len() as i64, Duration::from_secs(30)).await;
    assert_eq!(s.get("sent"), Some(&20), "{s:?}");
    let retried: i64 = client
        .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE attempts > 1 AND last_error LIKE '%503%'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(retried > 0, "the 503s were retried and recorded");
    assert!(env.pusher_counts().values().all(|n| *n == 1));
    relay.stop().await;
}

crate::both_modes!(bad_rows_are_recorded_failed_and_the_rows_around_them_flow);
async fn bad_rows_are_recorded_failed_and_the_rows_around_them_flow(mode: Mode) {
    let env = Env::in_mode(mode, "badrows").await;
    let client = env.db.client().await;
    client.batch_execute("ALTER TABLE operators_outboxevent ALTER COLUMN recipient_id DROP NOT NULL").await.unwrap();
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let big = "x".repeat(1 << 20);
    client
        .execute(
            r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES
               ('ok', 1, '{in_app}', '{"id": 1}'),
               ('no_recipient', NULL, '{in_app}', '{"id": 2}'),
               ('not_object', 1, '{in_app}', '[1, 2]'),
               ('ok', 1, '{in_app}', '{"id": 3}'),
               ('unknown_channel', 1, '{pager}', '{"id": 4}'),
               ('too_big', 1, '{in_app}', jsonb_build_object('id', 5, 'text', $1::text)),
               ('ok', 1, '{in_app}', '{"id": 6, "text": "ctrl \u0007 and emoji 🦀"}')"#,
            &[&big],
        )
        .await
        .unwrap();
    env.wait_settled(7, Duration::from_secs(30)).await;
    let rows = client
        .query(
            "SELECT event, status, coalesce(last_error, '') FROM outbox_relay.deliveries ORDER BY source_pk::int",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let expect = [
        ("ok", "sent", ""),
        ("no_recipient", "failed", "recipient column recipient_id is NULL"),
        ("not_object", "failed", "not a JSON object"),
        ("ok", "sent", ""),
        ("unknown_channel", "failed", "unknown channel \"pager\""),
        ("too_big", "failed", "10 KB"),
        ("ok", "sent", ""),
    ];
    for ((event, status, error), (want_event, want_status, want_error)) in got.iter().zip(expect) {
        assert_eq!((event.as_str(), status.as_str()), (want_event, want_status), "{got:?}");
        assert!(error.contains(want_error), "{event}: {error:?} should mention {want_error:?}");
    }
    let delivered: Vec<i64> = env.pusher_counts().into_keys().collect();
    assert_eq!(delivered, [1, 3, 6]);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_slot_still_releases_wal_written_elsewhere() {
    let env = Env::new("idle").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    client
        .batch_execute("CREATE TABLE busy (id serial, pad text); INSERT INTO busy (pad) SELECT repeat('x', 200) FROM generate_series(1, 20000);")
        .await
        .unwrap();
    let lsn: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let passed: bool = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&lsn, &env.slot],
            )
            .await
            .unwrap()
            .get(0);
        if passed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot kept holding WAL of unrouted tables");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}

crate::both_modes!(a_large_transaction_is_delivered_once_in_parts);
async fn a_large_transaction_is_delivered_once_in_parts(mode: Mode) {
    let env = Env::in_mode(mode, "bigtx").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    // 2 500 rows in one transaction: routed in parts of 1 000 before its commit arrives.
    let ids = insert_notifications(&client, 2500, 2500).await;
    env.wait_settled(2500, Duration::from_secs(60)).await;
    let counts = env.pusher_counts();
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)), "each row once");
    assert_eq!(counts.len(), 2500);
    relay.stop().await;
}

/// The classic flaw of id-based pollers: ids 5 and 6 taken by two transactions,
/// 6 commits first and is read, then 5 commits. Both must be delivered, once.
async fn out_of_order_commit_around_a_poll(mode: Mode) {
    let env = Env::in_mode(mode, "ooo").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let first = env.db.client().await;
    let second = env.db.client().await;
    first.batch_execute("BEGIN").await.unwrap();
    let early: i64 = first
        .query_one(
            "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'k', 'early') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let late: i64 = second
        .query_one(
            "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (2, 'k', 'late') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(late > early);
    // The later id is delivered while the earlier one's transaction is still open
    // (in listen mode only once the open transaction no longer holds the watermark back).
    if mode == Mode::Logical {
        env.wait_settled(1, Duration::from_secs(30)).await;
    } else {
        tokio::time::sleep(Duration::from_millis(600)).await; // a few polls go by
    }
    first.batch_execute("COMMIT").await.unwrap();
    env.wait_settled(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let counts = env.pusher_counts();
    assert_eq!(counts.get(&early), Some(&1), "the earlier id, committed last, is not skipped");
    assert_eq!(counts.get(&late), Some(&1));
    relay.stop().await;
}
crate::both_modes!(out_of_order_commit_around_a_poll);

/// A worker whose lease ran out (and whose rows another worker took over)
/// cannot record over the new claim: its outcome is ignored, the new one counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_from_a_lapsed_claim_is_ignored() {
    use outbox_relay::ledger::{Ledger, Outcome};
    let env = Env::new("lapsed").await;
    let mut client = env.db.client().await;
    outbox_relay::ledger::migrate(&mut client, "outbox_relay").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO outbox_relay.deliveries (source_table, source_pk, channel, idempotency_key, event, payload,
                                                  commit_lsn, committed_at)
             VALUES ('public.t', '1', 'in_app', 'or1-lapsed', 'e', '{}', '0/1', now())",
        )
        .await
        .unwrap();
    let ledger = Ledger::new(env.db.client().await, "outbox_relay");
    let first = ledger.claim(10, Duration::from_millis(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The process that holds the claim (frozen past its lease, say) never
    // takes its own row a second time: it still has it in hand.
    let (again, _) = ledger.claim_from(10, Duration::from_secs(60), None, None, &[first[0].id]).await.unwrap();
    assert!(again.is_empty(), "a held row is not claimed again by its holder");
    let second = ledger.claim(10, Duration::from_secs(60)).await.unwrap();
    assert!(second[0].lease_expired, "taken over, flagged as a possible re-send");
    let sent = |mid: &str| Outcome::Sent { provider: "pusher", message_id: Some(mid.into()) };
    ledger.finish(&[(first[0].claim_ref(), sent("late"))]).await.unwrap();
    let row = client.query_one("SELECT status, attempts FROM outbox_relay.deliveries", &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("sending".into(), 2),
        "the lapsed claim changed nothing"
    );
    ledger.finish(&[(second[0].claim_ref(), sent("current"))]).await.unwrap();
    let row = client.query_one("SELECT status, provider_message_id FROM outbox_relay.deliveries", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("sent".into(), "current".into()));
}

crate::both_modes!(kill_9_with_updates_deletes_and_reused_keys_loses_nothing);
async fn kill_9_with_updates_deletes_and_reused_keys_loses_nothing(mode: Mode) {
    use support::relay::{churn, truncate_notifications};
    let env = Env::for_every_change(mode, "kill9churn").await;
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;

    let db = env.db.clone();
    let writer = tokio::spawn(async move {
        let client = db.client().await;
        let mut expect = vec![];
        for round in 0..12 {
            if round == 6 {
                truncate_notifications(&client).await; // ids 1.. come again
            }
            expect.extend(churn(&client, 10, &format!("r{round}")).await);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        expect
    });
    let mut resends = kill_9_rounds(&mut child, port, 3, 300, || env.spawn_binary(port)).await;
    let expect = writer.await.unwrap();
    env.wait_settled(expect.len() as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    resends += scrape_counter(port, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    let seen = env.change_counts();
    let lost: Vec<_> = expect.iter().filter(|c| !seen.contains_key(*c)).collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("kill -9 x3 with every kind of change: changes {}, duplicates {duplicates}, counted re-sends {resends}, lost {}",
        expect.len(), lost.len());
    assert!(lost.is_empty(), "lost after kill -9: {lost:?}");
    assert_eq!(seen.len(), expect.len(), "nothing but the committed changes");
    assert!(duplicates as f64 <= resends, "{duplicates} duplicates, {resends} counted");
}
