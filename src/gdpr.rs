//! A person's rights over what the relay holds about them (GDPR articles 15
//! and 17): `export --recipient ID` (access) and `erase --recipient ID`
//! (erasure). docs/gdpr.md says what is stored, where and for how long.
//!
//! Erasure anonymises rather than deletes: a ledger row is also the proof that
//! its change was delivered, and without it a replay of the source transaction
//! would send the message again. So the row keeps its key, channel, event,
//! status and times, and loses everything about the person: recipient,
//! payload, provider message id, error text (which may quote an address).
//! Deliveries not yet sent are not sent any more (`discarded`).

use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tracing::info;

/// What `erase` puts in place of the recipient: marks the row as erased and
/// makes a second run find nothing left to do.
pub const ERASED: &str = "(erased)";

#[derive(Debug, thiserror::Error)]
pub enum GdprError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What `erase` did, without the person's data: safe to log and print.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// Rows whose personal data was removed.
    pub anonymised: u64,
    /// Of those, deliveries that were still to be sent and now never will be.
    pub discarded: u64,
}

/// A short, stable pseudonym for logs: which erasure this was, for an auditor
/// holding the id, without writing the id itself.
pub fn pseudonym(recipient: &str) -> String {
    hex::encode(&Sha256::digest(recipient.as_bytes())[..6])
}

/// Removes a person's data from every ledger row. Idempotent.
pub async fn erase(client: &mut Client, schema: &str, recipient: &str) -> Result<Erased, GdprError> {
    let tx = client.transaction().await?;
    // A row `sending` may be in a provider call right now; that call cannot
    // be taken back, but its outcome will not be written (outcomes are
    // recorded only on rows still `sending` under their claim), so the
    // person's data does not come back into the ledger.
    let discarded = tx
        .execute(
            &format!(
                "UPDATE {schema}.deliveries SET status = 'discarded', last_error = 'erased on request (GDPR)',
                        updated_at = now()
                 WHERE recipient = $1 AND status IN ('pending', 'sending')"
            ),
            &[&recipient],
        )
        .await?;
    // Which devices got which delivery: a pseudonymous trail of the person's
    // devices, and no proof of delivery needs it (the ledger row is that).
    tx.execute(
        &format!(
            "DELETE FROM {schema}.device_sends
             WHERE delivery_id IN (SELECT id FROM {schema}.deliveries WHERE recipient = $1)"
        ),
        &[&recipient],
    )
    .await?;
    let anonymised = tx
        .execute(
            &format!(
                "UPDATE {schema}.deliveries
                 SET recipient = $2, payload = '{{}}'::jsonb, provider_message_id = NULL,
                     last_error = CASE WHEN last_error IS NULL THEN NULL ELSE 'erased on request (GDPR)' END,
                     updated_at = now()
                 WHERE recipient = $1"
            ),
            &[&recipient, &ERASED],
        )
        .await?;
    tx.commit().await?;
    let done = Erased { anonymised, discarded };
    info!(recipient = %pseudonym(recipient), anonymised, discarded, "erased a recipient's data from the ledger");
    Ok(done)
}

/// Everything the ledger holds about a person, as JSON (right of access).
pub async fn export(client: &Client, schema: &str, recipient: &str) -> Result<Json, GdprError> {
    let rows = client
        .query(
            &format!(
                "SELECT coalesce(jsonb_agg(jsonb_build_object(
                     'id', id, 'channel', channel, 'event', event, 'status', status,
                     'source_table', source_table, 'source_pk', source_pk, 'operation', operation,
                     'payload', payload, 'provider', provider, 'provider_message_id', provider_message_id,
                     'attempts', attempts, 'last_error', last_error, 'committed_at', committed_at,
                     'created_at', created_at, 'sent_at', sent_at, 'updated_at', updated_at) ORDER BY id), '[]')
                 FROM {schema}.deliveries WHERE recipient = $1"
            ),
            &[&recipient],
        )
        .await?;
    let deliveries: Json = rows[0].get(0);
    Ok(serde_json::json!({
        "recipient": recipient,
        "exported_at": chrono::Utc::now().to_rfc3339(),
        "held_by": "outbox-relay ledger",
        "deliveries": deliveries,
    }))
}
