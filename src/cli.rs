//! The operator's door: `run`, `migrate`, `setup`, `teardown`, `status`,
//! `pause`/`resume`, `demo` and the ledger chores.
//!
//! Exit codes: 0 done; 2 something the user must fix (config, privileges,
//! missing slot), printed as one line naming the fix; 1 anything else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Delivers Django outbox rows to notification providers, exactly once."
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG", default_value = "relay.toml")]
    pub config: PathBuf,
    /// Log lines as JSON (for collectors) or text (for a terminal).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes and deliver them until SIGTERM/SIGINT.
    Run {
        /// `dispatch`: only send what the ledger holds, beside the relay that
        /// works the slot (more sending capacity, on other machines too).
        #[arg(long, value_enum)]
        only: Option<Only>,
    },
    /// Create or upgrade the relay's schema (ledger, offset). Safe to run twice.
    Migrate,
    /// Create the publication, slot and role the relay needs. Safe to run twice.
    Setup {
        /// Print the SQL instead of running it.
        #[arg(long)]
        print_sql: bool,
    },
    /// Remove what `setup` made: capture triggers, change log, functions, slot,
    /// publication. The relay schema (ledger) only with --ledger. Stop the relay first.
    Teardown {
        /// Print the SQL instead of running it.
        #[arg(long)]
        print_sql: bool,
        /// Also drop the relay schema: the ledger and its delivery history.
        #[arg(long)]
        ledger: bool,
    },
    /// Show the slot, the stored offset and the ledger.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Hold a channel's deliveries in the ledger (pending, none skipped) until
    /// `resume`. Holds across restarts; a call already under way may finish.
    Pause {
        /// A channel of the config, e.g. `email`.
        channel: String,
    },
    /// Let a paused channel's deliveries go, oldest first.
    Resume { channel: String },
    /// Run the whole thing on a throwaway PostgreSQL with the `log` provider.
    Demo,
    /// Deliveries that need an operator: list, retry or discard them.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// After `run` refused a gap (slot recreated or invalidated, database
    /// restored) and the gap was dealt with: resume from the server's position.
    AcceptGap,
    /// Config and preflight checks only, no run: exit 0 if `run` would start, 2 listing each fix.
    Check,
    /// Route existing rows of a table into the ledger, skipping rows already
    /// delivered: fills a gap the stream cannot (docs/operations.md). Resumable.
    Backfill {
        /// `schema.table`, as a route names it.
        #[arg(long)]
        table: String,
        /// Only rows whose --since-column is at or after this timestamp.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value = "created_at")]
        since_column: String,
        /// Only rows matching this SQL condition.
        #[arg(long = "where")]
        filter: Option<String>,
        /// Count what would be written, write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value_t = 1000)]
        page_rows: i64,
    },
    /// Delete settled deliveries older than ledger.retention_days (run does it hourly too).
    Prune {
        /// Count what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a person's data from the ledger (GDPR erasure). Idempotent.
    Erase {
        #[arg(long)]
        recipient: String,
    },
    /// Print what the ledger holds about a person, as JSON (GDPR access).
    Export {
        #[arg(long)]
        recipient: String,
    },
    /// Generate a VAPID key pair for Web Push: the private key (PEM PKCS#8,
    /// for providers.webpush.private_key) and the public key the browser
    /// passes as applicationServerKey to pushManager.subscribe().
    VapidKeys {
        /// Write the private key to this file (mode 0600, never overwritten)
        /// instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// One part of `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// Claim and send due deliveries from the ledger: no stream, no lock.
    Dispatch,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// Dead deliveries (retries exhausted), oldest first.
    List {
        #[arg(long)]
        channel: Option<String>,
        /// RFC 3339 time, or an age such as 30m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Also list `failed` deliveries (refused for good by a provider, or bad rows).
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Queue deliveries again with fresh attempts (dead or failed ones, by id; or every dead one).
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
    },
    /// Mark deliveries discarded: kept for audit, never sent.
    Discard {
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn user(message: impl ToString) -> Self {
        Failure { code: 2, message: message.to_string() }
    }
    fn other(message: impl ToString) -> Self {
        Failure { code: 1, message: message.to_string() }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::user(e)
    }
}

pub async fn main(cli: Cli) -> Result<(), Failure> {
    // The demo is for a terminal: text logs unless JSON was asked for explicitly.
    let asked_json = std::env::args().any(|a| a.starts_with("--log-format"));
    let format = if matches!(cli.command, Command::Demo) && !asked_json { LogFormat::Text } else { cli.log_format };
    crate::telemetry::init_logging(format);
    let explicit =
        std::env::var_os("OUTBOX_RELAY_CONFIG").is_some() || cli.config.as_path() != std::path::Path::new("relay.toml");
    let load = || Config::load(&cli.config, explicit);
    match cli.command {
        Command::Demo => crate::demo::run().await.map_err(Failure::other),
        Command::VapidKeys { out } => vapid_keys(out.as_deref()),
        Command::Setup { print_sql: true } => {
            print!("{}", crate::setup::script(&load()?));
            Ok(())
        }
        Command::Setup { print_sql: false } => {
            let cfg = load()?;
            let mut client = connect(&cfg).await?;
            crate::setup::apply(&mut client, &cfg).await.map_err(Failure::user)?;
            println!("setup done: publication {:?}, slot {:?}", cfg.source.publication, cfg.source.slot);
            Ok(())
        }
        Command::Teardown { print_sql: true, ledger } => {
            print!("{}", crate::setup::teardown_script(&load()?, ledger));
            Ok(())
        }
        Command::Teardown { print_sql: false, ledger } => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            crate::setup::teardown(&client, &cfg, ledger).await.map_err(Failure::user)?;
            let kept = if ledger { "dropped" } else { "kept (--ledger drops it)" };
            println!(
                "teardown done: triggers, change log, slot and publication removed; schema {} {kept}",
                cfg.relay.schema
            );
            Ok(())
        }
        Command::Migrate => {
            let cfg = load()?;
            let mut client = connect(&cfg).await?;
            let applied = crate::ledger::migrate(&mut client, &cfg.relay.schema).await.map_err(Failure::user)?;
            println!("schema {}: {} migration(s) applied", cfg.relay.schema, applied.len());
            Ok(())
        }
        Command::Status { json } => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            let status = crate::status::gather(client, &cfg).await.map_err(Failure::user)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status).map_err(Failure::other)?);
            } else {
                print!("{}", crate::status::render(&status));
            }
            Ok(())
        }
        Command::Pause { channel } => {
            let cfg = load()?;
            let ledger = migrated_ledger(&cfg).await?;
            let by = crate::pause::operator();
            match crate::pause::pause(&ledger, &cfg, &channel, by.as_deref()).await.map_err(pause_failure)? {
                crate::pause::Paused::Now => {
                    println!("channel {channel} paused: its deliveries wait in the ledger until `resume {channel}`")
                }
                crate::pause::Paused::Already(was) => println!(
                    "channel {channel} already paused (since {}, by {}): nothing changed",
                    was.paused_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    was.paused_by
                ),
            }
            Ok(())
        }
        Command::Resume { channel } => {
            let cfg = load()?;
            let ledger = migrated_ledger(&cfg).await?;
            match crate::pause::resume(&ledger, &cfg, &channel).await.map_err(pause_failure)? {
                crate::pause::Resumed::Now => println!("channel {channel} resumed: its waiting deliveries go out"),
                crate::pause::Resumed::NotPaused => println!("channel {channel} was not paused: nothing changed"),
            }
            Ok(())
        }
        Command::Check => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            crate::preflight::check(&client, &cfg).await.map_err(|e| match e {
                crate::preflight::PreflightError::Fix(_) => Failure::user(e),
                other => Failure::other(other),
            })?;
            // `run` would also refuse a gap in the source; a relay never run has none.
            let schema = &cfg.relay.schema;
            let migrated: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{schema}.progress")])
                .await
                .map_err(Failure::other)?
                .get(0);
            if migrated {
                let gap = match cfg.source.mode {
                    crate::config::SourceMode::Logical => {
                        let ledger = crate::ledger::Ledger::new(client, schema);
                        let stored = ledger.load_offset(&cfg.source.slot).await.map_err(Failure::other)?;
                        crate::gap::check_slot(ledger.client(), &cfg.source.slot, stored).await
                    }
                    crate::config::SourceMode::Listen => {
                        crate::gap::check_watermark(&client, schema, &cfg.source.slot).await
                    }
                };
                gap.map_err(Failure::user)?;
            }
            println!("config and database ready: `run` would start");
            Ok(())
        }
        Command::Backfill { table, since, since_column, filter, dry_run, page_rows } => {
            let cfg = load()?;
            let mut client = connect(&cfg).await?;
            let table = if table.contains('.') { table } else { format!("public.{table}") };
            let req =
                crate::backfill::Request { table, since, since_column, filter, dry_run, page_rows: page_rows.max(1) };
            let counts = crate::backfill::run(&mut client, &cfg, &req, |c| {
                eprint!(
                    "\rbackfill {}: {} rows read, {} new, {} already delivered, {} failed",
                    req.table, c.rows, c.new, c.already_delivered, c.failed
                );
            })
            .await
            .map_err(Failure::user)?;
            eprintln!();
            let verb = if dry_run { "would write" } else { "wrote" };
            println!(
                "backfill {}: {} rows; {verb} {} new deliveries, {} already delivered, {} failed",
                req.table, counts.rows, counts.new, counts.already_delivered, counts.failed
            );
            Ok(())
        }
        Command::Prune { dry_run } => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            let n = crate::retention::prune(&client, &cfg, dry_run).await.map_err(Failure::user)?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            println!("{verb} {n} settled deliveries older than {} days", cfg.ledger.retention_days);
            Ok(())
        }
        Command::Erase { recipient } => {
            let cfg = load()?;
            let mut client = connect(&cfg).await?;
            let done = crate::gdpr::erase(&mut client, &cfg.relay.schema, &recipient).await.map_err(Failure::user)?;
            println!(
                "recipient {}: {} ledger row(s) anonymised, {} unsent delivery(ies) discarded",
                crate::gdpr::pseudonym(&recipient),
                done.anonymised,
                done.discarded
            );
            Ok(())
        }
        Command::Export { recipient } => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            let data = crate::gdpr::export(&client, &cfg.relay.schema, &recipient).await.map_err(Failure::user)?;
            println!("{}", serde_json::to_string_pretty(&data).map_err(Failure::other)?);
            Ok(())
        }
        Command::AcceptGap => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            let logical = cfg.source.mode == crate::config::SourceMode::Logical;
            let done = crate::gap::accept(&client, &cfg.relay.schema, &cfg.source.slot, logical)
                .await
                .map_err(Failure::user)?;
            tracing::warn!(change = %done, "gap accepted by the operator: changes in it are not delivered by the stream");
            println!("{done}");
            Ok(())
        }
        Command::DeadLetters(cmd) => {
            let cfg = load()?;
            let ledger = crate::ledger::Ledger::new(connect(&cfg).await?, &cfg.relay.schema);
            dead_letters(&ledger, cmd).await
        }
        Command::Run { only } => {
            let cfg = load()?;
            let shutdown = signal_shutdown();
            let run = match only {
                None => crate::app::run(cfg, shutdown).await,
                Some(Only::Dispatch) => crate::app::run_dispatch_only(cfg, shutdown).await,
            };
            run.map_err(|e| match &e {
                crate::app::RunError::Ingest(i) if !i.is_retryable() => Failure::user(e),
                crate::app::RunError::ListenSource(l) if !l.is_retryable() => Failure::user(e),
                crate::app::RunError::Ledger(l) if !l.is_retryable() => Failure::user(e),
                crate::app::RunError::Gap(g) if !g.is_retryable() => Failure::user(e),
                crate::app::RunError::Config(_)
                | crate::app::RunError::MetricsListen { .. }
                | crate::app::RunError::Provider(_)
                | crate::app::RunError::Preflight(crate::preflight::PreflightError::Fix(_)) => Failure::user(e),
                _ => Failure::other(e),
            })
        }
    }
}

async fn dead_letters(ledger: &crate::ledger::Ledger, cmd: DeadLetters) -> Result<(), Failure> {
    match cmd {
        DeadLetters::List { channel, since, failed, limit, json } => {
            let since = since.as_deref().map(parse_since).transpose().map_err(Failure::user)?;
            let filter = crate::ledger::DeadLetterFilter { channel, since, include_failed: failed, limit };
            let rows = ledger.dead_letters(&filter).await.map_err(Failure::user)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows).map_err(Failure::other)?);
                return Ok(());
            }
            println!("{:>10}  {:<7} {:<10} {:<40} {:>3}  error", "id", "status", "channel", "source", "try");
            for r in &rows {
                let source = format!("{}#{}", r.source_table, r.source_pk);
                let error = r.last_error.as_deref().unwrap_or("");
                println!("{:>10}  {:<7} {:<10} {:<40} {:>3}  {}", r.id, r.status, r.channel, source, r.attempts, error);
            }
            println!("{} dead letter(s)", rows.len());
            Ok(())
        }
        DeadLetters::Retry { ids, all } => {
            let n = ledger.retry_dead(if all { None } else { Some(&ids) }).await.map_err(Failure::user)?;
            println!("{n} delivery(ies) queued again");
            Ok(())
        }
        DeadLetters::Discard { ids } => {
            let n = ledger.discard_dead(&ids).await.map_err(Failure::user)?;
            println!("{n} delivery(ies) discarded");
            Ok(())
        }
    }
}

/// `2026-11-24T10:00:00Z`, or an age back from now: `90s`, `30m`, `2h`, `7d`.
pub fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let bad = || format!("--since {s:?}: give an RFC 3339 time or an age such as 30m, 2h, 7d");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    Ok(chrono::Utc::now() - chrono::Duration::seconds(secs))
}

/// The ledger, its schema brought up to this build's first (`pause` may run
/// before any `run` of a build that knows the paused-channels table).
async fn migrated_ledger(cfg: &Config) -> Result<crate::ledger::Ledger, Failure> {
    let mut client = connect(cfg).await?;
    crate::ledger::migrate(&mut client, &cfg.relay.schema).await.map_err(Failure::user)?;
    Ok(crate::ledger::Ledger::new(client, &cfg.relay.schema))
}

fn pause_failure(e: crate::pause::PauseError) -> Failure {
    if e.is_retryable() {
        Failure::other(e)
    } else {
        Failure::user(e)
    }
}

async fn connect(cfg: &Config) -> Result<tokio_postgres::Client, Failure> {
    crate::ledger::connect(&cfg.source.database_url).await.map_err(|e| {
        Failure::user(format!(
            "{e} (check source.database_url or DATABASE_URL: {})",
            crate::config::redact_url(&cfg.source.database_url)
        ))
    })
}

/// A flag that turns true on SIGTERM or SIGINT.
pub fn signal_shutdown() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_ages() {
        let t = parse_since("2026-11-24T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-24T10:00:00+00:00");
        let two_h = parse_since("2h").unwrap();
        let age = chrono::Utc::now() - two_h;
        assert!((age.num_seconds() - 7200).abs() < 5);
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("5y").is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from(["outbox-relay", "dead-letters", "retry", "--all"]).unwrap();
        assert!(matches!(cli.command, Command::DeadLetters(DeadLetters::Retry { all: true, .. })));
        assert!(Cli::try_parse_from(["outbox-relay", "dead-letters", "retry"]).is_err());
        let cli = Cli::try_parse_from(["outbox-relay", "--config", "x.toml", "setup", "--print-sql"]).unwrap();
        assert!(matches!(cli.command, Command::Setup { print_sql: true }));
        let cli = Cli::try_parse_from(["outbox-relay", "pause", "email"]).unwrap();
        assert!(matches!(cli.command, Command::Pause { channel } if channel == "email"));
        assert!(Cli::try_parse_from(["outbox-relay", "resume"]).is_err(), "resume names its channel");
        let cli = Cli::try_parse_from(["outbox-relay", "teardown", "--print-sql", "--ledger"]).unwrap();
        assert!(matches!(cli.command, Command::Teardown { print_sql: true, ledger: true }));
    }
}

/// `vapid-keys`: a new pair; the private key to a new file or stdout.
fn vapid_keys(out: Option<&std::path::Path>) -> Result<(), Failure> {
    let (pem, public) = crate::providers::webpush::vapid::generate().map_err(Failure::other)?;
    match out {
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                    Failure::user(format!("{}: {e} (an existing key is never overwritten)", path.display()))
                })?;
            file.write_all(pem.as_bytes()).map_err(Failure::other)?;
            println!(
                "# private key written to {} (mode 0600): private_key = \"file:{}\"",
                path.display(),
                path.display()
            );
        }
        None => {
            println!(
                "# [providers.webpush] private_key (keep it secret; a file and private_key = \"file:/path\" is best):"
            );
            print!("{pem}");
        }
    }
    println!("# public key: the browser's applicationServerKey for pushManager.subscribe()");
    println!("{public}");
    Ok(())
}
