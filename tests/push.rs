//! OneSignal and FCM HTTP v1 against wire-level fakes (tests/support/fakes/
//! {onesignal,fcm,google_auth}.rs), then FCM end to end: devices from a
//! django-push-notifications `GCMDevice` table, a dead token forgotten by
//! `on_invalid_token`, in both source modes.

mod support;

use std::time::Duration;

use outbox_relay::config::{Config, Secret};
use outbox_relay::providers::devices::{Device, DeviceError};
use outbox_relay::providers::fcm::{Fcm, FcmConfig, SCOPE};
use outbox_relay::providers::google_auth::ServiceAccountKey;
use outbox_relay::providers::onesignal::{OneSignal, OneSignalConfig};
use outbox_relay::providers::{http_client, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::fcm::FakeFcm;
use support::fakes::google_auth::{FakeGoogleToken, PROJECT};
use support::fakes::onesignal::FakeOneSignal;
use support::relay::{insert_notifications, Env, Mode};
use tokio::sync::watch;

const APP_ID: &str = "202d4f61-1ca9-42df-9d36-bb17d8123abc";
const API_KEY: &str = "os_v2_app_testkey";

fn message(seq: i64, channel: &str, devices: &[&str]) -> OutboundMessage {
    OutboundMessage {
        delivery_id: seq,
        idempotency_key: format!("or1-key-{seq}"),
        channel_name: channel.into(),
        event: "order_shipped".into(),
        payload: json!({"id": seq, "title": "Commande expédiée", "message": "Votre commande est partie"}),
        contact: None,
        bus: None,
        devices: devices.iter().map(|d| Device::token(*d)).collect(),
        correlation: None,
    }
}

fn onesignal(fake: &FakeOneSignal, key: &str, timeout_ms: u64) -> OneSignal {
    let cfg = OneSignalConfig {
        app_id: APP_ID.into(),
        api_key: Secret::new(key),
        base_url: Some(fake.base_url()),
        timeout_ms,
    };
    OneSignal::new(&cfg, http_client())
}

#[tokio::test]
async fn onesignal_targets_the_external_id_once_per_delivery_key() {
    let fake = FakeOneSignal::start(APP_ID, API_KEY, &["42"]);
    let client = onesignal(&fake, API_KEY, 2000);
    let first = client.send(&message(1, "42", &[])).await.unwrap();
    let again = client.send(&message(1, "42", &[])).await.unwrap();
    assert_eq!(first, again, "a re-send answers the first call's notification id");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1, "OneSignal sent the repeated idempotency_key once");
    let n = &sent[0];
    assert_eq!(n["include_aliases"], json!({"external_id": ["42"]}));
    assert_eq!(n["target_channel"], "push");
    assert_eq!(n["headings"]["en"], "Commande expédiée");
    assert_eq!(n["contents"]["en"], "Votre commande est partie");
    assert_eq!(n["data"]["id"], 1);
    assert!(uuid::Uuid::parse_str(n["idempotency_key"].as_str().unwrap()).is_ok());
    assert_eq!(fake.rejections(), vec![]);

    let nobody = client.send(&message(2, "7", &[])).await.unwrap_err();
    assert!(
        matches!(&nobody, ProviderError::Permanent { reason } if reason.contains("no push subscription")),
        "{nobody:?}"
    );
}

#[tokio::test]
async fn onesignal_faults_have_the_providers_error_classes() {
    let fake = FakeOneSignal::start(APP_ID, API_KEY, &["42"]);
    let bad_key = onesignal(&fake, "wrong", 2000).send(&message(1, "42", &[])).await.unwrap_err();
    assert!(matches!(bad_key, ProviderError::Unauthorized { .. }), "{bad_key:?}");
    let client = onesignal(&fake, API_KEY, 300);
    fake.faults().fail_next(1, 503, None);
    assert!(client.send(&message(2, "42", &[])).await.unwrap_err().is_retryable());
    fake.faults().fail_next(1, 429, Some("11"));
    let limited = client.send(&message(3, "42", &[])).await.unwrap_err();
    assert_eq!(
        limited,
        ProviderError::Retryable { reason: limited.to_string(), retry_after: Some(Duration::from_secs(11)) }
    );
    fake.faults().set_delay(Duration::from_millis(1500));
    let slow = client.send(&message(4, "42", &[])).await.unwrap_err();
    assert!(
        matches!(&slow, ProviderError::Retryable { reason, .. } if reason.contains("no answer within 300 ms")),
        "{slow:?}"
    );
    fake.faults().clear();
    // The timed-out call may have reached OneSignal: its re-send carries the same key.
    client.send(&message(4, "42", &[])).await.unwrap();
    client.send(&message(4, "42", &[])).await.unwrap();
    assert_eq!(fake.sent().len(), 1);
}

#[test]
fn onesignal_channels_must_name_the_external_id() {
    let base = r#"
[source]
database_url = "postgres://relay@localhost/app"
[[routes]]
table = "public.t"
recipient_column = "user_id"
event = "e"
channels = ["push"]
payload_columns = ["id"]
[channels.push]
provider = "onesignal"
CHANNEL_NAME
[providers.onesignal]
app_id = "a"
api_key = "k"
"#;
    let err = Config::from_toml(&base.replace("CHANNEL_NAME", "")).unwrap_err().to_string();
    assert!(err.contains("External ID"), "{err}");
    Config::from_toml(&base.replace("CHANNEL_NAME", "channel_name = \"{recipient}\"")).expect("valid");
}

// --- FCM ----------------------------------------------------------------------------------------

fn fcm(tokens: &FakeGoogleToken, fake: &FakeFcm, timeout_ms: u64) -> Fcm {
    let cfg = FcmConfig {
        project: None,
        service_account_file: None,
        service_account_json: None,
        base_url: Some(fake.base_url()),
        timeout_ms,
    };
    Fcm::new(&cfg, ServiceAccountKey::from_json(&tokens.key_json()).unwrap(), http_client()).unwrap()
}

#[tokio::test]
async fn fcm_sends_one_call_per_device_and_answers_per_device() {
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakeFcm::start(PROJECT, &["tok-a", "tok-b"], &["tok-dead"], tokens.state.clone());
    let client = fcm(&tokens, &fake, 2000);
    let batch = [message(1, "", &["tok-a", "tok-dead", "garbage"]), message(2, "", &["tok-b"])];

    let answers = client.send_devices(&batch).await;

    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0].len(), 3);
    assert!(answers[0][0]
        .as_ref()
        .unwrap()
        .provider_message_id
        .as_deref()
        .unwrap()
        .starts_with("projects/demo-project/messages/"));
    assert!(
        matches!(&answers[0][1], Err(DeviceError::Gone { reason }) if reason.contains("UNREGISTERED")),
        "{:?}",
        answers[0][1]
    );
    assert!(
        matches!(&answers[0][2], Err(DeviceError::Gone { reason }) if reason.contains("registration token")),
        "{:?}",
        answers[0][2]
    );
    assert!(answers[1][0].is_ok());
    assert_eq!(tokens.minted(), 1, "one token for every call");
    let delivered = fake.delivered();
    assert_eq!(delivered.len(), 2);
    let (_, m) = delivered.iter().find(|(t, _)| t == "tok-a").unwrap();
    assert_eq!(m["notification"], json!({"title": "Commande expédiée", "body": "Votre commande est partie"}));
    assert_eq!(m["data"]["id"], "1", "data values are strings");
    assert_eq!(m["data"]["outbox_key"], "or1-key-1");
    // Folded for callers wanting one answer: a device reached is sent.
    assert!(client.send_batch(&batch[..1]).await[0].is_ok());
}

#[tokio::test]
async fn fcm_faults_have_the_providers_error_classes() {
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let fake = FakeFcm::start(PROJECT, &["tok-a"], &[], tokens.state.clone());
    let client = fcm(&tokens, &fake, 300);
    let one = |seq| [message(seq, "", &["tok-a"])];
    let retry_after = |a: &Vec<Vec<outbox_relay::providers::devices::DeviceResult>>| match &a[0][0] {
        Err(DeviceError::Provider(ProviderError::Retryable { retry_after, .. })) => *retry_after,
        other => panic!("expected retryable: {other:?}"),
    };
    fake.faults().fail_next(1, 503, Some("2"));
    assert_eq!(retry_after(&client.send_devices(&one(1)).await), Some(Duration::from_secs(2)));
    fake.faults().fail_next(1, 429, Some("30"));
    assert_eq!(retry_after(&client.send_devices(&one(2)).await), Some(Duration::from_secs(30)), "QUOTA_EXCEEDED");
    fake.faults().set_delay(Duration::from_millis(1500));
    retry_after(&client.send_devices(&one(3)).await);
    fake.faults().clear();
    // Revoked token: one 401, a fresh token, sent.
    tokens.revoke_all();
    assert!(client.send_devices(&one(4)).await[0][0].is_ok());
    assert_eq!(tokens.minted(), 2);
    // Messages FCM would refuse are refused before any call.
    let mut reserved = message(5, "", &["tok-a"]);
    reserved.payload = json!({"google.sent_time": 1});
    let big = OutboundMessage { payload: json!({"blob": "x".repeat(5000)}), ..message(6, "", &["tok-a"]) };
    let answers = client.send_devices(&[reserved, big]).await;
    for a in answers.iter().flatten() {
        assert!(matches!(a, Err(DeviceError::Provider(ProviderError::Permanent { .. }))), "{a:?}");
    }
    assert_eq!(fake.rejections().iter().filter(|(s, _)| *s == 400).count(), 0, "nothing FCM would refuse was sent");
}

/// The relay onto FCM: devices from django-push-notifications' GCMDevice
/// table; user 3's second device is dead and is deactivated by
/// `on_invalid_token`; every delivery `sent`, each live device reached once.
async fn fcm_end_to_end(mode: Mode) {
    const DEVICES: &str = "CREATE TABLE push_notifications_gcmdevice (
        id serial PRIMARY KEY, name varchar(255), active boolean NOT NULL DEFAULT true,
        date_created timestamptz, application_id varchar(64), device_id bigint,
        registration_id text NOT NULL, cloud_message_type varchar(3) NOT NULL DEFAULT 'FCM', user_id integer);
      INSERT INTO push_notifications_gcmdevice (user_id, registration_id)
        SELECT u, 'tok-' || u FROM generate_series(1, 20) u;
      INSERT INTO push_notifications_gcmdevice (user_id, registration_id) VALUES (3, 'dead-3');
      INSERT INTO push_notifications_gcmdevice (user_id, registration_id, active) VALUES (4, 'old-4', false);";
    let env = Env::prepared(mode, &format!("fcm{}", if mode == Mode::Logical { "l" } else { "n" }), DEVICES, "").await;
    let tokens = FakeGoogleToken::start(&[SCOPE]);
    let live: Vec<String> = (1..=20).map(|u| format!("tok-{u}")).collect();
    let live_refs: Vec<&str> = live.iter().map(String::as_str).collect();
    let fake = FakeFcm::start(PROJECT, &live_refs, &["dead-3"], tokens.state.clone());
    let key_path = env.dir.path().join("sa.json");
    std::fs::write(&key_path, tokens.key_json()).unwrap();
    let channel = "provider = \"fcm\"\n\
        tokens_query = \"SELECT registration_id FROM push_notifications_gcmdevice WHERE user_id = $1 AND active AND cloud_message_type = 'FCM'\"\n\
        on_invalid_token = \"UPDATE push_notifications_gcmdevice SET active = false WHERE registration_id = $1\"";
    let toml = env.config_toml("127.0.0.1:0").replacen("provider = \"pusher\"", channel, 1)
        + &format!(
            "\n[providers.fcm]\nservice_account_file = \"{}\"\nbase_url = \"{}\"\ntimeout_ms = 2000\n",
            key_path.display(),
            fake.base_url()
        );
    let cfg = Config::from_toml(&toml).expect("fcm config is valid");
    let (stop, rx) = watch::channel(false);
    let relay = tokio::spawn(outbox_relay::app::run(cfg, rx));
    env.wait_streaming().await;
    let client = env.db.client().await;
    insert_notifications(&client, 20, 5).await;
    let statuses = env.wait_settled(20, Duration::from_secs(30)).await;
    assert_eq!(statuses.get("sent"), Some(&20), "{statuses:?}");
    let delivered = fake.delivered();
    assert_eq!(delivered.len(), 20, "each live device once: one per notification here");
    assert!(delivered.iter().all(|(t, _)| t.starts_with("tok-")), "never an inactive device");
    let dead: bool = client
        .query_one("SELECT active FROM push_notifications_gcmdevice WHERE registration_id = 'dead-3'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!dead, "the dead token was deactivated by on_invalid_token");
    let errors: i64 = client
        .query_one("SELECT count(*) FROM outbox_relay.deliveries WHERE last_error LIKE '%dead-3%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "no token in the ledger");
    let _ = stop.send(true);
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fcm_end_to_end_logical() {
    fcm_end_to_end(Mode::Logical).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fcm_end_to_end_listen() {
    fcm_end_to_end(Mode::Listen).await;
}
