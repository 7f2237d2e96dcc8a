//! Log (stub, replaced by its implementation).
use super::{Accepted, OutboundMessage, ProviderError};

#[derive(Clone, Debug)]
pub struct Log;

impl Log {
    pub fn new() -> Self {
        Log
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let _ = messages;
        unimplemented!()
    }
}
