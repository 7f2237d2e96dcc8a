//! The fault suite: providers failing in every way they do, and the circuit
//! to a fallback provider. Each test prints rows in / delivered / duplicates /
//! lost (`cargo test --test faults -- --nocapture`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::fakes::ably::FakeAbly;
use support::relay::{insert_notifications, Env};

fn report(fault: &str, ids: &[i64], counts: &BTreeMap<i64, usize>) -> (usize, usize) {
    let lost = ids.iter().filter(|id| !counts.contains_key(id)).count();
    let duplicates: usize = ids.iter().filter_map(|id| counts.get(id)).map(|n| n - 1).sum();
    eprintln!("{fault}: rows {}, delivered {}, duplicates {duplicates}, lost {lost}", ids.len(), ids.len() - lost);
    (duplicates, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_503_then_429_then_timeouts_then_resets_then_recovery() {
    let env = Env::new("faults").await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    let mut total = 0i64;

    // 503: retried with backoff.
    env.pusher.fail_next(6, 503, None);
    let ids = insert_notifications(&client, 50, 10).await;
    total += ids.len() as i64;
    env.wait_settled(total, Duration::from_secs(30)).await;
    let (dups, lost) = report("503 x6", &ids, &env.pusher_counts());
    assert_eq!((dups, lost), (0, 0));

    // 429 with Retry-After: 1 — the next attempt waits at least that long.
    env.pusher.fail_next(3, 429, Some("1"));
    let started = std::time::Instant::now();
    let ids = insert_notifications(&client, 50, 50).await;
    total += ids.len() as i64;
    env.wait_settled(total, Duration::from_secs(30)).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After honoured");
    let (dups, lost) = report("429 Retry-After x3", &ids, &env.pusher_counts());
    assert_eq!((dups, lost), (0, 0));

    // Timeouts (the relay waits 2 s; Pusher takes 3 s and still publishes: the
    // one case where a re-send can duplicate, as with the real service).
    env.pusher.set_delay(Duration::from_secs(3));
    let ids = insert_notifications(&client, 20, 20).await;
    total += ids.len() as i64;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.pusher.set_delay(Duration::ZERO);
    env.wait_settled(total, Duration::from_secs(30)).await;
    let (dups, lost) = report("timeouts", &ids, &env.pusher_counts());
    assert_eq!(lost, 0);
    let failed_attempts: i64 = client
        .query_one(
            "SELECT coalesce(sum(attempts - 1), 0)::bigint FROM outbox_relay.deliveries
             WHERE source_pk::bigint = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dups as i64 <= failed_attempts, "each copy comes from a timed-out attempt: {dups} > {failed_attempts}");

    // Connections reset without an answer.
    env.pusher.reset_connections_next(4);
    let ids = insert_notifications(&client, 50, 10).await;
    total += ids.len() as i64;
    env.wait_settled(total, Duration::from_secs(30)).await;
    let (_, lost) = report("connection resets x4", &ids, &env.pusher_counts());
    assert_eq!(lost, 0);

    let statuses = env.statuses().await;
    assert_eq!(statuses.get("sent"), Some(&total), "{statuses:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_past_their_limit_go_dead_and_can_be_retried_by_hand() {
    let env = Env::with("dead", "", "").await;
    env.pusher.fail_next(10_000, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 5, 5).await;
    let s = env.wait_settled(5, Duration::from_secs(30)).await;
    assert_eq!(s.get("dead"), Some(&5), "max_attempts = 6 exhausted: {s:?}");
    let error: String =
        client.query_one("SELECT last_error FROM outbox_relay.deliveries LIMIT 1", &[]).await.unwrap().get(0);
    assert!(error.contains("gave up after 6 attempts"), "{error}");

    env.pusher.recover();
    let ledger = outbox_relay::ledger::Ledger::new(env.db.client().await, "outbox_relay");
    assert_eq!(ledger.retry_dead(None).await.unwrap(), 5);
    let s = env.wait_settled(5, Duration::from_secs(30)).await;
    assert_eq!(s.get("sent"), Some(&5), "{s:?}");
    let (dups, lost) = report("dead then retried", &ids, &env.pusher_counts());
    assert_eq!((dups, lost), (0, 0));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_sends_fresh_deliveries_to_the_fallback_and_never_to_both() {
    let ably = FakeAbly::start("appid.keyid:secret");
    let extra = format!(
        "circuit_failures = 3\n\n[providers.ably]\napi_key = \"appid.keyid:secret\"\nbase_url = \"{}\"\n",
        ably.base_url()
    );
    let env = Env::with("circuit", "fallback = \"ably\"", &extra).await;
    env.pusher.fail_next(10_000, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;

    // A: tried on Pusher, which fails until the circuit opens.
    let a = insert_notifications(&client, 10, 10).await;
    env.wait_circuit_open(Duration::from_secs(20)).await;
    // B: fresh while the circuit is open → Ably.
    let b = insert_notifications(&client, 10, 10).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ably.messages().len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "fallback not used: {} on Ably", ably.messages().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Pusher recovers; the half-open probe closes the circuit; A goes out on Pusher.
    env.pusher.recover();
    env.wait_settled(20, Duration::from_secs(30)).await;
    // C: after recovery → Pusher again.
    let c = insert_notifications(&client, 10, 10).await;
    env.wait_settled(30, Duration::from_secs(30)).await;

    let on_pusher: BTreeSet<i64> = env.pusher_counts().into_keys().collect();
    let on_ably: BTreeSet<i64> = ably.messages().iter().filter_map(|m| m.data["id"].as_i64()).collect();
    assert!(on_pusher.is_disjoint(&on_ably), "no delivery reached both: {:?}", on_pusher.intersection(&on_ably));
    assert!(a.iter().all(|id| on_pusher.contains(id)), "A stayed with Pusher");
    assert!(b.iter().all(|id| on_ably.contains(id)), "B went to the fallback");
    assert!(c.iter().all(|id| on_pusher.contains(id)), "C back on Pusher after the probe");
    let all: Vec<i64> = a.iter().chain(&b).chain(&c).copied().collect();
    let mut counts = env.pusher_counts();
    for m in ably.messages() {
        *counts.entry(m.data["id"].as_i64().unwrap()).or_default() += 1;
    }
    let (dups, lost) = report("circuit to fallback and back", &all, &counts);
    assert_eq!((dups, lost), (0, 0));
    relay.stop().await;
}
