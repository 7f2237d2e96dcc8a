//! `outbox-relay backfill --table T`: existing rows through the same routes
//! into the ledger, for the changes the stream can no longer give (a gap
//! refused at start, a route added after its rows were written).
//!
//! Each row is routed as an insert would be. The stream's keys name changes
//! (commit LSN and position), which a row read today cannot recover, so a
//! backfilled delivery has a key of its own (`backfill:<hash of table and
//! primary key>`, plus the channel), and a row counts as **already delivered**
//! when the ledger holds an insert delivery of that table, primary key and
//! channel. Running it twice therefore sends nothing twice. The one case that
//! rule cannot tell apart: a primary key reused after its first row was
//! delivered and deleted — the new row is then taken as already delivered.
//!
//! Rows are read in pages in primary-key order; each page's deliveries and
//! the position reached are committed together (`<schema>.backfills`), so an
//! interrupted run resumes where it stopped.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::change::{ChangeId, Column, Lsn, Operation, RowChange, Table, Value};
use crate::config::Config;
use crate::db::quote_ident;
use crate::ledger::{self, LedgerError};
use crate::routing::{NewDelivery, Router};
use crate::setup::quote_table;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("{0}")]
    Usage(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What to backfill.
#[derive(Clone, Debug)]
pub struct Request {
    /// `schema.table`, as routes name it.
    pub table: String,
    /// Only rows whose `since_column` is at or after this (an SQL timestamp literal).
    pub since: Option<String>,
    pub since_column: String,
    /// Only rows matching this SQL condition, written by the operator.
    pub filter: Option<String>,
    pub dry_run: bool,
    pub page_rows: i64,
}

/// The final count.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub rows: u64,
    /// Deliveries written to the ledger (or, in a dry run, that would be).
    pub new: u64,
    /// Deliveries the ledger already had for the row (sent by the stream or an earlier backfill).
    pub already_delivered: u64,
    /// New deliveries recorded `failed` by routing (bad row), with their reason.
    pub failed: u64,
}

/// A backfilled row's change: stable for the same table and primary key, so a
/// second run (or a resumed one) finds its own deliveries.
pub fn change_id(table: &str, pk: &str) -> ChangeId {
    let mut h = Sha256::new();
    h.update((table.len() as u64).to_be_bytes());
    h.update(table.as_bytes());
    h.update(pk.as_bytes());
    let d = h.finalize();
    ChangeId::Backfill(u64::from_be_bytes(d[..8].try_into().expect("8 bytes")))
}

/// A table's columns with their SQL types, and its primary key in key order.
async fn describe(client: &Client, table: &str) -> Result<(Table, Vec<(String, String)>), BackfillError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod),
                    array_position(i.indkey::int2[], a.attnum)
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    if rows.is_empty() {
        return Err(BackfillError::Usage(format!("table {table} does not exist")));
    }
    let mut key: Vec<(i32, String, String)> =
        rows.iter().filter_map(|r| r.get::<_, Option<i32>>(3).map(|pos| (pos, r.get(0), r.get(2)))).collect();
    if key.is_empty() {
        return Err(BackfillError::Usage(format!(
            "table {table} has no primary key: backfill reads in key order and names rows by their key"
        )));
    }
    key.sort();
    let columns = rows
        .iter()
        .map(|r| Column { name: r.get(0), type_oid: r.get(1), is_key: r.get::<_, Option<i32>>(3).is_some() })
        .collect();
    let table = Table { schema: schema.to_string(), name: name.to_string(), columns };
    Ok((table, key.into_iter().map(|(_, n, t)| (n, t)).collect()))
}

/// Runs (or resumes) a backfill; `progress` is told after each page.
pub async fn run(
    client: &mut Client,
    cfg: &Config,
    req: &Request,
    mut progress: impl FnMut(&Counts),
) -> Result<Counts, BackfillError> {
    let schema = &cfg.relay.schema;
    let router = Router::new(cfg);
    if !router.routes_table(&req.table) {
        return Err(BackfillError::Usage(format!("no route names table {}: nothing to backfill", req.table)));
    }
    let (table, key) = describe(client, &req.table).await?;
    let router =
        router.with_primary_keys(HashMap::from([(req.table.clone(), key.iter().map(|(n, _)| n.clone()).collect())]));
    let table = Arc::new(table);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.backfills (
                 name text PRIMARY KEY, last_key text[] NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    // One position per (table, filter): a different filter is a different backfill.
    let name = format!("{}|{}|{}", req.table, req.since.as_deref().unwrap_or(""), req.filter.as_deref().unwrap_or(""));
    let mut last: Option<Vec<String>> = client
        .query_opt(&format!("SELECT last_key FROM {schema}.backfills WHERE name = $1"), &[&name])
        .await?
        .map(|r| r.get(0));

    let key_list: Vec<String> = key.iter().map(|(n, _)| quote_ident(n)).collect();
    let after: Vec<String> = key.iter().enumerate().map(|(i, (_, ty))| format!("${}::text::{ty}", i + 1)).collect();
    let select: Vec<String> = table.columns.iter().map(|c| format!("{}::text", quote_ident(&c.name))).collect();
    let mut conditions = vec![];
    if let Some(since) = &req.since {
        conditions.push(format!("{} >= {}", quote_ident(&req.since_column), crate::db::quote_literal(since)));
    }
    if let Some(filter) = &req.filter {
        conditions.push(format!("({filter})"));
    }
    let base = if conditions.is_empty() { "true".to_string() } else { conditions.join(" AND ") };
    let (keys, params) = (key_list.join(", "), after.join(", "));
    let first_page = format!(
        "SELECT {} FROM {} WHERE {base} ORDER BY {keys} LIMIT {}",
        select.join(", "),
        quote_table(&req.table),
        req.page_rows
    );
    let next_page = format!(
        "SELECT {} FROM {} WHERE {base} AND ({keys}) > ({params}) ORDER BY {keys} LIMIT {}",
        select.join(", "),
        quote_table(&req.table),
        req.page_rows
    );
    let key_index: Vec<usize> =
        key.iter().map(|(n, _)| table.columns.iter().position(|c| &c.name == n).expect("key column")).collect();

    let mut counts = Counts::default();
    loop {
        let tx = client.transaction().await?;
        let rows = match &last {
            None => tx.query(&first_page, &[]).await?,
            Some(k) => {
                let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    k.iter().map(|s| s as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                tx.query(&next_page, &p).await?
            }
        };
        if rows.is_empty() {
            break;
        }
        let mut deliveries: Vec<NewDelivery> = Vec::new();
        let now = chrono::Utc::now();
        for r in &rows {
            let values: Vec<Value> =
                (0..r.len()).map(|i| r.get::<_, Option<String>>(i).map_or(Value::Null, Value::Text)).collect();
            let pk: Vec<&str> = key_index
                .iter()
                .map(|&i| match &values[i] {
                    Value::Text(t) => t.as_str(),
                    _ => "",
                })
                .collect();
            let id = change_id(&req.table, &pk.join(","));
            let change = RowChange { id, table: table.clone(), op: Operation::Insert, values: values.clone() };
            router.route_change(&change, Lsn::default(), now, &mut deliveries);
        }
        counts.rows += rows.len() as u64;
        last = Some(key_index.iter().map(|&i| rows.last().expect("non-empty").get::<_, String>(i)).collect());

        // Already delivered: an insert delivery of the same row and channel.
        let (mut t, mut pks, mut chs) = (vec![], vec![], vec![]);
        for d in &deliveries {
            t.push(d.source_table.as_str());
            pks.push(d.source_pk.as_str());
            chs.push(d.channel.as_str());
        }
        let known: std::collections::HashSet<(String, String)> = tx
            .query(
                &format!(
                    "SELECT DISTINCT d.source_pk, d.channel FROM {schema}.deliveries d
                     JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(t, pk, ch)
                       ON d.source_table = u.t AND d.source_pk = u.pk AND d.channel = u.ch
                     WHERE d.operation IS NULL OR d.operation = 'insert'"
                ),
                &[&t, &pks, &chs],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let before = deliveries.len();
        deliveries.retain(|d| !known.contains(&(d.source_pk.clone(), d.channel.clone())));
        counts.already_delivered += (before - deliveries.len()) as u64;
        counts.failed += deliveries.iter().filter(|d| d.disposition.status() == "failed").count() as u64;
        if req.dry_run {
            counts.new += deliveries.len() as u64;
            tx.rollback().await?;
        } else {
            let inserted = ledger::insert_deliveries(&tx, schema, &deliveries, None).await?;
            counts.new += inserted.count;
            tx.execute(
                &format!(
                    "INSERT INTO {schema}.backfills (name, last_key) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET last_key = EXCLUDED.last_key, updated_at = now()"
                ),
                &[&name, last.as_ref().expect("set above")],
            )
            .await?;
            tx.commit().await?;
        }
        progress(&counts);
        if (rows.len() as i64) < req.page_rows {
            break;
        }
    }
    if !req.dry_run {
        // Done: a later run with the same filter starts over (new rows since).
        client.execute(&format!("DELETE FROM {schema}.backfills WHERE name = $1"), &[&name]).await?;
    }
    Ok(counts)
}
