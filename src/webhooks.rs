//! Delivery reports from providers, fed back into the ledger so that Django's
//! audit shows delivered / bounced / failed / read, not just "sent".
//!
//! - `POST /webhooks/twilio`: Twilio's status callback, form-encoded, signed
//!   with `X-Twilio-Signature` over `providers.twilio.status_callback_url` (the
//!   URL Twilio was given, hence the one it signs).
//! - `POST /webhooks/brevo`: Brevo's transactional webhook, JSON, authenticated
//!   by `providers.brevo.webhook_token` (Bearer or `?token=`) or
//!   `webhook_basic` (`user:password`, HTTP Basic).
//!
//! Unsigned or forged calls get 403 and a warning; nothing changes. A status
//! never moves backwards (a late "delivered" does not undo "read").

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use tokio::sync::Mutex;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::Config;
use crate::providers::twilio::verify_signature;

use crate::telemetry::metric::WEBHOOKS;

/// What the handlers share. Not `Debug`: it holds secrets.
struct Hooks {
    database_url: String,
    schema: String,
    /// Twilio's auth token and the callback URL exactly as configured: Twilio
    /// signs the URL it was given, not the one a proxy forwards to us.
    twilio: Option<(String, String)>,
    brevo_token: Option<String>,
    /// `user:password`, compared with the Basic header in constant time.
    brevo_basic: Option<String>,
    /// One connection, opened on the first report and reopened if it drops:
    /// reports are few, and a failed update answers 503 so the provider retries.
    db: Mutex<Option<Client>>,
}

/// The webhook routes, or `None` when no provider is configured to call back.
pub fn router(cfg: &Config) -> Option<Router> {
    let twilio = cfg.providers.twilio.as_ref().and_then(|t| {
        let url = t.status_callback_url.clone()?;
        Some((t.auth_token.expose().to_string(), url))
    });
    let brevo = cfg.providers.brevo.as_ref();
    let brevo_token = brevo.and_then(|b| b.webhook_token.as_ref().map(|s| s.expose().to_string()));
    let brevo_basic = brevo.and_then(|b| b.webhook_basic.as_ref().map(|s| s.expose().to_string()));
    if twilio.is_none() && brevo_token.is_none() && brevo_basic.is_none() {
        return None;
    }
    let hooks = Arc::new(Hooks {
        database_url: cfg.source.database_url.clone(),
        schema: cfg.relay.schema.clone(),
        twilio,
        brevo_token,
        brevo_basic,
        db: Mutex::new(None),
    });
    Some(
        Router::new()
            .route("/webhooks/twilio", post(twilio_status))
            .route("/webhooks/brevo", post(brevo_event))
            .with_state(hooks),
    )
}

fn forbidden(provider: &'static str, why: &str) -> StatusCode {
    warn!(provider, why, "webhook refused: unsigned or forged");
    metrics::counter!(WEBHOOKS, "provider" => provider, "outcome" => "forbidden").increment(1);
    StatusCode::FORBIDDEN
}

async fn twilio_status(State(h): State<Arc<Hooks>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let Some((token, url)) = &h.twilio else { return forbidden("twilio", "status_callback_url not configured") };
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let signature = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !verify_signature(token, url, &params, signature) {
        return forbidden("twilio", "bad X-Twilio-Signature");
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(sid), Some(status)) = (get("MessageSid"), get("MessageStatus")) else {
        return StatusCode::BAD_REQUEST;
    };
    // https://www.twilio.com/docs/messaging/guides/track-outbound-message-status
    let new = match status {
        "delivered" => "delivered",
        "read" => "read",
        "undelivered" | "failed" => "failed",
        _ => return StatusCode::NO_CONTENT, // queued, sending, sent: nothing new for the ledger
    };
    let error = get("ErrorCode").map(|c| format!("twilio reported {status} (error {c})"));
    apply(&h, "twilio", sid, new, error).await
}

async fn brevo_event(
    State(h): State<Arc<Hooks>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let token_ok = h.brevo_token.as_deref().is_some_and(|t| {
        constant_eq(auth.strip_prefix("Bearer ").unwrap_or(""), t)
            || query.get("token").is_some_and(|q| constant_eq(q, t))
    });
    let basic_ok = h.brevo_basic.as_deref().is_some_and(|b| {
        let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(b));
        constant_eq(auth, &expected)
    });
    if !token_ok && !basic_ok {
        return forbidden("brevo", "missing or wrong webhook credentials");
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else { return StatusCode::BAD_REQUEST };
    let (Some(kind), Some(id)) = (event["event"].as_str(), event["message-id"].as_str()) else {
        return StatusCode::BAD_REQUEST;
    };
    // https://developers.brevo.com/docs/transactional-webhooks
    let new = match kind {
        "delivered" => "delivered",
        "hard_bounce" | "soft_bounce" => "bounced",
        "opened" | "unique_opened" | "click" => "read",
        "blocked" | "invalid_email" | "error" => "failed",
        _ => return StatusCode::NO_CONTENT,
    };
    let reason = event["reason"].as_str().map(|r| format!("brevo reported {kind}: {r}"));
    apply(&h, "brevo", id, new, reason).await
}

/// Moves the row forward; never backwards (read > delivered > sent).
async fn apply(h: &Hooks, provider: &'static str, message_id: &str, status: &str, error: Option<String>) -> StatusCode {
    let mut db = h.db.lock().await;
    if db.as_ref().is_none_or(|c| c.is_closed()) {
        *db = crate::ledger::connect(&h.database_url).await.ok();
    }
    let Some(client) = db.as_ref() else { return StatusCode::SERVICE_UNAVAILABLE };
    let from: &[&str] = match status {
        "read" => &["sent", "delivered"],
        "delivered" => &["sent"],
        _ => &["sent", "delivered"],
    };
    let sql = format!(
        "UPDATE {}.deliveries SET status = $1, last_error = COALESCE($2, last_error), updated_at = now()
         WHERE provider = $3 AND provider_message_id = $4 AND status = ANY($5)",
        h.schema
    );
    match client.execute(&sql, &[&status, &error, &provider, &message_id, &from]).await {
        Ok(n) => {
            // 0 rows: an unknown message (sent by another system on the same account) or a
            // report older than the row's status. Acknowledged either way, or the provider retries.
            let outcome = if n == 0 { "unmatched" } else { status };
            info!(provider, status, rows = n, "delivery report");
            metrics::counter!(WEBHOOKS, "provider" => provider, "outcome" => outcome.to_string()).increment(1);
            StatusCode::NO_CONTENT
        }
        // A 5xx makes the provider retry the callback later.
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
