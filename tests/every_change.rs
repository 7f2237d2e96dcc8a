//! "Every committed change a route lists reaches its channels exactly once":
//! updates and deletes as well as inserts, keys reused after TRUNCATE,
//! REPLICA IDENTITY FULL, values the ledger cannot store, a slot that changed
//! under the relay, and a second relay started beside the first.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::relay::{churn, free_port, scrape_counter, truncate_notifications, Env, Mode, CHANGE_ROUTES};

/// Ledger rows settled (sent, failed, ...), for `wait_settled`.
fn total(expect: &[support::relay::SeenChange]) -> i64 {
    expect.len() as i64
}

crate::both_modes!(every_insert_update_and_delete_is_delivered_once);
async fn every_insert_update_and_delete_is_delivered_once(mode: Mode) {
    let env = Env::for_every_change(mode, "changes").await;
    let client = env.db.client().await;
    let relay = env.start_in_process();
    env.wait_streaming().await;

    let mut expect = churn(&client, 20, "a").await;
    // Keys reused: ids 1.. again, after their first life was delivered.
    env.wait_settled(total(&expect), Duration::from_secs(30)).await;
    truncate_notifications(&client).await;
    expect.extend(churn(&client, 6, "b").await);
    assert!(expect.iter().filter(|(e, id, _)| e == "notification_created" && *id == 1).count() == 2, "id 1 reused");

    env.wait_settled(total(&expect), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // anything extra would show up now
    let seen = env.change_counts();
    for change in &expect {
        assert_eq!(seen.get(change), Some(&1), "{change:?} delivered once; seen {seen:?}");
    }
    assert_eq!(seen.len(), expect.len(), "nothing else delivered");

    // The ledger keys rows by the table's primary key, whatever the replica
    // identity: no other column (body, extra, ...) ends up there.
    let rows =
        client.query("SELECT DISTINCT source_pk, operation, status FROM outbox_relay.deliveries", &[]).await.unwrap();
    for r in &rows {
        let (pk, op, status): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        assert!(pk.parse::<i64>().is_ok(), "source_pk is the id alone, got {pk:?}");
        assert_eq!(status, "sent", "{pk} {op}");
    }
    let ops: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(ops.into_iter().collect::<Vec<_>>(), ["delete", "insert", "update"]);
    relay.stop().await;
}

crate::both_modes!(values_the_ledger_cannot_store_fail_alone_and_the_stream_goes_on);
async fn values_the_ledger_cannot_store_fail_alone_and_the_stream_goes_on(mode: Mode) {
    let env = Env::in_mode(mode, "poison").await;
    let client = env.db.client().await;
    // `json` keeps "\u0000" as written; jsonb (the ledger's payload) refuses it.
    client.batch_execute("ALTER TABLE operators_outboxevent ALTER COLUMN payload TYPE json").await.unwrap();
    let relay = env.start_in_process();
    env.wait_streaming().await;
    client
        .batch_execute(
            r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES
               ('ok', 1, '{in_app}', '{"id": 1}'),
               ('nul', 1, '{in_app}', '{"id": 2, "text": "a\u0000b"}'),
               ('ok', 1, '{in_app}', '{"id": 3}')"#,
        )
        .await
        .unwrap();
    let settled = env.wait_settled(3, Duration::from_secs(30)).await;
    assert_eq!(settled.get("sent"), Some(&2), "{settled:?}");
    let reason: String = client
        .query_one("SELECT last_error FROM outbox_relay.deliveries WHERE event = 'nul' AND status = 'failed'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("U+0000"), "{reason}");

    // A provider error the ledger could not store as given: a NUL in the
    // body and a Retry-After of 10^13 s (past PostgreSQL's last timestamp).
    env.pusher.answer_next_raw(503, &[("retry-after", "10000000000000")], b"upstream \0 broke");
    client
        .batch_execute(r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES ('odd', 1, '{in_app}', '{"id": 4}')"#)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (error, wait_days): (String, f64) = loop {
        let row = client
            .query_opt(
                "SELECT last_error, extract(epoch FROM next_attempt_at - now())::float8 / 86400
                 FROM outbox_relay.deliveries WHERE event = 'odd' AND status = 'pending' AND last_error IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            break (r.get(0), r.get(1));
        }
        assert!(tokio::time::Instant::now() < deadline, "the odd outcome was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(error.contains("upstream") && !error.contains('\0'), "{error:?}");
    assert!((6.9..=7.01).contains(&wait_days), "Retry-After capped at a week: {wait_days} days");
    // And the rows after it still flow.
    client
        .batch_execute(r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES ('ok', 1, '{in_app}', '{"id": 5}')"#)
        .await
        .unwrap();
    env.wait_settled(4, Duration::from_secs(30)).await;
    assert_eq!(env.pusher_counts().into_keys().collect::<Vec<_>>(), [1, 3, 5]);
    relay.stop().await;
}

/// The relay binary against `env`, to its exit: (code, stderr + stdout).
fn run_to_exit(env: &Env, args: &[&str]) -> (i32, String) {
    run_to_exit_with(env, "", args)
}

/// Likewise, with `more` TOML appended to the config (extra routes).
fn run_to_exit_with(env: &Env, more: &str, args: &[&str]) -> (i32, String) {
    let path = env.dir.path().join("gap.toml");
    std::fs::write(&path, env.config_toml("127.0.0.1:0") + more).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A relay that does not refuse streams on: stop it after a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        support::relay::sigterm(&child);
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

crate::both_modes!(a_gap_in_the_source_is_refused_until_an_operator_accepts_it);
async fn a_gap_in_the_source_is_refused_until_an_operator_accepts_it(mode: Mode) {
    let env = Env::in_mode(mode, "gap").await;
    let client = env.db.client().await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let first = support::relay::insert_notifications(&client, 5, 5).await;
    env.wait_settled(5, Duration::from_secs(30)).await;
    relay.stop().await;

    let expect = match mode {
        Mode::Logical => {
            // The slot is dropped and made again (by a DBA, a failover, a
            // restore script): it starts at the WAL's end, past what follows.
            client.execute("SELECT pg_drop_replication_slot($1)", &[&env.slot]).await.unwrap();
            support::relay::insert_notifications(&client, 3, 3).await;
            client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&env.slot]).await.unwrap();
            "dropped and recreated"
        }
        Mode::Listen => {
            // As after a restore from an older backup: the relay has read
            // further than the server's transaction ids now go.
            client
                .execute("UPDATE outbox_relay.listen_progress SET watermark = '4000000000000'::xid8", &[])
                .await
                .unwrap();
            "restored"
        }
    };
    let (code, out) = tokio::task::block_in_place(|| run_to_exit(&env, &["run"]));
    assert_eq!(code, 2, "a gap is refused with exit 2: {out}");
    assert!(out.contains(expect) && out.contains("accept-gap"), "names the gap and the fix: {out}");

    let (code, out) = tokio::task::block_in_place(|| run_to_exit(&env, &["check"]));
    assert_eq!(code, 2, "check refuses the gap as run does: {out}");
    assert!(out.contains(expect), "{out}");

    let (code, out) = tokio::task::block_in_place(|| run_to_exit(&env, &["accept-gap"]));
    assert_eq!(code, 0, "{out}");
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let after = support::relay::insert_notifications(&client, 4, 2).await;
    env.wait_settled(9, Duration::from_secs(30)).await;
    let counts = env.pusher_counts();
    for id in first.iter().chain(&after) {
        assert_eq!(counts.get(id), Some(&1), "{id} once after the gap was accepted");
    }
    relay.stop().await;
}

crate::both_modes!(a_second_relay_stands_by_and_takes_over_when_the_first_dies);
async fn a_second_relay_stands_by_and_takes_over_when_the_first_dies(mode: Mode) {
    let env = Env::in_mode(mode, "standby").await;
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = env.spawn_binary(port_a);
    env.wait_streaming().await;
    let mut b = env.spawn_binary(port_b);
    // B is up, serving its endpoints, and says it stands by.
    let http = reqwest::Client::new();
    let ready = |port: u16| {
        let http = http.clone();
        async move {
            for _ in 0..100 {
                if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/readyz")).send().await {
                    return (r.status().as_u16(), r.text().await.unwrap_or_default());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("relay on {port} never answered /readyz");
        }
    };
    let mut standby = (0, String::new());
    for _ in 0..50 {
        standby = ready(port_b).await;
        if standby.1.contains("standby") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(standby.0, 503, "{standby:?}");
    assert!(standby.1.contains("standby"), "{standby:?}");
    assert_eq!(scrape_counter(port_b, "outbox_relay_active").await, Some(0.0));

    let client = env.db.client().await;
    let mut ids = support::relay::insert_notifications(&client, 200, 20).await;
    env.wait_settled(200, Duration::from_secs(30)).await;
    let resends_a = scrape_counter(port_a, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    assert_eq!(resends_a, 0.0, "the live relay's rows were not taken over");

    // A dies mid-stream; B takes over.
    let inserting = {
        let db = env.db.clone();
        tokio::spawn(async move {
            let client = db.client().await;
            let mut ids = vec![];
            for _ in 0..20 {
                ids.extend(support::relay::insert_notifications(&client, 10, 10).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed = std::time::Instant::now();
    a.kill().unwrap();
    a.wait().unwrap();
    let mut took_over = None;
    for _ in 0..200 {
        if ready(port_b).await.0 == 200 {
            took_over = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took_over = took_over.expect("the standby never took over");
    ids.extend(inserting.await.unwrap());
    env.wait_settled(ids.len() as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resends = scrape_counter(port_b, "outbox_relay_resends_after_restart_total").await.unwrap_or(0.0);
    support::relay::sigterm(&b);
    assert!(b.wait().unwrap().success());

    let counts = env.pusher_counts();
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("takeover after {took_over:?}: duplicates {duplicates}, counted re-sends {resends}");
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicates as f64 <= resends, "{duplicates} duplicates, {resends} counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_route_without_the_old_row_is_refused_at_start() {
    // Under REPLICA IDENTITY DEFAULT a DELETE sends only the primary key: the
    // route's recipient would be NULL for every delete. Said before streaming.
    let env = Env::with_mode(Mode::Logical, "identity", "", CHANGE_ROUTES).await;
    let (code, out) = tokio::task::block_in_place(|| run_to_exit(&env, &["run"]));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("a delete route on public.operators_notificationoperateur uses user_id")
            && out.contains("REPLICA IDENTITY FULL"),
        "{out}"
    );
    // A table with no key at all: its own UPDATEs would fail once published.
    let client = env.db.client().await;
    client
        .batch_execute(
            "ALTER TABLE operators_notificationoperateur REPLICA IDENTITY FULL;
             CREATE TABLE public.keyless (user_id int, title text);",
        )
        .await
        .unwrap();
    let keyless = r#"
[[routes]]
table = "public.keyless"
operations = ["insert", "update"]
recipient_column = "user_id"
event = "keyless_changed"
channels = ["in_app"]
payload_columns = ["title"]
"#;
    let (code, out) = tokio::task::block_in_place(|| run_to_exit_with(&env, keyless, &["setup"]));
    assert_eq!(code, 0, "{out}");
    let (code, out) = tokio::task::block_in_place(|| run_to_exit_with(&env, keyless, &["run"]));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("table public.keyless has no replica identity"), "{out}");
    assert!(out.contains("ALTER TABLE public.keyless REPLICA IDENTITY FULL"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_lookups_that_cannot_be_right_fail_with_the_reason() {
    use outbox_relay::contacts::{prepare, ContactPlan, Prepared};
    let db = support::pg::fresh_db("lookup").await;
    let client = db.client().await;
    let plan = |sql: &str| ContactPlan {
        address_query: sql.to_string(),
        preferences_query: None,
        templates: Default::default(),
        provider: outbox_relay::config::ProviderKind::Twilio,
        require_template: false,
        body: Some("{title}".into()),
        subject: None,
        texts: Default::default(),
        whatsapp: false,
    };
    let payload = serde_json::json!({"title": "hi"});
    let twilio = outbox_relay::config::ProviderKind::Twilio;
    // Two addresses for one person: retrying would give the same answer until the delivery died.
    let two = plan("SELECT p FROM (VALUES ('+33600000001'), ('+33600000002')) v(p) WHERE $1::int > 0");
    match prepare(&client, &two, twilio, Some("1"), "e", &payload).await {
        Prepared::Fail(reason) => assert!(reason.contains("returned 2 rows"), "{reason}"),
        other => panic!("two rows must fail for good: {other:?}"),
    }
    // A phone number stored as a number is a query to fix, not "no consent".
    let number = plan("SELECT 33600000001::bigint WHERE $1::int > 0");
    match prepare(&client, &number, twilio, Some("1"), "e", &payload).await {
        Prepared::Fail(reason) => assert!(reason.contains("int8") && reason.contains("::text"), "{reason}"),
        other => panic!("a non-text address must fail with its type: {other:?}"),
    }
    let none = plan("SELECT 'x'::text WHERE $1::int < 0");
    assert!(matches!(prepare(&client, &none, twilio, Some("1"), "e", &payload).await, Prepared::Skip(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_never_followed() {
    // A 302 followed would turn the POST into a GET; this GET answers 200, so
    // a client that follows would record the message sent without sending it.
    let (elsewhere, _server) =
        support::fakes::http::serve(axum::Router::new().route("/", axum::routing::get(|| async { "{}" })));
    let env = Env::in_mode(Mode::Logical, "redirect").await;
    env.pusher.answer_next_raw(302, &[("location", &format!("{elsewhere}/"))], b"");
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    support::relay::insert_notifications(&client, 1, 1).await;
    let s = env.wait_settled(1, Duration::from_secs(30)).await;
    assert_eq!(s.get("failed"), Some(&1), "{s:?}");
    let error: String = client.query_one("SELECT last_error FROM outbox_relay.deliveries", &[]).await.unwrap().get(0);
    assert!(error.contains("302"), "{error}");
    assert!(env.pusher.events().is_empty());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_data_cannot_mint_metric_labels_and_idle_relays_do_not_feed_on_their_own_writes() {
    let env = Env::new("labels").await;
    let port = free_port();
    let mut child = env.spawn_binary_env(port, &[("OUTBOX_RELAY__RELAY__HEARTBEAT_MS", "200")]);
    env.wait_streaming().await;
    let client = env.db.client().await;
    client
        .batch_execute(
            r#"INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload) VALUES
               ('e', 1, '{in_app}', '{"id": 1}'), ('e', 1, '{pager_1}', '{"id": 2}'), ('e', 1, '{pager_2}', '{"id": 3}')"#,
        )
        .await
        .unwrap();
    env.wait_settled(3, Duration::from_secs(30)).await;
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let recorded: Vec<&str> =
        body.lines().filter(|l| l.starts_with("outbox_relay_deliveries_recorded_total")).collect();
    assert!(recorded.iter().all(|l| !l.contains("pager_")), "{recorded:?}");
    assert!(recorded.iter().any(|l| l.contains("channel=\"unknown\"") && l.ends_with(" 2")), "{recorded:?}");

    // Quiet now, with a heartbeat every 200 ms: the offset may move, but the
    // relay's own ledger writes must not each cause the next one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = || async {
        let sql = "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE schemaname = 'outbox_relay' AND relname = 'progress'";
        let c = env.db.client().await;
        c.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
    };
    let before = writes().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = writes().await - before;
    support::relay::sigterm(&child);
    assert!(child.wait().unwrap().success());
    assert!(during <= 1, "{during} offset writes in 5 quiet seconds (at most one per 10 s)");
}

crate::both_modes!(a_claim_whose_commit_outlived_its_connection_is_not_left_for_a_lease);
async fn a_claim_whose_commit_outlived_its_connection_is_not_left_for_a_lease(mode: Mode) {
    // A claim (or a fast-path insert) can commit while its acknowledgement is
    // lost with the connection: the row is `sending`, held by nobody. With a
    // 10-minute lease, waiting it out would be a 10-minute stall.
    let env = Env::in_mode(mode, "orphan").await;
    let port = free_port();
    let mut child = env.spawn_binary_env(port, &[("OUTBOX_RELAY__RELAY__CLAIM_LEASE_MS", "600000")]);
    env.wait_streaming().await;
    let client = env.db.client().await;
    support::relay::insert_notifications(&client, 1, 1).await;
    env.wait_settled(1, Duration::from_secs(30)).await;
    // The orphan, as such a commit leaves it.
    client
        .batch_execute(
            r#"INSERT INTO outbox_relay.deliveries (source_table, source_pk, channel, idempotency_key, event,
                   recipient, payload, status, attempts, commit_lsn, committed_at, next_attempt_at)
               SELECT source_table, '999', channel, 'orphan', event, recipient, '{"id": 999}', 'sending', 1,
                      commit_lsn, committed_at, now() + interval '10 minutes'
               FROM outbox_relay.deliveries LIMIT 1"#,
        )
        .await
        .unwrap();
    // The database drops the relay's connections (a failover, a restart).
    client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND (datname = current_database() OR backend_type = 'walsender')",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while !env.pusher_counts().contains_key(&999) {
        assert!(started.elapsed() < Duration::from_secs(30), "the orphan waited for its lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    support::relay::sigterm(&child);
    assert!(child.wait().unwrap().success());
    assert_eq!(env.pusher_counts().get(&999), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_apply_to_in_app_channels_too() {
    // In-app channels have no address_query; their preferences_query must
    // still be asked (it once was only for e-mail, SMS and WhatsApp).
    let prefs = r#"preferences_query = "SELECT $1::int <> 2 AND $2::text = 'notification_created'""#;
    let env = Env::with_mode(Mode::Logical, "inapp_prefs", prefs, "").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    client
        .batch_execute(
            "INSERT INTO operators_notificationoperateur (user_id, kind, title) VALUES (1, 'k', 'for 1'), (2, 'k', 'for 2'), (3, 'k', 'for 3')",
        )
        .await
        .unwrap();
    let s = env.wait_settled(3, Duration::from_secs(30)).await;
    assert_eq!((s.get("sent"), s.get("skipped")), (Some(&2), Some(&1)), "{s:?}");
    let reason: String = client
        .query_one("SELECT last_error FROM outbox_relay.deliveries WHERE recipient = '2'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.starts_with("preference:"), "{reason}");
    let channels: Vec<String> = env.pusher.events().into_iter().map(|e| e.channel).collect();
    assert!(!channels.contains(&"private-user-2".to_string()), "{channels:?}");
    relay.stop().await;
}
