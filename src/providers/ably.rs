//! Ably (stub, replaced by its implementation).
use super::{Accepted, OutboundMessage, ProviderError};

#[derive(Clone, Debug)]
pub struct Ably;

impl Ably {
    pub fn new(_cfg: &crate::config::AblyConfig, _http: reqwest::Client) -> Self {
        Ably
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let _ = messages;
        unimplemented!()
    }
}
