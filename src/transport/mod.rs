//! Transports: wake-ups between nodes. A notice is a hint; the store is the truth.
//!
//! Two kinds of notices travel: **signals** ("broker B may have claimable work") and **events**
//! ("dispatch D changed"). Losing one costs latency, never data: hubs poll as a fallback, and a
//! [`Notice::Resync`] tells a subscriber that notices may have been missed, so it re-reads
//! everything it cares about.
//!
//! Built in:
//!
//! | transport | feature | medium |
//! |---|---|---|
//! | [`MemoryTransport`] | | several hubs in one process |
//! | [`NoopTransport`] | | nothing; polling carries the load |
//! | `PgTransport` | `postgres` | Postgres LISTEN/NOTIFY |
//! | `NatsTransport` | `nats` | core NATS subjects `{prefix}.signal` / `{prefix}.event` |
//! | `RedisTransport` | `redis` | Redis pub/sub channels `{prefix}:signal` / `{prefix}:event` |
//! | `SqliteTransport` | `sqlite` | a notice outbox table in a SQLite file shared by several processes |
//!
//! All of them carry ids only, fan out through bounded per-subscription mailboxes (a subscriber
//! that falls behind gets one [`Notice::Resync`]), bound their connects, and send `Resync` after
//! every reconnect. Write your own against the [`Transport`] contract and prove it with the
//! conformance suite (`conformance` feature); `examples/custom_transport.rs` shows one.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::error::TransportError;
use crate::fsm::{BrokerId, DispatchId};

mod memory;
mod noop;
pub use memory::MemoryTransport;
pub use noop::NoopTransport;

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PgTransport, PgTransportOptions};

#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use nats::{NatsTransport, NatsTransportOptions};

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisTransport, RedisTransportOptions};

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{SqliteTransport, SqliteTransportOptions};

/// A wake-up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Notice {
    /// The broker may have claimable work: its owner should drain it.
    Signal {
        /// The broker.
        broker: BrokerId,
    },
    /// The dispatch changed (claimed, progressed, finished): its waiters should re-read it.
    Event {
        /// The dispatch.
        id: DispatchId,
    },
    /// Notices may have been lost (a reconnect, an overflow): re-read everything.
    Resync,
}

/// A subscription's stream of notices. It ends only when the transport closes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Notice> + Send + 'static>>,
}

impl Subscription {
    /// Wraps any stream of notices.
    pub fn new(stream: impl Stream<Item = Notice> + Send + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Stream for Subscription {
    type Item = Notice;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notice>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Carries [`Notice`]s between the nodes of a cluster.
///
/// # Contract
///
/// - `subscribe` returns once the subscription is live: a notice published (by anyone) after it
///   returns is delivered, or else the subscriber later receives [`Notice::Resync`].
/// - Delivery is best-effort, may duplicate, and may reorder; subscribers must treat notices as
///   hints and re-read the store.
/// - A publisher receives its own notices too (hubs rely on this in a one-node cluster).
/// - `publish` does not wait for delivery. Dropping its future may drop the notice.
///
/// A transport over a medium of your own: here one that forwards to a [`MemoryTransport`]
/// and counts what it publishes (`examples/custom_transport.rs` has a whole one; the
/// `conformance` feature's suite checks the contract).
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use async_trait::async_trait;
/// use broker_dispatch::fsm::BrokerId;
/// use broker_dispatch::transport::{MemoryTransport, Notice, Subscription, Transport};
/// use broker_dispatch::TransportError;
/// use futures::StreamExt;
///
/// #[derive(Debug, Default)]
/// struct Counted { inner: MemoryTransport, published: AtomicU64 }
///
/// #[async_trait]
/// impl Transport for Counted {
///     fn name(&self) -> &'static str { "counted" }
///     async fn subscribe(&self) -> Result<Subscription, TransportError> {
///         self.inner.subscribe().await
///     }
///     async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
///         self.published.fetch_add(1, Ordering::Relaxed);
///         self.inner.publish(notice).await
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let t = Counted::default();
/// let mut sub = t.subscribe().await?; // live when it returns
/// let signal = Notice::Signal { broker: BrokerId::new("b1")? };
/// t.publish(signal.clone()).await?;
/// assert_eq!(sub.next().await, Some(signal)); // publishers hear their own notices
/// assert_eq!(t.published.load(Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs (`"memory"`, `"noop"`, `"postgres"`).
    fn name(&self) -> &'static str;

    /// This transport as [`Any`](std::any::Any), so code holding a `dyn Transport` can reach
    /// the backend's own API (the hub checks that a [`PgTransport`] listens on its
    /// `PgStore`'s channels this way). The default is `None`; a wrapper should forward it.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Starts a live subscription to every notice.
    async fn subscribe(&self) -> Result<Subscription, TransportError>;

    /// Publishes a notice to every subscriber.
    async fn publish(&self, notice: Notice) -> Result<(), TransportError>;
}

#[cfg(any(test, feature = "conformance"))]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
