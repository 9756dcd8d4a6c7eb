//! [`HubBuilder`]: what a hub is made of (store, transport, executor, clock, config), checked
//! before anything starts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::conn;
use super::{background, Executor, HttpFallback, Hub, HubConfig, Lifetime, Shared};
use crate::error::Error;
use crate::fsm::{DispatchId, NodeId, Timestamp};
use crate::store::Store;
use crate::transport::Transport;

/// A source of time for the hub's own decisions (routing freshness, deadlines it writes).
///
/// With the default [`SystemClock`] the hub lets each store use its own clock (the database's,
/// for Postgres). A custom clock (a simulation's) is also passed to every store call.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// Mints dispatch ids for a hub (see [`HubBuilder::id_source`]).
pub type IdSource = Arc<dyn Fn() -> DispatchId + Send + Sync>;

/// Builds a [`Hub`].
pub struct HubBuilder {
    node: NodeId,
    store: Option<Arc<dyn Store>>,
    transport: Option<Arc<dyn Transport>>,
    executor: Option<Arc<dyn Executor>>,
    http: Option<Arc<dyn HttpFallback>>,
    clock: Option<Arc<dyn Clock>>,
    ids: Option<IdSource>,
    config: HubConfig,
}

impl fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubBuilder")
            .field("node", &self.node)
            .field("store", &self.store)
            .field("transport", &self.transport)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HubBuilder {
    /// The store (required).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The transport (default: [`NoopTransport`](crate::transport::NoopTransport), polling only).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The executor (required).
    pub fn executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executor = Some(executor);
        self
    }

    /// An HTTP route for brokers with no connection.
    pub fn http_fallback(mut self, http: Arc<dyn HttpFallback>) -> Self {
        self.http = Some(http);
        self
    }

    /// A custom clock (simulations). Store calls then carry its `now`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// A custom source of dispatch ids (simulations that must replay exactly). The default,
    /// [`DispatchId::new`], reads the system clock and randomness. Ids must be unique across the
    /// cluster, and should grow with time: stores claim in (creation time, id) order.
    pub fn id_source(mut self, ids: IdSource) -> Self {
        self.ids = Some(ids);
        self
    }

    /// The timing knobs.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// Starts the hub: subscribes to the transport (so that every dispatch this hub writes later
    /// is written after its subscription is live), then spawns the listener, sweeper, affinity
    /// refresher and catch-up tasks on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a missing store or executor or an invalid config;
    /// [`Error::Transport`] if the subscription fails.
    pub async fn start(self) -> Result<Hub, Error> {
        self.config.validate()?;
        let store = self
            .store
            .ok_or_else(|| Error::InvalidInput("Hub needs a store".into()))?;
        let executor = self
            .executor
            .ok_or_else(|| Error::InvalidInput("Hub needs an executor".into()))?;
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(crate::transport::NoopTransport));
        #[cfg(feature = "postgres")]
        check_pg_channels(store.as_ref(), transport.as_ref())?;
        let subscription = transport.subscribe().await?;
        let (shutdown_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            seed: seed_from(&self.node),
            node: self.node,
            store,
            transport,
            executor,
            http: self.http,
            explicit_clock: self.clock.is_some(),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            config: self.config,
            conns: Mutex::new(BTreeMap::new()),
            drains: Mutex::new(BTreeMap::new()),
            slots: Mutex::new(HashMap::new()),
            waiters: Mutex::new(BTreeMap::new()),
            next_waiter: AtomicU64::new(0),
            ids: self.ids,
            accepting: AtomicBool::new(true),
            shutdown: shutdown_tx,
            abandon: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            running: Arc::default(),
            lost: conn::lost_channel(),
            checks: conn::Checks::default(),
        });
        background::spawn_background(&shared, subscription);
        tracing::info!(node = %shared.node, store = shared.store.name(), transport = shared.transport.name(), "hub started");
        let lifetime = Arc::new(Lifetime(Arc::clone(&shared)));
        Ok(Hub {
            shared,
            _lifetime: lifetime,
        })
    }
}

/// A Postgres store that signals with NOTIFY and a Postgres transport must name the same
/// channels, or every wake-up is lost (the hubs fall back to polling): refuse that at start.
#[cfg(feature = "postgres")]
fn check_pg_channels(store: &dyn Store, transport: &dyn Transport) -> Result<(), Error> {
    let store = store
        .as_any()
        .and_then(|s| s.downcast_ref::<crate::store::PgStore>());
    let transport = transport
        .as_any()
        .and_then(|t| t.downcast_ref::<crate::transport::PgTransport>());
    if let (Some(store), Some(transport)) = (store, transport) {
        if store.signals_on_insert() && store.signal_channel() != transport.signal_channel() {
            return Err(Error::InvalidInput(format!(
                "the store signals on channel {:?} but the transport listens on {:?}: give \
                 PgStoreOptions and PgTransportOptions the same schema (or channel_prefix)",
                store.signal_channel(),
                transport.signal_channel()
            )));
        }
    }
    Ok(())
}

fn seed_from(node: &NodeId) -> u64 {
    node.as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

impl Hub {
    /// Starts building a hub for this node. The node id must be unique among running replicas
    /// (a pod name plus a UUID, say): it is the affinity key and the claim holder's name.
    pub fn builder(node: NodeId) -> HubBuilder {
        HubBuilder {
            node,
            store: None,
            transport: None,
            executor: None,
            http: None,
            clock: None,
            ids: None,
            config: HubConfig::default(),
        }
    }
}
