//! A recipient's devices, looked up at send time, and what each did with a
//! delivery (`device_sends`).
//!
//! Push channels (webpush, fcm) reach a person on each of their devices. The
//! devices come from the channel's `tokens_query`, run just before the call
//! like an address lookup (src/contacts.rs): the ledger never holds a token,
//! and a device removed since the row was written is not sent to.
//!
//! One delivery, N devices, one ledger row: the provider answers per device,
//! and dispatch writes each device's settled answer to
//! `<schema>.device_sends` right after the call (sent, gone, failed), keyed
//! by a hash of the token. A retry (one device answered 503) then skips the
//! devices already settled: they do not get the notification twice.
//!
//! Row shape of `tokens_query`: one row per device; the first column is the
//! token (FCM) or the subscription's endpoint URL (Web Push), as text; Web
//! Push also reads the columns *named* `p256dh` and `auth` (the keys of the
//! browser's `PushSubscription`, base64url text). Other columns are ignored.

use std::collections::{HashMap, HashSet};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::ChannelConfig;
use crate::contacts::{bind, classify, Prepared};
use crate::providers::devices::{Device, DeviceError, DeviceResult, MAX_DEVICES};

/// A push channel's device settings, from `[channels.<name>]`.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    pub tokens_query: String,
    /// Run for each device the provider says is gone; `None`: nothing is run
    /// (the device is skipped for this delivery only).
    pub on_invalid_token: Option<String>,
}

impl DevicePlan {
    /// `None` for channels that do not push to devices.
    pub fn from_config(ch: &ChannelConfig) -> Option<DevicePlan> {
        Some(DevicePlan { tokens_query: ch.tokens_query.clone()?, on_invalid_token: ch.on_invalid_token.clone() })
    }
}

/// What a device's answer to a delivery left in `device_sends`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    /// The provider took it: never sent to this device again for this delivery.
    Sent,
    /// The device no longer exists (404/410, UNREGISTERED).
    Gone,
    /// Refused for good (too large, refused credentials for this subscription).
    Failed,
}

impl DeviceStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Sent => "sent",
            DeviceStatus::Gone => "gone",
            DeviceStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<DeviceStatus> {
        Some(match s {
            "sent" => DeviceStatus::Sent,
            "gone" => DeviceStatus::Gone,
            "failed" => DeviceStatus::Failed,
            _ => return None,
        })
    }

    /// The settled status a device's answer leaves, if any: a retryable
    /// answer leaves none, so the device is tried again.
    pub fn of(result: &DeviceResult) -> Option<DeviceStatus> {
        match result {
            Ok(_) => Some(DeviceStatus::Sent),
            Err(DeviceError::Gone { .. }) => Some(DeviceStatus::Gone),
            Err(DeviceError::Provider(e)) if e.is_retryable() => None,
            Err(DeviceError::Provider(_)) => Some(DeviceStatus::Failed),
        }
    }
}

/// The recipient's devices: `Err` says what to record instead of a call
/// (skipped: no device; failed: a query to fix; retry: database trouble).
pub async fn lookup(db: &Client, plan: &DevicePlan, recipient: Option<&str>) -> Result<Vec<Device>, Prepared> {
    let Some(recipient) = recipient else { return Err(Prepared::Fail("the delivery has no recipient".into())) };
    let sql = &plan.tokens_query;
    let statement = db.prepare(sql).await.map_err(|e| classify(e, sql))?;
    let params = one_param(statement.params(), recipient, sql)?;
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = db.query(&statement, &refs).await.map_err(|e| classify(e, sql))?;
    if rows.len() > MAX_DEVICES {
        return Err(Prepared::Fail(format!(
            "tokens_query returned {} devices for one recipient, more than {MAX_DEVICES}: does it filter on $1? {sql}",
            rows.len()
        )));
    }
    let text_column = |row: &tokio_postgres::Row, name: &str| -> Result<Option<String>, Prepared> {
        match row.columns().iter().position(|c| c.name() == name) {
            None => Ok(None),
            Some(i) => row.try_get::<_, Option<String>>(i).map_err(|_| {
                Prepared::Fail(format!("tokens_query's column {name} is not text: cast it (::text): {sql}"))
            }),
        }
    };
    let mut seen = HashSet::new();
    let mut devices = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.columns().is_empty() {
            return Err(Prepared::Fail(format!("tokens_query returns no column: {sql}")));
        }
        let token: Option<String> = row.try_get(0).map_err(|_| {
            Prepared::Fail(format!(
                "tokens_query's first column is of type {}, not text: cast it (::text): {sql}",
                row.columns()[0].type_().name()
            ))
        })?;
        let Some(token) = token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else { continue };
        let device = Device { token, p256dh: text_column(row, "p256dh")?, auth: text_column(row, "auth")? };
        // The same subscription stored twice is one device: one notification.
        if seen.insert(device.hash()) {
            devices.push(device);
        }
    }
    if devices.is_empty() {
        return Err(Prepared::Skip("no device".into()));
    }
    Ok(devices)
}

fn one_param(types: &[Type], value: &str, sql: &str) -> Result<Vec<Box<dyn ToSql + Sync + Send>>, Prepared> {
    if types.len() > 1 {
        return Err(Prepared::Fail(format!("this query takes at most $1: {sql}")));
    }
    types.iter().map(|ty| bind(ty, value).map_err(Prepared::Fail)).collect()
}

/// Per-device outcomes already recorded for `ids`, by delivery then device hash.
pub async fn earlier(
    db: &Client,
    schema: &str,
    ids: &[i64],
) -> Result<HashMap<i64, HashMap<Vec<u8>, DeviceStatus>>, tokio_postgres::Error> {
    let rows = db
        .query(
            &format!("SELECT delivery_id, device_hash, status FROM {schema}.device_sends WHERE delivery_id = ANY($1)"),
            &[&ids],
        )
        .await?;
    let mut out: HashMap<i64, HashMap<Vec<u8>, DeviceStatus>> = HashMap::new();
    for r in rows {
        if let Some(status) = DeviceStatus::parse(r.get(2)) {
            out.entry(r.get(0)).or_default().insert(r.get(1), status);
        }
    }
    Ok(out)
}

/// Writes settled per-device answers, in one statement; only for deliveries
/// still `sending` (an erasure or a takeover since the claim wins).
pub async fn record(
    db: &Client,
    schema: &str,
    rows: &[(i64, [u8; 16], DeviceStatus)],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let hashes: Vec<&[u8]> = rows.iter().map(|r| &r.1[..]).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    db.execute(
        &format!(
            "INSERT INTO {schema}.device_sends (delivery_id, device_hash, status)
             SELECT u.id, u.hash, u.status
             FROM unnest($1::bigint[], $2::bytea[], $3::text[]) AS u(id, hash, status)
             JOIN {schema}.deliveries d ON d.id = u.id AND d.status = 'sending'
             ON CONFLICT (delivery_id, device_hash) DO UPDATE SET status = EXCLUDED.status, at = now()"
        ),
        &[&ids, &hashes, &statuses],
    )
    .await
}

/// Runs the channel's `on_invalid_token` for a device the provider says is
/// gone. Failures are logged (without the token) and otherwise ignored: the
/// device is recorded gone for this delivery either way, and the next
/// delivery to it will find it gone again and run this again.
pub async fn forget(db: &Client, plan: &DevicePlan, device: &Device) {
    let Some(sql) = &plan.on_invalid_token else { return };
    let run = async {
        let statement = db.prepare(sql).await.map_err(|e| e.to_string())?;
        let params = one_param(statement.params(), &device.token, sql).map_err(|p| format!("{p:?}"))?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        db.execute(&statement, &refs).await.map_err(|e| e.to_string())
    };
    match run.await {
        Ok(n) => info!(device = %device.label(), rows = n, "device gone: on_invalid_token ran"),
        Err(e) => {
            let e = e.replace(&device.token, "(token)");
            warn!(device = %device.label(), error = %e, "device gone, but on_invalid_token failed; fix it: {sql}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Accepted, ProviderError};

    #[test]
    fn only_settled_answers_are_kept() {
        assert_eq!(DeviceStatus::of(&Ok(Accepted::default())), Some(DeviceStatus::Sent));
        assert_eq!(DeviceStatus::of(&Err(DeviceError::Gone { reason: "410".into() })), Some(DeviceStatus::Gone));
        let retry = ProviderError::Retryable { reason: "503".into(), retry_after: None };
        assert_eq!(DeviceStatus::of(&Err(retry.into())), None);
        let perm = ProviderError::Permanent { reason: "413".into() };
        assert_eq!(DeviceStatus::of(&Err(perm.into())), Some(DeviceStatus::Failed));
        for s in [DeviceStatus::Sent, DeviceStatus::Gone, DeviceStatus::Failed] {
            assert_eq!(DeviceStatus::parse(s.as_str()), Some(s));
        }
    }
}
