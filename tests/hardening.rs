//! One fault stops nothing but itself: a panicking store call, a panicking transport stream, a
//! burst of resyncs, an HTTP fallback that hangs or panics. Run on paused time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{
    Affinity, BrokerId, Dispatch, DispatchId, FailReason, NodeId, SessionId,
};
use broker_dispatch::hub::{
    Command, FnExecutor, HttpFallback, Hub, HubConfig, UndeliverablePolicy,
};
use broker_dispatch::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Store, SweepParams,
    SweepReport, TouchParams,
};
use broker_dispatch::transport::{MemoryTransport, Notice, Subscription, Transport};
use broker_dispatch::{Error, ExecError, StoreError, TransportError};
use futures::StreamExt;
use serde_json::json;

/// A memory store that counts claims and panics in the first `panics` of them.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    claims: AtomicU32,
    panics: AtomicU32,
}

#[async_trait]
impl Store for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.claims.fetch_add(1, Ordering::Relaxed);
        let left = self.panics.load(Ordering::Relaxed);
        if left > 0 {
            self.panics.store(left - 1, Ordering::Relaxed);
            panic!("a codec bug");
        }
        self.inner.claim(p).await
    }
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        self.inner.heartbeat(c, p).await
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.inner.finish(c, p).await
    }
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.cancel(p).await
    }
    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.request_cancel(p).await
    }
    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        self.inner.list(f).await
    }
    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        self.inner.sweep(p).await
    }
    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        self.inner.connect(p).await
    }
    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        self.inner.disconnect(p).await
    }
    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        self.inner.touch(p).await
    }
    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
}

fn config() -> HubConfig {
    HubConfig {
        poll_interval: Duration::from_secs(1),
        sweep_interval: Duration::from_secs(30),
        ..HubConfig::default()
    }
}

async fn hub(name: &str, store: Arc<dyn Store>, transport: Arc<dyn Transport>) -> Hub {
    Hub::builder(NodeId::new(name).unwrap())
        .store(store)
        .transport(transport)
        .executor(Arc::new(FnExecutor(|_ctx, d: Dispatch| async move {
            Ok(json!(d.op))
        })))
        .config(config())
        .start()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_panicking_store_call_fails_that_call_and_the_broker_keeps_draining() {
    let store = Arc::new(Flaky {
        panics: AtomicU32::new(3),
        ..Flaky::default()
    });
    let bus = MemoryTransport::new();
    let owner = hub("owner", store.clone(), Arc::new(bus.clone())).await;
    let other = hub("other", store.clone(), Arc::new(bus.clone())).await;
    let b = BrokerId::new("b").unwrap();
    owner
        .connect(b.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    // The first claims panic; the next signal or catch-up claims again and the work runs.
    let out = other
        .dispatch(Command::new(b.clone(), "op", json!(1)))
        .await;
    assert_eq!(out.unwrap(), json!("op"));
    assert_eq!(
        store.panics.load(Ordering::Relaxed),
        0,
        "the panics happened"
    );
    let out = other.dispatch(Command::new(b, "again", json!(2))).await;
    assert_eq!(out.unwrap(), json!("again"));
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_resyncs_costs_one_claim_per_broker_per_poll_interval() {
    let store = Arc::new(Flaky::default());
    let bus = MemoryTransport::with_capacity(4096);
    let owner = hub("owner", store.clone(), Arc::new(bus.clone())).await;
    for i in 0..20 {
        owner
            .connect(
                BrokerId::new(format!("b{i}")).unwrap(),
                SessionId::new("s").unwrap(),
                (),
            )
            .await
            .unwrap();
    }
    // Let the connects' own drains settle.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = store.claims.load(Ordering::Relaxed);
    for _ in 0..500 {
        bus.inject_resync();
        tokio::task::yield_now().await;
    }
    // Well inside one poll interval (catch-up polling adds its own 20 claims once per second).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claims = store.claims.load(Ordering::Relaxed) - before;
    assert!(
        claims <= 2 * 20,
        "500 resyncs for 20 brokers cost {claims} claims"
    );
    assert!(claims >= 20, "the first resync re-drained every broker");
}

/// A transport whose subscription's stream panics when it meets its first event.
#[derive(Debug)]
struct PanickyStream {
    inner: MemoryTransport,
    subscribes: AtomicU32,
}

#[async_trait]
impl Transport for PanickyStream {
    fn name(&self) -> &'static str {
        "panicky"
    }
    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        let first = self.subscribes.fetch_add(1, Ordering::Relaxed) == 0;
        let sub = self.inner.subscribe().await?;
        Ok(Subscription::new(sub.map(move |n| {
            if first && matches!(n, Notice::Event { .. }) {
                panic!("a transport bug");
            }
            n
        })))
    }
    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        self.inner.publish(notice).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_listener_is_restarted_and_the_hub_keeps_hearing_notices() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let bus = MemoryTransport::new();
    let panicky = Arc::new(PanickyStream {
        inner: bus.clone(),
        subscribes: AtomicU32::new(0),
    });
    let owner = hub("owner", store.clone(), Arc::new(bus.clone())).await;
    let originator = hub("originator", store.clone(), panicky.clone()).await;
    let b = BrokerId::new("b").unwrap();
    owner
        .connect(b.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    for i in 0..3 {
        let out = originator
            .dispatch(Command::new(b.clone(), "op", json!(i)))
            .await
            .unwrap();
        assert_eq!(out, json!("op"));
    }
    assert!(
        panicky.subscribes.load(Ordering::Relaxed) >= 2,
        "the listener subscribed again after its panic"
    );
}

/// An executor's failure message larger than the store takes (64 KiB) is shortened before it is
/// written: the dispatch ends `Failed(Error(..))` after exactly one execution, instead of the
/// refused write being taken for fencing and the command run again when its lease lapsed.
#[tokio::test(start_paused = true)]
async fn an_oversized_failure_message_is_shortened_and_runs_once() {
    use broker_dispatch::fsm::FailReason;
    use broker_dispatch::store::MAX_DETAIL_BYTES;
    use broker_dispatch::{Error, ExecError};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let bus = MemoryTransport::new();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&runs);
    let owner = Hub::builder(NodeId::new("owner").unwrap())
        .store(store.clone())
        .transport(Arc::new(bus.clone()))
        .executor(Arc::new(FnExecutor(move |_ctx, _d: Dispatch| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move { Err::<serde_json::Value, _>(ExecError::fatal("x".repeat(100_000))) }
        })))
        .config(config())
        .start()
        .await
        .unwrap();
    let other = hub("other", store.clone(), Arc::new(bus.clone())).await;
    let b = BrokerId::new("b").unwrap();
    owner
        .connect(b.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    let shortened = |e: &Error| match e {
        Error::Failed {
            reason: FailReason::Error(m),
            ..
        } => m.len() <= MAX_DETAIL_BYTES && m.starts_with("xxx"),
        _ => false,
    };
    // Forwarded: the owner claims the row, runs it, and writes the failure.
    let err = other
        .dispatch(Command::new(b.clone(), "op", json!(1)))
        .await
        .unwrap_err();
    assert!(shortened(&err), "{err:?}");
    let rows = store.list(ListFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        matches!(&rows[0].failure, Some(FailReason::Error(m)) if m.len() <= MAX_DETAIL_BYTES),
        "{:?}",
        rows[0].state
    );
    // Long enough for a lapsed lease to be re-claimed, had the write been refused.
    tokio::time::sleep(config().lease * 3).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1, "the command ran again");
    // The local fast path reports the same shortened text.
    let err = owner
        .dispatch(Command::new(b, "op", json!(2)))
        .await
        .unwrap_err();
    assert!(shortened(&err), "{err:?}");
    assert_eq!(runs.load(Ordering::Relaxed), 2);
}

/// A memory store whose first `finish` applies the write and then answers `Unavailable`, as a
/// call whose answer was lost (a timeout, a dropped connection) after it committed.
#[derive(Debug, Default)]
struct LostAnswer {
    inner: MemoryStore,
    finishes: AtomicU32,
}

#[async_trait]
impl Store for LostAnswer {
    fn name(&self) -> &'static str {
        "lost-answer"
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.inner.claim(p).await
    }
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        self.inner.heartbeat(c, p).await
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        let first = self.finishes.fetch_add(1, Ordering::Relaxed) == 0;
        let r = self.inner.finish(c, p).await;
        if first && r.is_ok() {
            return Err(StoreError::Unavailable("the answer was lost".into()));
        }
        r
    }
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.cancel(p).await
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.request_cancel(p).await
    }
    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        self.inner.list(f).await
    }
    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        self.inner.sweep(p).await
    }
    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        self.inner.connect(p).await
    }
    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        self.inner.disconnect(p).await
    }
    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        self.inner.touch(p).await
    }
    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
}

/// A finish whose answer was lost, retried and refused because it already landed, counts as
/// finished: its event goes out at once (waiters hear it without waiting for their poll), not
/// as a fenced attempt that nobody announces.
#[tokio::test(start_paused = true)]
async fn a_retried_finish_that_had_landed_is_announced_not_fenced() {
    let store = Arc::new(LostAnswer::default());
    let bus = MemoryTransport::new();
    let mut events = bus.subscribe().await.unwrap();
    let owner = hub("owner", store.clone(), Arc::new(bus.clone())).await;
    let b = BrokerId::new("b").unwrap();
    owner
        .connect(b.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    let receipt = owner.send(Command::new(b, "op", json!(1))).await.unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(n) = events.next().await {
            if matches!(n, Notice::Event { id } if id == receipt.id) {
                return;
            }
        }
    })
    .await;
    assert_eq!(
        store.finishes.load(Ordering::Relaxed),
        2,
        "one lost answer, one retry"
    );
    assert!(announced.is_ok(), "the landed finish was never announced");
    let row = store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(row.result, Some(json!("op")));
}

/// An HTTP fallback that misbehaves by broker name: `hang-endpoint` / `panic-endpoint` in
/// `has_endpoint`, `hang-call` / `panic-call` in `call`; any other broker has an endpoint that
/// answers at once.
#[derive(Debug)]
struct BadHttp;

#[async_trait]
impl HttpFallback for BadHttp {
    async fn has_endpoint(&self, broker: &BrokerId) -> bool {
        match broker.as_str() {
            "hang-endpoint" => std::future::pending().await,
            "panic-endpoint" => panic!("has_endpoint bug"),
            _ => true,
        }
    }
    async fn call(&self, d: &Dispatch) -> Result<serde_json::Value, ExecError> {
        match d.broker.as_str() {
            "hang-call" => std::future::pending().await,
            "panic-call" => panic!("call bug"),
            _ => Ok(json!({"via": "http", "op": d.op})),
        }
    }
}

async fn http_hub(cfg: &HubConfig) -> Hub {
    Hub::builder(NodeId::new("http").unwrap())
        .store(Arc::new(MemoryStore::new()))
        .executor(Arc::new(FnExecutor(|_ctx, d: Dispatch| async move {
            Ok(json!(d.op))
        })))
        .http_fallback(Arc::new(BadHttp))
        .config(cfg.clone())
        .start()
        .await
        .unwrap()
}

fn http_config() -> HubConfig {
    HubConfig {
        store_timeout: Duration::from_secs(2),
        execute_timeout: Duration::from_secs(3),
        // A broker without an endpoint fails at once instead of waiting for an owner.
        undeliverable: UndeliverablePolicy::FailFast,
        ..config()
    }
}

/// Dispatches to `broker` on `hub`; returns the error and how long it took. Then checks that
/// the hub still serves an HTTP broker that behaves.
async fn dispatch_bad(hub: &Hub, broker: &str) -> (Error, Duration) {
    let started = tokio::time::Instant::now();
    let call = hub.dispatch(Command::new(BrokerId::new(broker).unwrap(), "op", json!(1)));
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the dispatch is bounded")
        .expect_err("the misbehaving fallback fails the dispatch");
    let took = started.elapsed();
    let out = hub
        .dispatch(Command::new(
            BrokerId::new("fine").unwrap(),
            "later",
            json!(2),
        ))
        .await
        .expect("a later dispatch succeeds");
    assert_eq!(out, json!({"via": "http", "op": "later"}));
    (err, took)
}

#[tokio::test(start_paused = true)]
async fn a_hanging_has_endpoint_counts_as_no_endpoint_after_store_timeout() {
    let cfg = http_config();
    let hub = http_hub(&cfg).await;
    let (err, took) = dispatch_bad(&hub, "hang-endpoint").await;
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Undeliverable,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took >= cfg.store_timeout, "gave up after {took:?}");
    assert!(took < cfg.store_timeout * 2, "gave up after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_has_endpoint_counts_as_no_endpoint() {
    let hub = http_hub(&http_config()).await;
    let (err, took) = dispatch_bad(&hub, "panic-endpoint").await;
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Undeliverable,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(100), "took {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_http_call_fails_after_execute_timeout() {
    let cfg = http_config();
    let hub = http_hub(&cfg).await;
    let (err, took) = dispatch_bad(&hub, "hang-call").await;
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Error(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took >= cfg.execute_timeout, "gave up after {took:?}");
    assert!(took < cfg.execute_timeout * 2, "gave up after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_http_call_fails_that_dispatch_only() {
    let hub = http_hub(&http_config()).await;
    let (err, took) = dispatch_bad(&hub, "panic-call").await;
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Error(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(100), "took {took:?}");
}

/// A memory store that keeps a clock of its own, `behind` the nodes' (as a database whose clock
/// disagrees with a node's would): rows and affinity are written by that clock, and
/// `affinity_at` reports it.
#[derive(Debug)]
struct ClockedStore {
    inner: MemoryStore,
    behind: Duration,
}

impl ClockedStore {
    fn now(&self) -> broker_dispatch::fsm::Timestamp {
        broker_dispatch::fsm::Timestamp::from_system_time(std::time::SystemTime::now())
            .saturating_sub(self.behind)
    }
}

#[async_trait]
impl Store for ClockedStore {
    fn name(&self) -> &'static str {
        "clocked"
    }
    async fn insert(&self, mut new: NewDispatch) -> Result<Dispatch, StoreError> {
        new.now = new.now.or(Some(self.now()));
        self.inner.insert(new).await
    }
    async fn claim(&self, mut p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        p.now = p.now.or(Some(self.now()));
        self.inner.claim(p).await
    }
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        self.inner.heartbeat(c, p).await
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.inner.finish(c, p).await
    }
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.cancel(p).await
    }
    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.request_cancel(p).await
    }
    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        self.inner.list(f).await
    }
    async fn sweep(&self, mut p: SweepParams) -> Result<SweepReport, StoreError> {
        p.now = p.now.or(Some(self.now()));
        self.inner.sweep(p).await
    }
    async fn connect(&self, mut p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        p.now = p.now.or(Some(self.now()));
        self.inner.connect(p).await
    }
    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        self.inner.disconnect(p).await
    }
    async fn touch(&self, mut p: TouchParams) -> Result<bool, StoreError> {
        p.now = p.now.or(Some(self.now()));
        self.inner.touch(p).await
    }
    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
    async fn affinity_at(
        &self,
        broker: &BrokerId,
    ) -> Result<(Option<Affinity>, Option<broker_dispatch::fsm::Timestamp>), StoreError> {
        Ok((self.inner.affinity(broker).await?, Some(self.now())))
    }
}

/// Routing judges an owner's freshness by the store's clock, the one its `last_seen` was
/// written with. With a store an hour behind this node, a live owner's row (refreshed just
/// now by the store's clock) looks an hour stale to this node's clock; the command must still
/// be forwarded to the owner (a row is written), not refused as undeliverable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_judges_an_owners_freshness_by_the_stores_clock() {
    let store = Arc::new(ClockedStore {
        inner: MemoryStore::new(),
        behind: Duration::from_secs(3600),
    });
    let b = BrokerId::new("b").unwrap();
    // The live owner's affinity, just refreshed by the store's clock.
    let claimed = store
        .connect(ConnectParams {
            broker: b.clone(),
            node: NodeId::new("owner").unwrap(),
            session: SessionId::new("s").unwrap(),
            connected_at: None,
            now: None,
        })
        .await
        .unwrap();
    assert!(matches!(claimed, ConnectOutcome::Claimed(_)));
    let originator = Hub::builder(NodeId::new("originator").unwrap())
        .store(store.clone())
        .transport(Arc::new(MemoryTransport::new()))
        .executor(Arc::new(FnExecutor(|_ctx, d: Dispatch| async move {
            Ok(json!(d.op))
        })))
        .config(HubConfig {
            undeliverable: UndeliverablePolicy::FailFast,
            wait_window: Duration::from_millis(200),
            ..config()
        })
        .start()
        .await
        .unwrap();
    let err = originator
        .dispatch(Command::new(b.clone(), "op", json!(1)))
        .await
        .unwrap_err();
    assert!(
        !matches!(
            err,
            Error::Failed {
                reason: FailReason::Undeliverable,
                ..
            }
        ),
        "a live owner was taken for dead: {err:?}"
    );
    assert_eq!(
        store.list(ListFilter::default()).await.unwrap().len(),
        1,
        "the command was forwarded as a row"
    );
    originator.shutdown().await.unwrap();
}
