//! The execution model, tried from the outside through the public API: per-broker slots,
//! ordering keys, deadlines that bind the start, attempts that count executions, and a fast path
//! that is a first attempt only. Every test runs on paused time with a hub clock that follows
//! it, so "a 10 ms command behind a 3 s one" is exact, not a guess on a loaded machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{
    BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, SessionId, Timestamp,
};
use broker_dispatch::hub::{Clock, Command, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Store, SweepParams,
    SweepReport, TouchParams,
};
use broker_dispatch::transport::MemoryTransport;
use broker_dispatch::{Error, ExecError, StoreError};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Wall time that follows tokio's (paused) clock.
#[derive(Debug)]
struct PausedClock(Instant);

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000).saturating_add(self.0.elapsed())
    }
}

/// One execution as the executor saw it.
#[derive(Debug, Clone)]
struct Run {
    id: DispatchId,
    op: String,
    key: Option<String>,
    node: NodeId,
    session: Option<SessionId>,
    attempt: u32,
    execution: u32,
    deadline: Option<Timestamp>,
    start: Timestamp,
    end: Option<Timestamp>,
}

/// An executor that logs every execution, then behaves per op: `slow` sleeps 3 s, `fast` 10 ms,
/// `hang` forever, `flaky` fails retryably on its first execution, `forever` asks for a retry
/// after `Duration::MAX`; anything else returns at once.
#[derive(Clone)]
struct Logged {
    node: NodeId,
    clock: Arc<PausedClock>,
    log: Arc<Mutex<Vec<Run>>>,
}

#[async_trait]
impl Executor for Logged {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let index = {
            let mut log = self.log.lock();
            log.push(Run {
                id: d.id,
                op: d.op.clone(),
                key: d.key.clone(),
                node: self.node.clone(),
                session: ctx.session().cloned(),
                attempt: ctx.attempt(),
                execution: ctx.execution(),
                deadline: d.deadline,
                start: self.clock.now(),
                end: None,
            });
            log.len() - 1
        };
        let out = match d.op.as_str() {
            "slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(json!("slow"))
            }
            "fast" => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(json!("fast"))
            }
            "hang" => std::future::pending().await,
            "flaky" if ctx.execution() == 1 => Err(ExecError::retry_after(
                Duration::from_millis(500),
                "not yet",
            )),
            "forever" => Err(ExecError::retry_after(Duration::MAX, "never again")),
            _ => Ok(json!(d.op)),
        };
        self.log.lock()[index].end = Some(self.clock.now());
        out
    }
}

fn config() -> HubConfig {
    HubConfig {
        lease: Duration::from_secs(2),
        freshness: Duration::from_secs(3),
        wait_window: Duration::from_secs(20),
        poll_interval: Duration::from_millis(100),
        sweep_interval: Duration::from_millis(200),
        execute_timeout: Duration::from_secs(10),
        ..HubConfig::default()
    }
}

struct Cluster {
    hubs: Vec<Hub>,
    store: Arc<dyn Store>,
    log: Arc<Mutex<Vec<Run>>>,
    clock: Arc<PausedClock>,
}

async fn cluster(n: usize, cfg: HubConfig, store: Arc<dyn Store>) -> Cluster {
    let clock = Arc::new(PausedClock(Instant::now()));
    let bus = MemoryTransport::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut hubs = Vec::new();
    for i in 0..n {
        let node = NodeId::new(format!("node-{i}")).unwrap();
        let exec = Logged {
            node: node.clone(),
            clock: Arc::clone(&clock),
            log: Arc::clone(&log),
        };
        hubs.push(
            Hub::builder(node)
                .store(Arc::clone(&store))
                .transport(Arc::new(bus.clone()))
                .executor(Arc::new(exec))
                .clock(clock.clone())
                .config(cfg.clone())
                .start()
                .await
                .unwrap(),
        );
    }
    Cluster {
        hubs,
        store,
        log,
        clock,
    }
}

fn broker(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

fn session(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn cmd(b: &BrokerId, op: &str) -> Command {
    Command::new(b.clone(), op, json!(null))
}

async fn rows(store: &dyn Store) -> Vec<Dispatch> {
    broker_dispatch::store::list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await
    .unwrap()
}

/// Waits (on paused time, so instantly in wall time) until `f` holds, for at most `within`.
async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_fast_command_is_not_held_up_by_a_slow_one_of_the_same_broker() {
    let c = cluster(2, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let slow = tokio::spawn({
        let hub = c.hubs[1].clone();
        let b = b.clone();
        async move { hub.dispatch(cmd(&b, "slow")).await }
    });
    until(Duration::from_secs(1), "the slow command started", || {
        c.log.lock().iter().any(|r| r.op == "slow")
    })
    .await;
    let started = Instant::now();
    let out = c.hubs[1].dispatch(cmd(&b, "fast")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(out, json!("fast"));
    assert!(
        took < Duration::from_millis(50),
        "the fast command took {took:?} behind the slow one"
    );
    assert!(!slow.is_finished(), "the slow command was still running");
    assert_eq!(slow.await.unwrap().unwrap(), json!("slow"));
}

#[tokio::test(start_paused = true)]
async fn a_broker_runs_at_most_max_in_flight_executions_and_uses_them_all() {
    let cfg = HubConfig {
        max_in_flight: 4,
        ..config()
    };
    let c = cluster(2, cfg, Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let sent = c.hubs[1]
        .send_many((0..20).map(|_| cmd(&b, "fast")).collect())
        .await
        .unwrap();
    assert_eq!(sent.len(), 20);
    until(Duration::from_secs(5), "all ran", || {
        c.log.lock().iter().filter(|r| r.end.is_some()).count() == 20
    })
    .await;
    let log = c.log.lock().clone();
    let peak = (0..log.len())
        .map(|i| {
            let t = log[i].start;
            log.iter()
                .filter(|r| r.start <= t && r.end.is_some_and(|e| e > t))
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(peak, 4, "slots in use at the busiest moment");
    // A per-broker override takes effect at the next claim.
    c.hubs[0].set_max_in_flight(&b, Some(1)).unwrap();
    c.log.lock().clear();
    c.hubs[1]
        .send_many((0..5).map(|_| cmd(&b, "fast")).collect())
        .await
        .unwrap();
    until(Duration::from_secs(5), "all ran", || {
        c.log.lock().iter().filter(|r| r.end.is_some()).count() == 5
    })
    .await;
    let log = c.log.lock().clone();
    for pair in log.windows(2) {
        assert!(pair[1].start >= pair[0].end.unwrap(), "overlap at one slot");
    }
    assert!(c.hubs[0].set_max_in_flight(&b, Some(0)).is_err());
}

#[tokio::test(start_paused = true)]
async fn commands_of_one_key_run_one_at_a_time_in_order_across_a_node_move() {
    let c = cluster(3, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        let op = if i % 2 == 0 { "slow" } else { "fast" };
        ids.push(c.hubs[2].send(cmd(&b, op).key("agent-1")).await.unwrap().id);
        // Unkeyed work beside them is not held up.
        c.hubs[2].send(cmd(&b, "fast")).await.unwrap();
    }
    // Move the broker while the first keyed command runs.
    until(
        Duration::from_secs(1),
        "the first keyed command started",
        || c.log.lock().iter().any(|r| r.key.is_some()),
    )
    .await;
    c.hubs[0].disconnect(&b, &session("s1")).await.unwrap();
    c.hubs[1]
        .connect(b.clone(), session("s2"), ())
        .await
        .unwrap();
    until(Duration::from_secs(60), "every keyed command ran", || {
        c.log
            .lock()
            .iter()
            .filter(|r| r.key.is_some() && r.end.is_some())
            .count()
            >= 6
    })
    .await;
    let keyed: Vec<Run> = c
        .log
        .lock()
        .iter()
        .filter(|r| r.key.is_some())
        .cloned()
        .collect();
    assert_eq!(
        keyed.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "insertion order, each once"
    );
    for pair in keyed.windows(2) {
        assert!(
            pair[1].start >= pair[0].end.unwrap(),
            "{} started before {} ended",
            pair[1].id,
            pair[0].id
        );
    }
    assert!(keyed.iter().skip(1).all(|r| r.node.as_str() == "node-1"));
}

#[tokio::test(start_paused = true)]
async fn no_execution_starts_at_or_after_its_deadline() {
    let cfg = HubConfig {
        max_in_flight: 1,
        ..config()
    };
    let c = cluster(2, cfg, Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    c.hubs[1].send(cmd(&b, "slow")).await.unwrap();
    // Behind the one slot: these can only start after their 1 s deadline.
    let mut doomed = Vec::new();
    for _ in 0..5 {
        let r = c.hubs[1]
            .send(cmd(&b, "fast").timeout(Duration::from_secs(1)))
            .await
            .unwrap();
        doomed.push(r.id);
    }
    let on_time = c.hubs[1]
        .send(cmd(&b, "fast").timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .id;
    let store = Arc::clone(&c.store);
    let mut done = false;
    let end = Instant::now() + Duration::from_secs(10);
    while !done {
        assert!(Instant::now() < end, "rows did not settle");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let all = rows(&*store).await;
        done = all.iter().all(|d| d.state.is_terminal());
    }
    for d in rows(&*c.store).await {
        if doomed.contains(&d.id) {
            assert_eq!(
                (d.state, d.failure.clone()),
                (DispatchState::Failed, Some(FailReason::Expired)),
                "{d:?}"
            );
        }
        if d.id == on_time {
            assert_eq!(d.state, DispatchState::Done);
        }
    }
    for r in c.log.lock().iter() {
        assert!(!doomed.contains(&r.id), "{} ran after its deadline", r.id);
        if let Some(deadline) = r.deadline {
            assert!(r.start < deadline, "{r:?} started at or after its deadline");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_retryable_fast_path_failure_becomes_a_row_that_follows_the_broker() {
    let c = cluster(2, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    let call = tokio::spawn({
        let hub = c.hubs[0].clone();
        let b = b.clone();
        async move { hub.dispatch(cmd(&b, "flaky")).await }
    });
    until(Duration::from_secs(1), "the first execution failed", || {
        c.log.lock().iter().any(|r| r.end.is_some())
    })
    .await;
    // The broker moves during the retry delay: node-0 must not run it again.
    c.hubs[0].disconnect(&b, &session("s1")).await.unwrap();
    let released = c.clock.now();
    c.hubs[1]
        .connect(b.clone(), session("s2"), ())
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), json!("flaky"));
    let log = c.log.lock().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[0].node.as_str(), log[0].execution),
        ("node-0", 1),
        "the fast path's one execution"
    );
    assert_eq!(
        (
            log[1].node.as_str(),
            log[1].execution,
            log[1].session.clone()
        ),
        ("node-1", 2, Some(session("s2"))),
        "the retry ran where the broker went"
    );
    assert_eq!(log[0].id, log[1].id, "one dispatch id for both executions");
    assert!(log
        .iter()
        .all(|r| r.node.as_str() != "node-0" || r.start < released));
}

#[tokio::test(start_paused = true)]
async fn the_fast_path_is_bounded_by_execute_timeout_and_never_sleeps_forever() {
    let cfg = HubConfig {
        execute_timeout: Duration::from_secs(2),
        ..config()
    };
    let c = cluster(1, cfg, Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let started = Instant::now();
    let err = c.hubs[0]
        .dispatch(cmd(&b, "hang").max_attempts(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = c.hubs[0].dispatch(cmd(&b, "forever")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Expired,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A store that holds each claim's answer until the test lets it go, so a test can move the
/// broker between a claim and the start of its execution.
#[derive(Debug)]
struct GatedClaims {
    inner: MemoryStore,
    gate: Notify,
    held: Mutex<bool>,
}

#[async_trait]
impl Store for GatedClaims {
    fn name(&self) -> &'static str {
        "gated"
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        let got = self.inner.claim(p).await?;
        if !got.is_empty() && *self.held.lock() {
            self.gate.notified().await;
        }
        Ok(got)
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
    async fn affinity(
        &self,
        broker: &BrokerId,
    ) -> Result<Option<broker_dispatch::fsm::Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_hand_back_does_not_use_up_the_one_execution_of_max_attempts_1() {
    let store = Arc::new(GatedClaims {
        inner: MemoryStore::new(),
        gate: Notify::new(),
        held: Mutex::new(true),
    });
    let c = cluster(2, config(), store.clone()).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    let id = c.hubs[1]
        .send(cmd(&b, "once").max_attempts(1))
        .await
        .unwrap()
        .id;
    // node-0's claim is held in flight; meanwhile the broker moves to node-1.
    until(Duration::from_secs(1), "node-0 claimed it", || {
        store.gate_waiting()
    })
    .await;
    c.hubs[0].disconnect(&b, &session("s1")).await.unwrap();
    *store.held.lock() = false;
    c.hubs[1]
        .connect(b.clone(), session("s2"), ())
        .await
        .unwrap();
    store.gate.notify_one();
    let out = c.hubs[1].wait(id).await.unwrap();
    assert_eq!(out, json!("once"));
    let log = c.log.lock().clone();
    assert_eq!(log.len(), 1, "ran exactly once: {log:?}");
    assert_eq!(
        (log[0].node.as_str(), log[0].execution, log[0].attempt),
        ("node-1", 1, 2),
        "first execution, second fencing token"
    );
    let row = c.store.get(id).await.unwrap().unwrap();
    assert_eq!((row.attempt, row.released, row.executions()), (2, 1, 1));
}

impl GatedClaims {
    /// Whether a claim is waiting at the gate (the row it took is in progress, unstarted).
    fn gate_waiting(&self) -> bool {
        let rows = futures::executor::block_on(self.inner.list(ListFilter::default())).unwrap();
        rows.iter().any(|d| d.state == DispatchState::InProgress)
    }
}

#[tokio::test(start_paused = true)]
async fn send_many_writes_all_or_nothing_and_every_row_runs() {
    let c = cluster(2, config(), Arc::new(MemoryStore::new())).await;
    let (b1, b2) = (broker("b1"), broker("b2"));
    c.hubs[0]
        .connect(b1.clone(), session("s"), ())
        .await
        .unwrap();
    c.hubs[1]
        .connect(b2.clone(), session("s"), ())
        .await
        .unwrap();
    let batch: Vec<Command> = (0..10)
        .map(|i| cmd(if i % 2 == 0 { &b1 } else { &b2 }, "ok"))
        .collect();
    let receipts = c.hubs[0].send_many(batch).await.unwrap();
    for r in &receipts {
        assert_eq!(c.hubs[0].wait(r.id).await.unwrap(), json!("ok"));
    }
    let before = rows(&*c.store).await.len();
    let bad = vec![cmd(&b1, "ok"), cmd(&b1, "")];
    assert!(matches!(
        c.hubs[0].send_many(bad).await,
        Err(Error::InvalidInput(_))
    ));
    let reused = vec![
        cmd(&b1, "ok").idempotency_key("k"),
        Command::new(b1.clone(), "ok", json!("other")).idempotency_key("k"),
    ];
    assert!(matches!(
        c.hubs[0].send_many(reused).await,
        Err(Error::Store(StoreError::Conflict(_)))
    ));
    assert_eq!(
        rows(&*c.store).await.len(),
        before,
        "nothing of a refused batch"
    );
}

#[tokio::test(start_paused = true)]
async fn two_waiters_on_one_dispatch_both_hear_of_its_end_at_once() {
    let c = cluster(2, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let id = c.hubs[1].send(cmd(&b, "slow")).await.unwrap().id;
    let waits: Vec<_> = (0..2)
        .map(|_| {
            let hub = c.hubs[1].clone();
            tokio::spawn(async move {
                let out = hub.wait(id).await;
                (out, Instant::now())
            })
        })
        .collect();
    let mut ends = BTreeMap::new();
    for (i, w) in waits.into_iter().enumerate() {
        let (out, at) = w.await.unwrap();
        assert_eq!(out.unwrap(), json!("slow"));
        ends.insert(i, at);
    }
    let finished = c.log.lock()[0].end.unwrap();
    for at in ends.values() {
        let heard = Timestamp::from_micros(1_700_000_000_000_000)
            .saturating_add(at.duration_since(c.clock.0));
        assert!(
            heard.duration_since(finished) < Duration::from_millis(50),
            "a waiter heard of the end {:?} late",
            heard.duration_since(finished)
        );
    }
}

/// The next command of a key is claimed as soon as the previous one ends, not at the next
/// catch-up poll: with polling effectively off (60 s), five keyed 10 ms commands finish in well
/// under a second of (paused) time.
#[tokio::test(start_paused = true)]
async fn the_next_command_of_a_key_starts_when_the_previous_ends_not_at_the_next_poll() {
    let cfg = HubConfig {
        poll_interval: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(60),
        ..config()
    };
    let c = cluster(2, cfg, Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let started = Instant::now();
    let sent = c.hubs[1]
        .send_many((0..5).map(|_| cmd(&b, "fast").key("agent-1")).collect())
        .await
        .unwrap();
    for r in &sent {
        c.hubs[1].wait(r.id).await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "five keyed 10 ms commands took {took:?}: a successor waited for a poll"
    );
}

/// A command whose absolute deadline has passed never runs, even for a broker connected to
/// the very node it was given to (it takes a row, judged by the store's clock).
#[tokio::test(start_paused = true)]
async fn a_past_deadline_never_runs_even_on_the_node_holding_the_broker() {
    let c = cluster(1, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let past = c.clock.now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = c.hubs[0]
        .dispatch(cmd(&b, "fast").deadline(past))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Expired,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(c.log.lock().is_empty(), "it ran: {:?}", c.log.lock());
    // A future deadline runs, before it.
    let later = c.clock.now().saturating_add(Duration::from_secs(5));
    let out = c.hubs[0]
        .dispatch(cmd(&b, "fast").deadline(later))
        .await
        .unwrap();
    assert_eq!(out, json!("fast"));
    let log = c.log.lock().clone();
    assert_eq!(log.len(), 1);
    assert!(
        log[0].start < later && log[0].deadline == Some(later),
        "{log:?}"
    );
}

/// `delay` and `available_at` hold a command back on every route, the connected node's too.
#[tokio::test(start_paused = true)]
async fn delayed_commands_start_no_earlier_than_asked() {
    let c = cluster(2, config(), Arc::new(MemoryStore::new())).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let t0 = c.clock.now();
    let by_delay = c.hubs[0]
        .send(cmd(&b, "delay").delay(Duration::from_secs(2)))
        .await
        .unwrap()
        .id;
    let at = t0.saturating_add(Duration::from_secs(3));
    let by_instant = c.hubs[1]
        .send(cmd(&b, "instant").available_at(at))
        .await
        .unwrap()
        .id;
    for id in [by_delay, by_instant] {
        c.hubs[1].wait(id).await.unwrap();
    }
    let log = c.log.lock().clone();
    let start = |id| log.iter().find(|r| r.id == id).unwrap().start;
    assert!(
        start(by_delay) >= t0.saturating_add(Duration::from_secs(2)),
        "{log:?}"
    );
    assert!(start(by_instant) >= at, "{log:?}");
}

/// A fast-path failure's retry row inherits what is left of the command's window: its deadline
/// is the one the command had when it was first given, not a new window from the retry.
#[tokio::test(start_paused = true)]
async fn a_fast_path_retry_keeps_the_commands_original_deadline() {
    /// Fails retryably after 1 s on its first execution; records each execution's deadline.
    #[derive(Clone)]
    struct SlowFlaky(Arc<Mutex<Vec<Option<Timestamp>>>>);
    #[async_trait]
    impl Executor for SlowFlaky {
        async fn execute(
            &self,
            ctx: ExecContext,
            d: &Dispatch,
        ) -> Result<serde_json::Value, ExecError> {
            self.0.lock().push(d.deadline);
            if ctx.execution() == 1 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Err(ExecError::retry_after(
                    Duration::from_millis(100),
                    "not yet",
                ));
            }
            Ok(json!("second"))
        }
    }
    let clock = Arc::new(PausedClock(Instant::now()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hub = Hub::builder(NodeId::new("n").unwrap())
        .store(Arc::new(MemoryStore::new()))
        .transport(Arc::new(MemoryTransport::new()))
        .executor(Arc::new(SlowFlaky(Arc::clone(&seen))))
        .clock(clock.clone())
        .config(config())
        .start()
        .await
        .unwrap();
    let b = broker("b");
    hub.connect(b.clone(), session("s"), ()).await.unwrap();
    let given = clock.now();
    let out = hub
        .dispatch(cmd(&b, "x").timeout(Duration::from_secs(4)))
        .await
        .unwrap();
    assert_eq!(out, json!("second"));
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let deadline = seen[1].expect("the retry row has a deadline");
    assert!(
        deadline <= given.saturating_add(Duration::from_secs(4)),
        "the retry's deadline {deadline:?} is past the command's window (given at {given:?})"
    );
}

/// A fast-path execution that runs past `execute_timeout` becomes a durable row, which runs
/// again (a second execution) while attempts remain.
#[tokio::test(start_paused = true)]
async fn a_fast_path_timeout_with_attempts_left_becomes_a_row_that_runs() {
    #[derive(Clone)]
    struct HangsOnce(Arc<Mutex<Vec<u32>>>);
    #[async_trait]
    impl Executor for HangsOnce {
        async fn execute(
            &self,
            ctx: ExecContext,
            _d: &Dispatch,
        ) -> Result<serde_json::Value, ExecError> {
            self.0.lock().push(ctx.execution());
            if ctx.execution() == 1 {
                std::future::pending::<()>().await;
            }
            Ok(json!("second"))
        }
    }
    let runs = Arc::new(Mutex::new(Vec::new()));
    let hub = Hub::builder(NodeId::new("n").unwrap())
        .store(Arc::new(MemoryStore::new()))
        .transport(Arc::new(MemoryTransport::new()))
        .executor(Arc::new(HangsOnce(Arc::clone(&runs))))
        .config(HubConfig {
            execute_timeout: Duration::from_secs(1),
            ..config()
        })
        .start()
        .await
        .unwrap();
    let b = broker("b");
    hub.connect(b.clone(), session("s"), ()).await.unwrap();
    let out = hub.dispatch(cmd(&b, "x").max_attempts(2)).await.unwrap();
    assert_eq!(out, json!("second"));
    assert_eq!(*runs.lock(), vec![1, 2]);
    let all = rows(&**hub.store()).await;
    assert_eq!(all.len(), 1, "one durable row for the retry");
    assert_eq!(all[0].state, DispatchState::Done);
}

/// A claim whose answer arrives after most of its lease is gone is handed back unstarted (the
/// row could already be another node's): the row runs later on a fresh claim, as its first
/// execution.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_too_late_to_keep_its_lease_is_handed_back_unstarted() {
    let store = Arc::new(GatedClaims {
        inner: MemoryStore::new(),
        gate: Notify::new(),
        held: Mutex::new(true),
    });
    let cfg = HubConfig {
        // No store timeout cuts the held claim short.
        store_timeout: Duration::from_secs(60),
        ..config()
    };
    let c = cluster(1, cfg.clone(), store.clone()).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let id = c.hubs[0]
        .send(cmd(&b, "once").max_attempts(1))
        .await
        .unwrap()
        .id;
    until(Duration::from_secs(1), "the claim is in flight", || {
        store.gate_waiting()
    })
    .await;
    // The answer comes back when only 5% of the 2 s lease is left.
    tokio::time::sleep(cfg.lease.mul_f64(0.95)).await;
    *store.held.lock() = false;
    store.gate.notify_one();
    let out = c.hubs[0].wait(id).await.unwrap();
    assert_eq!(out, json!("once"));
    let log = c.log.lock().clone();
    assert_eq!(log.len(), 1, "ran exactly once: {log:?}");
    assert_eq!((log[0].attempt, log[0].execution), (2, 1), "{log:?}");
}

/// A shutdown that reaches its timeout while a claim's answer is on its way hands that claim's
/// rows back before it returns (they never began, so they use up no execution), and records
/// nothing for an execution that began and still runs: its row waits for its lease.
#[tokio::test(start_paused = true)]
async fn a_shutdown_timeout_hands_back_the_claims_not_started() {
    let store = Arc::new(GatedClaims {
        inner: MemoryStore::new(),
        gate: Notify::new(),
        held: Mutex::new(false),
    });
    let cfg = HubConfig {
        shutdown_timeout: Duration::from_secs(1),
        // No store timeout cuts the held claim short.
        store_timeout: Duration::from_secs(60),
        ..config()
    };
    let c = cluster(2, cfg, store.clone()).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    // One execution that began and ignores cancellation.
    let hung = c.hubs[1].send(cmd(&b, "hang")).await.unwrap().id;
    until(
        Duration::from_secs(1),
        "the hanging command started",
        || c.log.lock().iter().any(|r| r.id == hung),
    )
    .await;
    // Three rows claimed by node-0 whose claim's answer is held.
    *store.held.lock() = true;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.hubs[1].send(cmd(&b, "once")).await.unwrap().id);
    }
    until(Duration::from_secs(1), "node-0 claimed them", || {
        futures::executor::block_on(store.inner.list(ListFilter::default()))
            .unwrap()
            .iter()
            .filter(|d| d.state == DispatchState::InProgress)
            .count()
            == 4
    })
    .await;
    let stopping = tokio::spawn({
        let hub = c.hubs[0].clone();
        async move { hub.shutdown().await }
    });
    // The answer arrives only after the shutdown timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    *store.held.lock() = false;
    store.gate.notify_one();
    stopping.await.unwrap().unwrap();
    for id in &ids {
        let row = c.store.get(*id).await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.attempt, row.released, row.executions()),
            (DispatchState::Pending, 1, 1, 0),
            "{id} handed back unexecuted"
        );
    }
    let row = c.store.get(hung).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempt, row.released),
        (DispatchState::InProgress, 1, 0),
        "nothing recorded for the execution that began"
    );
    // Another node runs them as their first execution.
    c.hubs[1]
        .connect(b.clone(), session("s2"), ())
        .await
        .unwrap();
    for id in &ids {
        assert_eq!(c.hubs[1].wait(*id).await.unwrap(), json!("once"));
        let row = c.store.get(*id).await.unwrap().unwrap();
        assert_eq!((row.attempt, row.released, row.executions()), (2, 1, 1));
    }
    let log = c.log.lock().clone();
    assert!(
        log.iter()
            .filter(|r| ids.contains(&r.id))
            .all(|r| (r.node.as_str(), r.execution) == ("node-1", 1)),
        "{log:?}"
    );
}

/// Counts the signals a hub publishes, per broker.
#[derive(Debug, Clone)]
struct CountingTransport {
    inner: MemoryTransport,
    signals: Arc<Mutex<BTreeMap<String, usize>>>,
}

#[async_trait]
impl broker_dispatch::transport::Transport for CountingTransport {
    fn name(&self) -> &'static str {
        "counting"
    }
    async fn subscribe(
        &self,
    ) -> Result<broker_dispatch::transport::Subscription, broker_dispatch::TransportError> {
        self.inner.subscribe().await
    }
    async fn publish(
        &self,
        notice: broker_dispatch::transport::Notice,
    ) -> Result<(), broker_dispatch::TransportError> {
        if let broker_dispatch::transport::Notice::Signal { broker } = &notice {
            *self
                .signals
                .lock()
                .entry(broker.as_str().to_owned())
                .or_default() += 1;
        }
        self.inner.publish(notice).await
    }
}

/// `send_many` wakes each broker's owner once, however many of its commands the batch holds.
#[tokio::test(start_paused = true)]
async fn send_many_wakes_each_brokers_owner_once() {
    let signals = Arc::new(Mutex::new(BTreeMap::new()));
    let hub = Hub::builder(NodeId::new("originator").unwrap())
        .store(Arc::new(MemoryStore::new()))
        .transport(Arc::new(CountingTransport {
            inner: MemoryTransport::new(),
            signals: Arc::clone(&signals),
        }))
        .executor(Arc::new(Logged {
            node: NodeId::new("originator").unwrap(),
            clock: Arc::new(PausedClock(Instant::now())),
            log: Arc::new(Mutex::new(Vec::new())),
        }))
        .config(config())
        .start()
        .await
        .unwrap();
    let (b1, b2) = (broker("b1"), broker("b2"));
    let batch: Vec<Command> = (0..30)
        .map(|i| cmd(if i % 3 == 0 { &b1 } else { &b2 }, "ok"))
        .collect();
    assert_eq!(hub.send_many(batch).await.unwrap().len(), 30);
    let counted = signals.lock().clone();
    assert_eq!(
        counted,
        BTreeMap::from([("b1".to_owned(), 1), ("b2".to_owned(), 1)]),
        "one wake-up per broker"
    );
}
