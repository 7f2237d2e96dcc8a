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

/// The statements, with a comment above each saying why.
pub fn statements(cfg: &Config) -> Vec<(String, String)> {
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
        out.push((
            "Publication on the routed tables, publishing only the operations routes listen to.".into(),
            format!(
                "DO $$ BEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {name}) THEN\n    \
                 CREATE PUBLICATION {publication} FOR TABLE {table_list} WITH (publish = '{ops}');\n  ELSE\n    \
                 ALTER PUBLICATION {publication} SET TABLE {table_list};\n    \
                 ALTER PUBLICATION {publication} SET (publish = '{ops}');\n  END IF;\nEND $$",
                name = quote_literal(&src.publication),
                ops = ops.join(", "),
            ),
        ));
        out.push((
            "Logical slot with the pgoutput plugin. It keeps WAL until the relay confirms it: drop it if you remove the relay.".into(),
            format!(
                "SELECT pg_create_logical_replication_slot({slot}, 'pgoutput')\n\
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot})",
                slot = quote_literal(&src.slot)
            ),
        ));
    }
    if let Some(role) = &src.role {
        let r = quote_ident(role);
        let attrs = if src.mode == SourceMode::Logical { "LOGIN REPLICATION" } else { "LOGIN" };
        out.push((
            format!("Role for the relay. Set its password yourself: ALTER ROLE {r} PASSWORD '...';"),
            format!(
                "DO $$ BEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN\n    \
                 CREATE ROLE {r} {attrs};\n  END IF;\nEND $$",
                lit = quote_literal(role)
            ),
        ));
        out.push((
            "The relay reads the routed tables and nothing else.".into(),
            format!("GRANT SELECT ON {table_list} TO {r}"),
        ));
        out.push((
            "The relay's own schema (ledger, offset), owned by the relay's role.".into(),
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
         -- Requires wal_level = logical (ALTER SYSTEM SET wal_level = logical; then restart).\n\
         -- Safe to run twice.\n",
    );
    for (why, sql) in statements(cfg) {
        s.push_str(&format!("\n-- {why}\n{sql};\n"));
    }
    s
}

/// Applies the script, after checking what would make it fail obscurely.
pub async fn apply(client: &Client, cfg: &Config) -> Result<(), SetupError> {
    if cfg.source.mode == SourceMode::Logical {
        let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        if level != "logical" {
            return Err(SetupError::WalLevel(level));
        }
    }
    for (_, sql) in statements(cfg) {
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SetupError::Statement { statement: sql.clone(), source })?;
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
        assert!(sql.contains(
            "CREATE PUBLICATION \"outbox_relay\" FOR TABLE \"public\".\"operators_notificationoperateur\", \
             \"public\".\"operators_outboxevent\" WITH (publish = 'insert')"
        ), "{sql}");
        assert!(sql.contains("pg_create_logical_replication_slot('outbox_relay', 'pgoutput')"));
        assert!(sql.contains("CREATE ROLE \"relay\" LOGIN REPLICATION"));
        assert!(sql.contains("GRANT SELECT ON"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'clock"), "'o''clock'");
        assert_eq!(quote_table("app.t"), "\"app\".\"t\"");
    }
}
