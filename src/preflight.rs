//! Checks run before `run` does any work, so that each thing a user must fix
//! is reported as one line naming the fix (exit code 2), instead of surfacing
//! later as a replication error or a stream of failed deliveries.

use tokio_postgres::Client;

use crate::config::{Config, SourceMode};
use crate::setup;
use crate::source::Operation;

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
    if src.mode == SourceMode::Listen {
        capture_problems(client, cfg, &mut problems).await?;
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

/// Listen mode: each routed table has the capture trigger of this version for
/// each operation its routes list, capturing every column they read, with the
/// configured `source.notify`. An earlier install's row-level trigger (keys,
/// not values) is a mixed state `setup` resolves.
async fn capture_problems(client: &Client, cfg: &Config, problems: &mut Vec<String>) -> Result<(), PreflightError> {
    let schema = &cfg.relay.schema;
    let legacy = setup::legacy_trigger_name(schema);
    let mut seen: Vec<String> = vec![];
    for route in &cfg.routes {
        let qualified = route.qualified_table();
        if seen.contains(&qualified) {
            continue;
        }
        seen.push(qualified.clone());
        let (table_schema, table) = route.schema_and_table();
        let triggers: Vec<(String, Vec<u8>)> = client
            .query(
                "SELECT t.tgname::text, t.tgargs FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&table_schema, &table],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if triggers.iter().any(|(name, _)| *name == legacy) {
            problems.push(format!(
                "table {qualified} still has the {legacy} trigger of an earlier install, which records keys, not the \
                 rows' values: run `outbox-relay setup` to replace it"
            ));
        }
        let needed = setup::capture_columns(cfg, &qualified);
        let flag = if cfg.source.notify { "notify" } else { "quiet" };
        for op in [Operation::Insert, Operation::Update, Operation::Delete] {
            if !cfg.routes.iter().any(|r| r.qualified_table() == qualified && r.operations.contains(&op)) {
                continue;
            }
            let name = setup::capture_trigger_name(schema, op);
            let Some((_, args)) = triggers.iter().find(|(n, _)| *n == name) else {
                problems.push(format!(
                    "table {qualified} has no {name} trigger (a route lists {}): run `outbox-relay setup`",
                    op.as_str()
                ));
                continue;
            };
            // tgargs: the arguments, each NUL-terminated.
            let args: Vec<&[u8]> = args.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            if args.first().copied() != Some(flag.as_bytes()) {
                problems.push(format!(
                    "trigger {name} on {qualified} does not match source.notify = {}: run `outbox-relay setup` again",
                    cfg.source.notify
                ));
            }
            // No column arguments: the trigger captures every column.
            let missing: Vec<&str> =
                needed.iter().copied().filter(|c| args.len() > 1 && !args[1..].contains(&c.as_bytes())).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "trigger {name} on {qualified} does not capture column(s) {} that the routes read: \
                     run `outbox-relay setup` again",
                    missing.join(", ")
                ));
            }
        }
    }
    Ok(())
}
