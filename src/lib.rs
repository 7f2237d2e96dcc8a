//! outbox-relay: committed PostgreSQL rows → notification providers, exactly once.
//!
//! The flow, one module each: `source` reads committed transactions, `routing`
//! turns rows into deliveries, `ledger` makes them durable (and only then is the
//! offset confirmed), `dispatch` works the ledger through `providers`.
//! `telemetry` shows it; `cli` is the operator's door; `config` the contract.
//! `db` is how every connection to PostgreSQL is made (TLS included).

pub mod app;
pub mod backfill;
pub mod change;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod contacts;
pub mod db;
pub mod demo;
pub mod devices;
pub mod dispatch;
pub mod gap;
pub mod gdpr;
pub mod ingest;
pub mod instance;
pub mod ledger;
pub mod limits;
pub mod pause;
pub mod preflight;
pub mod providers;
pub mod retention;
pub mod routing;
pub mod secret;
pub mod setup;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod unwritten;
pub mod webhooks;

/// Resolves once a shutdown flag turns true (or its sender is gone). The
/// watch guard is dropped here, so callers can hold this across `.await`.
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
