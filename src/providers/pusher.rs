//! Pusher (stub, replaced by its implementation).
use super::{Accepted, OutboundMessage, ProviderError};

#[derive(Clone, Debug)]
pub struct Pusher;

impl Pusher {
    pub fn new(_cfg: &crate::config::PusherConfig, _http: reqwest::Client) -> Self {
        Pusher
    }

    pub async fn send_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<Accepted, ProviderError>> {
        let _ = messages;
        unimplemented!()
    }
}
