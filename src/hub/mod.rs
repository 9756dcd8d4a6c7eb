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
//! Files, one job each: `builder.rs` (what a hub is made of, checked before it starts),
//! `conn.rs` (connect, disconnect, losses), `dispatch.rs` (routing, writing a row, waiting),
//! `local.rs` (the fast path and HTTP), `send.rs` (durable fire-and-forget, in the caller's
//! transaction too), `wait.rs` (the originator's rolling wait), `cancel.rs`, `drain.rs` (slots
//! and claims), `lease.rs` (one execution and its lease renewal), `finish.rs` (outcomes in
//! group commits), `sweeper.rs`, `listener.rs`, `background.rs` (catch-up polling and the
//! affinity refresh), `shared.rs` (the state the hub's tasks share).

mod background;
mod builder;
mod cancel;
mod command;
mod config;
mod conn;
mod dispatch;
mod drain;
mod executor;
mod finish;
mod lease;
mod listener;
mod local;
mod replies;
mod send;
mod shared;
mod sweeper;
mod wait;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use builder::{Clock, HubBuilder, IdSource, SystemClock};
pub use cancel::CancelOutcome;
pub use command::{Command, Dispatched, Receipt};
pub use config::{HubConfig, UndeliverablePolicy};
pub use conn::{Lost, LostReason, LostStream, LOST_BUFFER};

pub use executor::{ExecContext, Executor, FnExecutor, HttpFallback};
pub use replies::{Replies, Reply, ReplyError};

use crate::error::Error;
use crate::fsm::{Dispatch, DispatchId, NodeId};
use crate::store::{DisconnectParams, Store};
pub(crate) use shared::{instant_after, panic_message, run_guarded, Shared};

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

impl Hub {
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

    /// Reads a dispatch.
    ///
    /// # Errors
    ///
    /// Store errors.
    pub async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, Error> {
        self.shared.bounded(self.shared.store.get(id)).await
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
