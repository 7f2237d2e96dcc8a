//! The operator's door: `run`, `migrate`, `setup`, `status`, `demo`.
//!
//! Exit codes: 0 done; 2 something the user must fix (config, privileges,
//! missing slot), printed as one line naming the fix; 1 anything else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about = "Delivers Django outbox rows to notification providers, exactly once.")]
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
    Run,
    /// Create or upgrade the relay's schema (ledger, offset). Safe to run twice.
    Migrate,
    /// Create the publication, slot and role the relay needs. Safe to run twice.
    Setup {
        /// Print the SQL instead of running it.
        #[arg(long)]
        print_sql: bool,
    },
    /// Show the slot, the stored offset and the ledger.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the whole thing on a throwaway PostgreSQL with the `log` provider.
    Demo,
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
    crate::telemetry::init_logging(cli.log_format);
    let explicit = std::env::var_os("OUTBOX_RELAY_CONFIG").is_some() || cli.config != PathBuf::from("relay.toml");
    let load = || Config::load(&cli.config, explicit);
    match cli.command {
        Command::Demo => crate::demo::run().await.map_err(Failure::other),
        Command::Setup { print_sql: true } => {
            print!("{}", crate::setup::script(&load()?));
            Ok(())
        }
        Command::Setup { print_sql: false } => {
            let cfg = load()?;
            let client = connect(&cfg).await?;
            crate::setup::apply(&client, &cfg).await.map_err(Failure::user)?;
            println!("setup done: publication {:?}, slot {:?}", cfg.source.publication, cfg.source.slot);
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
        Command::Run => {
            let cfg = load()?;
            let shutdown = signal_shutdown();
            crate::app::run(cfg, shutdown).await.map_err(|e| match &e {
                crate::app::RunError::Ingest(i) if !i.is_retryable() => Failure::user(e),
                crate::app::RunError::Ledger(l) if !l.is_retryable() => Failure::user(e),
                crate::app::RunError::Config(_) | crate::app::RunError::Listen { .. } => Failure::user(e),
                _ => Failure::other(e),
            })
        }
    }
}

async fn connect(cfg: &Config) -> Result<tokio_postgres::Client, Failure> {
    crate::ledger::connect(&cfg.source.database_url).await.map_err(|e| {
        Failure::user(format!("{e} (check source.database_url or DATABASE_URL: {})", crate::config::redact_url(&cfg.source.database_url)))
    })
}

/// A flag that turns true on SIGTERM or SIGINT.
pub fn signal_shutdown() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    rx
}
