//! The e-mail, SMS and WhatsApp clients against wire-level fakes (Brevo,
//! Twilio) and a real SMTP conversation with an in-process sink.

mod support;

use std::time::Duration;

use outbox_relay::config::Secret;
use outbox_relay::demo::smtp_sink::SmtpSink;
use outbox_relay::providers::brevo::{Brevo, BrevoConfig};
use outbox_relay::providers::smtp::{Smtp, SmtpConfig};
use outbox_relay::providers::twilio::{Twilio, TwilioConfig};
use outbox_relay::providers::{http_client, Contact, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::brevo::FakeBrevo;
use support::fakes::twilio::FakeTwilio;

fn message(address: &str, template_id: Option<i64>, whatsapp: bool) -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: "or1-0123456789abcdef".into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload: json!({"title": "Commande expédiée 📦", "order": 1042}),
        contact: Some(Contact {
            address: address.into(),
            subject: "Commande expédiée 📦".into(),
            body: "Votre commande 1042 est partie.\n.ligne qui commence par un point".into(),
            template_id,
            whatsapp,
        }),
        bus: None,
        devices: Vec::new(),
    }
}

fn brevo(fake: &FakeBrevo, key: &str) -> Brevo {
    let cfg = BrevoConfig {
        api_key: Secret::new(key),
        sender_email: "alerts@example.com".into(),
        sender_name: Some("Alerts".into()),
        base_url: Some(fake.base_url()),
        timeout_ms: 2000,
        webhook_token: None,
        webhook_basic: None,
    };
    Brevo::new(&cfg, http_client())
}

#[tokio::test]
async fn brevo_sends_templates_with_params_and_plain_mails_with_subject() {
    let fake = FakeBrevo::start("xkeysib-test", &[12]);
    let client = brevo(&fake, "xkeysib-test");
    let ok = client.send(&message("jane@example.com", Some(12), false)).await.unwrap();
    assert!(ok.provider_message_id.as_deref().unwrap().starts_with('<'), "messageId recorded");
    let again = client.send(&message("jane@example.com", Some(12), false)).await.unwrap();
    assert_eq!(again.provider_message_id, ok.provider_message_id, "a re-send carries the same idempotencyKey");
    let mut plain = message("jane@example.com", None, false);
    plain.idempotency_key = "or1-fedcba9876543210".into();
    client.send(&plain).await.unwrap();
    let sent = fake.accepted();
    assert_eq!(sent.len(), 2, "Brevo sent the repeated key once");
    assert_eq!(sent[0]["templateId"], 12);
    assert_eq!(sent[0]["params"]["order"], 1042);
    assert_eq!(sent[0]["to"][0]["email"], "jane@example.com");
    assert_eq!(sent[0]["sender"], json!({"email": "alerts@example.com", "name": "Alerts"}));
    assert_eq!(sent[1]["subject"], "Commande expédiée 📦");
    assert!(sent[1]["textContent"].as_str().unwrap().contains("1042"));
}

#[tokio::test]
async fn brevo_errors_are_classified() {
    let fake = FakeBrevo::start("xkeysib-test", &[12]);
    let unknown_template = brevo(&fake, "xkeysib-test").send(&message("a@b.c", Some(99), false)).await;
    assert!(matches!(unknown_template, Err(ProviderError::Permanent { ref reason }) if reason.contains("Template")));
    let bad_key = brevo(&fake, "wrong").send(&message("a@b.c", Some(12), false)).await;
    assert!(matches!(bad_key, Err(ProviderError::Unauthorized { .. })), "{bad_key:?}");
    fake.fail_next(1, 429, Some("3"));
    let limited = brevo(&fake, "xkeysib-test").send(&message("a@b.c", Some(12), false)).await;
    assert_eq!(
        limited.unwrap_err(),
        ProviderError::Retryable { reason: limited_reason(&fake), retry_after: Some(Duration::from_secs(3)) }
    );
}

fn limited_reason(_: &FakeBrevo) -> String {
    "brevo answered 429: {\"code\":\"error\",\"message\":\"injected failure\"}".into()
}

fn twilio(fake: &FakeTwilio, token: &str) -> Twilio {
    let cfg = TwilioConfig {
        account_sid: "AC0123".into(),
        auth_token: Secret::new(token),
        from: Some("+33700000000".into()),
        messaging_service_sid: None,
        whatsapp_from: Some("whatsapp:+33700000000".into()),
        status_callback_url: Some("https://relay.example.com/webhooks/twilio".into()),
        base_url: Some(fake.base_url()),
        timeout_ms: 2000,
    };
    Twilio::new(&cfg, http_client())
}

#[tokio::test]
async fn twilio_sends_sms_and_whatsapp_form_encoded() {
    let fake = FakeTwilio::start("AC0123", "token");
    let client = twilio(&fake, "token");
    let sms = client.send(&message("+33612345678", None, false)).await.unwrap();
    let wa = client.send(&message("+33612345678", None, true)).await.unwrap();
    let sent = fake.messages();
    assert_eq!(sms.provider_message_id.as_deref(), Some(sent[0].sid.as_str()));
    assert!(wa.provider_message_id.unwrap().starts_with("SM"));
    assert_eq!((sent[0].to.as_str(), sent[0].from.as_str()), ("+33612345678", "+33700000000"));
    assert_eq!((sent[1].to.as_str(), sent[1].from.as_str()), ("whatsapp:+33612345678", "whatsapp:+33700000000"));
    assert!(sent[0].body.contains("1042"));
    assert_eq!(sent[0].status_callback.as_deref(), Some("https://relay.example.com/webhooks/twilio"));
}

#[tokio::test]
async fn twilio_errors_are_classified() {
    let fake = FakeTwilio::start("AC0123", "token");
    let client = twilio(&fake, "token");
    // Not E.164: refused before any call.
    let local = client.send(&message("06 12 34 56 78", None, false)).await;
    assert!(matches!(local, Err(ProviderError::Permanent { .. })));
    assert!(fake.rejections().is_empty(), "no request for a number that cannot be valid");
    fake.mark_invalid("+33600000001");
    let invalid = client.send(&message("+33600000001", None, false)).await;
    assert!(matches!(invalid, Err(ProviderError::Permanent { ref reason }) if reason.contains("21211")), "{invalid:?}");
    let bad_token = twilio(&fake, "nope").send(&message("+33612345678", None, false)).await;
    assert!(matches!(bad_token, Err(ProviderError::Unauthorized { ref reason }) if reason.contains("20003")));
    fake.fail_next(1, 503, None);
    assert!(client.send(&message("+33612345678", None, false)).await.unwrap_err().is_retryable());
}

fn smtp(sink: &SmtpSink) -> Smtp {
    let cfg = SmtpConfig {
        url: sink.url(),
        from: "Alerts <alerts@example.com>".into(),
        username: None,
        password: None,
        timeout_ms: 2000,
        allow_insecure_auth: false,
    };
    Smtp::new(&cfg).unwrap()
}

#[tokio::test]
async fn smtp_delivers_a_real_conversation_to_the_sink() {
    let sink = SmtpSink::start().await.unwrap();
    let accepted = smtp(&sink).send(&message("jane@example.com", None, false)).await.unwrap();
    let mails = sink.mails();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "alerts@example.com");
    assert_eq!(mail.to, ["jane@example.com"]);
    assert_eq!(mail.header("Message-ID"), accepted.provider_message_id, "the Message-ID derives from the key");
    assert!(mail.header("Message-ID").unwrap().contains("or1-0123456789abcdef"));
    assert!(mail.header("Subject").is_some());
    assert!(mail.body().contains(".ligne qui commence par un point"), "dot-stuffing undone: {:?}", mail.body());
}

#[tokio::test]
async fn smtp_550_is_permanent_and_451_retryable() {
    let sink = SmtpSink::start().await.unwrap();
    let client = smtp(&sink);
    sink.reject_next_recipients(1);
    assert!(matches!(
        client.send(&message("gone@example.com", None, false)).await,
        Err(ProviderError::Permanent { .. })
    ));
    sink.defer_next(1);
    assert!(client.send(&message("jane@example.com", None, false)).await.unwrap_err().is_retryable());
    client.send(&message("jane@example.com", None, false)).await.unwrap();
    assert_eq!(sink.mails().len(), 1);
}
