//! The Pusher, Ably and log clients against wire-level fakes on 127.0.0.1.

mod support;

use std::time::Duration;

use outbox_relay::providers::ably::Ably;
use outbox_relay::providers::pusher::Pusher;
use outbox_relay::providers::{http_client, Accepted, OutboundMessage, Provider, ProviderError};
use serde_json::json;
use support::fakes::ably::FakeAbly;
use support::fakes::pusher::{FakePusher, ReceivedEvent};

const APP_ID: &str = "1234";
const KEY: &str = "278d425bdf160c739803";
const SECRET: &str = "7ad3773142a6692b25b8";
const ABLY_KEY: &str = "appid.keyid:s3cr3tValue";

fn msg(seq: i64, channel: &str) -> OutboundMessage {
    OutboundMessage {
        delivery_id: seq,
        idempotency_key: format!("delivery-{seq}"),
        channel_name: channel.to_string(),
        event: "notification.created".to_string(),
        payload: json!({"seq": seq, "text": format!("hello {seq}")}),
        contact: None,
        bus: None,
        devices: Vec::new(),
    }
}

fn pusher_for(fake: &FakePusher) -> Provider {
    Provider::Pusher(Pusher::new(&fake.config(), http_client()))
}

fn ably_for(fake: &FakeAbly) -> Provider {
    Provider::Ably(Ably::new(&fake.config(), http_client()))
}

fn expect_retryable(result: &Result<Accepted, ProviderError>) -> Option<Duration> {
    match result {
        Err(ProviderError::Retryable { retry_after, .. }) => *retry_after,
        other => panic!("expected Retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn pusher_signed_batch_is_accepted_and_delivered() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let results = pusher_for(&fake).send_batch(&[msg(1, "private-user-42")]).await;

    assert_eq!(results, vec![Ok(Accepted { provider_message_id: None })]);
    assert_eq!(fake.rejections(), vec![]);
    assert_eq!(
        fake.events(),
        vec![ReceivedEvent {
            channel: "private-user-42".into(),
            name: "notification.created".into(),
            data: json!({"seq": 1, "text": "hello 1"}),
        }]
    );
}

#[tokio::test]
async fn pusher_wrong_secret_is_unauthorized_and_nothing_is_delivered() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let mut cfg = fake.config();
    cfg.secret = outbox_relay::config::Secret::new("7ad3773142a6692b25b9");
    let pusher = Provider::Pusher(Pusher::new(&cfg, http_client()));

    let results = pusher.send_batch(&[msg(1, "private-user-1"), msg(2, "private-user-2")]).await;

    for r in &results {
        assert!(matches!(r, Err(ProviderError::Unauthorized { reason }) if reason.contains("401")), "{r:?}");
    }
    assert!(fake.events().is_empty());
    let rejections = fake.rejections();
    assert_eq!(rejections.len(), 1, "one batch call, refused once");
    assert_eq!(rejections[0].status, 401);
    assert!(rejections[0].reason.starts_with("Invalid signature"), "{:?}", rejections[0]);
}

#[tokio::test]
async fn pusher_twenty_five_messages_go_in_three_calls_of_at_most_ten() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let messages: Vec<_> = (0..25).map(|i| msg(i, &format!("private-user-{i}"))).collect();

    let results = pusher_for(&fake).send_batch(&messages).await;

    assert_eq!(results.len(), 25);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(fake.requests(), 3);
    assert_eq!(fake.rejections(), vec![]);
    // Calls run concurrently, so they may arrive in any order; each carries a
    // contiguous run of the input, in input order.
    let mut batches: Vec<Vec<i64>> =
        fake.batches().iter().map(|b| b.iter().map(|e| e.data["seq"].as_i64().unwrap()).collect()).collect();
    batches.sort();
    assert_eq!(batches, vec![(0..10).collect::<Vec<_>>(), (10..20).collect(), (20..25).collect()]);
    // And each event went to its own message's channel.
    for e in fake.events() {
        assert_eq!(e.channel, format!("private-user-{}", e.data["seq"]));
    }
}

#[tokio::test]
async fn pusher_oversized_payload_fails_alone_and_is_never_sent() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let mut big = msg(2, "private-user-2");
    big.payload = json!({"blob": "x".repeat(11 * 1024)});
    let messages = [msg(1, "private-user-1"), big, msg(3, "private-user-3")];

    let results = pusher_for(&fake).send_batch(&messages).await;

    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    match &results[1] {
        Err(ProviderError::Permanent { reason }) => {
            assert_eq!(reason, "payload of 11275 bytes exceeds Pusher's 10 KB limit")
        }
        other => panic!("{other:?}"),
    }
    let seqs: Vec<_> = fake.events().iter().map(|e| e.data["seq"].clone()).collect();
    assert_eq!(seqs, vec![json!(1), json!(3)]);
    assert_eq!(fake.rejections(), vec![]);
}

#[tokio::test]
async fn pusher_invalid_channel_name_is_permanent_before_sending() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let results = pusher_for(&fake).send_batch(&[msg(1, "user 1/inbox")]).await;

    assert!(matches!(&results[0], Err(ProviderError::Permanent { reason }) if reason.contains("user 1/inbox")));
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn pusher_503_is_retryable_for_every_message_in_the_call() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    fake.fail_next(1, 503, None);

    let results = pusher_for(&fake).send_batch(&[msg(1, "a"), msg(2, "b")]).await;

    for r in &results {
        assert_eq!(expect_retryable(r), None);
    }
    assert!(fake.events().is_empty());
}

#[tokio::test]
async fn pusher_429_passes_retry_after_on() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    fake.fail_next(1, 429, Some("7"));

    let results = pusher_for(&fake).send_batch(&[msg(1, "a")]).await;

    assert_eq!(expect_retryable(&results[0]), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn pusher_413_from_the_service_is_permanent() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    fake.fail_next(1, 413, None);

    let results = pusher_for(&fake).send_batch(&[msg(1, "a")]).await;

    assert!(matches!(&results[0], Err(ProviderError::Permanent { reason }) if reason.contains("413")), "{results:?}");
}

#[tokio::test]
async fn pusher_no_answer_in_time_is_retryable() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    fake.set_delay(Duration::from_secs(3));
    let mut cfg = fake.config();
    cfg.timeout_ms = 200;

    let results = Pusher::new(&cfg, http_client()).send_batch(&[msg(1, "a")]).await;

    assert!(
        matches!(&results[0], Err(ProviderError::Retryable { reason, .. }) if reason.contains("200 ms")),
        "{results:?}"
    );
}

#[tokio::test]
async fn pusher_dropped_connection_is_retryable_and_the_retry_works() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    fake.reset_connections_next(1);
    let pusher = pusher_for(&fake);

    let first = pusher.send_batch(&[msg(1, "a")]).await;
    expect_retryable(&first[0]);
    assert!(fake.events().is_empty());

    let second = pusher.send_batch(&[msg(1, "a")]).await;
    assert!(second[0].is_ok(), "{second:?}");
    assert_eq!(fake.events().len(), 1);
}

#[tokio::test]
async fn pusher_connection_refused_is_retryable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let mut cfg = fake.config();
    cfg.base_url = Some(format!("http://127.0.0.1:{port}"));

    let results = Pusher::new(&cfg, http_client()).send_batch(&[msg(1, "a")]).await;

    expect_retryable(&results[0]);
}

#[tokio::test]
async fn ably_publishes_each_message_with_its_idempotency_key() {
    let fake = FakeAbly::start(ABLY_KEY);
    let messages = [msg(1, "private:user-1"), msg(2, "private:user-1"), msg(3, "room 7/news")];

    let results = ably_for(&fake).send_batch(&messages).await;

    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(results[0].as_ref().unwrap().provider_message_id.as_deref(), Some("delivery-1"));
    let mut got: Vec<_> =
        fake.messages().into_iter().map(|m| (m.id.unwrap(), m.channel, m.name.unwrap(), m.data)).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<_> = messages
        .iter()
        .map(|m| (m.idempotency_key.clone(), m.channel_name.clone(), m.event.clone(), m.payload.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(fake.rejections(), vec![]);
}

#[tokio::test]
async fn ably_drops_a_repeated_idempotency_key() {
    let fake = FakeAbly::start(ABLY_KEY);
    let ably = ably_for(&fake);

    // The same delivery sent twice, as after a crash between publish and ledger update.
    let first = ably.send_batch(&[msg(1, "private:user-1")]).await;
    let second = ably.send_batch(&[msg(1, "private:user-1")]).await;

    assert!(first[0].is_ok() && second[0].is_ok(), "{first:?} {second:?}");
    assert_eq!(fake.publishes(), 2);
    assert_eq!(fake.messages().len(), 1);
}

#[tokio::test]
async fn ably_wrong_key_secret_is_unauthorized_with_ablys_code() {
    let fake = FakeAbly::start(ABLY_KEY);
    let mut cfg = fake.config();
    cfg.api_key = outbox_relay::config::Secret::new("appid.keyid:wrong");

    let results = Ably::new(&cfg, http_client()).send_batch(&[msg(1, "c")]).await;

    assert!(
        matches!(&results[0], Err(ProviderError::Unauthorized { reason }) if reason.contains("40101")),
        "{results:?}"
    );
    assert!(fake.messages().is_empty());
    assert_eq!(fake.rejections().len(), 1);
}

#[tokio::test]
async fn ably_malformed_key_is_unauthorized_without_a_request() {
    let fake = FakeAbly::start(ABLY_KEY);
    let mut cfg = fake.config();
    cfg.api_key = outbox_relay::config::Secret::new("no-secret-part");

    let results = Ably::new(&cfg, http_client()).send_batch(&[msg(1, "c")]).await;

    assert!(matches!(&results[0], Err(ProviderError::Unauthorized { .. })), "{results:?}");
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn ably_oversized_message_fails_alone() {
    let fake = FakeAbly::start(ABLY_KEY);
    let mut big = msg(2, "c");
    big.payload = json!({"blob": "x".repeat(64 * 1024)});

    let results = ably_for(&fake).send_batch(&[msg(1, "c"), big]).await;

    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(ProviderError::Permanent { reason }) if reason.contains("64 KiB")),
        "{results:?}"
    );
    assert_eq!(fake.messages().len(), 1);
}

#[tokio::test]
async fn ably_rate_limit_and_outage_are_retryable() {
    let fake = FakeAbly::start(ABLY_KEY);
    fake.fail_next(1, 429, Some("7"));
    fake.fail_next(1, 503, None);
    let ably = ably_for(&fake);

    let first = ably.send_batch(&[msg(1, "c")]).await;
    let second = ably.send_batch(&[msg(1, "c")]).await;
    let third = ably.send_batch(&[msg(1, "c")]).await;

    assert_eq!(expect_retryable(&first[0]), Some(Duration::from_secs(7)));
    assert_eq!(expect_retryable(&second[0]), None);
    assert!(third[0].is_ok());
    assert_eq!(fake.messages().len(), 1);
}

#[tokio::test]
async fn ably_timeout_then_resend_is_delivered_once() {
    let fake = FakeAbly::start(ABLY_KEY);
    fake.set_delay(Duration::from_millis(500));
    let mut cfg = fake.config();
    cfg.timeout_ms = 100;

    let first = Ably::new(&cfg, http_client()).send_batch(&[msg(1, "c")]).await;
    expect_retryable(&first[0]);

    // Ably may still take a publish we stopped waiting for: the fake finishes
    // it after its delay. Wait for that, then re-send the same delivery.
    fake.set_delay(Duration::ZERO);
    for _ in 0..200 {
        if fake.publishes() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.publishes(), 1, "the unanswered publish reached the fake");
    let second = ably_for(&fake).send_batch(&[msg(1, "c")]).await;

    assert!(second[0].is_ok(), "{second:?}");
    assert_eq!(fake.publishes(), 2);
    assert_eq!(fake.messages().len(), 1, "the re-send was dropped as a duplicate");
}

#[tokio::test]
async fn ably_dropped_connection_is_retryable() {
    let fake = FakeAbly::start(ABLY_KEY);
    fake.reset_connections_next(1);

    let results = ably_for(&fake).send_batch(&[msg(1, "c")]).await;

    expect_retryable(&results[0]);
    assert!(fake.messages().is_empty());
}

/// Signs a request the way the HTTP API reference describes, written apart
/// from the client so that the fake's checks are tested on their own.
fn raw_pusher_request(fake: &FakePusher, body: &str, timestamp: i64, md5_of: &str) -> reqwest::RequestBuilder {
    use hmac::{Hmac, Mac};
    use md5::{Digest, Md5};
    let path = format!("/apps/{APP_ID}/batch_events");
    let query = format!(
        "auth_key={KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        hex::encode(Md5::digest(md5_of.as_bytes()))
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    reqwest::Client::new()
        .post(format!("{}{path}?{query}&auth_signature={signature}", fake.base_url()))
        .header("content-type", "application/json")
        .body(body.to_string())
}

#[tokio::test]
async fn pusher_fake_refuses_what_pusher_refuses() {
    let fake = FakePusher::start(APP_ID, KEY, SECRET);
    let now = chrono::Utc::now().timestamp();
    let event = |data: &str| json!({"name": "e", "channel": "c", "data": data});
    let body = |events: Vec<serde_json::Value>| json!({ "batch": events }).to_string();

    let ok = body(vec![event("{}")]);
    let eleven = body((0..11).map(|_| event("{}")).collect());
    let too_big = body(vec![event(&"x".repeat(10 * 1024 + 1))]);
    let bad_channel = body(vec![json!({"name": "e", "channel": "a b", "data": "{}"})]);
    let cases = [
        (raw_pusher_request(&fake, &ok, now, &ok), 200),
        (raw_pusher_request(&fake, &ok, now - 700, &ok), 401),
        (raw_pusher_request(&fake, &ok, now, "a different body"), 401),
        (raw_pusher_request(&fake, &eleven, now, &eleven), 400),
        (raw_pusher_request(&fake, &too_big, now, &too_big), 413),
        (raw_pusher_request(&fake, &bad_channel, now, &bad_channel), 400),
    ];
    let mut statuses = Vec::new();
    for (request, _) in &cases {
        statuses.push(request.try_clone().unwrap().send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, cases.iter().map(|(_, s)| *s).collect::<Vec<_>>());
    assert_eq!(fake.events().len(), 1, "only the valid request was accepted");
    assert_eq!(fake.rejections().len(), 5);
}

#[tokio::test]
async fn ably_fake_refuses_unrelated_ids_in_one_publish() {
    let fake = FakeAbly::start(ABLY_KEY);
    let post = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(format!("{}/channels/c/messages", fake.base_url()))
            .basic_auth("appid.keyid", Some("s3cr3tValue"))
            .json(&body)
    };

    let unrelated = post(json!([{"id": "a", "data": 1}, {"id": "b", "data": 2}])).send().await.unwrap();
    let derived = post(json!([{"id": "base:0", "data": 1}, {"id": "base:1", "data": 2}])).send().await.unwrap();

    assert_eq!(unrelated.status().as_u16(), 400);
    let error: serde_json::Value = unrelated.json().await.unwrap();
    assert_eq!(error["error"]["code"], 40031);
    assert_eq!(derived.status().as_u16(), 201);
    assert_eq!(fake.messages().len(), 2);
}
