//! Google service-account auth and the Pub/Sub sink against wire-level fakes
//! of Google's token endpoint and Pub/Sub (tests/support/fakes/{google_auth,pubsub}.rs),
//! then the relay end to end onto the fake Pub/Sub in both source modes.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outbox_relay::config::{Config, Secret};
use outbox_relay::providers::bus::pubsub::{PubSub, PubSubConfig};
use outbox_relay::providers::bus::{BusMessage, BusRoute, EnvelopeMode};
use outbox_relay::providers::google_auth::{GoogleAuth, ServiceAccountKey};
use outbox_relay::providers::{http_client, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::google_auth::{FakeGoogleToken, OTHER_KEY_PEM, PROJECT};
use support::fakes::pubsub::FakePubSub;
use support::relay::{insert_notifications, Env, Mode};
use tokio::sync::watch;

const SCOPE: &str = "https://www.googleapis.com/auth/pubsub";

fn auth(fake: &FakeGoogleToken) -> GoogleAuth {
    let key = ServiceAccountKey::from_json(&fake.key_json()).unwrap();
    GoogleAuth::new(key, SCOPE, http_client(), Duration::from_secs(2))
}

#[tokio::test]
async fn one_token_is_minted_for_many_concurrent_callers_and_reused() {
    let fake = FakeGoogleToken::start(&[SCOPE]);
    let auth = auth(&fake);
    let tokens = futures_util::future::join_all((0..20).map(|_| auth.token())).await;
    let tokens: BTreeSet<String> = tokens.into_iter().map(|t| t.unwrap().expose().to_string()).collect();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(fake.requests(), 1, "one token request for twenty callers");
    auth.token().await.unwrap();
    assert_eq!(fake.requests(), 1, "cached while far from expiry");
    assert_eq!(fake.rejections(), Vec::<String>::new(), "the JWT passed the endpoint's checks");
}

#[tokio::test]
async fn a_token_at_its_renewal_point_is_replaced() {
    let fake = FakeGoogleToken::start(&[SCOPE]);
    // expires_in 0: already inside the renewal margin when it arrives.
    fake.set_expires_in(0);
    let auth = auth(&fake);
    let first = auth.token().await.unwrap();
    let second = auth.token().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(fake.minted(), 2);
}

#[tokio::test]
async fn a_wrong_key_or_scope_is_unauthorized_and_outages_are_retryable() {
    let fake = FakeGoogleToken::start(&[SCOPE]);
    let other = ServiceAccountKey::from_json(&fake.key_json_with(OTHER_KEY_PEM)).unwrap();
    let e = GoogleAuth::new(other, SCOPE, http_client(), Duration::from_secs(2)).token().await.unwrap_err();
    assert!(matches!(&e, ProviderError::Unauthorized { reason } if reason.contains("Invalid JWT Signature")), "{e:?}");
    let key = ServiceAccountKey::from_json(&fake.key_json()).unwrap();
    let e =
        GoogleAuth::new(key, "https://www.googleapis.com/auth/cloud-platform", http_client(), Duration::from_secs(2))
            .token()
            .await
            .unwrap_err();
    assert!(matches!(e, ProviderError::Unauthorized { .. }), "{e:?}");
    fake.fail_next(1, 503, Some("4"));
    let e = auth(&fake).token().await.unwrap_err();
    assert_eq!(e, ProviderError::Retryable { reason: e.to_string(), retry_after: Some(Duration::from_secs(4)) });
}

// --- Pub/Sub ------------------------------------------------------------------------------------

fn route(destination: &str, mode: EnvelopeMode, ordering: bool) -> Arc<BusRoute> {
    Arc::new(BusRoute {
        destination: destination.into(),
        exchange: String::new(),
        key: "{recipient}".into(),
        headers: [("team".to_string(), "t-{recipient}".to_string())].into(),
        mode,
        source: None,
        events: Default::default(),
        ordering,
    })
}

fn message(seq: i64, recipient: &str, route: &Arc<BusRoute>) -> OutboundMessage {
    OutboundMessage {
        delivery_id: seq,
        idempotency_key: format!("or1-key-{seq}"),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload: json!({"id": seq}),
        contact: None,
        bus: Some(BusMessage {
            route: route.clone(),
            source: "/app/public.orders".into(),
            recipient: Some(recipient.into()),
            time: Utc::now(),
        }),
        devices: vec![],
        correlation: None,
    }
}

fn pubsub_cfg(fake: &FakePubSub, timeout_ms: u64) -> PubSubConfig {
    PubSubConfig {
        project: None,
        service_account_file: None,
        service_account_json: None,
        base_url: Some(fake.base_url()),
        timeout_ms,
    }
}

fn pubsub(tokens: &FakeGoogleToken, fake: &FakePubSub, timeout_ms: u64) -> PubSub {
    let key = ServiceAccountKey::from_json(&tokens.key_json()).unwrap();
    PubSub::new(&pubsub_cfg(fake, timeout_ms), key, http_client()).unwrap()
}

#[tokio::test]
async fn pubsub_publishes_one_call_per_topic_with_attributes_ids_and_ordering_keys() {
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakePubSub::start(PROJECT, &["orders", "audit"], tokens.state.clone());
    let client = pubsub(&tokens, &fake, 2000);
    let orders = route("orders", EnvelopeMode::Structured, false);
    let audit = route("projects/demo-project/topics/audit", EnvelopeMode::Binary, true);
    let batch =
        [message(1, "42", &orders), message(2, "42", &audit), message(3, "7", &orders), message(4, "42", &audit)];

    let results = client.send_batch(&batch).await;

    let ids: Vec<String> = results.iter().map(|r| r.clone().unwrap().provider_message_id.unwrap()).collect();
    assert_eq!(fake.rejections(), vec![]);
    let mut calls = fake.calls();
    calls.sort();
    assert_eq!(calls, vec![2, 2], "one call per topic (and ordering key)");
    let stored = fake.stored();
    assert_eq!(tokens.minted(), 1, "both calls shared one token");
    for (m, id) in batch.iter().zip(&ids) {
        let s = stored.iter().find(|s| &s.message_id == id).expect("each result carries its own messageId");
        assert_eq!(s.attributes["key"], m.idempotency_key, "consumers dedup on the delivery key");
        assert_eq!(s.attributes["event"], "order_shipped");
        assert_eq!(s.attributes["recipient"], m.bus.as_ref().unwrap().recipient.clone().unwrap());
        assert_eq!(s.attributes["team"], format!("t-{}", s.attributes["recipient"]), "route headers, filled");
        if s.topic == "orders" {
            assert_eq!(s.ordering_key, "", "no ordering unless the route asks");
            assert_eq!(s.attributes["content-type"], "application/cloudevents+json");
            let event: serde_json::Value = serde_json::from_slice(&s.data).unwrap();
            assert_eq!(event["id"], m.idempotency_key);
            assert_eq!(event["data"], m.payload);
        } else {
            assert_eq!(s.topic, "audit");
            assert_eq!(s.ordering_key, "42", "ordering key = the message key (the recipient)");
            assert_eq!(s.attributes["ce-id"], m.idempotency_key, "binary mode: ce- attributes");
            assert_eq!(serde_json::from_slice::<serde_json::Value>(&s.data).unwrap(), m.payload);
        }
    }
}

#[tokio::test]
async fn pubsub_splits_ordering_keys_and_refuses_what_pubsub_would() {
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakePubSub::start(PROJECT, &["orders"], tokens.state.clone());
    let client = pubsub(&tokens, &fake, 2000);
    let ordered = route("orders", EnvelopeMode::Structured, true);
    let mut big = message(3, "1", &ordered);
    big.payload = json!({"blob": "x".repeat(10_000_001)});
    let mut long_header = message(4, "1", &route("orders", EnvelopeMode::Structured, false));
    let mut headers = BTreeMap::new();
    headers.insert("note".to_string(), "y".repeat(1025));
    long_header.bus.as_mut().unwrap().route = Arc::new(BusRoute { headers, ..(*ordered).clone() });
    let bad_topic = message(5, "1", &route("9-starts-with-a-digit", EnvelopeMode::Structured, false));
    let other_project = message(6, "1", &route("projects/elsewhere/topics/orders", EnvelopeMode::Structured, false));
    let batch = [message(1, "a", &ordered), message(2, "b", &ordered), big, long_header, bad_topic, other_project];

    let results = client.send_batch(&batch).await;

    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    for (i, what) in [(2, "exceeds the limit"), (3, "attribute"), (4, "not a valid topic"), (5, "outside")] {
        assert!(
            matches!(&results[i], Err(ProviderError::Permanent { reason }) if reason.contains(what)),
            "{i}: {:?}",
            results[i]
        );
    }
    assert_eq!(fake.calls(), vec![1, 1], "two ordering keys: two calls, as Pub/Sub requires");
    assert_eq!(fake.rejections(), vec![], "nothing Pub/Sub would refuse was sent");
}

#[tokio::test]
async fn pubsub_faults_have_the_providers_error_classes() {
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakePubSub::start(PROJECT, &["orders"], tokens.state.clone());
    let client = pubsub(&tokens, &fake, 300);
    let r = route("orders", EnvelopeMode::Structured, false);
    let one = |seq| [message(seq, "42", &r)];

    fake.faults().fail_next(1, 503, None);
    assert!(client.send_batch(&one(1)).await[0].as_ref().unwrap_err().is_retryable(), "503");
    fake.faults().fail_next(1, 429, Some("7"));
    match &client.send_batch(&one(2)).await[0] {
        Err(ProviderError::Retryable { retry_after, .. }) => assert_eq!(*retry_after, Some(Duration::from_secs(7))),
        other => panic!("429: {other:?}"),
    }
    fake.faults().set_delay(Duration::from_millis(1500));
    match &client.send_batch(&one(3)).await[0] {
        Err(ProviderError::Retryable { reason, .. }) => assert!(reason.contains("no answer within 300 ms"), "{reason}"),
        other => panic!("timeout: {other:?}"),
    }
    fake.faults().clear();

    // A topic nobody created yet: retried until someone does, as on every bus.
    let missing = route("not-yet", EnvelopeMode::Structured, false);
    let e = client.send_batch(&[message(4, "42", &missing)]).await.remove(0).unwrap_err();
    assert!(e.is_retryable() && e.to_string().contains("does not exist"), "{e:?}");
    fake.create_topic("not-yet");
    assert!(client.send_batch(&[message(4, "42", &missing)]).await[0].is_ok());

    // A revoked token (key rotated): one 401, a fresh token, sent.
    tokens.revoke_all();
    assert!(client.send_batch(&one(5)).await[0].is_ok());
    assert_eq!(tokens.minted(), 2, "a fresh token after the 401");

    // No credentials that work: unauthorized, and nothing stored.
    let before = fake.stored().len();
    let other = ServiceAccountKey::from_json(&tokens.key_json_with(OTHER_KEY_PEM)).unwrap();
    let stranger = PubSub::new(&pubsub_cfg(&fake, 2000), other, http_client()).unwrap();
    assert!(matches!(stranger.send_batch(&one(6)).await[0], Err(ProviderError::Unauthorized { .. })));
    assert_eq!(fake.stored().len(), before);
}

#[test]
fn pubsub_config_reads_the_key_file_and_needs_a_project() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    let key = json!({"type": "service_account", "private_key": support::fakes::google_auth::KEY_PEM,
                     "client_email": "a@b.iam.gserviceaccount.com"});
    std::fs::write(&path, key.to_string()).unwrap();
    let cfg = |project: Option<&str>, json: Option<Secret>| PubSubConfig {
        project: project.map(str::to_string),
        service_account_file: json.is_none().then(|| path.to_str().unwrap().to_string()),
        service_account_json: json,
        base_url: None,
        timeout_ms: 1000,
    };
    let ctx = outbox_relay::providers::BuildContext { http: http_client(), tls: Default::default() };
    let e = PubSub::build(&cfg(None, None), &ctx).unwrap_err();
    assert!(e.to_string().contains("project"), "{e}");
    PubSub::build(&cfg(Some("p"), None), &ctx).expect("key file read");
    PubSub::build(&cfg(Some("p"), Some(Secret::new(key.to_string()))), &ctx).expect("inline key");
}

/// The relay onto Pub/Sub: 20 notifications, one message each, keyed by the
/// ledger's delivery key; in both source modes.
async fn pubsub_end_to_end(mode: Mode) {
    let env = Env::in_mode(mode, &format!("pubsub{}", if mode == Mode::Logical { "l" } else { "n" })).await;
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakePubSub::start(PROJECT, &["notifications"], tokens.state.clone());
    let key_path = env.dir.path().join("sa.json");
    std::fs::write(&key_path, tokens.key_json()).unwrap();
    let toml = env.config_toml("127.0.0.1:0").replacen(
        "provider = \"pusher\"",
        "provider = \"pubsub\"\nbus = { destination = \"notifications\", ordering = true }",
        1,
    ) + &format!(
        "\n[providers.pubsub]\nservice_account_file = \"{}\"\nbase_url = \"{}\"\ntimeout_ms = 2000\n",
        key_path.display(),
        fake.base_url()
    );
    let cfg = Config::from_toml(&toml).expect("pubsub config is valid");
    let (stop, rx) = watch::channel(false);
    let relay = tokio::spawn(outbox_relay::app::run(cfg, rx));
    env.wait_streaming().await;
    let client = env.db.client().await;
    let ids = insert_notifications(&client, 20, 5).await;
    let statuses = env.wait_settled(20, Duration::from_secs(30)).await;
    assert_eq!(statuses.get("sent"), Some(&20), "{statuses:?}");
    let ledger = client
        .query("SELECT idempotency_key, recipient, provider_message_id FROM outbox_relay.deliveries", &[])
        .await
        .unwrap();
    let stored = fake.stored();
    assert_eq!(stored.len(), 20, "one message per delivery");
    for row in &ledger {
        let (key, recipient, message_id): (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
        let s = stored.iter().find(|s| s.attributes["key"] == key).expect("each delivery published");
        assert_eq!(message_id.as_deref(), Some(s.message_id.as_str()), "messageId in the ledger");
        assert_eq!(s.ordering_key, recipient);
        let event: serde_json::Value = serde_json::from_slice(&s.data).unwrap();
        assert!(ids.contains(&event["data"]["id"].as_i64().unwrap()));
        assert_eq!(event["type"], "notification_created");
    }
    assert!(env.pusher.events().is_empty());
    let _ = stop.send(true);
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_end_to_end_logical() {
    pubsub_end_to_end(Mode::Logical).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_end_to_end_listen() {
    pubsub_end_to_end(Mode::Listen).await;
}
