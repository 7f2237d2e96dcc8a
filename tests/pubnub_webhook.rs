//! PubNub and the Standard Webhooks signed webhook: their clients against
//! wire-level fakes on 127.0.0.1 (the same fault cases as tests/providers.rs),
//! the fakes' own checks, one end-to-end relay run through both, and PubNub
//! as the fallback of a failing Pusher channel.

mod support;

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_relay::providers::pubnub::Pubnub;
use outbox_relay::providers::webhook::{Webhook, WebhookConfigError};
use outbox_relay::providers::{http_client, Accepted, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::pubnub::FakePubnub;
use support::fakes::webhook::FakeWebhook;
use support::relay::{free_port, insert_notifications, scrape_counter, Env, Mode};

const PUB: &str = "pub-c-0f9faa0e";
const SUB: &str = "sub-c-c10cec8f";
const SEC: &str = "sec-c-Nzk2ZTU2MTYtYzBm";
/// 24 random bytes, `whsec_`-prefixed base64 (the spec's format).
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn msg(seq: i64, channel: &str) -> OutboundMessage {
    OutboundMessage {
        delivery_id: seq,
        idempotency_key: format!("or2-{seq:032x}"),
        channel_name: channel.to_string(),
        event: "notification_created".to_string(),
        payload: json!({"seq": seq, "text": format!("hello {seq}")}),
        contact: None,
        bus: None,
        devices: Vec::new(),
        correlation: None,
    }
}

fn expect_retryable(result: &Result<Accepted, ProviderError>) -> Option<Duration> {
    match result {
        Err(ProviderError::Retryable { retry_after, .. }) => *retry_after,
        other => panic!("expected Retryable, got {other:?}"),
    }
}

fn pubnub(fake: &FakePubnub) -> Pubnub {
    Pubnub::new(&fake.config(), http_client())
}

fn webhook(fake: &FakeWebhook, path: &str) -> Webhook {
    Webhook::new(&fake.config(path), http_client()).unwrap()
}

// ---------------------------------------------------------------- PubNub

#[tokio::test]
async fn pubnub_signed_publish_carries_the_event_and_records_the_timetoken() {
    let fake = FakePubnub::start(PUB, SUB, Some(SEC));
    let mut odd = msg(2, "café.user-42");
    odd.event = "notification.created".into();

    let results = pubnub(&fake).send_batch(&[msg(1, "private-user-42"), odd]).await;

    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let timetoken = results[0].as_ref().unwrap().provider_message_id.clone().unwrap();
    assert_eq!(timetoken.len(), 17, "PubNub's 17-digit timetoken: {timetoken}");
    assert_eq!(fake.rejections(), vec![]);
    let mut got = fake.published();
    got.sort_by_key(|p| p.message["seq"].as_i64());
    assert_eq!(got[0].channel, "private-user-42");
    assert_eq!(got[0].message, json!({"seq": 1, "text": "hello 1"}));
    assert_eq!(got[0].meta, Some(json!({"event": "notification_created", "key": format!("or2-{:032x}", 1)})));
    assert_eq!(got[0].custom_message_type.as_deref(), Some("notification_created"));
    assert_eq!(got[0].uuid, "outbox-relay");
    assert!(got.iter().all(|p| p.signed), "every publish signed");
    // Non-ASCII and '.' in the channel: encoded in the path and signed as sent.
    assert_eq!(got[1].channel, "café.user-42");
    assert_eq!(got[1].meta.as_ref().unwrap()["event"], "notification.created");
    assert_eq!(got[1].custom_message_type, None, "a '.' is outside custom_message_type's characters");
}

#[tokio::test]
async fn pubnub_without_a_secret_key_publishes_unsigned() {
    let fake = FakePubnub::start(PUB, SUB, None);
    let results = pubnub(&fake).send_batch(&[msg(1, "c")]).await;
    assert!(results[0].is_ok(), "{results:?}");
    assert!(!fake.published()[0].signed);
}

#[tokio::test]
async fn pubnub_wrong_secret_or_key_is_unauthorized_and_nothing_is_published() {
    let fake = FakePubnub::start(PUB, SUB, Some(SEC));
    let mut cfg = fake.config();
    cfg.secret_key = Some(outbox_relay::config::Secret::new("sec-c-wrong"));
    let bad_secret = Pubnub::new(&cfg, http_client()).send_batch(&[msg(1, "c")]).await;
    let mut cfg = fake.config();
    cfg.publish_key = "pub-c-other".into();
    let bad_key = Pubnub::new(&cfg, http_client()).send_batch(&[msg(1, "c")]).await;

    assert!(
        matches!(&bad_secret[0], Err(ProviderError::Unauthorized { reason }) if reason == "pubnub answered 403: Signature does not match"),
        "{bad_secret:?}"
    );
    assert!(
        matches!(&bad_key[0], Err(ProviderError::Unauthorized { reason }) if reason.contains("Invalid Key")),
        "{bad_key:?}"
    );
    assert!(fake.published().is_empty());
    assert_eq!(fake.rejections().len(), 2);
}

#[tokio::test]
async fn pubnub_oversized_message_and_bad_channel_fail_alone_without_a_call() {
    let fake = FakePubnub::start(PUB, SUB, Some(SEC));
    let mut big = msg(2, "c");
    big.payload = json!({"blob": "x".repeat(32 * 1024)});

    let results = pubnub(&fake).send_batch(&[msg(1, "c"), big, msg(3, "user:3")]).await;

    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(ProviderError::Permanent { reason }) if reason == "payload of 32779 bytes exceeds PubNub's 32 KiB limit"),
        "{results:?}"
    );
    assert!(matches!(&results[2], Err(ProviderError::Permanent { reason }) if reason.contains("user:3")));
    assert_eq!(fake.requests(), 1, "only the valid message was sent");
}

#[tokio::test]
async fn pubnub_503_429_timeout_reset_and_refused_are_retryable() {
    let fake = FakePubnub::start(PUB, SUB, Some(SEC));
    let client = pubnub(&fake);
    fake.faults().fail_next(1, 503, None);
    fake.faults().fail_next(1, 429, Some("7"));
    assert_eq!(expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]), None);
    assert_eq!(expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]), Some(Duration::from_secs(7)));

    fake.faults().reset_connections_next(1);
    expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]);
    assert!(fake.published().is_empty());
    assert!(client.send_batch(&[msg(1, "c")]).await[0].is_ok(), "the retry after a reset works");

    fake.faults().set_delay(Duration::from_secs(3));
    let mut cfg = fake.config();
    cfg.timeout_ms = 200;
    let timed_out = Pubnub::new(&cfg, http_client()).send_batch(&[msg(2, "c")]).await;
    assert!(matches!(&timed_out[0], Err(ProviderError::Retryable { reason, .. }) if reason.contains("200 ms")));

    let mut cfg = fake.config();
    cfg.base_url = Some(format!("http://127.0.0.1:{}", free_port()));
    expect_retryable(&Pubnub::new(&cfg, http_client()).send_batch(&[msg(3, "c")]).await[0]);
}

#[tokio::test]
async fn pubnub_fake_refuses_what_pubnub_refuses() {
    let fake = FakePubnub::start(PUB, SUB, Some(SEC));
    // Signed here from the documented rules, apart from the client.
    let send = |timestamp: i64, body: String, extra: &str| {
        let path = format!("/publish/{PUB}/{SUB}/0/c/0");
        let query = format!("{extra}timestamp={timestamp}&uuid=u");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SEC.as_bytes()).unwrap();
        mac.update(format!("GET\n{PUB}\n{path}\n{query}\n").as_bytes());
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        let url = format!("{}{path}?{query}&signature=v2.{sig}", fake.base_url());
        async move { reqwest::Client::new().post(url).body(body).send().await.unwrap().status().as_u16() }
    };
    let now = chrono::Utc::now().timestamp();
    assert_eq!(send(now, "{}".into(), "").await, 200);
    assert_eq!(send(now - 120, "{}".into(), "").await, 403, "timestamp more than 60 s off");
    assert_eq!(send(now, format!("\"{}\"", "x".repeat(32 * 1024)), "").await, 413);
    assert_eq!(send(now, "not json".into(), "").await, 400);
    assert_eq!(send(now, "{}".into(), "custom_message_type=a.b&").await, 400);
    assert_eq!(send(now, "{}".into(), "meta=%5B1%5D&").await, 400, "meta must be an object");
    assert_eq!(fake.published().len(), 1);
    assert_eq!(fake.rejections().len(), 5);
}

// ---------------------------------------------------------------- Signed webhook

#[tokio::test]
async fn webhook_delivery_is_signed_routed_by_path_and_deduplicated_by_id() {
    let fake = FakeWebhook::start(WHSEC);
    let client = webhook(&fake, "/hooks/{channel}?event={event}");

    let first = client.send_batch(&[msg(1, "user 42"), msg(2, "user-7")]).await;
    // A re-send of delivery 1 (after a crash): same webhook-id, fresh timestamp and signature.
    let again = client.send_batch(&[msg(1, "user 42")]).await;

    assert!(first.iter().chain(&again).all(Result::is_ok), "{first:?} {again:?}");
    assert_eq!(fake.requests(), 3);
    let mut got = fake.processed();
    got.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(got.len(), 2, "the receiver processed the re-send once");
    assert_eq!(got[0].target, "/hooks/user%2042?event=notification_created");
    assert_eq!(got[0].id, format!("or2-{:032x}", 1));
    assert_eq!(
        got[0].body,
        json!({"type": "notification_created", "recipient": "user 42", "key": got[0].id,
               "data": {"seq": 1, "text": "hello 1"}})
    );
    assert!((chrono::Utc::now().timestamp() - got[0].timestamp).abs() < 60);
}

#[tokio::test]
async fn webhook_wrong_secret_is_unauthorized() {
    let fake = FakeWebhook::start(WHSEC);
    let mut cfg = fake.config("/hooks");
    cfg.secret = outbox_relay::config::Secret::new(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([9u8; 32])
    ));
    let results = Webhook::new(&cfg, http_client()).unwrap().send_batch(&[msg(1, "c")]).await;
    assert!(
        matches!(&results[0], Err(ProviderError::Unauthorized { reason }) if reason.contains("401")),
        "{results:?}"
    );
    assert_eq!(fake.rejections(), vec![(401, "no matching v1 signature".to_string())]);
    assert!(fake.processed().is_empty());
}

#[tokio::test]
async fn webhook_410_gone_stops_calls_to_that_url_only() {
    let fake = FakeWebhook::start(WHSEC);
    fake.gone_under("/hooks/user-1");
    let client = webhook(&fake, "/hooks/{channel}");

    let first = client.send_batch(&[msg(1, "user-1")]).await;
    let later = client.send_batch(&[msg(2, "user-1"), msg(3, "user-2")]).await;

    assert!(
        matches!(&first[0], Err(ProviderError::Permanent { reason }) if reason.contains("gone (410)")),
        "{first:?}"
    );
    assert!(matches!(&later[0], Err(ProviderError::Permanent { reason }) if reason.contains("not called again")));
    assert!(later[1].is_ok(), "another URL still works: {later:?}");
    assert_eq!(fake.requests(), 2, "the gone URL was called once");
}

#[tokio::test]
async fn webhook_redirect_is_not_followed_and_fails() {
    let fake = FakeWebhook::start(WHSEC);
    let elsewhere = format!("{}/moved", fake.base_url());
    fake.faults().answer_next_raw(308, &[("location", &elsewhere)], b"");

    let results = webhook(&fake, "/hooks").send_batch(&[msg(1, "c")]).await;

    assert!(matches!(&results[0], Err(ProviderError::Permanent { reason }) if reason.contains("308")), "{results:?}");
    assert_eq!(fake.requests(), 1, "the Location was not requested");
    assert!(fake.processed().is_empty());
}

#[tokio::test]
async fn webhook_503_429_timeout_reset_and_refused_are_retryable() {
    let fake = FakeWebhook::start(WHSEC);
    let client = webhook(&fake, "/hooks");
    fake.faults().fail_next(1, 503, Some("2"));
    fake.faults().fail_next(1, 429, Some("7"));
    assert_eq!(expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]), Some(Duration::from_secs(2)));
    assert_eq!(expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]), Some(Duration::from_secs(7)));

    fake.faults().reset_connections_next(1);
    expect_retryable(&client.send_batch(&[msg(1, "c")]).await[0]);
    assert!(client.send_batch(&[msg(1, "c")]).await[0].is_ok(), "the retry after a reset works");

    fake.faults().set_delay(Duration::from_secs(3));
    let mut cfg = fake.config("/hooks");
    cfg.timeout_ms = 200;
    let timed_out = Webhook::new(&cfg, http_client()).unwrap().send_batch(&[msg(2, "c")]).await;
    assert!(matches!(&timed_out[0], Err(ProviderError::Retryable { reason, .. }) if reason.contains("200 ms")));

    let refused = FakeWebhook::start(WHSEC).config("/hooks");
    let cfg = outbox_relay::providers::webhook::WebhookConfig {
        url: format!("http://127.0.0.1:{}/hooks", free_port()),
        ..refused
    };
    expect_retryable(&Webhook::new(&cfg, http_client()).unwrap().send_batch(&[msg(3, "c")]).await[0]);
}

#[tokio::test]
async fn webhook_config_refuses_plain_http_bad_secrets_and_unknown_placeholders() {
    let fake = FakeWebhook::start(WHSEC);
    let mut cfg = fake.config("/hooks");
    cfg.allow_http = false;
    assert_eq!(Webhook::new(&cfg, http_client()).unwrap_err(), WebhookConfigError::Scheme);
    let mut cfg = fake.config("/hooks/{recipient}");
    assert_eq!(Webhook::new(&cfg, http_client()).unwrap_err(), WebhookConfigError::Placeholder("recipient".into()));
    cfg = fake.config("/hooks");
    cfg.secret = outbox_relay::config::Secret::new("whsec_c2hvcnQ=");
    let err = Webhook::new(&cfg, http_client()).unwrap_err();
    assert_eq!(err, WebhookConfigError::SecretLength(5));
    assert!(!err.to_string().contains("c2hvcnQ"), "the error never shows the secret");
}

/// The receiver's checks on their own, with requests signed here.
#[tokio::test]
async fn webhook_fake_verifies_like_the_spec_says() {
    let fake = FakeWebhook::start(WHSEC);
    let key = base64::engine::general_purpose::STANDARD.decode(&WHSEC[6..]).unwrap();
    let sign = |id: &str, ts: i64, body: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    };
    let post = |id: &str, ts: i64, signature: String, body: &str| {
        let request = reqwest::Client::new()
            .post(format!("{}/hooks", fake.base_url()))
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.to_string());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let now = chrono::Utc::now().timestamp();
    let body = r#"{"type":"t","data":{}}"#;
    assert_eq!(post("a", now, sign("a", now, body), body).await, 204);
    assert_eq!(post("b", now - 360, sign("b", now - 360, body), body).await, 401, "6 minutes old");
    assert_eq!(post("c", now + 360, sign("c", now + 360, body), body).await, 401, "6 minutes ahead");
    assert_eq!(post("d", now, sign("d", now, body), r#"{"type":"u","data":{}}"#).await, 401, "tampered body");
    let rotated = format!("v1,bm9wZQ== {}", sign("e", now, body));
    assert_eq!(post("e", now, rotated, body).await, 204, "one valid signature in the list is enough");
    assert_eq!(fake.processed().len(), 2);
    assert_eq!(fake.rejections().len(), 3);
}

// ---------------------------------------------------------------- End to end

/// Outbox rows routed to a PubNub channel and a signed-webhook channel: each
/// reaches its provider once, the ledger records PubNub's timetoken, and a
/// recipient whose webhook URL is gone fails (counted) while the others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delivers_outbox_rows_to_pubnub_and_a_signed_webhook() {
    let pn = FakePubnub::start(PUB, SUB, Some(SEC));
    let hook = FakeWebhook::start(WHSEC);
    hook.gone_under("/hooks/13");
    let port = free_port();
    let extra = format!(
        r#"
[channels.realtime]
provider = "pubnub"
channel_name = "inbox-{{recipient}}"

[channels.hook]
provider = "webhook"
channel_name = "{{recipient}}"

[providers.pubnub]
publish_key = "{PUB}"
subscribe_key = "{SUB}"
secret_key = "{SEC}"
base_url = "{pn_url}"

[providers.webhook]
url = "{hook_url}/hooks/{{channel}}"
secret = "{WHSEC}"
allow_http = true
"#,
        pn_url = pn.base_url(),
        hook_url = hook.base_url(),
    );
    let env = Env::with_mode(Mode::Logical, "pnhook", "", &extra).await;
    let relay = env.start_in_process_on(port);
    env.wait_streaming().await;
    let gone_before = scrape_counter(port, "outbox_relay_webhook_endpoint_gone_total").await.unwrap_or(0.0);
    let client = env.db.client().await;
    for (order, user) in (1..=6).zip([11, 12, 13, 14, 15, 16]) {
        let payload = json!({"title": format!("Commande {order}"), "order": order});
        client
            .execute(
                "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
                 VALUES ('order_shipped', $1, '{realtime,hook}', $2)",
                &[&user, &payload],
            )
            .await
            .unwrap();
    }
    let statuses = env.wait_settled(12, Duration::from_secs(30)).await;
    assert_eq!((statuses.get("sent"), statuses.get("failed")), (Some(&11), Some(&1)), "{statuses:?}");

    let mut on_pubnub: Vec<(String, i64)> =
        pn.published().iter().map(|p| (p.channel.clone(), p.message["order"].as_i64().unwrap())).collect();
    on_pubnub.sort();
    let want: Vec<(String, i64)> = (1..=6).map(|o| (format!("inbox-{}", 10 + o), o)).collect();
    assert_eq!(on_pubnub, want, "each row once, on its recipient's channel");
    assert!(pn.published().iter().all(|p| p.signed && p.custom_message_type.as_deref() == Some("order_shipped")));

    let mut on_hook: Vec<(String, i64)> =
        hook.processed().iter().map(|d| (d.target.clone(), d.body["data"]["order"].as_i64().unwrap())).collect();
    on_hook.sort();
    let want: Vec<(String, i64)> = (1..=6).filter(|o| *o != 3).map(|o| (format!("/hooks/{}", 10 + o), o)).collect();
    assert_eq!(on_hook, want, "each row once, except recipient 13's gone endpoint");
    assert_eq!(hook.requests(), 6, "no retries: 410 is final");

    let row = client
        .query_one(
            "SELECT d.idempotency_key, (SELECT provider_message_id FROM outbox_relay.deliveries
                                        WHERE channel = 'realtime' AND recipient = '11'),
                    d.last_error
             FROM outbox_relay.deliveries d WHERE d.channel = 'hook' AND d.recipient = '13'",
            &[],
        )
        .await
        .unwrap();
    let timetoken: Option<String> = row.get(1);
    assert_eq!(timetoken.map(|t| t.len()), Some(17), "PubNub's timetoken is recorded");
    let error: String = row.get(2);
    assert!(error.contains("gone (410)"), "{error}");
    let sent_id = hook.processed().iter().find(|d| d.target == "/hooks/11").unwrap().id.clone();
    let key_11: String = client
        .query_one(
            "SELECT idempotency_key FROM outbox_relay.deliveries WHERE channel = 'hook' AND recipient = '11'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent_id, key_11, "webhook-id is the ledger's idempotency key");
    // The counter is process-wide: webhook_410_gone_* may have counted its own 410 already.
    let gone = scrape_counter(port, "outbox_relay_webhook_endpoint_gone_total").await.unwrap();
    assert!(gone >= gone_before + 1.0, "the 410 is counted: {gone_before} -> {gone}");
    relay.stop().await;
}

/// Pusher down, its circuit open: fresh deliveries go to PubNub as the
/// channel's fallback, and none reaches both (the faults.rs pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubnub_takes_fresh_deliveries_as_fallback_while_pusher_is_down() {
    let pn = FakePubnub::start(PUB, SUB, Some(SEC));
    let extra = format!(
        "circuit_failures = 3\n\n[providers.pubnub]\npublish_key = \"{PUB}\"\nsubscribe_key = \"{SUB}\"\nsecret_key = \"{SEC}\"\nbase_url = \"{}\"\n",
        pn.base_url()
    );
    let env = Env::with("pnfallback", "fallback = \"pubnub\"", &extra).await;
    env.pusher.fail_next(10_000, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;

    // A: tried on Pusher, which fails until the circuit opens.
    let a = insert_notifications(&client, 10, 10).await;
    env.wait_circuit_open(Duration::from_secs(20)).await;
    // B: fresh while the circuit is open → PubNub.
    let b = insert_notifications(&client, 10, 10).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while pn.published().len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "fallback not used: {} on PubNub", pn.published().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.pusher.recover();
    env.wait_settled(20, Duration::from_secs(30)).await;

    let on_pusher = env.pusher_counts();
    let mut on_pubnub = std::collections::BTreeMap::<i64, usize>::new();
    for p in pn.published() {
        *on_pubnub.entry(p.message["id"].as_i64().unwrap()).or_default() += 1;
    }
    assert!(on_pusher.keys().all(|id| !on_pubnub.contains_key(id)), "no delivery reached both");
    assert!(a.iter().all(|id| on_pusher.get(id) == Some(&1)), "A stayed with Pusher, once each");
    assert!(b.iter().all(|id| on_pubnub.get(id) == Some(&1)), "B went to PubNub, once each: {on_pubnub:?}");
    assert!(pn.published().iter().all(|p| p.channel.starts_with("private-user-") && p.signed));
    relay.stop().await;
}
