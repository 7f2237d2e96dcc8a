//! Replication stream (temporary stub of the API; replaced on merge).
use super::{CommittedTx, Lsn};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplicationError(String);
impl ReplicationError {
    pub fn is_retryable(&self) -> bool {
        true
    }
}

pub enum ReplicationEvent {
    Tx(CommittedTx),
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

pub struct ReplicationStream;

impl ReplicationStream {
    pub async fn start(
        _config: &tokio_postgres::Config,
        _slot: &str,
        _publication: &str,
        _start: Lsn,
    ) -> Result<Self, ReplicationError> {
        unimplemented!()
    }
    pub async fn next_event(&mut self) -> Result<ReplicationEvent, ReplicationError> {
        unimplemented!()
    }
    pub async fn send_status(&mut self, _flushed: Lsn, _reply_requested: bool) -> Result<(), ReplicationError> {
        unimplemented!()
    }
    pub fn server_wal_end(&self) -> Lsn {
        unimplemented!()
    }
    pub fn in_transaction(&self) -> bool {
        unimplemented!()
    }
    pub async fn close(self) -> Result<(), ReplicationError> {
        unimplemented!()
    }
}
