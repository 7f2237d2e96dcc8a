//! Checks run before `run` does any work, so that each thing a user must fix
//! is reported as one line naming the fix (exit code 2), instead of surfacing
//! later as a replication error or a stream of failed deliveries.

use tokio_postgres::Client;

use crate::config::{Config, SourceMode};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Something a user must change; the message says what.
    #[error("{0}")]
    Fix(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Every problem found, not only the first: fixing them one restart at a time is tedious.
pub async fn check(client: &Client, cfg: &Config) -> Result<(), PreflightError> {
    let mut problems = Vec::new();
    let src = &cfg.source;
    if src.mode == SourceMode::Logical {
        let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        if level != "logical" {
            problems.push(format!(
                "wal_level is {level:?}: run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
            ));
        }
        let can_replicate: bool = client
            .query_one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await?
            .get(0);
        if !can_replicate {
            problems.push("the relay's role lacks REPLICATION: ALTER ROLE <role> REPLICATION; (or run `outbox-relay setup` with source.role)".into());
        }
        let slot = client
            .query_opt(
                "SELECT plugin::text, database::text = current_database() FROM pg_replication_slots WHERE slot_name = $1",
                &[&src.slot],
            )
            .await?;
        match slot {
            None => problems.push(format!("replication slot {:?} does not exist: run `outbox-relay setup`", src.slot)),
            Some(r) if r.get::<_, Option<String>>(0).as_deref() != Some("pgoutput") => problems.push(format!(
                "slot {:?} does not use pgoutput: drop it (SELECT pg_drop_replication_slot('{}')) and run `outbox-relay setup`",
                src.slot, src.slot
            )),
            Some(r) if !r.get::<_, bool>(1) => problems.push(format!(
                "slot {:?} belongs to another database: give this relay its own source.slot",
                src.slot
            )),
            Some(_) => {}
        }
        let published =
            client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&src.publication]).await?;
        if published.is_none() {
            problems.push(format!("publication {:?} does not exist: run `outbox-relay setup`", src.publication));
        } else {
            for route in &cfg.routes {
                let (schema, table) = route.schema_and_table();
                let listed = client
                    .query_opt(
                        "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                        &[&src.publication, &schema, &table],
                    )
                    .await?;
                if listed.is_none() {
                    problems.push(format!(
                        "table {} is not in publication {:?}: run `outbox-relay setup` again",
                        route.qualified_table(),
                        src.publication
                    ));
                }
            }
        }
    }
    if src.mode == SourceMode::Logical {
        replica_identity(client, cfg, &mut problems).await?;
    }
    if src.mode == SourceMode::Listen {
        let trigger = format!("{}_capture", cfg.relay.schema);
        for route in &cfg.routes {
            let (schema, table) = route.schema_and_table();
            let installed = client
                .query_opt(
                    "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = $3",
                    &[&schema, &table, &trigger],
                )
                .await?;
            if installed.is_none() {
                problems.push(format!(
                    "table {} has no {trigger} trigger: run `outbox-relay setup` (listen mode installs it)",
                    route.qualified_table()
                ));
            }
        }
    }
    for route in &cfg.routes {
        let (schema, table) = route.schema_and_table();
        let qualified = route.qualified_table();
        let columns: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&schema, &table],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if columns.is_empty() {
            problems.push(format!(
                "routed table {qualified} does not exist: fix routes[].table or run Django's migrations"
            ));
            continue;
        }
        for col in route.columns() {
            if !columns.iter().any(|c| c == col) {
                problems.push(format!("column {col:?} does not exist in {qualified}: fix the route's column names"));
            }
        }
        let can_read: bool = client
            .query_one("SELECT has_table_privilege(format('%I.%I', $1::text, $2::text), 'SELECT')", &[&schema, &table])
            .await?
            .get(0);
        if !can_read {
            problems
                .push(format!("the relay's role cannot SELECT {qualified}: GRANT SELECT ON {qualified} TO <role>;"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Fix(problems.join("\n")))
    }
}

/// What pgoutput can send for updates and deletes depends on each table's
/// replica identity: with none (no primary key under DEFAULT, or NOTHING),
/// PostgreSQL refuses the application's own UPDATE and DELETE on a table
/// published for them; under DEFAULT or USING INDEX a DELETE carries only the
/// key columns, so a delete route needing any other column gets NULLs.
async fn replica_identity(client: &Client, cfg: &Config, problems: &mut Vec<String>) -> Result<(), PreflightError> {
    use crate::source::Operation;
    for route in &cfg.routes {
        let wants_update = route.operations.contains(&Operation::Update);
        let wants_delete = route.operations.contains(&Operation::Delete);
        if !wants_update && !wants_delete {
            continue;
        }
        let qualified = route.qualified_table();
        let row = client
            .query_opt(
                "SELECT c.relreplident::text,
                        (SELECT array_agg(a.attname::text) FROM pg_index i
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
                         WHERE i.indrelid = c.oid
                           AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))
                 FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&qualified],
            )
            .await?;
        let Some(row) = row else { continue }; // a missing table is reported below
        let identity: String = row.get(0);
        let key: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
        let ops = if wants_delete && wants_update {
            "UPDATE and DELETE"
        } else if wants_delete {
            "DELETE"
        } else {
            "UPDATE"
        };
        if identity == "n" || (identity != "f" && key.is_empty()) {
            problems.push(format!(
                "table {qualified} has no replica identity (no primary key, or REPLICA IDENTITY NOTHING): \
                 while it is published for {ops}, PostgreSQL refuses the application's own {ops} on it. \
                 ALTER TABLE {qualified} REPLICA IDENTITY FULL; (or give it a primary key)"
            ));
            continue;
        }
        if wants_delete && identity != "f" {
            let missing: Vec<&str> = route.columns().into_iter().filter(|c| !key.iter().any(|k| k == c)).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "a delete route on {qualified} uses {}, but a DELETE sends only the key ({}) under its replica \
                     identity: ALTER TABLE {qualified} REPLICA IDENTITY FULL;",
                    missing.join(", "),
                    key.join(", ")
                ));
            }
        }
    }
    Ok(())
}
