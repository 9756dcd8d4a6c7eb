//! The hub runtime: the async shell around the pure core.
//!
//! A [`Hub`] is one replica's view of the cluster. It routes each command
//! ([`fsm::route`](crate::fsm::route())), runs it locally when the broker is connected here, and
//! otherwise writes a durable dispatch, signals the owner, and waits for the result with a
//! rolling deadline. For brokers connected here it drains their pending dispatches.
//!
//! ## The execution model
//!
//! - **Concurrency per broker**: up to [`HubConfig::max_in_flight`] executions of one broker run
//!   at once (overridable per broker with [`Hub::set_max_in_flight`]). A drain claims only as
//!   many rows as there are free slots and starts each at once; a finished execution frees its
//!   slot for the next claim. A slow command never holds up a fast one of the same broker.
//! - **Ordering keys** ([`Command::key`]): commands of one broker with the same key run one at a
//!   time, in insertion order, whichever node holds the broker, across node moves. A retried
//!   command keeps its place: the later commands of its key wait for it. Keyed commands always
//!   take a row (no fast path), so every node's claim sees them.
//! - **Deadlines bind the start**: no execution starts at or after its deadline. A claimed row
//!   whose deadline passed before it could start ends `Failed(Expired)` unexecuted, and a retry
//!   that could only start after the deadline ends the same way.
//! - **Attempts count executions**: `max_attempts` bounds executions begun. A claim handed back
//!   unexecuted (the broker moved, shutdown) does not use one up; `attempt`, the fencing token,
//!   is never reused. `max_attempts = 1` runs a command at most once.
//! - **The local fast path is a first attempt**: bounded by `execute_timeout`; a retryable
//!   failure or a timeout is written as a durable row (`available_at` = now + the delay asked
//!   for) that follows the broker wherever it connects, instead of being retried in memory on a
//!   connection this node may no longer hold.
//!
//! Files: `drain.rs` (slots and claims), `lease.rs` (one execution and its lease renewal),
//! `finish.rs` (outcomes in group commits), `local.rs` (the fast path and HTTP), `wait.rs`
//! (the originator's rolling wait), `sweeper.rs`, `listener.rs`, `background.rs` (catch-up
//! polling and the affinity refresh).

mod background;
mod command;
mod config;
mod conn;
mod drain;
mod executor;
mod finish;
mod lease;
mod listener;
mod local;
mod replies;
mod sweeper;
mod wait;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::Instrument;

pub use command::{Command, Dispatched, Receipt};
pub use config::{HubConfig, UndeliverablePolicy};
pub use conn::{Lost, LostReason, LostStream, LOST_BUFFER};

/// What [`Hub::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// It was pending: it ended `Failed(Cancelled)` and will never run.
    Cancelled(Dispatch),
    /// It is running: its holder was asked to stop (`ExecContext::cancelled`); it ends
    /// `Failed(Cancelled)` when the executor returns, unless it completed.
    Requested(Dispatch),
    /// It runs on this node's fast path (it has no row): its `cancelled()` fired.
    Stopping,
    /// It had already finished; nothing changed.
    Finished(Dispatch),
}
pub use executor::{ExecContext, Executor, FnExecutor, HttpFallback};
pub use replies::{Replies, Reply, ReplyError};

use crate::error::{Error, ExecError, StoreError};
use crate::fsm::{
    self, BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, Route, RouteInput,
    SessionId, Timestamp,
};
use crate::store::{
    CancelParams, ConnectOutcome, ConnectParams, DisconnectParams, NewDispatch, Store,
};
use crate::transport::{Notice, Transport};
use local::{run_http, run_local};

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

/// One replica of the hub. Cheap to clone; all clones drive the same runtime.
///
/// Call [`shutdown`](Hub::shutdown) to stop it gracefully. Dropping the last clone without
/// that stops its tasks at once, like [`abort`](Hub::abort): nothing keeps running unowned.
///
/// ```
/// use std::sync::Arc;
/// use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchState, NodeId, SessionId};
/// use broker_dispatch::hub::{CancelOutcome, Command, ExecContext, FnExecutor, Hub};
/// use broker_dispatch::store::SqliteStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = Arc::new(SqliteStore::open(dir.path().join("hub.db"))?); // the embedded default
/// let hub = Hub::builder(NodeId::new("node-a")?)
///     .store(store)
///     .executor(Arc::new(FnExecutor(|ctx: ExecContext, d: Dispatch| async move {
///         Ok(serde_json::json!({ "op": d.op, "session": ctx.session().map(|s| s.to_string()) }))
///     })))
///     .start()
///     .await?;
///
/// // A broker connects (over the application's socket) and a command runs on it.
/// let b1 = BrokerId::new("b1")?;
/// hub.connect(b1.clone(), SessionId::new("ws-1")?, ()).await?;
/// let out = hub.dispatch(Command::new(b1, "restart", serde_json::json!({}))).await?;
/// assert_eq!(out["session"], "ws-1");
///
/// // A durable message for a broker not connected anywhere waits for it ...
/// let b2 = BrokerId::new("b2")?;
/// let receipt = hub.send(Command::new(b2, "upgrade", serde_json::json!({}))).await?;
/// // ... unless cancelled, from any node.
/// let CancelOutcome::Cancelled(row) = hub.cancel(receipt.id).await? else { panic!() };
/// assert_eq!(row.state, DispatchState::Failed);
///
/// hub.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
    _lifetime: Arc<Lifetime>,
}

/// Aborts the hub's tasks when the last [`Hub`] handle goes away (background tasks and drains
/// hold only the shared state, so they do not keep this alive).
struct Lifetime(Arc<Shared>);

impl Drop for Lifetime {
    fn drop(&mut self) {
        self.0.abort_all();
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("node", &self.shared.node)
            .field("store", &self.shared.store.name())
            .field("transport", &self.shared.transport.name())
            .finish_non_exhaustive()
    }
}

use conn::{ConnHandle, LocalConn};

pub(crate) struct Shared {
    pub(crate) node: NodeId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) http: Option<Arc<dyn HttpFallback>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) explicit_clock: bool,
    pub(crate) config: HubConfig,
    /// Brokers connected to this node, by session.
    pub(crate) conns: Mutex<BTreeMap<BrokerId, LocalConn>>,
    /// The runners of brokers connected here (or finishing work after they left).
    pub(crate) drains: drain::Runners,
    /// Per-broker overrides of `max_in_flight`.
    pub(crate) slots: Mutex<HashMap<BrokerId, u32>>,
    /// Originators waiting here, by dispatch: each registration has its own notifier, so two
    /// waiters on one id both hear of it.
    pub(crate) waiters: Mutex<BTreeMap<DispatchId, Vec<wait::Waiter>>>,
    pub(crate) next_waiter: AtomicU64,
    /// Mints dispatch ids (`None`: [`DispatchId::new`]).
    pub(crate) ids: Option<IdSource>,
    pub(crate) accepting: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Set when [`Hub::shutdown`] reaches its timeout: executions that began stop where they
    /// are, claims not yet started are handed back.
    pub(crate) abandon: watch::Sender<bool>,
    pub(crate) tasks: Mutex<Vec<AbortHandle>>,
    pub(crate) seed: u64,
    /// Executions running here, for their cancellation signals.
    pub(crate) running: Arc<conn::RunningSet>,
    /// Where [`Hub::lost`] readers hear of lost connections.
    pub(crate) lost: tokio::sync::broadcast::Sender<Lost>,
    /// Ownership checks in flight, by broker.
    pub(crate) checks: conn::Checks,
}

impl Shared {
    /// Stops every task at once (a crash, as far as the cluster can tell).
    pub(crate) fn abort_all(&self) {
        let sh = self;
        sh.accepting.store(false, Ordering::Release);
        sh.shutdown.send_replace(true);
        for t in sh.tasks.lock().drain(..) {
            t.abort();
        }
        let drains = std::mem::take(&mut *sh.drains.lock());
        for r in drains.values() {
            r.abort();
        }
        sh.conns.lock().clear();
        sh.notify_all_waiters();
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The id `cmd` asked for, or a fresh one.
    pub(crate) fn id_for(&self, cmd: &Command) -> DispatchId {
        cmd.id.unwrap_or_else(|| self.new_id())
    }

    /// A fresh dispatch id from the configured source.
    pub(crate) fn new_id(&self) -> DispatchId {
        self.ids.as_ref().map_or_else(DispatchId::new, |ids| ids())
    }

    /// The `now` to hand to the store: `None` (the store's clock) unless a custom clock is set.
    pub(crate) fn store_now(&self) -> Option<Timestamp> {
        self.explicit_clock.then(|| self.clock.now())
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn local_session(&self, broker: &BrokerId) -> Option<SessionId> {
        self.conns.lock().get(broker).map(|c| c.session.clone())
    }

    /// The application's handle for `broker`'s connection here, if it is still `session`.
    pub(crate) fn conn_handle(&self, broker: &BrokerId, session: &SessionId) -> Option<ConnHandle> {
        self.conns
            .lock()
            .get(broker)
            .filter(|c| c.session == *session)
            .map(|c| Arc::clone(&c.handle))
    }

    /// How many executions of `broker` may run at once here.
    pub(crate) fn max_in_flight(&self, broker: &BrokerId) -> u32 {
        self.slots
            .lock()
            .get(broker)
            .copied()
            .unwrap_or(self.config.max_in_flight)
    }

    /// Runs a store (or transport) call with the configured timeout.
    pub(crate) async fn bounded<T, E>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Error>
    where
        Error: From<E>,
    {
        // A panicking store (a codec, a driver bug) fails this call, never the task making it.
        let call = AssertUnwindSafe(fut).catch_unwind();
        match tokio::time::timeout(self.config.store_timeout, call).await {
            Ok(Ok(r)) => r.map_err(Error::from),
            Ok(Err(panic)) => Err(Error::Store(StoreError::Backend(
                format!("store call panicked: {}", panic_message(&*panic)).into(),
            ))),
            Err(_) => Err(Error::Store(StoreError::Unavailable(
                "store call timed out".into(),
            ))),
        }
    }

    pub(crate) async fn publish(&self, notice: Notice) {
        let res =
            tokio::time::timeout(self.config.store_timeout, self.transport.publish(notice)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "publish failed; polling will catch up"),
            Err(_) => tracing::debug!("publish timed out; polling will catch up"),
        }
    }

    pub(crate) fn notify_waiter(&self, id: &DispatchId) {
        if let Some(list) = self.waiters.lock().get(id) {
            for (_, n) in list {
                n.notify_one();
            }
        }
    }

    pub(crate) fn notify_all_waiters(&self) {
        for list in self.waiters.lock().values() {
            for (_, n) in list {
                n.notify_one();
            }
        }
    }

    /// `d` jittered by ±25 %, from a cheap per-hub generator.
    pub(crate) fn jitter(&self, d: Duration, salt: u64) -> Duration {
        let mut x =
            self.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.now().as_micros() as u64;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let frac = (x % 1000) as f64 / 1000.0;
        // In [0.75, 1.25) of `d`, saturating: any duration the config accepts must not panic here.
        Duration::try_from_secs_f64(d.as_secs_f64() * (0.75 + frac * 0.5)).unwrap_or(Duration::MAX)
    }
}

/// `from + d`, or about 30 years from `from` when that is not representable: config durations
/// may be as large as `Duration::MAX`, and adding one to an instant must not panic.
pub(crate) fn instant_after(from: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    from.checked_add(d)
        .unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 24 * 3600))
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

    /// This hub's node id.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// The hub's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The hub's config.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// Whether `broker` is connected to this node.
    pub fn is_connected(&self, broker: &BrokerId) -> bool {
        self.shared.conns.lock().contains_key(broker)
    }

    /// The broker connections this node loses from now on, and why: close their sockets.
    /// Each reader gets every loss (a slow one keeps the last [`LOST_BUFFER`]); the stream ends
    /// when the hub is dropped.
    pub fn lost(&self) -> LostStream {
        LostStream::new(self.shared.lost.subscribe())
    }

    /// A broker's control connection arrived at this node: claim its affinity (newest
    /// connection wins, by `connected_at`) and drain its pending work.
    ///
    /// `conn` is the application's handle for this connection (a channel to its socket, say;
    /// `()` when the executor needs none): every execution for the broker on this node gets it
    /// from [`ExecContext::conn`], with the session it belongs to. When the node loses the
    /// connection, [`lost`](Hub::lost) says so. A newer connection replaces an older one of the
    /// same broker on this node, and the node holding an older one elsewhere is told at once
    /// (a signal, which makes it read the broker's affinity).
    ///
    /// # Errors
    ///
    /// [`Error::Superseded`] if a newer session of the broker already holds it (this
    /// connection is stale and should be closed); store errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped after the store accepted the claim, the affinity names this node but the hub
    /// does not know the connection; it goes stale after `freshness` and routing ignores it.
    pub async fn connect<C: Send + Sync + 'static>(
        &self,
        broker: BrokerId,
        session: SessionId,
        conn: C,
    ) -> Result<(), Error> {
        // Stamped by the store's clock (the database's on Postgres) unless the hub runs on a
        // clock of its own: a node whose clock is off cannot order connections wrongly.
        let connected_at = self.shared.store_now();
        self.connect_with(broker, session, Arc::new(conn), connected_at)
            .await
    }

    /// [`connect`](Hub::connect) with an explicit `connected_at` (when the connection was
    /// accepted, if that was earlier than now).
    ///
    /// # Errors
    ///
    /// As [`connect`](Hub::connect).
    pub async fn connect_at<C: Send + Sync + 'static>(
        &self,
        broker: BrokerId,
        session: SessionId,
        conn: C,
        connected_at: Timestamp,
    ) -> Result<(), Error> {
        self.connect_with(broker, session, Arc::new(conn), Some(connected_at))
            .await
    }

    async fn connect_with(
        &self,
        broker: BrokerId,
        session: SessionId,
        handle: ConnHandle,
        connected_at: Option<Timestamp>,
    ) -> Result<(), Error> {
        let sh = &self.shared;
        if sh.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let outcome = sh
            .bounded(sh.store.connect(ConnectParams {
                broker: broker.clone(),
                node: sh.node.clone(),
                session: session.clone(),
                connected_at,
                now: sh.store_now(),
            }))
            .await?;
        match outcome {
            ConnectOutcome::Claimed(affinity) => {
                let connected_at = affinity.connected_at;
                let replaced = {
                    let mut conns = sh.conns.lock();
                    let newer = conns
                        .get(&broker)
                        .is_none_or(|c| (connected_at, &session) >= (c.connected_at, &c.session));
                    if !newer {
                        return Err(Error::Superseded);
                    }
                    conns
                        .insert(
                            broker.clone(),
                            LocalConn {
                                session: session.clone(),
                                connected_at,
                                handle,
                            },
                        )
                        .filter(|old| old.session != session)
                };
                if let Some(old) = replaced {
                    conn::announce_loss(sh, &broker, &old.session, LostReason::Superseded);
                }
                tracing::debug!(node = %sh.node, %broker, "broker connected");
                drain::schedule(sh, &broker);
                // Whichever node held an older connection reads the affinity on this signal
                // and lets it go now, not at its next refresh.
                sh.publish(Notice::Signal {
                    broker: broker.clone(),
                })
                .await;
                Ok(())
            }
            ConnectOutcome::Superseded(_) => Err(Error::Superseded),
        }
    }

    /// A broker's control connection went away: forget it locally and release its affinity,
    /// both only if `session` is still the current one (a teardown of an old session after a
    /// newer connect changes nothing). Returns whether it released anything. Executions already
    /// running for it finish and record their outcomes; nothing new starts on that session.
    ///
    /// # Errors
    ///
    /// Store errors (the local map is updated first regardless).
    pub async fn disconnect(&self, broker: &BrokerId, session: &SessionId) -> Result<bool, Error> {
        let sh = &self.shared;
        let removed = conn::forget(sh, broker, session, LostReason::Released);
        let released = sh
            .bounded(sh.store.disconnect(DisconnectParams {
                broker: broker.clone(),
                node: sh.node.clone(),
                session: session.clone(),
                now: sh.store_now(),
            }))
            .await?;
        if removed || released {
            tracing::debug!(node = %sh.node, %broker, "broker disconnected");
        }
        Ok(removed || released)
    }

    /// Sets how many executions of `broker` may run at once on this node (`None`: back to
    /// [`HubConfig::max_in_flight`]). Takes effect at the broker's next claim; running
    /// executions are not interrupted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for 0 or more than [`MAX_BATCH`](crate::store::MAX_BATCH).
    pub fn set_max_in_flight(&self, broker: &BrokerId, n: Option<u32>) -> Result<(), Error> {
        let sh = &self.shared;
        match n {
            Some(n) => {
                config::check_slots("max_in_flight", n)?;
                sh.slots.lock().insert(broker.clone(), n);
            }
            None => {
                sh.slots.lock().remove(broker);
            }
        }
        if sh.conns.lock().contains_key(broker) {
            drain::schedule(sh, broker);
        }
        Ok(())
    }

    /// Routes a command and returns its result.
    ///
    /// - Connected here (and neither keyed nor delayed): the executor runs at once, in this
    ///   task, bounded by `execute_timeout`; no row is written. If it fails retryably or times
    ///   out, the retry is written as a durable row and this call waits for it like a forward.
    /// - Owned by another live node (or parked, or keyed, or delayed): a dispatch is written
    ///   (after this hub's subscription is live), the owner is signalled, and this call waits
    ///   with a rolling deadline that extends on real progress. If it gives up on a row nobody
    ///   claimed, it cancels it, so it never runs later.
    /// - Over HTTP, when the broker has an endpoint and a fallback is configured.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] (with the row's reason, or `Undeliverable` under
    /// [`UndeliverablePolicy::FailFast`]), [`Error::TimedOut`], [`Error::InvalidInput`],
    /// [`Error::ShuttingDown`], store errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the row was written leaves it pending until its deadline (the
    /// wait window): it may still run, or it expires. Use the id from the error or
    /// [`send`](Hub::send) plus [`wait`](Hub::wait) to keep a handle.
    pub async fn dispatch(&self, cmd: Command) -> Result<serde_json::Value, Error> {
        self.dispatch_detailed(cmd).await.map(|d| d.value)
    }

    /// [`dispatch`](Hub::dispatch), reporting how the command was carried out: its id, the
    /// attempt and node that completed it, the route it took and whether a row carried it.
    /// To know the id before the result, set the command's [`id`](Command::id) (or use
    /// [`send`](Hub::send) and [`wait`](Hub::wait)).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, Route, SessionId};
    /// use broker_dispatch::hub::{Command, FnExecutor, Hub};
    /// use broker_dispatch::store::MemoryStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = Hub::builder(NodeId::new("node-a")?)
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .executor(Arc::new(FnExecutor(|_ctx, d: Dispatch| async move { Ok(d.args) })))
    ///     .start()
    ///     .await?;
    /// let broker = BrokerId::new("broker-1")?;
    /// hub.connect(broker.clone(), SessionId::new("ws-1")?, ()).await?;
    /// let out = hub
    ///     .dispatch_detailed(Command::new(broker, "echo", serde_json::json!({ "n": 1 })))
    ///     .await?;
    /// assert_eq!(out.value, serde_json::json!({ "n": 1 }));
    /// assert_eq!(out.route, Route::Local);
    /// assert_eq!(out.node.as_ref(), Some(hub.node()));
    /// assert!(!out.durable, "the fast path writes no row");
    /// hub.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`dispatch`](Hub::dispatch).
    pub async fn dispatch_detailed(&self, cmd: Command) -> Result<Dispatched, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max_attempts = self.validate(&cmd)?;
        if cmd.takes_fast_path() && sh.conns.lock().contains_key(&cmd.broker) {
            metrics::counter!("broker_dispatch_routed_total", "route" => "local").increment(1);
            return run_local(self, cmd, max_attempts).await;
        }
        let (affinity, store_now) = sh.bounded(sh.store.affinity_at(&cmd.broker)).await?;
        let has_http = match &sh.http {
            Some(http) => local::has_endpoint(sh, http.as_ref(), &cmd.broker).await,
            None => false,
        };
        // Freshness by the store's clock (the database's on Postgres) unless the hub runs on an
        // explicit clock of its own; `last_seen` was written by that same clock.
        let now = sh.store_now().or(store_now).unwrap_or_else(|| sh.now());
        let connected_here = sh.conns.lock().contains_key(&cmd.broker);
        let route = fsm::route(&RouteInput {
            this_node: &sh.node,
            connected_here,
            affinity: affinity.as_ref(),
            now,
            freshness: sh.config.freshness,
            has_http_endpoint: has_http,
        });
        metrics::counter!("broker_dispatch_routed_total", "route" => route_name(&route))
            .increment(1);
        match route {
            Route::Local if cmd.takes_fast_path() => run_local(self, cmd, max_attempts).await,
            Route::Local | Route::Forward { .. } => {
                let id = sh.id_for(&cmd);
                self.write_and_wait(cmd, id, max_attempts, 0, route).await
            }
            Route::Http => match &sh.http {
                Some(http) => run_http(sh, http.as_ref(), cmd, max_attempts, now).await,
                None => self.park_or_fail(cmd, max_attempts, Route::Http).await,
            },
            Route::Undeliverable => {
                self.park_or_fail(cmd, max_attempts, Route::Undeliverable)
                    .await
            }
        }
    }

    async fn park_or_fail(
        &self,
        cmd: Command,
        max_attempts: u32,
        route: Route,
    ) -> Result<Dispatched, Error> {
        match self.shared.config.undeliverable {
            UndeliverablePolicy::Park => {
                let id = self.shared.id_for(&cmd);
                self.write_and_wait(cmd, id, max_attempts, 0, route).await
            }
            UndeliverablePolicy::FailFast => Err(Error::Failed {
                id: self.shared.id_for(&cmd),
                reason: FailReason::Undeliverable,
            }),
        }
    }

    /// Writes the command as dispatch `id` (whose first `executions` executions already began
    /// elsewhere: the fast path's) and waits for it; `route` is what routing decided.
    pub(crate) async fn write_and_wait(
        &self,
        cmd: Command,
        id: DispatchId,
        max_attempts: u32,
        executions: u32,
        route: Route,
    ) -> Result<Dispatched, Error> {
        let sh = &self.shared;
        let span = tracing::debug_span!("dispatch", node = %sh.node, broker = %cmd.broker, op = %cmd.op, %id);
        async move {
            // Subscribe before write: the transport subscription is live since `start`, and the
            // waiter is registered before the row exists, so no event about it can be missed.
            let waiter = wait::Registration::new(sh, id);
            let new = self.new_dispatch(cmd, id, max_attempts, executions, sh.config.wait_window);
            let d = self.write(new).await?;
            if d.id != id {
                // The idempotency key named an existing dispatch: wait for that one instead.
                drop(waiter);
                let done = wait::Registration::new(sh, d.id).wait(d).await?;
                return Ok(Dispatched::of_row(done, route));
            }
            let done = waiter.wait(d).await?;
            Ok(Dispatched::of_row(done, route))
        }
        .instrument(span)
        .await
    }

    /// The row for `cmd`: its deadline is the command's own (`timeout`, `deadline`) or else
    /// `default_ttl` from the store's now.
    fn new_dispatch(
        &self,
        cmd: Command,
        id: DispatchId,
        max_attempts: u32,
        executions: u32,
        default_ttl: Duration,
    ) -> NewDispatch {
        let sh = &self.shared;
        let ttl = match (cmd.timeout, cmd.deadline) {
            (None, None) => Some(default_ttl),
            (t, _) => t,
        };
        NewDispatch {
            id,
            broker: cmd.broker,
            op: cmd.op,
            args: cmd.args,
            max_attempts,
            available_at: cmd.available_at,
            deadline: cmd.deadline,
            idempotency_key: cmd.idempotency_key,
            key: cmd.key,
            delay: cmd.delay,
            ttl,
            executions,
            now: sh.store_now(),
        }
    }

    async fn write(&self, new: NewDispatch) -> Result<Dispatch, Error> {
        let sh = &self.shared;
        let broker = new.broker.clone();
        let d = sh.bounded(sh.store.insert(new)).await?;
        metrics::counter!("broker_dispatch_published_total").increment(1);
        self.announce_broker(&broker).await;
        Ok(d)
    }

    /// Tells `broker`'s owner there is work: a drain here, or a signal (unless the store's
    /// insert already signalled).
    async fn announce_broker(&self, broker: &BrokerId) {
        let sh = &self.shared;
        if sh.conns.lock().contains_key(broker) {
            drain::schedule(sh, broker);
        } else if !sh.store.signals_on_insert() {
            sh.publish(Notice::Signal {
                broker: broker.clone(),
            })
            .await;
        }
    }

    /// Durable fire-and-forget: writes the dispatch (deadline `send_ttl` from now unless the
    /// command sets one), then runs it here if the broker is connected here, or signals its
    /// owner. Returns once the row is durable; execution is at-least-once, like any dispatch.
    /// Never uses the HTTP fallback and ignores [`UndeliverablePolicy`]: a message for an absent
    /// broker waits for it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`], [`Error::ShuttingDown`], store errors (then nothing was
    /// written, or — for a timeout — the write may have landed: resend with the same
    /// idempotency key to be sure).
    pub async fn send(&self, cmd: Command) -> Result<Receipt, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max_attempts = self.validate(&cmd)?;
        let id = sh.id_for(&cmd);
        let span =
            tracing::debug_span!("send", node = %sh.node, broker = %cmd.broker, op = %cmd.op, %id);
        let new = self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl);
        let d = self.write(new).instrument(span).await?;
        Ok(Receipt {
            id: d.id,
            dispatch: d,
        })
    }

    /// [`send`](Hub::send) inside the caller's own Postgres transaction (`postgres` feature):
    /// the row is written through `client` (e.g. a `tokio_postgres::Transaction`, or a
    /// `deadpool_postgres` one from [`PgStore::pool`](crate::store::PgStore::pool)), so it
    /// exists if and only if the caller's transaction commits, together with the caller's own
    /// writes. After the commit, [`announce`](Hub::announce) the receipt (a no-op when the
    /// store's NOTIFY, sent in the transaction, already woke the owner) and
    /// [`wait`](Hub::wait) for its id if the result is wanted.
    ///
    /// The hub's store must be a [`PgStore`](crate::store::PgStore), and `client` connected to
    /// its database.
    ///
    /// ```no_run
    /// # use broker_dispatch::{fsm::BrokerId, hub::{Command, Hub}, store::PgStore};
    /// # async fn f(hub: Hub, pg: PgStore) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut conn = pg.pool().get().await?;
    /// let tx = conn.transaction().await?;
    /// tx.execute("UPDATE accounts SET state = 'restarting' WHERE id = 7", &[]).await?;
    /// let receipt = hub
    ///     .send_in(&*tx, Command::new(BrokerId::new("b1")?, "restart", serde_json::json!({})))
    ///     .await?;
    /// tx.commit().await?; // the command exists only if the update does
    /// hub.announce(&receipt).await;
    /// let result = hub.wait(receipt.id).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid command or a hub whose store is not Postgres;
    /// as [`PgStore::insert_in`](crate::store::PgStore::insert_in). After an error the
    /// caller's transaction is aborted (Postgres semantics): roll it back.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn send_in<C>(&self, client: &C, cmd: Command) -> Result<Receipt, Error>
    where
        C: tokio_postgres::GenericClient + Sync,
    {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let Some(pg) = sh
            .store
            .as_any()
            .and_then(|s| s.downcast_ref::<crate::store::PgStore>())
        else {
            return Err(Error::InvalidInput(format!(
                "send_in needs a Postgres store; this hub's is {}",
                sh.store.name()
            )));
        };
        let max_attempts = self.validate(&cmd)?;
        let id = sh.id_for(&cmd);
        let new = self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl);
        let d = sh.bounded(pg.insert_in(client, new)).await?;
        Ok(Receipt {
            id: d.id,
            dispatch: d,
        })
    }

    /// Tells the broker's owner about a dispatch written outside the hub's own calls (by
    /// [`send_in`](Hub::send_in) in a transaction now committed): a drain here if the broker
    /// is connected here, otherwise a signal on the transport unless the store's insert already
    /// sent one. Harmless to repeat; skipping it costs latency (the owner's poll finds the
    /// row), never the row.
    pub async fn announce(&self, receipt: &Receipt) {
        metrics::counter!("broker_dispatch_published_total").increment(1);
        self.announce_broker(&receipt.dispatch.broker).await;
    }

    /// [`send`](Hub::send) for many commands at once: every row is written atomically (all or
    /// none; one transaction on SQLite, one statement on Postgres), then each broker's owner is
    /// told once. The receipts are in input order.
    ///
    /// # Errors
    ///
    /// As [`send`](Hub::send); an invalid command fails the whole batch before anything is
    /// written, and a conflict (an id or idempotency key reused with another payload) writes
    /// none of it.
    pub async fn send_many(&self, cmds: Vec<Command>) -> Result<Vec<Receipt>, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let mut batch = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let max_attempts = self.validate(&cmd)?;
            let id = sh.id_for(&cmd);
            batch.push(self.new_dispatch(cmd, id, max_attempts, 0, sh.config.send_ttl));
        }
        let rows = sh.bounded(sh.store.insert_many(batch)).await?;
        metrics::counter!("broker_dispatch_published_total").increment(rows.len() as u64);
        let brokers: BTreeSet<BrokerId> = rows.iter().map(|d| d.broker.clone()).collect();
        for broker in &brokers {
            self.announce_broker(broker).await;
        }
        Ok(rows
            .into_iter()
            .map(|d| Receipt {
                id: d.id,
                dispatch: d,
            })
            .collect())
    }

    /// Waits for a dispatch written by [`send`](Hub::send) (or by another node) to finish, with
    /// the rolling deadline of [`dispatch`](Hub::dispatch). Unlike `dispatch`, it does not
    /// cancel the row when it gives up.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`], [`Error::TimedOut`], [`StoreError::NotFound`] (as
    /// [`Error::Store`]).
    pub async fn wait(&self, id: DispatchId) -> Result<serde_json::Value, Error> {
        let sh = &self.shared;
        let waiter = wait::Registration::new(sh, id).observe_only();
        let d = sh
            .bounded(sh.store.get(id))
            .await?
            .ok_or(Error::Store(StoreError::NotFound(id)))?;
        let done = waiter.wait(d).await?;
        Ok(done.result.unwrap_or(serde_json::Value::Null))
    }

    /// Cancels dispatch `id`, from any node: a pending one ends `Failed(Cancelled)` at once and
    /// never runs; a running one is marked in the store (never claimed again) and its holder,
    /// told by a notice or at its next lease renewal, fires the execution's
    /// [`ExecContext::cancelled`]; the row then ends `Failed(Cancelled)` when the executor
    /// returns, unless it completed. A command running on this node's fast path (no row) has
    /// its `cancelled()` fired directly; one running on another node's fast path cannot be
    /// reached (give it an [`id`](Command::id) and a row by sending it with a
    /// [`key`](Command::key) or [`send`](Hub::send) if it must be cancellable from anywhere).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] with [`StoreError::NotFound`] for an id no store row or local execution
    /// has; other store errors.
    ///
    /// # Cancel safety
    ///
    /// The cancel takes effect if the store call landed, whether or not this future completes.
    pub async fn cancel(&self, id: DispatchId) -> Result<CancelOutcome, Error> {
        let sh = &self.shared;
        let stopped_here = sh.running.cancel(&id);
        let res = sh
            .bounded(sh.store.request_cancel(CancelParams {
                id,
                now: sh.store_now(),
            }))
            .await;
        match res {
            Ok(row) => {
                // Its waiters (anywhere) re-read it; its holder (if elsewhere) checks the mark.
                sh.publish(Notice::Event { id }).await;
                sh.notify_waiter(&id);
                if row.state == DispatchState::InProgress {
                    metrics::counter!("broker_dispatch_cancel_requested_total").increment(1);
                    Ok(CancelOutcome::Requested(row))
                } else {
                    metrics::counter!("broker_dispatch_failed_total", "reason" => "cancelled")
                        .increment(1);
                    Ok(CancelOutcome::Cancelled(row))
                }
            }
            Err(Error::Store(StoreError::NotFound(_))) if stopped_here => {
                Ok(CancelOutcome::Stopping)
            }
            Err(Error::Store(StoreError::Illegal { .. })) => {
                match sh.bounded(sh.store.get(id)).await? {
                    Some(row) => Ok(CancelOutcome::Finished(row)),
                    None => Err(Error::Store(StoreError::NotFound(id))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a dispatch.
    ///
    /// # Errors
    ///
    /// Store errors.
    pub async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, Error> {
        self.shared.bounded(self.shared.store.get(id)).await
    }

    fn validate(&self, cmd: &Command) -> Result<u32, Error> {
        fsm::check_op(&cmd.op)?;
        let max_attempts = cmd.max_attempts.unwrap_or(self.shared.config.max_attempts);
        if max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        if let Some(k) = &cmd.idempotency_key {
            fsm::check_idempotency_key(k)?;
        }
        if let Some(k) = &cmd.key {
            fsm::check_key(k)?;
        }
        // The rule every store applies to a row's args, applied at the door whatever the route,
        // so a command is accepted or refused the same way on the fast path and forwarded.
        crate::store::check_json("args", &cmd.args, crate::store::MAX_ARGS_BYTES).map_err(|e| {
            match e {
                StoreError::InvalidInput(m) => Error::InvalidInput(m),
                other => Error::Store(other),
            }
        })?;
        for (what, d) in [("timeout", cmd.timeout), ("delay", cmd.delay)] {
            if d.is_some_and(|d| d < config::MIN_DURATION) {
                return Err(Error::InvalidInput(format!(
                    "Command::{what} must be at least {:?}",
                    config::MIN_DURATION
                )));
            }
        }
        Ok(max_attempts)
    }

    /// Stops the hub gracefully: refuses new work, stops claiming, lets in-flight executions
    /// finish and their outcomes be written (up to `shutdown_timeout`), releases the affinity
    /// of every broker connected here, and stops the background tasks.
    ///
    /// At `shutdown_timeout` it hands back, before returning, every row claimed here whose
    /// execution never began (`Release`, fenced by its attempt, so it does not use up an
    /// execution), including the rows of a claim whose answer is still on its way: that phase
    /// lasts at most twice `store_timeout` (one for the claim's answer, one for the write). An
    /// execution that did begin and is still running at the timeout is stopped and nothing is
    /// recorded for it: the hub cannot know how far it got, so its row stays `in_progress` and
    /// is re-claimed elsewhere once its lease runs out, as its next execution.
    ///
    /// # Errors
    ///
    /// Store errors while releasing affinity (the hub is stopped regardless).
    pub async fn shutdown(&self) -> Result<(), Error> {
        let sh = &self.shared;
        sh.accepting.store(false, Ordering::Release);
        sh.shutdown.send_replace(true);
        // Executors that watch `ctx.cancelled()` can wind down within the shutdown timeout.
        sh.running.cancel_all();
        for r in sh.drains.lock().values() {
            r.poke();
        }
        let mut deadline = instant_after(tokio::time::Instant::now(), sh.config.shutdown_timeout);
        let mut handing_back = false;
        loop {
            if sh.drains.lock().is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline && !handing_back {
                // Aborting the drains now would strand the claims that never started (and the
                // answer of a claim still in flight) as `in_progress` until their leases ran
                // out, each costing an execution: let the drains hand those back first.
                tracing::warn!(node = %sh.node, "shutdown timeout: stopping the executions still running, handing back the claims not started");
                handing_back = true;
                sh.abandon.send_replace(true);
                deadline = instant_after(now, sh.config.store_timeout.saturating_mul(2));
                continue;
            }
            if now >= deadline {
                tracing::warn!(node = %sh.node, "shutdown: the hand-back did not finish in time; the leases will run out");
                for r in std::mem::take(&mut *sh.drains.lock()).values() {
                    r.abort();
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for t in sh.tasks.lock().drain(..) {
            t.abort();
        }
        let conns = std::mem::take(&mut *sh.conns.lock());
        let mut first_err = None;
        for (broker, c) in conns {
            conn::announce_loss(sh, &broker, &c.session, LostReason::Released);
            let res = sh
                .bounded(sh.store.disconnect(DisconnectParams {
                    broker,
                    node: sh.node.clone(),
                    session: c.session,
                    now: sh.store_now(),
                }))
                .await;
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        sh.notify_all_waiters();
        tracing::info!(node = %sh.node, "hub stopped");
        first_err.map_or(Ok(()), Err)
    }

    /// Stops every task of this hub at once, mid-execution, without handing anything back or
    /// releasing affinity: what a crash looks like to the rest of the cluster. Its claims are
    /// re-claimed after their leases; its affinity goes stale after `freshness`. For tests and
    /// simulations.
    pub fn abort(&self) {
        self.shared.abort_all();
    }
}

fn route_name(r: &Route) -> &'static str {
    match r {
        Route::Local => "local",
        Route::Forward { .. } => "forward",
        Route::Http => "http",
        Route::Undeliverable => "undeliverable",
    }
}

/// Runs an executor future, turning a panic into a fatal error.
pub(crate) async fn run_guarded(
    fut: impl Future<Output = Result<serde_json::Value, ExecError>>,
) -> Result<serde_json::Value, ExecError> {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => Err(ExecError::Fatal(format!(
            "executor panicked: {}",
            panic_message(&*panic)
        ))),
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// The outcome a row reports to its originator: the `done` row itself, the failure of a
/// `failed` one; one not yet finished (the wait gave up) is [`Error::TimedOut`].
pub(crate) fn outcome_of_row(d: Dispatch) -> Result<Dispatch, Error> {
    match d.state {
        DispatchState::Done => Ok(d),
        DispatchState::Failed => Err(Error::Failed {
            id: d.id,
            reason: d.failure.unwrap_or(FailReason::Error(String::new())),
        }),
        DispatchState::Pending | DispatchState::InProgress => Err(Error::TimedOut {
            id: d.id,
            last_state: d.state,
        }),
    }
}
