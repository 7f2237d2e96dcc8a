//! outbox-relay: committed PostgreSQL rows → notification providers, exactly once.
//!
//! The flow, one module each: `source` reads committed transactions, `routing`
//! turns rows into deliveries, `ledger` makes them durable (and only then is the
//! offset confirmed), `dispatch` works the ledger through `providers`.
//! `telemetry` shows it; `cli` is the operator's door; `config` the contract.

pub mod config;
pub mod dispatch;
pub mod embedded_pg;
pub mod ledger;
pub mod providers;
pub mod routing;
pub mod source;
pub mod telemetry;
