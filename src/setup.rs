//! What a DBA runs once: the publication, the slot, and a role for the relay.
//!
//! `setup --print-sql` prints exactly what `setup` executes, so a DBA can read
//! (or hand-edit) it first. Every statement is safe to run twice. Statements run
//! one by one, outside a transaction: PostgreSQL refuses to create a logical
//! slot in a transaction that has already written.

use tokio_postgres::Client;

use crate::change::Operation;
use crate::config::{Config, SourceMode};
use crate::db::{quote_ident, quote_literal};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("wal_level is {0:?}, logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL")]
    WalLevel(String),
    #[error("{statement}\n  failed: {source}")]
    Statement { statement: String, source: tokio_postgres::Error },
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("relay schema: {0}")]
    Migrate(#[from] crate::ledger::LedgerError),
}

/// `schema.table` → `"schema"."table"`.
pub fn quote_table(qualified: &str) -> String {
    match qualified.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => format!("{}.{}", quote_ident("public"), quote_ident(qualified)),
    }
}

/// One step of the setup: why, and the SQL.
pub struct Statement {
    pub why: String,
    pub sql: String,
    /// The relay schema's migrations: applied through `ledger::migrate` (which
    /// records them), printed as their SQL.
    pub migrations: bool,
    /// What runs instead on PostgreSQL 17 and later (printed as a comment).
    pub pg17: Option<String>,
}

fn step(why: impl Into<String>, sql: String) -> Statement {
    Statement { why: why.into(), sql, migrations: false, pg17: None }
}

/// The statements, with a comment above each saying why.
pub fn statements(cfg: &Config) -> Vec<Statement> {
    let src = &cfg.source;
    let mut tables: Vec<String> = cfg.routes.iter().map(|r| quote_table(&r.qualified_table())).collect();
    tables.sort();
    tables.dedup();
    let table_list = tables.join(", ");
    let mut ops: Vec<&str> = Vec::new();
    for op in cfg.routes.iter().flat_map(|r| &r.operations) {
        let name = match op {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        };
        if !ops.contains(&name) {
            ops.push(name);
        }
    }
    let publication = quote_ident(&src.publication);
    let mut out = vec![];
    if src.mode == SourceMode::Logical {
        out.push(step(
            "Publication on the routed tables, publishing only the operations routes listen to.",
            format!(
                "DO $$ BEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {name}) THEN\n    \
                 CREATE PUBLICATION {publication} FOR TABLE {table_list} WITH (publish = '{ops}');\n  ELSE\n    \
                 ALTER PUBLICATION {publication} SET TABLE {table_list};\n    \
                 ALTER PUBLICATION {publication} SET (publish = '{ops}');\n  END IF;\nEND $$",
                name = quote_literal(&src.publication),
                ops = ops.join(", "),
            ),
        ));
        let create = |args: &str| {
            format!(
                "SELECT pg_create_logical_replication_slot({slot}, 'pgoutput'{args})\n\
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})",
                slot = quote_literal(&src.slot)
            )
        };
        out.push(Statement {
            pg17: Some(create(", failover => true")),
            ..step(
                "Logical slot with the pgoutput plugin. It keeps WAL until the relay confirms it: drop it if you \
                 remove the relay. On PostgreSQL 17+ a failover slot, which standbys can keep in sync \
                 (docs/operations.md, \"Database failover\").",
                create(""),
            )
        });
    }
    if src.mode == SourceMode::Listen {
        let schema = &cfg.relay.schema;
        out.push(Statement {
            why: "The relay schema: ledger, change log and the capture functions (as `outbox-relay migrate`).".into(),
            sql: crate::ledger::migration_sql(schema).into_iter().map(|(_, sql)| sql).collect::<Vec<_>>().join("\n"),
            migrations: true,
            pg17: None,
        });
        for table in &tables {
            out.push(step(
                format!(
                    "Capture triggers on {table}: each statement's rows go to the change log, as committed, with \
                     the columns the routes read{}.",
                    if src.notify {
                        ", and one NOTIFY per transaction wakes the relay"
                    } else {
                        " (no NOTIFY: source.notify = false)"
                    }
                ),
                capture_triggers_sql(cfg, table),
            ));
        }
    }
    if let Some(role) = &src.role {
        let r = quote_ident(role);
        let attrs = if src.mode == SourceMode::Logical { "LOGIN REPLICATION" } else { "LOGIN" };
        out.push(step(
            format!("Role for the relay. Set its password yourself: ALTER ROLE {r} PASSWORD '...';"),
            format!(
                "DO $$ BEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN\n    \
                 CREATE ROLE {r} {attrs};\n  END IF;\nEND $$",
                lit = quote_literal(role)
            ),
        ));
        out.push(step(
            "The relay reads the routed tables and nothing else.",
            format!("GRANT SELECT ON {table_list} TO {r}"),
        ));
        out.push(step(
            "The relay's own schema (ledger, offset), owned by the relay's role.",
            format!(
                "CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION {r};\nGRANT USAGE, CREATE ON SCHEMA {s} TO {r}",
                s = quote_ident(&cfg.relay.schema)
            ),
        ));
    }
    out
}

/// Capture triggers' names: `<schema>_capture_<operation>`.
pub fn capture_trigger_name(schema: &str, op: Operation) -> String {
    format!("{schema}_capture_{}", op.as_str())
}

/// The row-level trigger of installs before migration 7 (table and key only).
pub fn legacy_trigger_name(schema: &str) -> String {
    format!("{schema}_capture")
}

/// Each routed table's columns the capture trigger must record: every route's
/// columns, in route order, each once. `setup` adds the primary key's.
pub fn capture_columns<'a>(cfg: &'a Config, qualified: &str) -> Vec<&'a str> {
    let mut columns: Vec<&str> = vec![];
    for c in cfg.routes.iter().filter(|r| r.qualified_table() == qualified).flat_map(|r| r.columns()) {
        if !columns.contains(&c) {
            columns.push(c);
        }
    }
    columns
}

/// The call that (re)installs `table`'s capture function and triggers
/// (`install_capture`, sql/migrations/007): one statement-level trigger per
/// operation its routes list; the earlier install's row-level trigger and the
/// triggers of operations no route lists any more are dropped. The primary
/// key's columns are added from the catalog there, once, not by the trigger.
fn capture_triggers_sql(cfg: &Config, table: &str) -> String {
    let routes: Vec<_> = cfg.routes.iter().filter(|r| quote_table(&r.qualified_table()) == table).collect();
    let qualified = routes.first().map(|r| r.qualified_table()).unwrap_or_default();
    let columns: Vec<String> = capture_columns(cfg, &qualified).into_iter().map(quote_literal).collect();
    let operations: Vec<String> = [Operation::Insert, Operation::Update, Operation::Delete]
        .into_iter()
        .filter(|op| routes.iter().any(|r| r.operations.contains(op)))
        .map(|op| quote_literal(op.as_str()))
        .collect();
    format!(
        "SELECT {s}.install_capture({table_lit}::regclass,\n  ARRAY[{operations}]::text[],\n  \
         ARRAY[{columns}]::text[],\n  {notify})",
        s = quote_ident(&cfg.relay.schema),
        table_lit = quote_literal(table),
        operations = operations.join(", "),
        columns = columns.join(", "),
        notify = cfg.source.notify,
    )
}

/// Migrations that made listen mode's objects (change log, its position, the
/// capture functions). Teardown without `--ledger` forgets them so that a later
/// `setup` makes those objects again. A new migration touching them joins this list.
const LISTEN_MIGRATIONS: [i32; 3] = [3, 5, 7];

/// What `teardown` runs: everything `setup` made, in either mode (a relay
/// switched from one mode to the other leaves no slot behind), and the relay
/// schema with its ledger only if `ledger`. The role, if any, stays: it may own
/// other things.
pub fn teardown_statements(cfg: &Config, ledger: bool) -> Vec<Statement> {
    let schema = &cfg.relay.schema;
    let s = quote_ident(schema);
    let schema_lit = quote_literal(schema);
    let mut out = vec![
        step(
            "Capture triggers first, on every table (routed now or earlier): Django's writes stop filling the change log.",
            format!(
                "DO $$\nDECLARE r record;\nBEGIN\n  \
                 FOR r IN SELECT t.tgname, t.tgrelid::regclass AS tbl FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid\n           \
                 WHERE p.pronamespace = to_regnamespace({schema_lit}) AND p.proname LIKE 'capture%' LOOP\n    \
                 EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.tbl);\n  \
                 END LOOP;\nEND $$"
            ),
        ),
        step(
            "The change log, its read position, and the capture functions (those setup wrote per table too).",
            format!(
                "DROP TABLE IF EXISTS {s}.changes, {s}.listen_progress, {s}.listen_doorbell;\n\
                 DO $$\nDECLARE f regprocedure;\nBEGIN\n  \
                 FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = to_regnamespace({schema_lit})\n           \
                 AND (p.proname IN ('capture', 'capture_expr', 'text_output', 'install_capture') OR p.proname LIKE 'capture\\_%') LOOP\n    \
                 EXECUTE format('DROP FUNCTION %s', f);\n  \
                 END LOOP;\nEND $$"
            ),
        ),
        step(
            "The logical slot (this database's only): it would keep WAL forever. Stop the relay first: an active slot cannot be dropped.",
            format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots\n\
                 WHERE slot_name = {slot} AND database = current_database()",
                slot = quote_literal(&cfg.source.slot)
            ),
        ),
        step("The publication.", format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&cfg.source.publication))),
    ];
    if ledger {
        out.push(step(
            "The relay schema: ledger, offsets, everything in it.",
            format!("DROP SCHEMA IF EXISTS {s} CASCADE"),
        ));
    } else {
        let versions = LISTEN_MIGRATIONS.map(|v| v.to_string()).join(", ");
        out.push(step(
            "The ledger stays (--ledger drops it). Forget the positions and the listen-mode migrations, so a later `setup` starts afresh.",
            format!(
                "DO $$ BEGIN\n  \
                 IF to_regclass({migrations_lit}) IS NOT NULL THEN\n    \
                 DELETE FROM {s}.schema_migrations WHERE version IN ({versions});\n  END IF;\n  \
                 IF to_regclass({progress_lit}) IS NOT NULL THEN\n    \
                 DELETE FROM {s}.progress WHERE slot = {slot};\n  END IF;\nEND $$",
                slot = quote_literal(&cfg.source.slot),
                migrations_lit = quote_literal(&format!("{s}.schema_migrations")),
                progress_lit = quote_literal(&format!("{s}.progress")),
            ),
        ));
    }
    out
}

/// The script `teardown --print-sql` shows.
pub fn teardown_script(cfg: &Config, ledger: bool) -> String {
    let mut s = String::from(
        "-- outbox-relay teardown: removes what `setup` made. Run as the role that ran setup.\n\
         -- Safe to run twice.\n",
    );
    for st in teardown_statements(cfg, ledger) {
        s.push_str(&format!("\n-- {}\n{};\n", st.why, st.sql));
        if let Some(pg17) = &st.pg17 {
            s.push_str(&format!("-- on PostgreSQL 17 and later, instead:\n-- {};\n", pg17.replace('\n', "\n-- ")));
        }
    }
    if let Some(role) = &cfg.source.role {
        s.push_str(&format!(
            "\n-- The role {} is left in place: DROP ROLE it yourself once nothing uses it.\n",
            quote_ident(role)
        ));
    }
    s
}

/// Runs the teardown, statement by statement.
pub async fn teardown(client: &Client, cfg: &Config, ledger: bool) -> Result<(), SetupError> {
    for st in teardown_statements(cfg, ledger) {
        client
            .batch_execute(&st.sql)
            .await
            .map_err(|source| SetupError::Statement { statement: st.sql.clone(), source })?;
    }
    Ok(())
}

/// The script `--print-sql` shows.
pub fn script(cfg: &Config) -> String {
    let mut s = String::from(
        "-- outbox-relay setup. Run as a superuser (or the tables' owner with REPLICATION).\n\
         -- Logical mode requires wal_level = logical (ALTER SYSTEM SET wal_level = logical; then restart).\n\
         -- Safe to run twice.\n",
    );
    for st in statements(cfg) {
        s.push_str(&format!("\n-- {}\n{};\n", st.why, st.sql));
        if let Some(pg17) = &st.pg17 {
            s.push_str(&format!("-- on PostgreSQL 17 and later, instead:\n-- {};\n", pg17.replace('\n', "\n-- ")));
        }
    }
    s
}

/// Applies the script, after checking what would make it fail obscurely.
pub async fn apply(client: &mut Client, cfg: &Config) -> Result<(), SetupError> {
    if cfg.source.mode == SourceMode::Logical {
        let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        if level != "logical" {
            return Err(SetupError::WalLevel(level));
        }
    }
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    for st in statements(cfg) {
        let st = match st.pg17.clone() {
            Some(sql) if version >= 170_000 => Statement { sql, ..st },
            _ => st,
        };
        if st.migrations {
            crate::ledger::migrate(client, &cfg.relay.schema).await?;
            continue;
        }
        client
            .batch_execute(&st.sql)
            .await
            .map_err(|source| SetupError::Statement { statement: st.sql.clone(), source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_covers_publication_slot_and_role() {
        let mut cfg = Config::from_toml(crate::config::README_EXAMPLE).unwrap();
        cfg.source.role = Some("relay".into());
        let sql = script(&cfg);
        assert!(
            sql.contains(
                "CREATE PUBLICATION \"outbox_relay\" FOR TABLE \"public\".\"operators_notificationoperateur\", \
             \"public\".\"operators_outboxevent\" WITH (publish = 'insert')"
            ),
            "{sql}"
        );
        assert!(sql.contains("pg_create_logical_replication_slot('outbox_relay', 'pgoutput')"));
        assert!(
            sql.contains("-- on PostgreSQL 17 and later, instead:\n-- SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput', failover => true)"),
            "{sql}"
        );
        assert!(sql.contains("CREATE ROLE \"relay\" LOGIN REPLICATION"));
        assert!(sql.contains("GRANT SELECT ON"));
    }

    #[test]
    fn listen_mode_installs_triggers_not_a_slot() {
        let text = crate::config::README_EXAMPLE.replace("mode = \"logical\"", "mode = \"listen\"");
        let cfg = Config::from_toml(&text).unwrap();
        let sql = script(&cfg);
        assert!(!sql.contains("pg_create_logical_replication_slot"), "{sql}");
        assert!(
            sql.contains(
                "SELECT \"outbox_relay\".install_capture('\"public\".\"operators_outboxevent\"'::regclass,\n  \
                 ARRAY['insert']::text[],\n  ARRAY['recipient_id', 'event_type', 'channels', 'payload']::text[],\n  true)"
            ),
            "the route's operations and columns: {sql}"
        );
        assert!(sql.contains("'FOR EACH STATEMENT EXECUTE FUNCTION outbox_relay.%I(%s)'"), "{sql}");
        assert!(sql.contains("'DROP TRIGGER IF EXISTS %I ON %s', 'outbox_relay_capture', tbl"), "the old one goes");
        assert!(
            sql.contains("PERFORM pg_notify(''outbox_relay'', '''')"),
            "a constant payload, folded per transaction"
        );
        let quiet = Config::from_toml(&text.replace("mode = \"listen\"", "mode = \"listen\"\nnotify = false")).unwrap();
        assert!(script(&quiet).contains("::text[],\n  false)"));
    }

    #[test]
    fn teardown_removes_both_modes_and_the_ledger_only_when_asked() {
        let cfg = Config::from_toml(crate::config::README_EXAMPLE).unwrap();
        let sql = teardown_script(&cfg, false);
        for want in [
            "DROP TRIGGER %I ON %s",
            "DROP TABLE IF EXISTS \"outbox_relay\".changes, \"outbox_relay\".listen_progress",
            "pg_drop_replication_slot(slot_name)",
            "DROP PUBLICATION IF EXISTS \"outbox_relay\"",
            "DELETE FROM \"outbox_relay\".schema_migrations WHERE version IN (3, 5, 7)",
        ] {
            assert!(sql.contains(want), "{want}: {sql}");
        }
        assert!(!sql.contains("DROP SCHEMA"), "{sql}");
        assert!(teardown_script(&cfg, true).contains("DROP SCHEMA IF EXISTS \"outbox_relay\" CASCADE"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'clock"), "'o''clock'");
        assert_eq!(quote_table("app.t"), "\"app\".\"t\"");
    }
}
