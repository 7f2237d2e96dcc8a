//! What a DBA runs once: the publication, the slot, and a role for the relay.
//!
//! `setup --print-sql` prints exactly what `setup` executes, so a DBA can read
//! (or hand-edit) it first. Every statement is safe to run twice. Statements run
//! one by one, outside a transaction: PostgreSQL refuses to create a logical
//! slot in a transaction that has already written.

use tokio_postgres::Client;

use crate::config::{Config, SourceMode};
use crate::source::Operation;

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

/// `name` as a SQL identifier, always quoted (safe for any configured name).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as a SQL literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
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
}

fn step(why: impl Into<String>, sql: String) -> Statement {
    Statement { why: why.into(), sql, migrations: false }
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
        out.push(step(
            "Logical slot with the pgoutput plugin. It keeps WAL until the relay confirms it: drop it if you remove the relay.",
            format!(
                "SELECT pg_create_logical_replication_slot({slot}, 'pgoutput')\n\
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})",
                slot = quote_literal(&src.slot)
            ),
        ));
    }
    if src.mode == SourceMode::Listen {
        let schema = &cfg.relay.schema;
        out.push(Statement {
            why: "The relay schema: ledger, change log and the capture() trigger function (as `outbox-relay migrate`)."
                .into(),
            sql: crate::ledger::migration_sql(schema).into_iter().map(|(_, sql)| sql).collect::<Vec<_>>().join("\n"),
            migrations: true,
        });
        let events = ops.iter().map(|o| o.to_uppercase()).collect::<Vec<_>>().join(" OR ");
        for table in &tables {
            // The key columns go in as trigger arguments, read from the catalog
            // here once rather than by the trigger on every row.
            out.push(step(
                format!("Trigger on {table}: records (table, primary key) in the change log and sends a NOTIFY."),
                format!(
                    "DO $$\nDECLARE key_columns text;\nBEGIN\n  \
                     SELECT string_agg(quote_literal(a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))\n    \
                     INTO key_columns\n    \
                     FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])\n   \
                     WHERE i.indrelid = {table_lit}::regclass AND i.indisprimary;\n  \
                     EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER {events} ON %s FOR EACH ROW EXECUTE FUNCTION %I.capture(%s)',\n    \
                     {trigger}, {table_lit}, {schema_lit}, coalesce(key_columns, ''));\nEND $$",
                    trigger = quote_literal(&format!("{schema}_capture")),
                    table_lit = quote_literal(table),
                    schema_lit = quote_literal(schema),
                ),
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

/// The script `--print-sql` shows.
pub fn script(cfg: &Config) -> String {
    let mut s = String::from(
        "-- outbox-relay setup. Run as a superuser (or the tables' owner with REPLICATION).\n\
         -- Logical mode requires wal_level = logical (ALTER SYSTEM SET wal_level = logical; then restart).\n\
         -- Safe to run twice.\n",
    );
    for st in statements(cfg) {
        s.push_str(&format!("\n-- {}\n{};\n", st.why, st.sql));
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
    for st in statements(cfg) {
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
        assert!(sql.contains("CREATE ROLE \"relay\" LOGIN REPLICATION"));
        assert!(sql.contains("GRANT SELECT ON"));
    }

    #[test]
    fn listen_mode_installs_triggers_not_a_slot() {
        let text = crate::config::README_EXAMPLE.replace("mode = \"logical\"", "mode = \"listen\"");
        let cfg = Config::from_toml(&text).unwrap();
        let sql = script(&cfg);
        assert!(!sql.contains("pg_create_logical_replication_slot"), "{sql}");
        assert!(sql.contains("WHERE i.indrelid = '\"public\".\"operators_outboxevent\"'::regclass"), "{sql}");
        assert!(
            sql.contains(
                "'CREATE OR REPLACE TRIGGER %I AFTER INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %I.capture(%s)'"
            ),
            "the key columns become trigger arguments: {sql}"
        );
        assert!(sql.contains("CREATE OR REPLACE FUNCTION outbox_relay.capture()"));
        assert!(sql.contains("pg_notify"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'clock"), "'o''clock'");
        assert_eq!(quote_table("app.t"), "\"app\".\"t\"");
    }
}
