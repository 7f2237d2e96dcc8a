//! TLS towards providers: SMTP never sends credentials in clear unless told
//! to, an opportunistic STARTTLS that is missing is counted (and keeps the
//! credentials home), and `tls.ca_file` lets SMTP and HTTP providers trust a
//! CA of the company's own — each against a real conversation (the SMTP sink,
//! the fake Pusher) behind a TLS front whose certificate a test CA signed.

mod support;

use outbox_relay::config::{Secret, TlsConfig};
use outbox_relay::demo::smtp_sink::SmtpSink;
use outbox_relay::providers::pusher::Pusher;
use outbox_relay::providers::smtp::{Smtp, SmtpConfig};
use outbox_relay::providers::{http_client, http_client_with, Contact, OutboundMessage, ProviderError};
use serde_json::json;
use support::fakes::pusher::FakePusher;
use support::pki::TestCa;
use support::tls_proxy::TlsProxy;

fn mail() -> OutboundMessage {
    OutboundMessage {
        delivery_id: 1,
        idempotency_key: "or1-00000000000000aa".into(),
        channel_name: String::new(),
        event: "order_shipped".into(),
        payload: json!({"title": "Shipped"}),
        contact: Some(Contact {
            address: "jane@example.com".into(),
            subject: "Shipped".into(),
            body: "Your order left.".into(),
            template_id: None,
            whatsapp: false,
        }),
        bus: None,
        devices: Vec::new(),
    }
}

fn smtp_config(url: String) -> SmtpConfig {
    SmtpConfig {
        url,
        from: "Alerts <alerts@example.com>".into(),
        username: None,
        password: None,
        timeout_ms: 5000,
        allow_insecure_auth: false,
    }
}

/// A CA, a certificate for "localhost", and the CA's PEM in a file.
struct Pki {
    ca: TestCa,
    _dir: tempfile::TempDir,
    ca_file: String,
}

fn pki() -> Pki {
    let ca = TestCa::new("company CA");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("company-ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    Pki { ca, ca_file: path.display().to_string(), _dir: dir }
}

#[tokio::test]
async fn smtp_credentials_in_clear_need_allow_insecure_auth() {
    let sink = SmtpSink::start().await.unwrap();
    let url = format!("smtp://mailer:s3cret-pw@127.0.0.1:{}", sink.port());
    let err = Smtp::new(&smtp_config(url.clone())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{text}");
    assert!(text.contains("allow_insecure_auth = true") && text.contains("smtps://"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");

    // Keys instead of the URL: same rule.
    let mut keys = smtp_config(sink.url());
    keys.username = Some("mailer".into());
    keys.password = Some(Secret::new("s3cret-pw"));
    assert!(Smtp::new(&keys).is_err());

    let mut allowed = smtp_config(url);
    allowed.allow_insecure_auth = true;
    Smtp::new(&allowed).unwrap().send(&mail()).await.unwrap();
    assert_eq!(sink.auth_users(), ["mailer"]);
    assert_eq!(sink.mails().len(), 1);
}

#[tokio::test]
async fn missing_starttls_is_counted_and_keeps_credentials_home() {
    // The sink offers no STARTTLS: what a stripping middlebox leaves of a server that does.
    let sink = SmtpSink::start().await.unwrap();
    let anonymous = Smtp::new(&smtp_config(format!("smtp://127.0.0.1:{}?tls=opportunistic", sink.port()))).unwrap();
    anonymous.send(&mail()).await.unwrap();
    assert_eq!(anonymous.starttls_missing(), 1, "sent in clear, and counted");
    assert_eq!(sink.mails().len(), 1);

    let with_credentials =
        Smtp::new(&smtp_config(format!("smtp://mailer:s3cret-pw@127.0.0.1:{}?tls=opportunistic", sink.port())))
            .unwrap();
    let err = with_credentials.send(&mail()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("offered no STARTTLS") && !err.to_string().contains("s3cret-pw"), "{err}");
    assert!(sink.auth_users().is_empty(), "no AUTH went out in clear");
    assert_eq!(sink.mails().len(), 1, "and no mail either");
}

#[tokio::test]
async fn smtps_trusts_tls_ca_file() {
    let pki = pki();
    let sink = SmtpSink::start().await.unwrap();
    let (cert, key) = pki.ca.issue(&["localhost"], "localhost");
    let front = TlsProxy::start(sink.port(), &cert, &key).await;
    let url = format!("smtps://mailer:s3cret-pw@localhost:{}", front.port);

    // The public roots do not know the company's CA.
    let err = Smtp::new(&smtp_config(url.clone())).unwrap().send(&mail()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(sink.auth_users().is_empty());

    let tls = TlsConfig { ca_file: Some(pki.ca_file.clone()) };
    Smtp::with_tls(&smtp_config(url), &tls).unwrap().send(&mail()).await.unwrap();
    assert_eq!(sink.auth_users(), ["mailer"], "credentials allowed: the connection is encrypted");
    assert_eq!(sink.mails().len(), 1);

    let missing = TlsConfig { ca_file: Some("/no/such/ca.pem".into()) };
    let err = Smtp::with_tls(&smtp_config(sink.url()), &missing).unwrap_err();
    assert!(err.to_string().contains("tls.ca_file /no/such/ca.pem"), "{err}");
}

#[tokio::test]
async fn http_providers_trust_tls_ca_file() {
    let pki = pki();
    let fake = FakePusher::start("123", "key", "secret");
    let upstream: u16 = fake.base_url().rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let (cert, key) = pki.ca.issue(&["localhost"], "localhost");
    let front = TlsProxy::start(upstream, &cert, &key).await;
    let mut cfg = fake.config();
    cfg.base_url = Some(format!("https://localhost:{}", front.port));
    let msg = OutboundMessage {
        delivery_id: 1,
        idempotency_key: "d-1".into(),
        channel_name: "private-user-1".into(),
        event: "e".into(),
        payload: json!({"n": 1}),
        contact: None,
        bus: None,
        devices: Vec::new(),
    };

    let refused = Pusher::new(&cfg, http_client()).send_batch(std::slice::from_ref(&msg)).await;
    assert!(refused[0].as_ref().is_err_and(|e| e.is_retryable()), "{refused:?}");
    assert!(fake.events().is_empty());

    let tls = TlsConfig { ca_file: Some(pki.ca_file.clone()) };
    let accepted = Pusher::new(&cfg, http_client_with(&tls).unwrap()).send_batch(&[msg]).await;
    assert!(accepted[0].is_ok(), "{accepted:?}");
    assert_eq!(fake.events().len(), 1);

    let not_pem = TlsConfig { ca_file: Some(pki._dir.path().join("nothing").display().to_string()) };
    assert!(http_client_with(&not_pem).is_err());
}
