//! SendGrid, Mailgun and Amazon SNS: each client against its wire-level fake
//! (what the service checks, how it refuses, the faults every provider has:
//! 5xx, 429 / throttling, timeouts, dropped connections), then through the
//! relay end to end: Brevo failing over to SendGrid, Mailgun mail, SNS SMS
//! and a FIFO topic, in both source modes where the guarantee applies.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use outbox_relay::config::Secret;
use outbox_relay::providers::bus::{BusMessage, BusRoute, EnvelopeMode};
use outbox_relay::providers::mailgun::{Mailgun, MailgunConfig, Region};
use outbox_relay::providers::sendgrid::{Sendgrid, SendgridConfig};
use outbox_relay::providers::sns::{Sns, SnsConfig};
use outbox_relay::providers::template::TemplateId;
use outbox_relay::providers::{http_client, Contact, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::brevo::FakeBrevo;
use support::fakes::mailgun::FakeMailgun;
use support::fakes::sendgrid::FakeSendgrid;
use support::fakes::sns::FakeSns;
use support::relay::{Env, Mode};

fn mail(key: &str, address: &str, template: Option<TemplateId>) -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: key.into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload: json!({"title": "Commande expédiée 📦", "order": 1042}),
        contact: Some(Contact {
            address: address.into(),
            subject: "Commande expédiée 📦".into(),
            body: "Votre commande 1042 est partie.".into(),
            template,
            whatsapp: false,
        }),
        bus: None,
        correlation: None,
        devices: Vec::new(),
    }
}

fn retry_after(r: &Result<outbox_relay::providers::Accepted, ProviderError>) -> Option<Duration> {
    match r {
        Err(ProviderError::Retryable { retry_after, .. }) => *retry_after,
        other => panic!("expected Retryable, got {other:?}"),
    }
}

// ---------------------------------------------------------------- SendGrid

fn sendgrid(fake: &FakeSendgrid, key: &str, sender: &str) -> Sendgrid {
    let cfg = SendgridConfig {
        api_key: Secret::new(key),
        sender_email: sender.into(),
        sender_name: Some("Alerts".into()),
        base_url: Some(fake.base_url()),
        timeout_ms: 1000,
    };
    Sendgrid::new(&cfg, http_client())
}

#[tokio::test]
async fn sendgrid_sends_dynamic_templates_and_plain_mails_and_records_the_message_id() {
    let fake = FakeSendgrid::start("SG.key", "alerts@example.com", &["d-order"]);
    let client = sendgrid(&fake, "SG.key", "alerts@example.com");
    let templated = client.send(&mail("or1-a", "jane@example.com", Some(TemplateId::Name("d-order".into())))).await;
    let plain = client.send(&mail("or1-b", "jane@example.com", None)).await.unwrap();
    let sent = fake.accepted();
    assert_eq!(templated.unwrap().provider_message_id.as_deref(), Some(sent[0].0.as_str()), "X-Message-Id recorded");
    assert_eq!(plain.provider_message_id.as_deref(), Some(sent[1].0.as_str()));
    let (t, p) = (&sent[0].1, &sent[1].1);
    assert_eq!(t["template_id"], "d-order");
    assert_eq!(t["personalizations"][0]["dynamic_template_data"]["order"], 1042);
    assert_eq!(t["personalizations"][0]["to"][0]["email"], "jane@example.com");
    assert_eq!(t["custom_args"]["outbox_relay_key"], "or1-a");
    assert_eq!(p["subject"], "Commande expédiée 📦");
    assert_eq!(p["content"][0]["value"], "Votre commande 1042 est partie.");
    // No idempotency key at SendGrid: the same delivery sent again is a second mail (counted by the relay).
    client.send(&mail("or1-b", "jane@example.com", None)).await.unwrap();
    assert_eq!(fake.accepted().len(), 3);
}

#[tokio::test]
async fn sendgrid_errors_are_classified() {
    let fake = FakeSendgrid::start("SG.key", "alerts@example.com", &["d-order"]);
    let client = sendgrid(&fake, "SG.key", "alerts@example.com");
    let plain = || mail("or1-a", "jane@example.com", None);

    let bad_key = sendgrid(&fake, "SG.wrong", "alerts@example.com").send(&plain()).await;
    assert!(
        matches!(bad_key, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("401")),
        "{bad_key:?}"
    );
    let unverified = sendgrid(&fake, "SG.key", "other@example.com").send(&plain()).await;
    assert!(
        matches!(unverified, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("from: The from address")),
        "a sender that is not a verified identity needs a human: {unverified:?}"
    );
    let unknown = client.send(&mail("or1-a", "jane@example.com", Some(TemplateId::Name("d-nope".into())))).await;
    assert_eq!(
        unknown.unwrap_err(),
        ProviderError::Permanent {
            reason: "sendgrid answered 400: template_id: The template_id is not a valid template ID.".into()
        }
    );
    let invalid = client.send(&mail("or1-a", "not an address", None)).await;
    assert!(
        matches!(invalid, Err(ProviderError::Permanent { ref reason }) if reason.contains("personalizations.0.to"))
    );

    // 429: no Retry-After, the window's reset as a Unix time.
    fake.faults().fail_next(1, 429, Some("3"));
    let wait = retry_after(&client.send(&plain()).await).expect("the reset header gives the wait");
    assert!(wait <= Duration::from_secs(3) && wait >= Duration::from_secs(1), "{wait:?}");
    fake.faults().fail_next(1, 503, Some("2"));
    assert_eq!(retry_after(&client.send(&plain()).await), Some(Duration::from_secs(2)));

    // Too large: the service's 413 is permanent; over 30 MB the relay does not even call.
    fake.set_max_bytes(200);
    assert!(
        matches!(client.send(&plain()).await, Err(ProviderError::Permanent { ref reason }) if reason.contains("413"))
    );
    let before = fake.rejections().len();
    let mut huge = plain();
    huge.contact.as_mut().unwrap().body = "x".repeat(30 * 1024 * 1024);
    let refused = client.send(&huge).await;
    assert!(matches!(refused, Err(ProviderError::Permanent { ref reason }) if reason.contains("30 MB")), "{refused:?}");
    assert_eq!(fake.rejections().len(), before, "no request for a mail SendGrid cannot take");
}

#[tokio::test]
async fn sendgrid_timeouts_and_dropped_connections_are_retryable_then_it_delivers() {
    let fake = FakeSendgrid::start("SG.key", "alerts@example.com", &[]);
    let client = sendgrid(&fake, "SG.key", "alerts@example.com");
    fake.faults().set_delay(Duration::from_millis(1500));
    let slow = client.send(&mail("or1-a", "jane@example.com", None)).await;
    assert!(
        matches!(slow, Err(ProviderError::Retryable { ref reason, .. }) if reason.contains("no answer within 1000 ms"))
    );
    fake.faults().set_delay(Duration::ZERO);
    fake.faults().reset_connections_next(1);
    assert!(client.send(&mail("or1-a", "jane@example.com", None)).await.unwrap_err().is_retryable());
    client.send(&mail("or1-a", "jane@example.com", None)).await.unwrap();
}

// ---------------------------------------------------------------- Mailgun

fn mailgun(fake: &FakeMailgun, key: &str, domain: &str) -> Mailgun {
    let cfg = MailgunConfig {
        api_key: Secret::new(key),
        domain: domain.into(),
        from: "Alerts <alerts@mg.example.com>".into(),
        region: Region::Eu,
        base_url: Some(fake.base_url()),
        timeout_ms: 1000,
    };
    Mailgun::new(&cfg, http_client())
}

#[tokio::test]
async fn mailgun_sends_templates_with_variables_and_plain_text_as_multipart() {
    let fake = FakeMailgun::start("key-1", "mg.example.com", &["order-shipped"]);
    let client = mailgun(&fake, "key-1", "mg.example.com");
    let templated =
        client.send(&mail("or1-a", "jane@example.com", Some(TemplateId::Name("order-shipped".into())))).await;
    let plain = client.send(&mail("or1-b", "jane@example.com", None)).await.unwrap();
    let sent = fake.accepted();
    assert_eq!(
        templated.unwrap().provider_message_id.as_deref(),
        Some(sent[0].0.as_str()),
        "the returned id is recorded"
    );
    assert_eq!(plain.provider_message_id.as_deref(), Some(sent[1].0.as_str()));
    let (t, p) = (&sent[0].1, &sent[1].1);
    assert_eq!(t["template"], "order-shipped");
    let vars: serde_json::Value = serde_json::from_str(&t["t:variables"]).unwrap();
    assert_eq!(vars["order"], 1042);
    assert_eq!(t["to"], "jane@example.com");
    assert_eq!(t["from"], "Alerts <alerts@mg.example.com>");
    assert_eq!(t["v:outbox_relay_key"], "or1-a");
    assert!(!t.contains_key("text"));
    assert_eq!(p["subject"], "Commande expédiée 📦");
    assert_eq!(p["text"], "Votre commande 1042 est partie.");
}

#[tokio::test]
async fn mailgun_errors_and_faults_are_classified() {
    let fake = FakeMailgun::start("key-1", "mg.example.com", &["order-shipped"]);
    let client = mailgun(&fake, "key-1", "mg.example.com");
    let plain = || mail("or1-a", "jane@example.com", None);

    let bad_key = mailgun(&fake, "key-2", "mg.example.com").send(&plain()).await;
    assert!(
        matches!(bad_key, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("401: Forbidden")),
        "{bad_key:?}"
    );
    let other_domain = mailgun(&fake, "key-1", "other.example.com").send(&plain()).await;
    assert!(
        matches!(other_domain, Err(ProviderError::Permanent { ref reason }) if reason.contains("Domain not found"))
    );
    let unknown = client.send(&mail("or1-a", "jane@example.com", Some(TemplateId::Name("nope".into())))).await;
    assert_eq!(
        unknown.unwrap_err(),
        ProviderError::Permanent { reason: "mailgun answered 400: template not found".into() }
    );

    fake.faults().fail_next(1, 429, Some("3"));
    assert_eq!(retry_after(&client.send(&plain()).await), Some(Duration::from_secs(3)));
    fake.faults().fail_next(1, 500, None);
    assert_eq!(retry_after(&client.send(&plain()).await), None);
    fake.set_max_bytes(100);
    assert!(
        matches!(client.send(&plain()).await, Err(ProviderError::Permanent { ref reason }) if reason.contains("413"))
    );
    fake.set_max_bytes(support::fakes::mailgun::MAX_BYTES);

    fake.faults().set_delay(Duration::from_millis(1500));
    assert!(client.send(&plain()).await.unwrap_err().is_retryable(), "no answer in time");
    fake.faults().set_delay(Duration::ZERO);
    fake.faults().reset_connections_next(1);
    assert!(client.send(&plain()).await.unwrap_err().is_retryable(), "dropped connection");
    client.send(&plain()).await.unwrap();
    assert_eq!(fake.accepted().len(), 1);
}

// ---------------------------------------------------------------- SNS

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const FIFO: &str = "arn:aws:sns:eu-west-3:123456789012:orders.fifo";

fn sns(fake: &FakeSns, secret: &str, token: Option<&str>, region: &str) -> Sns {
    let cfg = SnsConfig {
        access_key_id: AKID.into(),
        secret_access_key: Secret::new(secret),
        session_token: token.map(Secret::new),
        region: region.into(),
        base_url: Some(fake.base_url()),
        timeout_ms: 1000,
    };
    Sns::new(&cfg, http_client()).unwrap()
}

fn sms(key: &str, number: &str, body: &str) -> OutboundMessage {
    let mut m = mail(key, number, None);
    m.contact.as_mut().unwrap().body = body.into();
    m
}

fn topic_message(key: &str, topic: &str, recipient: &str) -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: key.into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload: json!({"order": 1042}),
        contact: None,
        bus: Some(BusMessage {
            route: Arc::new(BusRoute {
                destination: topic.into(),
                exchange: String::new(),
                key: "{recipient}".into(),
                headers: [("origin".to_string(), "django".to_string())].into(),
                mode: EnvelopeMode::Structured,
                source: None,
                events: Default::default(),
                ordering: false,
            }),
            source: "/app/public.orders".into(),
            recipient: Some(recipient.into()),
            time: chrono::Utc::now(),
        }),
        correlation: None,
        devices: Vec::new(),
    }
}

#[tokio::test]
async fn sns_publishes_sms_signed_with_sigv4_with_and_without_a_session_token() {
    let fake = FakeSns::start(AKID, SECRET, None, "eu-west-3");
    let ok =
        sns(&fake, SECRET, None, "eu-west-3").send(&sms("or1-a", "+33612345678", "Commande 1042 🚚")).await.unwrap();
    let published = fake.published();
    assert_eq!(ok.provider_message_id.as_deref(), Some(published[0].message_id.as_str()), "MessageId recorded");
    assert_eq!(published[0].get("PhoneNumber"), Some("+33612345678"));
    assert_eq!(published[0].get("Message"), Some("Commande 1042 🚚"));

    let with_token = FakeSns::start(AKID, SECRET, Some("session/token+=="), "eu-west-3");
    sns(&with_token, SECRET, Some("session/token+=="), "eu-west-3")
        .send(&sms("or1-a", "+33612345678", "x"))
        .await
        .unwrap();
    let missing = sns(&with_token, SECRET, None, "eu-west-3").send(&sms("or1-a", "+33612345678", "x")).await;
    assert!(
        matches!(missing, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("InvalidClientTokenId"))
    );
}

#[tokio::test]
async fn sns_fifo_topic_drops_a_resend_of_the_same_delivery() {
    let fake = FakeSns::start(AKID, SECRET, None, "eu-west-3");
    fake.create_topic(FIFO);
    let client = sns(&fake, SECRET, None, "eu-west-3");
    let first = client.send(&topic_message("or1-a", FIFO, "42")).await.unwrap();
    let again = client.send(&topic_message("or1-a", FIFO, "42")).await.unwrap();
    client.send(&topic_message("or1-b", FIFO, "43")).await.unwrap();
    assert_eq!(first, again, "SNS accepts the re-send and answers the first MessageId");
    let published = fake.published();
    assert_eq!(published.len(), 2, "the re-send is not delivered again");
    assert_eq!(published[0].get("MessageGroupId"), Some("42"));
    assert_eq!(published[0].get("MessageDeduplicationId"), Some("or1-a"));
    assert_eq!(published[0].get("MessageAttributes.entry.1.Name"), Some("origin"));
    let event: serde_json::Value = serde_json::from_str(published[0].get("Message").unwrap()).unwrap();
    assert_eq!(event["id"], "or1-a");
    assert_eq!(event["type"], "order_shipped");
    assert_eq!(event["data"], json!({"order": 1042}));
}

#[tokio::test]
async fn sns_errors_and_faults_are_classified() {
    let fake = FakeSns::start(AKID, SECRET, None, "eu-west-3");
    fake.create_topic(FIFO);
    let client = sns(&fake, SECRET, None, "eu-west-3");
    let text = || sms("or1-a", "+33612345678", "x");

    let wrong_secret = sns(&fake, "not-the-secret", None, "eu-west-3").send(&text()).await;
    assert!(
        matches!(wrong_secret, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("SignatureDoesNotMatch"))
    );
    let wrong_region = sns(&fake, SECRET, None, "us-east-1").send(&text()).await;
    assert!(matches!(wrong_region, Err(ProviderError::Unauthorized { .. })), "{wrong_region:?}");
    let no_topic = client.send(&topic_message("or1-a", "arn:aws:sns:eu-west-3:123456789012:gone.fifo", "1")).await;
    assert!(matches!(no_topic, Err(ProviderError::Permanent { ref reason }) if reason.contains("NotFound")));

    fake.throttle_next(1);
    let throttled = client.send(&text()).await;
    assert_eq!(
        throttled.unwrap_err(),
        ProviderError::Retryable { reason: "sns answered 400 (Throttling): Rate exceeded".into(), retry_after: None },
        "a 400 that is retryable: the code decides"
    );
    fake.faults().fail_next(1, 503, Some("2"));
    assert_eq!(retry_after(&client.send(&text()).await), Some(Duration::from_secs(2)));

    // Refused before any call: not E.164, an SMS over 1,600 characters, a topic message over 256 KB.
    let before = fake.rejections().len();
    for m in [sms("or1-a", "06 12 34 56 78", "x"), sms("or1-a", "+33612345678", &"a".repeat(1601)), {
        let mut m = topic_message("or1-a", FIFO, "1");
        m.payload = json!({"blob": "x".repeat(262_144)});
        m
    }] {
        assert!(matches!(client.send(&m).await, Err(ProviderError::Permanent { .. })));
    }
    assert_eq!(fake.rejections().len(), before);

    fake.faults().set_delay(Duration::from_millis(1500));
    assert!(client.send(&text()).await.unwrap_err().is_retryable(), "no answer in time");
    fake.faults().set_delay(Duration::ZERO);
    fake.faults().reset_connections_next(1);
    assert!(client.send(&text()).await.unwrap_err().is_retryable(), "dropped connection");
    client.send(&text()).await.unwrap();
    assert_eq!(fake.published().len(), 1);
}

// ---------------------------------------------------------------- end to end

/// Inserts an outbox row for `channels` (`{email}`); the payload's `order` identifies it.
async fn outbox(client: &tokio_postgres::Client, event: &str, user: i32, order: i32, channels: &str) {
    let payload = json!({"title": format!("Commande {order}"), "order": order});
    client
        .execute(
            "INSERT INTO operators_outboxevent (event_type, recipient_id, channels, payload)
             VALUES ($1, $2, $3::text::varchar[], $4)",
            &[&event, &user, &channels, &payload],
        )
        .await
        .unwrap();
}

/// (channel, recipient, status, provider, provider_message_id) of every ledger row.
async fn rows(env: &Env) -> Vec<(String, String, String, Option<String>, Option<String>)> {
    let client = env.db.client().await;
    client
        .query(
            "SELECT channel, recipient, status, provider, provider_message_id FROM outbox_relay.deliveries ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

fn counts(orders: impl Iterator<Item = i64>) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for o in orders {
        *out.entry(o).or_default() += 1;
    }
    out
}

/// Brevo answers 503 until the channel's circuit opens; fresh mails go to
/// SendGrid, each with its own template; none reaches both, none is lost;
/// Brevo recovers and takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brevo_failing_with_503_falls_back_to_sendgrid_and_never_to_both() {
    let brevo = FakeBrevo::start("xkeysib-test", &[14]);
    let sendgrid = FakeSendgrid::start("SG.key", "alerts@example.com", &["d-order"]);
    let extra = format!(
        r#"circuit_failures = 3

[channels.email]
provider = "brevo"
fallback = "sendgrid"
address_query = "SELECT email FROM auth_user WHERE id = $1"
templates = {{ order_shipped = {{ brevo = 14, sendgrid = "d-order" }} }}
require_template = true

[providers.brevo]
api_key = "xkeysib-test"
sender_email = "alerts@example.com"
base_url = "{brevo}"
timeout_ms = 2000

[providers.sendgrid]
api_key = "SG.key"
sender_email = "alerts@example.com"
base_url = "{sendgrid}"
timeout_ms = 2000
"#,
        brevo = brevo.base_url(),
        sendgrid = sendgrid.base_url(),
    );
    let env = Env::with_mode(Mode::Logical, "fallback_sg", "", &extra).await;
    brevo.fail_next(10_000, 503, None);
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;

    // A: tried on Brevo (one transaction, so one call), which fails until the circuit opens.
    client.batch_execute("BEGIN").await.unwrap();
    for order in 1..=5 {
        outbox(&client, "order_shipped", order, order as i32, "{email}").await;
    }
    client.batch_execute("COMMIT").await.unwrap();
    env.wait_circuit_open(Duration::from_secs(30)).await;
    // B: fresh while the circuit is open → SendGrid (one that meets a half-open
    // probe is tried on Brevo, and stays there).
    for order in 6..=10 {
        outbox(&client, "order_shipped", order, order as i32, "{email}").await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b_on_brevo: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox_relay.deliveries WHERE recipient::int BETWEEN 6 AND 10 AND provider = 'brevo'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if sendgrid.accepted().len() as i64 + b_on_brevo >= 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "fallback not used: {} on SendGrid", sendgrid.accepted().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    brevo.recover();
    let statuses = env.wait_settled(10, Duration::from_secs(60)).await;
    relay.stop().await;

    assert_eq!(statuses.get("sent"), Some(&10), "{statuses:?}");
    let on_brevo = counts(brevo.accepted().iter().map(|m| m["params"]["order"].as_i64().unwrap()));
    let on_sendgrid = counts(
        sendgrid
            .accepted()
            .iter()
            .map(|(_, m)| m["personalizations"][0]["dynamic_template_data"]["order"].as_i64().unwrap()),
    );
    eprintln!("brevo 503 -> sendgrid: rows 10, on brevo {on_brevo:?}, on sendgrid {on_sendgrid:?}");
    let brevo_set: BTreeSet<i64> = on_brevo.keys().copied().collect();
    let sendgrid_set: BTreeSet<i64> = on_sendgrid.keys().copied().collect();
    assert!((1..=5).all(|o| brevo_set.contains(&o)), "A stayed with Brevo: {brevo_set:?}");
    assert!(
        !sendgrid_set.is_empty() && sendgrid_set.iter().all(|o| (6..=10).contains(o)),
        "only fresh B went to SendGrid"
    );
    assert!(brevo_set.is_disjoint(&sendgrid_set), "no mail reached both");
    assert_eq!(brevo_set.union(&sendgrid_set).copied().collect::<BTreeSet<_>>(), (1..=10).collect(), "none lost");
    assert!(on_brevo.values().chain(on_sendgrid.values()).all(|n| *n == 1), "each once");
    for (_, m) in sendgrid.accepted() {
        assert_eq!(m["template_id"], "d-order", "the fallback sends its own template");
        let order = m["personalizations"][0]["dynamic_template_data"]["order"].as_i64().unwrap();
        assert_eq!(m["personalizations"][0]["to"][0]["email"], format!("operator{order}@example.com"));
    }
    for (channel, _, _, provider, id) in rows(&env).await {
        assert_eq!(channel, "email");
        let provider = provider.unwrap();
        assert!(provider == "brevo" || provider == "sendgrid");
        assert!(id.is_some(), "{provider}'s message id is recorded");
    }
}

crate::both_modes!(mailgun_end_to_end_templates_and_text_once_each);
async fn mailgun_end_to_end_templates_and_text_once_each(mode: Mode) {
    let fake = FakeMailgun::start("key-1", "mg.example.com", &["order-shipped"]);
    let extra = format!(
        r#"
[channels.email]
provider = "mailgun"
address_query = "SELECT email FROM auth_user WHERE id = $1"
templates = {{ order_shipped = "order-shipped" }}
subject = "{{title}}"

[providers.mailgun]
api_key = "key-1"
domain = "mg.example.com"
from = "Alerts <alerts@mg.example.com>"
region = "eu"
base_url = "{url}"
"#,
        url = fake.base_url()
    );
    let env = Env::with_mode(mode, "mailgun", "", &extra).await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    for order in 1..=6 {
        let event = if order % 2 == 0 { "order_shipped" } else { "order_created" };
        outbox(&client, event, order, order, "{email}").await;
    }
    let statuses = env.wait_settled(6, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_eq!(statuses.get("sent"), Some(&6), "{statuses:?}");
    let sent = fake.accepted();
    let orders = counts(sent.iter().map(|(_, f)| {
        let vars = f
            .get("t:variables")
            .map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap()["order"].as_i64().unwrap());
        vars.unwrap_or_else(|| f["subject"].trim_start_matches("Commande ").parse().unwrap())
    }));
    assert_eq!(orders, (1..=6).map(|o| (o, 1)).collect(), "each row once ({mode:?})");
    for (_, f) in &sent {
        assert!(f.contains_key("template") == f.contains_key("t:variables"));
        assert!(f.contains_key("template") != f.contains_key("text"), "a template or a text: {f:?}");
    }
    let ids: BTreeSet<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    let recorded: BTreeSet<String> = rows(&env).await.into_iter().filter_map(|r| r.4).collect();
    assert_eq!(recorded, ids, "Mailgun's ids are in the ledger");
}

crate::both_modes!(sns_sms_and_fifo_topic_end_to_end);
async fn sns_sms_and_fifo_topic_end_to_end(mode: Mode) {
    let fake = FakeSns::start(AKID, SECRET, None, "eu-west-3");
    fake.create_topic(FIFO);
    let extra = format!(
        r#"
[channels.sms]
provider = "sns"
address_query = "SELECT phone FROM operators_operatorprofile WHERE user_id = $1 AND sms_opt_in"
body = "{{title}}"

[channels.orders]
provider = "sns"
bus = {{ destination = "{FIFO}" }}

[providers.sns]
access_key_id = "{AKID}"
secret_access_key = "{SECRET}"
region = "eu-west-3"
base_url = "{url}"
"#,
        url = fake.base_url()
    );
    let env = Env::with_mode(mode, "sns", "", &extra).await;
    let relay = env.start_in_process();
    env.wait_streaming().await;
    let client = env.db.client().await;
    for user in 1..=6 {
        outbox(&client, "order_shipped", user, 100 + user, "{sms,orders}").await;
    }
    let statuses = env.wait_settled(12, Duration::from_secs(60)).await;
    relay.stop().await;
    // SMS only to the opted-in (even) users; every row on the topic.
    assert_eq!(statuses.get("sent"), Some(&(3 + 6)), "{statuses:?}");
    assert_eq!(statuses.get("skipped"), Some(&3), "{statuses:?}");
    let published = fake.published();
    let texts: BTreeMap<String, String> = published
        .iter()
        .filter_map(|p| Some((p.get("PhoneNumber")?.to_string(), p.get("Message")?.to_string())))
        .collect();
    assert_eq!(
        texts,
        [2, 4, 6].iter().map(|u| (format!("+336{u:08}"), format!("Commande {}", 100 + u))).collect(),
        "{mode:?}"
    );
    let on_topic: Vec<_> = published.iter().filter(|p| p.get("TopicArn") == Some(FIFO)).collect();
    let groups = counts(on_topic.iter().map(|p| p.get("MessageGroupId").unwrap().parse::<i64>().unwrap()));
    assert_eq!(groups, (1..=6).map(|u| (u, 1)).collect(), "one event per row, grouped by recipient");
    let keys: BTreeSet<&str> = on_topic.iter().map(|p| p.get("MessageDeduplicationId").unwrap()).collect();
    assert_eq!(keys.len(), 6, "the delivery keys de-duplicate");
    let ids: BTreeSet<String> = published.iter().map(|p| p.message_id.clone()).collect();
    let recorded: BTreeSet<String> = rows(&env).await.into_iter().filter_map(|r| r.4).collect();
    assert_eq!(recorded, ids, "SNS MessageIds are in the ledger");
}
