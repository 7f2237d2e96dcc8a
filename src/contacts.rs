//! Contact details, looked up at send time and only with consent.
//!
//! Providers that reach a person at an address (e-mail, SMS, WhatsApp) get it
//! here, just before the call, from the channel's `address_query` — so the
//! ledger and the logs never hold it, and a consent withdrawn since the row was
//! written is honoured. Then the message text is rendered from the payload.

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::config::{ChannelConfig, EventText};
use crate::providers::template::{default_text, render};
use crate::providers::Contact;

/// A channel's contact settings, from `[channels.<name>]`.
#[derive(Clone, Debug)]
pub struct ContactPlan {
    pub address_query: String,
    pub preferences_query: Option<String>,
    pub templates: BTreeMap<String, i64>,
    pub require_template: bool,
    pub body: Option<String>,
    pub subject: Option<String>,
    pub texts: BTreeMap<String, EventText>,
    pub whatsapp: bool,
}

impl ContactPlan {
    /// `None` for app channels (Pusher, Ably, log), which need no address.
    pub fn from_config(name: &str, ch: &ChannelConfig) -> Option<ContactPlan> {
        Some(ContactPlan {
            address_query: ch.address_query.clone()?,
            preferences_query: ch.preferences_query.clone(),
            templates: ch.templates.clone(),
            require_template: ch.require_template,
            body: ch.body.clone(),
            subject: ch.subject.clone(),
            texts: ch.texts.clone(),
            whatsapp: ch.is_whatsapp(name),
        })
    }
}

/// What to do with one delivery.
#[derive(Debug)]
pub enum Prepared {
    Ready(Contact),
    /// Not sent, on purpose: no address, no consent, preference says no.
    Skip(String),
    /// Not sendable as configured (missing template, placeholder not in payload).
    Fail(String),
    /// The lookup itself failed (database trouble): try again later.
    Retry(String),
}

pub async fn prepare(
    db: &Client,
    plan: &ContactPlan,
    recipient: Option<&str>,
    event: &str,
    payload: &Value,
) -> Prepared {
    let Some(recipient) = recipient else { return Prepared::Fail("the delivery has no recipient".into()) };
    if let Some(sql) = &plan.preferences_query {
        if let Some(not_wanted) = preference_refuses(db, sql, recipient, event).await {
            return not_wanted;
        }
    }
    let address = match query_one_value(db, &plan.address_query, recipient, None).await {
        Ok(Some(Lookup::Text(a))) if !a.trim().is_empty() => a.trim().to_string(),
        Ok(_) => return Prepared::Skip("no address or no consent".into()),
        Err(e) => return e,
    };
    let template_id = plan.templates.get(event).copied();
    if template_id.is_none() && plan.require_template {
        return Prepared::Fail(format!("no template for event {event:?} in this channel's templates"));
    }
    let fill = |template: Option<&String>| match template {
        Some(t) => render(t, payload).map_err(|e| Prepared::Fail(e.to_string())),
        None => Ok(default_text(event, payload)),
    };
    let text = plan.texts.get(event);
    let body = match fill(text.and_then(|t| t.body.as_ref()).or(plan.body.as_ref())) {
        Ok(b) => b,
        Err(p) => return p,
    };
    let subject = match fill(text.and_then(|t| t.subject.as_ref()).or(plan.subject.as_ref())) {
        Ok(s) => s,
        Err(p) => return p,
    };
    Prepared::Ready(Contact { address, subject, body, template_id, whatsapp: plan.whatsapp })
}

enum Lookup {
    Text(String),
    Bool(bool),
}

/// The channel's `preferences_query` for this recipient and event: `None` if
/// the delivery may go, else what to record instead (skipped, or the lookup's
/// own failure). Used for app channels too (Pusher, Ably), which have no address.
pub async fn preference_refuses(db: &Client, sql: &str, recipient: &str, event: &str) -> Option<Prepared> {
    match query_one_value(db, sql, recipient, Some(event)).await {
        Ok(Some(Lookup::Bool(true))) => None,
        Ok(_) => Some(Prepared::Skip("preference: the user does not want this event on this channel".into())),
        Err(e) => Some(e),
    }
}

/// Runs a lookup with the recipient (and event) bound to whatever types the
/// query's parameters have: `WHERE id = $1` on an integer column gets an integer.
async fn query_one_value(
    db: &Client,
    sql: &str,
    recipient: &str,
    event: Option<&str>,
) -> Result<Option<Lookup>, Prepared> {
    let statement = db.prepare(sql).await.map_err(|e| classify(e, sql))?;
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    for (i, ty) in statement.params().iter().enumerate() {
        let text = match i {
            0 => recipient,
            1 => event.unwrap_or(""),
            _ => {
                return Err(Prepared::Fail(format!("lookup query takes at most $1 (recipient) and $2 (event): {sql}")))
            }
        };
        params.push(bind(ty, text).map_err(Prepared::Fail)?);
    }
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = db.query(&statement, &refs).await.map_err(|e| classify(e, sql))?;
    // Two addresses for one person is a query that needs fixing, not a
    // transient state: retrying would give the same answer until the delivery dies.
    if rows.len() > 1 {
        return Err(Prepared::Fail(format!(
            "lookup query returned {} rows for one recipient; it must return at most one \
             (add a unique condition or LIMIT 1): {sql}",
            rows.len()
        )));
    }
    let Some(r) = rows.first() else { return Ok(None) };
    let Some(column) = r.columns().first() else {
        return Err(Prepared::Fail(format!("lookup query returns no column: {sql}")));
    };
    if *column.type_() == Type::BOOL {
        return Ok(r.get::<_, Option<bool>>(0).map(Lookup::Bool));
    }
    match r.try_get::<_, Option<String>>(0) {
        Ok(text) => Ok(text.map(Lookup::Text)),
        // An integer phone column, say: not "no consent", a query to fix.
        Err(_) => Err(Prepared::Fail(format!(
            "lookup query's first column is of type {}, not text or boolean: cast it (::text): {sql}",
            column.type_().name()
        ))),
    }
}

pub(crate) fn bind(ty: &Type, text: &str) -> Result<Box<dyn ToSql + Sync + Send>, String> {
    let bad = || format!("recipient {text:?} does not fit the lookup parameter type {ty}: cast it, e.g. $1::text");
    Ok(match *ty {
        Type::INT2 => Box::new(text.parse::<i16>().map_err(|_| bad())?),
        Type::INT4 => Box::new(text.parse::<i32>().map_err(|_| bad())?),
        Type::INT8 => Box::new(text.parse::<i64>().map_err(|_| bad())?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Box::new(text.to_string()),
        _ => return Err(bad()),
    })
}

pub(crate) fn classify(e: tokio_postgres::Error, sql: &str) -> Prepared {
    if crate::db::db_error_is_retryable(&e) {
        Prepared::Retry(format!("contact lookup: {e}"))
    } else {
        Prepared::Fail(format!("contact lookup failed ({e}): fix the channel's query: {sql}"))
    }
}
