//! [`NoopTransport`]: delivers nothing.

use async_trait::async_trait;

use super::{Notice, Subscription, Transport};
use crate::error::TransportError;

/// A transport that delivers nothing: hubs find work by polling (see `HubConfig::poll_interval`).
/// Useful for several processes over one SQLite file, or to prove polling alone is enough.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopTransport;

impl NoopTransport {
    /// The transport.
    pub fn new() -> Self {
        NoopTransport
    }
}

#[async_trait]
impl Transport for NoopTransport {
    fn name(&self) -> &'static str {
        "noop"
    }

    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        Ok(Subscription::new(futures::stream::pending()))
    }

    async fn publish(&self, _notice: Notice) -> Result<(), TransportError> {
        Ok(())
    }
}
