//! The state every task of one hub shares, and the small helpers they all use.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::conn::{self, ConnHandle, LocalConn, Lost};
use super::{drain, wait, Clock, Command, Executor, HttpFallback, HubConfig, IdSource};
use crate::error::{Error, ExecError, StoreError};
use crate::fsm::{BrokerId, DispatchId, NodeId, SessionId, Timestamp};
use crate::store::Store;
use crate::transport::{Notice, Transport};

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
