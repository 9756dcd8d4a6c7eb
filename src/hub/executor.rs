//! The user's side: [`Executor`] runs a command on the broker's live connection;
//! [`HttpFallback`] reaches a broker that has no connection but an HTTP endpoint.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::conn::Cancel;
use crate::error::ExecError;
use crate::fsm::{Attempt, BrokerId, Dispatch, DispatchId, SessionId};

/// Runs commands on brokers connected to this node.
///
/// # Contract
///
/// - Called only on the node that holds the broker's connection (or, for the local fast path,
///   where it is connected now), with the dispatch id and attempt so the broker can deduplicate:
///   execution is at-least-once, at most `max_attempts` times.
/// - Return `Ok(result)` on success, [`ExecError::Retryable`] to run again later (if attempts
///   remain), [`ExecError::Fatal`] to fail the dispatch.
/// - A panic fails that dispatch (`executor panicked: …`), never the hub.
/// - The future may be dropped (shutdown timeout, process death): the lease then runs out and
///   another attempt may run.
///
/// An executor that writes the command to the broker's socket (the handle given to
/// [`Hub::connect`](super::Hub::connect)) and stops when the dispatch is cancelled:
///
/// ```
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use broker_dispatch::fsm::Dispatch;
/// use broker_dispatch::hub::{ExecContext, Executor};
/// use broker_dispatch::ExecError;
/// use tokio::sync::mpsc;
///
/// /// The application's handle for one connection: its socket's writer.
/// type Socket = mpsc::Sender<String>;
///
/// struct ToSocket;
///
/// #[async_trait]
/// impl Executor for ToSocket {
///     async fn execute(&self, ctx: ExecContext, d: &Dispatch) -> Result<serde_json::Value, ExecError> {
///         let socket = ctx.conn::<Socket>().ok_or_else(|| ExecError::fatal("no socket"))?;
///         // (id, attempt) lets the broker drop a duplicate of an execution it already ran.
///         let line = format!("{} {} {}", d.id, ctx.attempt(), d.op);
///         if socket.send(line).await.is_err() {
///             // The socket closed: another attempt may find the broker on its new connection.
///             return Err(ExecError::Retryable { after: Duration::from_secs(1), message: "socket closed".into() });
///         }
///         tokio::select! {
///             () = ctx.cancelled() => Err(ExecError::fatal("cancelled")),
///             () = tokio::time::sleep(Duration::from_millis(10)) => Ok(serde_json::json!("sent")),
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use broker_dispatch::{fsm::BrokerId, store::NewDispatch, fsm::Timestamp};
///
/// // A unit test of the executor, outside any hub.
/// let d = NewDispatch::new(BrokerId::new("b1").unwrap(), "restart", serde_json::json!({}))
///     .into_dispatch(Timestamp::EPOCH);
/// let (socket, mut wire) = mpsc::channel::<String>(8);
/// let ctx = ExecContext::detached(d.id, 1).with_conn(socket);
/// assert_eq!(ToSocket.execute(ctx, &d).await, Ok(serde_json::json!("sent")));
/// assert_eq!(wire.recv().await, Some(format!("{} 1 restart", d.id)));
/// # }
/// ```
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Executes one dispatch.
    async fn execute(
        &self,
        ctx: ExecContext,
        dispatch: &Dispatch,
    ) -> Result<serde_json::Value, ExecError>;
}

/// Reaches a broker over HTTP when no node holds its connection.
#[async_trait]
pub trait HttpFallback: Send + Sync + 'static {
    /// Whether this broker has an HTTP endpoint.
    async fn has_endpoint(&self, broker: &BrokerId) -> bool;

    /// Executes the command over HTTP. The dispatch is not written to the store.
    async fn call(&self, dispatch: &Dispatch) -> Result<serde_json::Value, ExecError>;
}

/// What an execution knows about itself: which dispatch and attempt, the broker connection it
/// runs on (the application's handle and its session), how to report progress, and whether it
/// should stop.
pub struct ExecContext {
    id: DispatchId,
    attempt: Attempt,
    execution: u32,
    session: Option<SessionId>,
    conn: Option<Arc<dyn Any + Send + Sync>>,
    cancel: Cancel,
    /// The latest progress not yet stored: a report replaces an unsent one, so a chatty executor
    /// costs memory for one value and never blocks.
    progress: Option<watch::Sender<Option<serde_json::Value>>>,
}

impl fmt::Debug for ExecContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecContext")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("execution", &self.execution)
            .field("session", &self.session)
            .field("cancelled", &self.cancel.is_fired())
            .finish_non_exhaustive()
    }
}

impl ExecContext {
    pub(crate) fn new(
        id: DispatchId,
        attempt: Attempt,
        execution: u32,
        session: Option<SessionId>,
        progress: Option<watch::Sender<Option<serde_json::Value>>>,
    ) -> Self {
        ExecContext {
            id,
            attempt,
            execution,
            session,
            conn: None,
            cancel: Cancel::default(),
            progress,
        }
    }

    /// The same context on the connection `conn`, cancelled by `cancel`.
    pub(crate) fn on(mut self, conn: Option<Arc<dyn Any + Send + Sync>>, cancel: Cancel) -> Self {
        self.conn = conn;
        self.cancel = cancel;
        self
    }

    /// A context outside any hub (progress reports go nowhere): for calling an executor
    /// directly, in tests or benchmarks.
    pub fn detached(id: DispatchId, attempt: Attempt) -> Self {
        ExecContext::new(id, attempt, attempt, None, None)
    }

    /// This context with `conn` as its connection handle (what [`conn`](Self::conn) returns):
    /// for calling an executor directly on a [`detached`](Self::detached) context in a test.
    #[must_use]
    pub fn with_conn<C: Send + Sync + 'static>(mut self, conn: C) -> Self {
        self.conn = Some(Arc::new(conn));
        self
    }

    /// The dispatch id (stable across attempts): the broker's deduplication key.
    pub fn id(&self) -> DispatchId {
        self.id
    }

    /// The fencing token of this attempt: `(id, attempt)` is unique per execution, the key to
    /// deduplicate on. It counts claims, so after a hand-back (the broker moved before the row
    /// started) it can exceed [`execution`](Self::execution) and even `max_attempts`.
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// Which execution this is, from 1: executions begun so far, this one included. Never more
    /// than the dispatch's `max_attempts`.
    pub fn execution(&self) -> u32 {
        self.execution
    }

    /// The session of the broker connection this execution was started for (`None` outside a
    /// hub). A broker that keeps its own session can refuse commands sent on one it replaced.
    pub fn session(&self) -> Option<&SessionId> {
        self.session.as_ref()
    }

    /// The application's handle for the connection this execution runs on, as given to
    /// [`Hub::connect`](super::Hub::connect), if it is a `T` (`None` outside a hub, or for
    /// another type).
    ///
    /// ```
    /// # use broker_dispatch::hub::ExecContext;
    /// # fn f(ctx: &ExecContext) {
    /// // Given `hub.connect(broker, session, socket_tx)` with a `tokio::sync::mpsc::Sender<String>`:
    /// if let Some(socket) = ctx.conn::<tokio::sync::mpsc::Sender<String>>() {
    ///     let _ = socket.try_send("start".to_owned());
    /// }
    /// # }
    /// ```
    pub fn conn<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.conn.as_deref().and_then(|c| c.downcast_ref::<T>())
    }

    /// Resolves when this execution should stop: its dispatch was cancelled (from any node,
    /// [`Hub::cancel`](super::Hub::cancel)), the broker's connection left this node, or the hub
    /// is shutting down. Cooperative: the execution goes on until the executor returns, and
    /// what it returns still counts (a cancelled dispatch ends `Failed(Cancelled)` unless it
    /// completed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; call it as often as needed (e.g. in a `select!` loop).
    pub async fn cancelled(&self) {
        self.cancel.fired().await;
    }

    /// Whether [`cancelled`](Self::cancelled) has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_fired()
    }

    /// Reports progress: the hub renews the lease at once, stores the detail, and the
    /// originator's rolling wait restarts. Cheap and non-blocking: a report made before the
    /// previous one was stored replaces it. A no-op on the local fast path, where the
    /// originator is the caller itself.
    pub fn report_progress(&self, detail: serde_json::Value) {
        if let Some(tx) = &self.progress {
            // The receiver is gone only once the execution finished; nothing to report then.
            let _ = tx.send(Some(detail));
        }
    }
}

/// An executor built from a closure, for tests and small programs.
pub struct FnExecutor<F>(pub F);

impl<F> fmt::Debug for FnExecutor<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnExecutor").finish_non_exhaustive()
    }
}

#[async_trait]
impl<F, Fut> Executor for FnExecutor<F>
where
    F: Fn(ExecContext, Dispatch) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value, ExecError>> + Send + 'static,
{
    async fn execute(
        &self,
        ctx: ExecContext,
        dispatch: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        (self.0)(ctx, dispatch.clone()).await
    }
}
