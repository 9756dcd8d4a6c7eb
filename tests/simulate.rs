//! The deterministic cluster simulation (`examples/simulate.rs`), run as tests: replays are
//! exact, the invariants hold across seeds, disabling a store guard is caught, and the bugs the
//! simulation found stay fixed.

#[path = "../examples/simulate.rs"]
#[allow(dead_code)]
mod simulate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{
    Affinity, BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, SessionId,
    Timestamp,
};
use broker_dispatch::hub::{Clock, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Store, StoreFault,
    SweepParams, SweepReport, TouchParams,
};
use broker_dispatch::{ExecError, StoreError};
use parking_lot::Mutex;
use serde_json::json;
use simulate::{run_seed, SimOptions};

#[test]
fn the_same_seed_replays_the_same_run() {
    let opts = SimOptions::default();
    let mut digests = Vec::new();
    for seed in [1, 42, 977] {
        let a = run_seed(seed, &opts);
        let b = run_seed(seed, &opts);
        assert_eq!(a.digest, b.digest, "seed {seed} diverged between two runs");
        assert_eq!(a.events, b.events, "seed {seed}");
        assert!(a.events > 100, "seed {seed} did too little to compare");
        digests.push(a.digest);
    }
    digests.dedup();
    assert_eq!(digests.len(), 3, "different seeds must give different runs");
}

#[test]
fn a_verbose_replay_is_the_same_run() {
    let quiet = run_seed(5, &SimOptions::default());
    let loud = run_seed(
        5,
        &SimOptions {
            verbose: true,
            ..SimOptions::default()
        },
    );
    assert_eq!(quiet.digest, loud.digest);
    assert_eq!(loud.trace.len() as u64, loud.events);
}

#[test]
fn every_invariant_holds_across_seeds() {
    let opts = SimOptions::default();
    let mut executions = 0;
    for seed in 0..400 {
        let r = run_seed(seed, &opts);
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {:?} (replay: cargo run --example simulate -- --seed {seed})",
            r.violations[0]
        );
        executions += r.executions;
    }
    assert!(
        executions > 1000,
        "the runs executed too little: {executions}"
    );
}

/// The first seed in `0..limit` whose run breaks one of `invariants` with `fault` set.
fn first_caught(fault: StoreFault, invariants: &[&str], limit: u64) -> Option<(u64, String)> {
    let opts = SimOptions {
        fault: Some(fault),
        ..SimOptions::default()
    };
    (0..limit).find_map(|seed| {
        run_seed(seed, &opts)
            .violations
            .into_iter()
            .find(|v| invariants.contains(&v.invariant))
            .map(|v| (seed, format!("{}: {}", v.invariant, v.detail)))
    })
}

#[test]
fn a_store_without_fencing_is_caught() {
    let caught = first_caught(StoreFault::SkipFencing, &["I1", "I2", "I4"], 300);
    assert!(
        caught.is_some(),
        "300 seeds without fencing and no violation"
    );
}

#[test]
fn a_claim_past_the_deadline_is_caught() {
    let caught = first_caught(StoreFault::SkipClaimDeadline, &["I5"], 100);
    assert!(
        caught.is_some(),
        "100 seeds claiming past deadlines and no violation"
    );
}

/// Seeds on which the simulation found zombie executions (a claim that lapsed while it waited
/// behind its batch ran after the sweeper expired it); see the next test.
#[test]
fn seeds_that_found_bugs_stay_clean() {
    for seed in [21, 134, 644, 796, 1609, 1835] {
        let r = run_seed(seed, &SimOptions::default());
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
}

// ---------------------------------------------------------------------------------------------
// Focused regression test for the zombie execution found by seed 21.

#[derive(Debug)]
struct PausedClock(tokio::time::Instant);

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000).saturating_add(self.0.elapsed())
    }
}

/// A memory store whose heartbeats fail while `down` is set (the node lost the store).
#[derive(Debug, Default)]
struct HeartbeatOutage {
    inner: MemoryStore,
    down: AtomicBool,
}

#[async_trait]
impl Store for HeartbeatOutage {
    fn name(&self) -> &'static str {
        "heartbeat-outage"
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.inner.claim(p).await
    }
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("outage".into()));
        }
        self.inner.heartbeat(c, p).await
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.inner.finish(c, p).await
    }
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.inner.cancel(p).await
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

#[derive(Debug, Default, Clone)]
struct SlowThenRecord {
    ran: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Executor for SlowThenRecord {
    async fn execute(
        &self,
        _ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        self.ran.lock().push(d.op.clone());
        if d.op == "slow" {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(json!(d.op))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_claim_that_lapsed_behind_its_batch_is_not_executed() {
    let clock = Arc::new(PausedClock(tokio::time::Instant::now()));
    let store = Arc::new(HeartbeatOutage::default());
    let broker = BrokerId::new("b").unwrap();
    let now = clock.now();
    // Two rows claimed in one batch: the first runs for a second; the second's deadline passes
    // meanwhile, while every lease renewal fails.
    for (op, deadline) in [
        ("slow", Duration::from_secs(60)),
        ("late", Duration::from_millis(500)),
    ] {
        let mut new = NewDispatch::new(broker.clone(), op, json!(null));
        new.deadline = Some(now.saturating_add(deadline));
        new.now = Some(now);
        store.insert(new).await.unwrap();
    }
    store.down.store(true, Ordering::SeqCst);
    let exec = SlowThenRecord::default();
    let hub = Hub::builder(NodeId::new("owner").unwrap())
        .store(store.clone())
        .executor(Arc::new(exec.clone()))
        .clock(clock.clone())
        .config(HubConfig {
            lease: Duration::from_millis(300),
            claim_batch: 2,
            sweep_interval: Duration::from_millis(100),
            ..HubConfig::default()
        })
        .start()
        .await
        .unwrap();
    hub.connect(broker.clone(), SessionId::new("s").unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = store.list(ListFilter::default()).await.unwrap();
    let late = rows.iter().find(|d| d.op == "late").unwrap();
    assert_eq!(late.state, DispatchState::Failed);
    assert_eq!(late.failure, Some(FailReason::Expired));
    assert_eq!(
        *exec.ran.lock(),
        vec!["slow".to_owned()],
        "the expired row must not run"
    );
    hub.abort();
}
