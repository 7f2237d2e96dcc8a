//! Push to devices end to end (issue 14): a real PostgreSQL, the relay
//! in-process, and a local Web Push service that verifies each request's
//! VAPID token and decrypts each message with the subscriber's private key.
//!
//! One recipient with a live and an unsubscribed browser: the live one gets
//! the notification exactly once, the dead one is forgotten through
//! `on_invalid_token`. Another whose second device answers 503 once: the
//! retry goes to that device alone. A recipient without a subscription is
//! skipped ("no device"); one whose only device is gone fails, saying so;
//! one with more than 100 devices (a query without its WHERE) fails too.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::fakes::webpush::PushService;
use support::relay::{Env, Mode};

const SUBSCRIPTIONS: &str = "
CREATE TABLE push_subscription (
    id serial PRIMARY KEY,
    user_id integer NOT NULL,
    endpoint text NOT NULL,
    p256dh text NOT NULL,
    auth text NOT NULL
);";

fn push_toml(key_file: &str) -> String {
    format!(
        r#"
[channels.push]
provider = "webpush"
tokens_query = "SELECT endpoint, p256dh, auth FROM push_subscription WHERE user_id = $1 ORDER BY id"
on_invalid_token = "DELETE FROM push_subscription WHERE endpoint = $1"

[providers.webpush]
private_key = "file:{key_file}"
subject = "mailto:ops@example.com"
ttl_s = 600
urgency = "high"
timeout_ms = 2000
"#
    )
}

async fn outbox(client: &tokio_postgres::Client, user: i32, order: i32) -> i64 {
    let payload = serde_json::json!({"title": format!("Commande {order}"), "order": order});
    client
        .query_one(
            "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
             VALUES ('order_shipped', $1, '{push}', $2) RETURNING id",
            &[&user, &payload],
        )
        .await
        .unwrap()
        .get(0)
}

async fn push_reaches_each_live_device_once(mode: Mode) {
    let (pem, public) = outbox_relay::providers::webpush::vapid::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("vapid.pem");
    std::fs::write(&key_file, pem).unwrap();
    let service = PushService::start().await.unwrap();
    let env = Env::prepared(mode, "webpush", SUBSCRIPTIONS, &push_toml(key_file.to_str().unwrap())).await;
    let client = env.db.client().await;
    // Browsers subscribed with the relay's public key as applicationServerKey.
    let mut endpoints = BTreeMap::new();
    for (user, device) in [(7, "live7"), (7, "dead7"), (8, "c8"), (8, "d8"), (9, "dead9")] {
        let s = service.subscribe(device, Some(&public));
        client
            .execute(
                "INSERT INTO push_subscription (user_id, endpoint, p256dh, auth) VALUES ($1, $2, $3, $4)",
                &[&user, &s.endpoint, &s.p256dh, &s.auth],
            )
            .await
            .unwrap();
        endpoints.insert(device, s.endpoint);
    }
    // The same browser stored twice is one device.
    client
        .execute("INSERT INTO push_subscription (user_id, endpoint, p256dh, auth) SELECT user_id, endpoint, p256dh, auth FROM push_subscription WHERE endpoint = $1", &[&endpoints["live7"]])
        .await
        .unwrap();
    // A query that forgot its WHERE would send to everyone: past 100 devices, refused.
    client
        .execute(
            "INSERT INTO push_subscription (user_id, endpoint, p256dh, auth)
             SELECT 11, 'https://push.example.net/push/' || n, 'k', 'a' FROM generate_series(1, 101) n",
            &[],
        )
        .await
        .unwrap();
    service.unsubscribe("dead7");
    service.unsubscribe("dead9");
    service.fail_next("d8", 1, 503, Some("0"));

    let relay = env.start_in_process();
    env.wait_streaming().await;
    let to_7 = outbox(&client, 7, 1).await;
    let to_8 = outbox(&client, 8, 2).await;
    let to_9 = outbox(&client, 9, 3).await;
    let to_10 = outbox(&client, 10, 4).await;
    let to_11 = outbox(&client, 11, 5).await;
    env.wait_settled(5, Duration::from_secs(30)).await;
    relay.stop().await;

    let row = |id: i64| {
        let client = &client;
        async move {
            let r = client
                .query_one(
                    "SELECT status, attempts, last_error FROM outbox_relay.deliveries
                     WHERE source_pk = $1::bigint::text AND channel = 'push'",
                    &[&id],
                )
                .await
                .unwrap();
            (r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, Option<String>>(2))
        }
    };
    let received = service.received();
    let count = |device: &str| received.iter().filter(|r| r.subscription == device).count();

    // Recipient 7: the live browser got it once, decrypted; the dead one was forgotten.
    assert_eq!(row(to_7).await.0, "sent");
    assert_eq!(count("live7"), 1, "{received:?}");
    assert_eq!(count("dead7"), 0);
    let push: serde_json::Value =
        serde_json::from_str(&received.iter().find(|r| r.subscription == "live7").unwrap().plaintext).unwrap();
    assert_eq!(push["event"], "order_shipped");
    assert_eq!(push["data"]["order"], 1);
    assert!(push["key"].as_str().is_some_and(|k| !k.is_empty()), "{push}");
    let first = &received[0];
    assert_eq!(
        (first.ttl, first.urgency.as_deref(), first.sender.as_str()),
        (600, Some("high"), "mailto:ops@example.com")
    );
    let left: Vec<String> = client
        .query("SELECT endpoint FROM push_subscription ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!left.contains(&endpoints["dead7"]) && !left.contains(&endpoints["dead9"]), "on_invalid_token ran");
    assert!(left.contains(&endpoints["live7"]) && left.contains(&endpoints["c8"]));

    // Recipient 8: one 503 on d8; the retry went to d8 alone.
    let (status, attempts, _) = row(to_8).await;
    assert_eq!((status.as_str(), attempts), ("sent", 2));
    assert_eq!((count("c8"), count("d8")), (1, 1), "each device exactly once: {received:?}");
    let refused_503: Vec<_> = service.refused().into_iter().filter(|(_, s, _)| *s == 503).collect();
    assert_eq!(refused_503.len(), 1, "{refused_503:?}");

    // Recipient 9: every device gone; recipient 10: none at all.
    let (status, _, error) = row(to_9).await;
    assert_eq!(status, "failed");
    assert!(error.as_deref().unwrap_or("").contains("all 1 device(s) are gone"), "{error:?}");
    let (status, _, error) = row(to_10).await;
    assert_eq!((status.as_str(), error.as_deref()), ("skipped", Some("no device")));

    let (status, _, error) = row(to_11).await;
    assert_eq!(status, "failed");
    assert!(error.as_deref().unwrap_or("").contains("more than 100"), "{error:?}");

    // Per-device outcomes hold hashes, never the endpoints.
    let kept: Vec<(String, i64)> = client
        .query("SELECT status, count(*) FROM outbox_relay.device_sends GROUP BY 1 ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kept, [("gone".to_string(), 2), ("sent".to_string(), 3)]);
    // And the ledger's errors never quote an endpoint.
    let errors: Vec<Option<String>> = client
        .query("SELECT last_error FROM outbox_relay.deliveries", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors.iter().flatten().all(|e| !e.contains("/push/")), "{errors:?}");

    // Erasure takes a person's device trail with it; retention the rest.
    let device_rows = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM outbox_relay.device_sends s JOIN outbox_relay.deliveries d
                     ON d.id = s.delivery_id WHERE d.source_pk = $1::bigint::text",
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(device_rows(to_7).await, 2);
    outbox_relay::gdpr::erase(&mut env.db.client().await, "outbox_relay", "7").await.unwrap();
    assert_eq!(device_rows(to_7).await, 0, "erase deletes the recipient's device_sends");
    assert_eq!(device_rows(to_8).await, 2, "and only theirs");
    client.execute("UPDATE outbox_relay.deliveries SET updated_at = now() - interval '400 days'", &[]).await.unwrap();
    let pruned = outbox_relay::retention::prune(&client, &env.config(), false).await.unwrap();
    assert_eq!(pruned, 5, "every settled delivery is past retention");
    let left: i64 = client.query_one("SELECT count(*) FROM outbox_relay.device_sends", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "device_sends pruned with their deliveries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_reaches_each_live_device_once_logical() {
    push_reaches_each_live_device_once(Mode::Logical).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_reaches_each_live_device_once_listen() {
    push_reaches_each_live_device_once(Mode::Listen).await;
}
