//! Checks run before `run` does any work, so that each thing a user must fix
//! is reported as one line naming the fix (exit code 2), instead of surfacing
//! later as a replication error or a stream of failed deliveries.
//!
//! Managed services grant replication their own way and change `wal_level`
//! through their own consoles, so the checks recognise the service (by the
//! roles it installs) and word each fix in its terms: RDS/Aurora's
//! `rds_replication` membership and `rds.logical_replication` parameter, Cloud
//! SQL's `cloudsql.logical_decoding` flag, Azure's server parameters, Neon's
//! project setting. docs/managed-postgres.md has the full story per provider.

use tokio_postgres::Client;

use crate::change::Operation;
use crate::config::{Config, SourceMode};
use crate::setup;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Something a user must change; the message says what.
    #[error("{0}")]
    Fix(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The oldest PostgreSQL the relay runs on: the ledger's listen-mode tables
/// use `xid8` and `pg_current_xact_id()`, new in 13.
pub const MIN_SERVER_VERSION: i32 = 130_000;

/// Where the database runs, as far as the fixes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Amazon RDS for PostgreSQL and Aurora PostgreSQL (`rds_replication` exists).
    Rds,
    /// Google Cloud SQL (`cloudsqlsuperuser` exists).
    CloudSql,
    /// Azure Database for PostgreSQL flexible server (`azure_pg_admin` exists).
    Azure,
    /// Neon (`neon_superuser` exists).
    Neon,
    /// Supabase (`supabase_admin` exists).
    Supabase,
    /// Self-managed, Crunchy Bridge (a real superuser) and anything else.
    Plain,
}

impl Platform {
    /// Recognises the service by the administrative roles it creates in every cluster.
    pub async fn detect(client: &Client) -> Result<Platform, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT to_regrole('rds_replication') IS NOT NULL, to_regrole('cloudsqlsuperuser') IS NOT NULL,
                        to_regrole('azure_pg_admin') IS NOT NULL, to_regrole('neon_superuser') IS NOT NULL,
                        to_regrole('supabase_admin') IS NOT NULL",
                &[],
            )
            .await?;
        let found = [Platform::Rds, Platform::CloudSql, Platform::Azure, Platform::Neon, Platform::Supabase];
        Ok(found.into_iter().enumerate().find(|(i, _)| row.get::<_, bool>(*i)).map_or(Platform::Plain, |(_, p)| p))
    }

    /// How to get `wal_level = logical` here.
    pub fn wal_level_fix(self) -> &'static str {
        match self {
            Platform::Rds => {
                "set rds.logical_replication = 1 in the instance's DB parameter group (the DB cluster parameter \
                 group for Aurora) and reboot"
            }
            Platform::CloudSql => "set the database flag cloudsql.logical_decoding = on (Cloud SQL restarts the instance)",
            Platform::Azure => {
                "set the server parameter wal_level = logical (and max_worker_processes to at least 16) \
                 and restart the server"
            }
            Platform::Neon => {
                "enable logical replication in the Neon project settings (irreversible; computes restart)"
            }
            Platform::Supabase => "Supabase runs wal_level = logical: connect directly (db.<ref>.supabase.co:5432), not through the pooler",
            Platform::Plain => "run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL",
        }
    }

    /// How to give `role` the right to stream from a slot here.
    pub fn replication_fix(self, role: &str) -> String {
        match self {
            Platform::Rds => format!("as the master user: GRANT rds_replication TO {role};"),
            Platform::CloudSql => {
                format!("as a cloudsqlsuperuser member (e.g. postgres): ALTER USER {role} WITH REPLICATION;")
            }
            Platform::Azure => format!("as the server admin (azure_pg_admin): ALTER ROLE {role} WITH REPLICATION;"),
            Platform::Neon => format!(
                "create the role in the Neon console or API (its roles have REPLICATION through neon_superuser), \
                 or ALTER ROLE {role} WITH REPLICATION;"
            ),
            Platform::Supabase => format!("as postgres: ALTER ROLE {role} WITH REPLICATION;"),
            Platform::Plain => {
                format!("ALTER ROLE {role} REPLICATION; (or run `outbox-relay setup` with source.role)")
            }
        }
    }
}

/// `server_version_num` below [`MIN_SERVER_VERSION`], worded.
pub fn version_problem(version_num: i32) -> Option<String> {
    (version_num < MIN_SERVER_VERSION).then(|| {
        // 9.6 is 90624 (major.minor.patch); 10 and later are major * 10000 + minor.
        let shown = if version_num >= 100_000 {
            format!("{}.{}", version_num / 10_000, version_num % 10_000)
        } else {
            format!("{}.{}.{}", version_num / 10_000, version_num % 10_000 / 100, version_num % 100)
        };
        format!("PostgreSQL {shown} is older than 13, the oldest the relay supports (its tables use xid8): upgrade the server")
    })
}

/// Every problem found, not only the first: fixing them one restart at a time is tedious.
pub async fn check(client: &Client, cfg: &Config) -> Result<(), PreflightError> {
    let mut problems = Vec::new();
    let src = &cfg.source;
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    problems.extend(version_problem(version));
    if src.mode == SourceMode::Logical {
        let platform = Platform::detect(client).await?;
        let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        if level != "logical" {
            problems.push(format!(
                "wal_level is {level:?}, logical replication needs \"logical\": {}; or use mode = \"listen\" \
                 (docs/listen-mode.md)",
                platform.wal_level_fix()
            ));
        }
        // RDS and Aurora grant replication by role membership, not the attribute.
        let row = client
            .query_one(
                "SELECT r.rolreplication OR r.rolsuper OR EXISTS (
                     SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication'
                     AND pg_has_role(current_user, g.oid, 'MEMBER')), current_user::text
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        let (can_replicate, role): (bool, String) = (row.get(0), row.get(1));
        if !can_replicate {
            problems.push(format!("the relay's role {role:?} cannot replicate: {}", platform.replication_fix(&role)));
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
        failover_readiness(client, &src.slot).await?;
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

/// PostgreSQL 17+: a failover slot survives a switch to a standby only if it
/// is marked `failover` and the primary waits for the standbys that keep it
/// (`synchronized_standby_slots`; `sync_replication_slots = on` on them).
/// Said, not refused: a database without standbys needs neither.
async fn failover_readiness(client: &Client, slot: &str) -> Result<(), PreflightError> {
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    if version < 170_000 {
        return Ok(());
    }
    let row = client
        .query_opt(
            "SELECT s.failover, coalesce(current_setting('synchronized_standby_slots', true), '')
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(r) = row {
        let (failover, standby_slots): (bool, String) = (r.get(0), r.get(1));
        if !failover {
            tracing::warn!(
                slot,
                "the slot is not a failover slot: after a switch to a standby it is gone; \
                recreate it with `outbox-relay setup` (docs/operations.md, \"Database failover\")"
            );
        } else if standby_slots.is_empty() {
            tracing::warn!(slot, "synchronized_standby_slots is empty: a standby may be promoted before it has \
                the slot's position; list the standbys' physical slots there (docs/operations.md, \"Database failover\")");
        }
    }
    Ok(())
}

/// What pgoutput can send for updates and deletes depends on each table's
/// replica identity: with none (no primary key under DEFAULT, or NOTHING),
/// PostgreSQL refuses the application's own UPDATE and DELETE on a table
/// published for them; under DEFAULT or USING INDEX a DELETE carries only the
/// key columns, so a delete route needing any other column gets NULLs.
async fn replica_identity(client: &Client, cfg: &Config, problems: &mut Vec<String>) -> Result<(), PreflightError> {
    use crate::change::Operation;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_13_are_refused_by_name() {
        assert_eq!(version_problem(150_004), None);
        assert_eq!(version_problem(130_000), None);
        assert!(version_problem(120_017).unwrap().starts_with("PostgreSQL 12.17 is older than 13"));
        assert!(version_problem(90_624).unwrap().starts_with("PostgreSQL 9.6.24 is older"));
    }

    #[test]
    fn every_platform_names_its_own_fix() {
        assert!(Platform::Rds.replication_fix("relay").contains("GRANT rds_replication TO relay"));
        assert!(Platform::Rds.wal_level_fix().contains("rds.logical_replication"));
        assert!(Platform::CloudSql.wal_level_fix().contains("cloudsql.logical_decoding"));
        assert!(Platform::Plain.replication_fix("relay").contains("ALTER ROLE relay REPLICATION"));
    }
}
