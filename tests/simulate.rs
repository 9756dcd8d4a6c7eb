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
use simulate::{run_seed, SimFault, SimOptions};

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

/// The first seed in `0..limit` whose run breaks `invariant` with `fault` injected.
fn first_caught(fault: SimFault, invariant: &str, limit: u64) -> Option<(u64, String)> {
    let opts = SimOptions {
        fault: Some(fault),
        ..SimOptions::default()
    };
    (0..limit).find_map(|seed| {
        run_seed(seed, &opts)
            .violations
            .into_iter()
            .find(|v| v.invariant == invariant)
            .map(|v| (seed, format!("{}: {}", v.invariant, v.detail)))
    })
}

/// Asserts that `fault` makes the check of `invariant` fire within `limit` seeds.
fn assert_caught(fault: SimFault, invariant: &str, limit: u64) {
    let caught = first_caught(fault, invariant, limit);
    assert!(
        caught.is_some(),
        "{limit} seeds with {fault:?} and no {invariant} violation"
    );
}

// One mutation test per invariant: each injects a bug the invariant is for and asserts that its
// check fires (the fault is in the audited store; the hubs are the real ones).

#[test]
fn i1_a_claim_handed_out_twice_is_caught() {
    assert_caught(SimFault::DoubleClaim, "I1", 50);
}

#[test]
fn i2_a_store_without_fencing_is_caught() {
    assert_caught(SimFault::Store(StoreFault::SkipFencing), "I2", 300);
}

#[test]
fn i3_a_store_that_never_sweeps_is_caught() {
    assert_caught(SimFault::NoSweep, "I3", 50);
}

#[test]
fn i4_retries_recorded_as_hand_backs_are_caught() {
    assert_caught(SimFault::RetryAsRelease, "I4", 100);
}

#[test]
fn i5_a_claim_past_the_deadline_is_caught() {
    assert_caught(SimFault::Store(StoreFault::SkipClaimDeadline), "I5", 100);
}

#[test]
fn i6_a_forged_read_is_caught() {
    assert_caught(SimFault::ForgedRead, "I6", 50);
}

#[test]
fn i7_an_older_connection_winning_is_caught() {
    assert_caught(SimFault::ConnectStampedNow, "I7", 100);
}

#[test]
fn i8_a_start_after_the_deadline_is_caught() {
    assert_caught(SimFault::SlowClaimClock, "I8", 100);
}

#[test]
fn i9_an_execution_on_a_connection_the_node_was_told_it_lost_is_caught() {
    assert_caught(SimFault::StaleTouch, "I9", 200);
}

#[test]
fn i10_hand_backs_counted_as_executions_are_caught() {
    assert_caught(SimFault::ReleaseAsRetry, "I10", 300);
}

#[test]
fn i11_claims_that_ignore_ordering_keys_are_caught() {
    assert_caught(SimFault::IgnoreKeys, "I11", 50);
}

/// Seeds on which the simulation found zombie executions (a claim that lapsed while it waited
/// behind its batch ran after the sweeper expired it, under the batch-sequential drain).
#[test]
fn seeds_that_found_bugs_stay_clean() {
    for seed in [21, 134, 644, 796, 1609, 1835] {
        let r = run_seed(seed, &SimOptions::default());
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
}

/// The strict form of I11, on the seed that broke it: on seed 2 node hub-3 starts row `…000d`
/// (key `k0`, a 750 ms command), then loses the store at 606 ms; its renewals fail, and hub-1
/// (which holds the broker now) re-claims the row once the lease has run out. The first
/// execution used to run on beside the second; now it stops a tenth of a lease before its
/// lease is known to end, so two executions of one key never overlap.
#[test]
fn strict_key_order_holds_when_a_holder_loses_the_store() {
    let r = run_seed(
        2,
        &SimOptions {
            strict: true,
            ..SimOptions::default()
        },
    );
    let i11: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.invariant == "I11")
        .collect();
    assert!(i11.is_empty(), "{i11:?}");
}

/// Known gap, not a regression (ignored: only the broker can close it): the strict form of I9.
/// On seed 8 broker b1 moves from hub-0 (session b1-s2) to hub-1 (b1-s3, accepted at 664 ms).
/// A node learns of a newer connection elsewhere from the connecting node's signal (then one
/// affinity read), or, when that signal is lost, from its next affinity refresh; between the
/// newer connect and either, it may still start work on the old connection.
#[test]
#[ignore = "known gap: the window between a newer connect elsewhere and the old node hearing of it"]
fn strict_no_start_on_a_superseded_connection() {
    let r = run_seed(
        8,
        &SimOptions {
            strict: true,
            ..SimOptions::default()
        },
    );
    let i9: Vec<_> = r
        .violations
        .iter()
        .filter(|v| v.invariant == "I9")
        .collect();
    assert!(i9.is_empty(), "{i9:?}");
}

// ---------------------------------------------------------------------------------------------
// Focused test: a claimed row whose deadline passes before it can start is never executed.

#[derive(Debug)]
struct PausedClock(tokio::time::Instant);

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000).saturating_add(self.0.elapsed())
    }
}

/// A memory store whose claim replies take `reply_delay` to arrive: the claim is applied at once
/// (the rows are held, their `claimed_at` is the request's time), the holder hears of it later.
#[derive(Debug)]
struct SlowClaimReplies {
    inner: MemoryStore,
    reply_delay: Duration,
    claims: AtomicBool,
}

#[async_trait]
impl Store for SlowClaimReplies {
    fn name(&self) -> &'static str {
        "slow-claim-replies"
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        let claimed = self.inner.claim(p).await?;
        if !claimed.is_empty() {
            self.claims.store(true, Ordering::SeqCst);
            tokio::time::sleep(self.reply_delay).await;
        }
        Ok(claimed)
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

#[derive(Debug, Default, Clone)]
struct Record {
    ran: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Executor for Record {
    async fn execute(
        &self,
        _ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        self.ran.lock().push(d.op.clone());
        Ok(json!(d.op))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_claimed_row_whose_deadline_passes_before_it_can_start_is_expired_unexecuted() {
    let clock = Arc::new(PausedClock(tokio::time::Instant::now()));
    let store = Arc::new(SlowClaimReplies {
        inner: MemoryStore::new(),
        reply_delay: Duration::from_millis(400),
        claims: AtomicBool::new(false),
    });
    let broker = BrokerId::new("b").unwrap();
    let now = clock.now();
    // Both rows are claimed at once, before either deadline; the reply arrives 400 ms later, past
    // the first row's deadline and well before the second's.
    for (op, deadline) in [
        ("late", Duration::from_millis(300)),
        ("in-time", Duration::from_secs(60)),
    ] {
        let mut new = NewDispatch::new(broker.clone(), op, json!(null));
        new.deadline = Some(now.saturating_add(deadline));
        new.now = Some(now);
        store.insert(new).await.unwrap();
    }
    let exec = Record::default();
    let hub = Hub::builder(NodeId::new("owner").unwrap())
        .store(store.clone())
        .executor(Arc::new(exec.clone()))
        .clock(clock.clone())
        .config(HubConfig {
            sweep_interval: Duration::from_millis(100),
            ..HubConfig::default()
        })
        .start()
        .await
        .unwrap();
    hub.connect(broker.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(store.claims.load(Ordering::SeqCst), "nothing was claimed");
    let rows = store.list(ListFilter::default()).await.unwrap();
    let late = rows.iter().find(|d| d.op == "late").unwrap();
    assert_eq!(late.state, DispatchState::Failed);
    assert_eq!(late.failure, Some(FailReason::Expired));
    assert_eq!(late.attempt, 1, "it was claimed, once");
    let in_time = rows.iter().find(|d| d.op == "in-time").unwrap();
    assert_eq!(in_time.state, DispatchState::Done);
    assert_eq!(
        *exec.ran.lock(),
        vec!["in-time".to_owned()],
        "the row whose deadline passed before it could start must not run"
    );
    hub.abort();
}
