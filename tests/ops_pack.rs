//! The ops pack: the alerting rules pass their unit tests, and every metric
//! they and the Grafana dashboard name is one the relay exports.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use support::relay::{free_port, Env};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    let out = Command::new("promtool")
        .args(["test", "rules", "rules.test.yml"])
        .current_dir(repo("docker/prometheus"))
        .output()
        .expect("promtool (Debian package `prometheus`, which .ci/run installs) must be on PATH");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

/// `outbox_relay_*` names in a text, histogram suffixes folded into the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_relay_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        rest = &rest[i + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), str::to_string));
        out.insert(family);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_name_is_exported() {
    let rules = std::fs::read_to_string(repo("docker/prometheus/rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(repo("docker/grafana/outbox-relay.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10), "a dashboard with its panels");
    let mut named = metric_names(&rules);
    named.extend(metric_names(&dashboard));
    assert!(named.len() >= 15, "{named:?}");

    // Every provider feature the rules watch: deliveries (Pusher), an SMTP
    // channel (STARTTLS), a webhook (Brevo reports).
    let extra = r#"
[channels.email]
provider = "smtp"
address_query = "SELECT NULL::text WHERE $1::text IS NOT NULL"

[providers.smtp]
url = "smtp://127.0.0.1:1?tls=opportunistic"
from = "Alerts <alerts@example.com>"

[providers.brevo]
api_key = "unused"
sender_email = "alerts@example.com"
webhook_token = "a-long-random-token"
"#;
    let env = Env::with_extra("opspack", extra).await;
    let port = free_port();
    let mut child = env.spawn_binary(port);
    env.wait_streaming().await;
    let client = env.db.client().await;
    support::relay::insert_notifications(&client, 3, 3).await;
    env.wait_settled(3, Duration::from_secs(30)).await;
    // Housekeeping (gauges) runs every 5 s.
    let mut exported = BTreeSet::new();
    for _ in 0..80 {
        let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
        exported = metric_names(&body);
        if named.is_subset(&exported) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = reqwest::get(format!("http://127.0.0.1:{port}/livez")).await.unwrap();
    assert_eq!(live.status().as_u16(), 200, "a relay at work is alive");
    support::relay::sigterm(&child);
    assert!(child.wait().unwrap().success());
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "named by the rules or the dashboard but not exported: {missing:?}");
}
