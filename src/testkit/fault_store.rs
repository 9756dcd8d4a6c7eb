//! [`FaultStore`]: a store wrapper that fails the calls you choose.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::StoreError;
use crate::fsm::{Affinity, BrokerId, Dispatch, DispatchId, Timestamp};
use crate::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, NewDispatch, Store, SweepParams, SweepReport,
    TouchParams,
};

/// A [`Store`] call, to aim a [`Fault`] at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreOp {
    /// [`Store::insert`] and [`Store::insert_many`].
    Insert,
    /// [`Store::claim`].
    Claim,
    /// [`Store::heartbeat`].
    Heartbeat,
    /// [`Store::finish`] and [`Store::finish_many`] (one fault fails the whole batch call).
    Finish,
    /// [`Store::cancel`] and [`Store::request_cancel`].
    Cancel,
    /// [`Store::get`] and [`Store::list`].
    Read,
    /// [`Store::sweep`].
    Sweep,
    /// [`Store::connect`], [`Store::disconnect`] and [`Store::touch`].
    Affinity,
    /// [`Store::affinity`] and [`Store::affinity_at`].
    AffinityRead,
}

/// What happens to a call a fault is aimed at.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Fault {
    /// The call fails with [`StoreError::Unavailable`]; nothing is written.
    Unavailable,
    /// The call fails with [`StoreError::Backend`]; nothing is written.
    Backend,
    /// The call is applied, then its answer is lost: the caller gets
    /// [`StoreError::Unavailable`] although the write landed (a timeout after the commit).
    LoseAnswer,
    /// The call panics before reaching the store (a codec or driver bug).
    Panic,
    /// The call waits this long (on tokio's clock), then runs.
    Delay(Duration),
    /// The call never returns (a server that accepts and never answers).
    Hang,
}

/// Wraps any store and injects faults into the calls you choose; every call is counted.
///
/// Faults are queued per [`StoreOp`] and each one is used up by one call, in order;
/// a call with no fault queued goes straight to the wrapped store. Everything else a store
/// declares (its name, whether it signals on insert, `as_any`) is the wrapped store's.
///
/// ```
/// use std::sync::Arc;
/// use broker_dispatch::fsm::BrokerId;
/// use broker_dispatch::store::{MemoryStore, NewDispatch, Store};
/// use broker_dispatch::testkit::{Fault, FaultStore, StoreOp};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = FaultStore::new(MemoryStore::new());
/// store.inject(StoreOp::Insert, Fault::LoseAnswer);
/// let new = NewDispatch::new(BrokerId::new("b1").unwrap(), "start", serde_json::json!({}));
/// // The write landed, but its caller was told it failed ...
/// assert!(store.insert(new.clone()).await.is_err());
/// // ... so it retries, and the insert's idempotency returns the same row.
/// assert_eq!(store.insert(new.clone()).await.unwrap().id, new.id);
/// assert_eq!(store.calls(StoreOp::Insert), 2);
/// # }
/// ```
pub struct FaultStore {
    inner: Arc<dyn Store>,
    plan: Mutex<HashMap<StoreOp, VecDeque<Fault>>>,
    calls: Mutex<HashMap<StoreOp, u64>>,
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultStore")
            .field("inner", &self.inner)
            .field("plan", &*self.plan.lock())
            .finish_non_exhaustive()
    }
}

impl FaultStore {
    /// Wraps `store`, with no fault planned.
    pub fn new(store: impl Store) -> Self {
        Self::wrap(Arc::new(store))
    }

    /// Wraps a shared store.
    pub fn wrap(store: Arc<dyn Store>) -> Self {
        FaultStore {
            inner: store,
            plan: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// Queues `fault` for the next call of `op` not already given one.
    pub fn inject(&self, op: StoreOp, fault: Fault) {
        self.inject_n(op, fault, 1);
    }

    /// Queues `fault` for the next `n` calls of `op`.
    pub fn inject_n(&self, op: StoreOp, fault: Fault, n: usize) {
        let mut plan = self.plan.lock();
        let queue = plan.entry(op).or_default();
        queue.extend(std::iter::repeat_n(fault, n));
    }

    /// Drops every fault not yet used.
    pub fn clear(&self) {
        self.plan.lock().clear();
    }

    /// How many calls of `op` were made (faulted or not).
    pub fn calls(&self, op: StoreOp) -> u64 {
        self.calls.lock().get(&op).copied().unwrap_or(0)
    }

    /// Counts a call of `op` and takes its fault, if one is queued.
    fn next(&self, op: StoreOp) -> Option<Fault> {
        *self.calls.lock().entry(op).or_default() += 1;
        self.plan.lock().get_mut(&op).and_then(VecDeque::pop_front)
    }

    /// Runs `call` under the fault planned for `op`.
    async fn run<T, F>(&self, op: StoreOp, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        match self.next(op) {
            None => call.await,
            Some(Fault::Unavailable) => Err(StoreError::Unavailable(
                format!("injected: {op:?} unavailable").into(),
            )),
            Some(Fault::Backend) => Err(StoreError::Backend(
                format!("injected: {op:?} failed").into(),
            )),
            Some(Fault::LoseAnswer) => {
                let _applied = call.await;
                Err(StoreError::Unavailable(
                    format!("injected: the answer to {op:?} was lost").into(),
                ))
            }
            Some(Fault::Panic) => panic!("injected: {op:?} panicked"),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

#[async_trait]
impl Store for FaultStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn signals_on_insert(&self) -> bool {
        self.inner.signals_on_insert()
    }

    fn announces_finishes(&self) -> bool {
        self.inner.announces_finishes()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.inner.as_any()
    }

    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.run(StoreOp::Insert, self.inner.insert(new)).await
    }

    async fn insert_many(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        self.run(StoreOp::Insert, self.inner.insert_many(batch))
            .await
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.run(StoreOp::Claim, self.inner.claim(p)).await
    }

    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        self.run(StoreOp::Heartbeat, self.inner.heartbeat(c, p))
            .await
    }

    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.run(StoreOp::Finish, self.inner.finish(c, p)).await
    }

    async fn finish_many(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let n = batch.len();
        let call = async { Ok(self.inner.finish_many(batch).await) };
        match self.run(StoreOp::Finish, call).await {
            Ok(results) => results,
            Err(e) => {
                let message = e.to_string();
                (0..n)
                    .map(|_| Err(StoreError::Unavailable(message.clone().into())))
                    .collect()
            }
        }
    }

    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.run(StoreOp::Cancel, self.inner.cancel(p)).await
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.run(StoreOp::Cancel, self.inner.request_cancel(p))
            .await
    }

    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.run(StoreOp::Read, self.inner.get(id)).await
    }

    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        self.run(StoreOp::Read, self.inner.list(f)).await
    }

    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        self.run(StoreOp::Sweep, self.inner.sweep(p)).await
    }

    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        self.run(StoreOp::Affinity, self.inner.connect(p)).await
    }

    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        self.run(StoreOp::Affinity, self.inner.disconnect(p)).await
    }

    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        self.run(StoreOp::Affinity, self.inner.touch(p)).await
    }

    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        self.run(StoreOp::AffinityRead, self.inner.affinity(broker))
            .await
    }

    async fn affinity_at(
        &self,
        broker: &BrokerId,
    ) -> Result<(Option<Affinity>, Option<Timestamp>), StoreError> {
        self.run(StoreOp::AffinityRead, self.inner.affinity_at(broker))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn new() -> NewDispatch {
        NewDispatch::new(BrokerId::new("b1").unwrap(), "op", serde_json::json!({}))
    }

    #[tokio::test]
    async fn each_fault_is_used_by_one_call_in_order() {
        let store = FaultStore::new(MemoryStore::new());
        store.inject(StoreOp::Insert, Fault::Unavailable);
        store.inject(StoreOp::Insert, Fault::Backend);
        assert!(matches!(
            store.insert(new()).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.insert(new()).await,
            Err(StoreError::Backend(_))
        ));
        let d = store.insert(new()).await.unwrap();
        assert_eq!(store.calls(StoreOp::Insert), 3);
        // Nothing was written by the failed calls: one row.
        assert_eq!(store.list(ListFilter::default()).await.unwrap(), vec![d]);
    }

    #[tokio::test]
    async fn a_lost_answer_applies_the_call() {
        let store = FaultStore::new(MemoryStore::new());
        store.inject(StoreOp::Insert, Fault::LoseAnswer);
        let n = new();
        assert!(store.insert(n.clone()).await.is_err());
        assert!(store.get(n.id).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn delays_and_hangs_are_on_tokio_time() {
        let store = FaultStore::new(MemoryStore::new());
        store.inject(StoreOp::Read, Fault::Delay(Duration::from_secs(5)));
        let t = tokio::time::Instant::now();
        store.get(DispatchId::new()).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        store.inject(StoreOp::Read, Fault::Hang);
        let hung = tokio::time::timeout(Duration::from_secs(60), store.get(DispatchId::new()));
        assert!(hung.await.is_err());
    }

    #[tokio::test]
    async fn a_panic_is_the_callers() {
        let store = Arc::new(FaultStore::new(MemoryStore::new()));
        store.inject(StoreOp::Claim, Fault::Panic);
        let s = Arc::clone(&store);
        let r = tokio::spawn(async move {
            s.claim(ClaimParams {
                broker: BrokerId::new("b1").unwrap(),
                node: crate::fsm::NodeId::new("n").unwrap(),
                limit: 1,
                lease: Duration::from_secs(1),
                now: None,
            })
            .await
        })
        .await;
        assert!(r.unwrap_err().is_panic());
        // The next call goes through.
        store.clear();
        assert_eq!(store.calls(StoreOp::Claim), 1);
    }
}
