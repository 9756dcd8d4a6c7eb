//! Deterministic cluster simulation: from one seed, 3–5 hubs and 5–20 brokers share one audited
//! `MemoryStore` and a fault-injecting transport, under a simulated clock, while hubs crash and
//! restart, brokers flap (with late teardowns, half-open sockets and delayed connect claims),
//! commands carry ordering keys and start deadlines, executors run fast or slow, fail, retry,
//! hang past their lease or panic, claim replies arrive late, nodes lose the store for a while,
//! and clocks jump within [`SKEW_BOUND`]. After each run the history is checked against the
//! invariants I1–I11 (see [`check`], `World::executed` and `docs/guarantees.md`); `--fault`
//! injects one of the bugs ([`SimFault`]) that prove each check can fire.
//!
//! ```text
//! cargo run --release --example simulate -- [--seeds N | --seeds A..B | --seed S] [--soak]
//!                                           [--strict] [--fault NAME]  (see [`SimFault::ALL`])
//! ```
//!
//! `--seed S` replays one seed and prints its trace. The last stdout line is
//! `simulate: seeds=<n> violations=<n>` (seeds that broke an invariant); the exit code is 1 if
//! any did.
//!
//! Determinism: everything runs on one current-thread tokio runtime with paused time, so tasks
//! interleave in the same order every run; hub clocks derive from tokio's paused `Instant` plus a
//! simulated skew; every random choice comes from one seeded [`SplitMix`]; dispatch ids come from
//! a counter through the hub's `id_source` hook. The same seed gives the same trace digest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{
    Affinity, BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, SessionId,
    Timestamp,
};
use broker_dispatch::hub::{Clock, Command, ExecContext, Executor, Hub, HubConfig, IdSource};
use broker_dispatch::store::{
    list_all, CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Outcome as StoreOutcome,
    Store, StoreFault, SweepParams, SweepReport, TouchParams,
};
use broker_dispatch::transport::{MemoryTransport, Notice, Subscription, Transport};
use broker_dispatch::{Error, ExecError, StoreError, TransportError};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// How far any hub's clock may be from true (simulated) time, either way. Two hubs may then
/// disagree by up to twice this. It is kept well under `lease / 3` (the renewal period), so a
/// live holder's renewal always lands before any node's clock sees its lease run out.
pub const SKEW_BOUND: Duration = Duration::from_millis(50);

/// Worst extra time one `finish` may take when the store is briefly unavailable: the hub retries
/// five times with backoff 50, 100, 200, 400, 800 ms.
const FINISH_SLACK: Duration = Duration::from_millis(1600);

/// Where simulated wall-clock time starts (2023-11-14), so timestamps look real.
const EPOCH_BASE_MICROS: i64 = 1_700_000_000_000_000;

/// The hub configuration every simulated hub runs with: production shape, shrunk time.
pub fn sim_config() -> HubConfig {
    HubConfig {
        lease: Duration::from_millis(600),
        freshness: Duration::from_millis(900),
        wait_window: Duration::from_millis(1500),
        wait_hard_cap: Some(Duration::from_secs(4)),
        send_ttl: Duration::from_secs(2),
        max_attempts: 3,
        poll_interval: Duration::from_millis(150),
        sweep_interval: Duration::from_millis(250),
        retention: Duration::from_secs(3600),
        claim_batch: 3,
        execute_timeout: Duration::from_millis(800),
        store_timeout: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(1),
        ..HubConfig::default()
    }
}

/// I3's bound: how long after its deadline (in true time) a dispatch may still be non-terminal.
///
/// - `4 × SKEW_BOUND`: the deadline is written with the originator's clock, and a claim (or the
///   sweeper's expiry) is decided by another node's clock; each may be off by `SKEW_BOUND`, both
///   at the claim and at the sweep.
/// - `claim reply + execute_timeout + FINISH_SLACK`: a row claimed just before its deadline
///   starts as soon as the claim's reply arrives (up to `CLAIM_SLOW_MAX_MS` late), runs up to
///   `execute_timeout`, and its finish may be retried for up to `FINISH_SLACK` while the store is
///   unavailable. (Drains claim only free slots, so no claimed row waits behind another.)
/// - `lease`: if that holder crashed (or lost the store), the row is only re-claimable or
///   expirable once its lease ran out.
/// - `1.25 × sweep_interval + poll_interval`: the sweeper (jittered ±25 %) then expires it.
pub fn terminal_bound(cfg: &HubConfig) -> Duration {
    SKEW_BOUND * 4
        + Duration::from_millis(CLAIM_SLOW_MAX_MS)
        + cfg.execute_timeout
        + FINISH_SLACK
        + cfg.lease
        + cfg.sweep_interval * 5 / 4
        + cfg.poll_interval
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// SplitMix64: tiny, seedable, and good enough to drive a simulation.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

// ---------------------------------------------------------------------------------------------
// Options and results

/// What to simulate.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Longer runs: more commands per seed.
    pub soak: bool,
    /// Keep (and print) the trace.
    pub verbose: bool,
    /// A fault to inject (tests that prove each check catches the bug it is for).
    pub fault: Option<SimFault>,
    /// Check the strict forms of I9 (no start on a connection once a newer one was accepted
    /// anywhere) and I11 (no overlap of a key's executions at all), which the hub does not meet
    /// (see `docs/guarantees.md`).
    pub strict: bool,
}

/// A deliberate bug, injected to prove that an invariant's check fires (one per invariant; see
/// `tests/simulate.rs`). Each breaks the store's side of the contract, from inside the audited
/// store, so the hub under test is the real one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFault {
    /// A guard disabled inside the memory store itself (`SkipFencing`: I2; `SkipClaimDeadline`:
    /// I5).
    Store(StoreFault),
    /// Every claimed row is handed out twice in the claim's reply (I1).
    DoubleClaim,
    /// Sweeps do nothing: rows nobody can claim any more never end (I3).
    NoSweep,
    /// Retries are applied as hand-backs, so executions stop being counted (I4).
    RetryAsRelease,
    /// Reads of a finished row return a forged result (I6).
    ForgedRead,
    /// Connects are stamped with the caller's `now` instead of their `connected_at`, so a delayed
    /// older connection can win (I7).
    ConnectStampedNow,
    /// Claims are stamped 300 ms in the past: a holder believes it has more time before the
    /// deadline than it has (I8).
    SlowClaimClock,
    /// Affinity refreshes always answer "still yours" (I9).
    StaleTouch,
    /// Hand-backs are applied as retries: `released` is never incremented (I10).
    ReleaseAsRetry,
    /// Ordering keys are dropped on insert, so claims ignore them (I11).
    IgnoreKeys,
}

impl SimFault {
    /// Every fault, with its command-line name.
    pub const ALL: [(&'static str, SimFault); 11] = [
        ("skip-fencing", SimFault::Store(StoreFault::SkipFencing)),
        (
            "skip-claim-deadline",
            SimFault::Store(StoreFault::SkipClaimDeadline),
        ),
        ("double-claim", SimFault::DoubleClaim),
        ("no-sweep", SimFault::NoSweep),
        ("retry-as-release", SimFault::RetryAsRelease),
        ("forged-read", SimFault::ForgedRead),
        ("connect-stamped-now", SimFault::ConnectStampedNow),
        ("slow-claim-clock", SimFault::SlowClaimClock),
        ("stale-touch", SimFault::StaleTouch),
        ("release-as-retry", SimFault::ReleaseAsRetry),
        ("ignore-keys", SimFault::IgnoreKeys),
    ];
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which one (`"I1"` … `"I11"`).
    pub invariant: &'static str,
    /// What happened.
    pub detail: String,
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// FNV-1a over every trace line: equal digests mean equal runs.
    pub digest: u64,
    /// Trace lines (empty unless verbose).
    pub trace: Vec<String>,
    /// Every violation found, in order.
    pub violations: Vec<Violation>,
    /// Trace events recorded.
    pub events: u64,
    /// Dispatch rows written.
    pub rows: usize,
    /// Executions seen.
    pub executions: usize,
    /// Simulated time the run took.
    pub simulated: Duration,
    /// Executions that started on a connection after a newer one was accepted elsewhere, before
    /// the node was told: within I9's bound, outside its strict form.
    pub stale_starts: usize,
    /// Hand-backs the store accepted.
    pub releases: u32,
    /// Executions of a key that overlapped an earlier one whose claim had lapsed: within I11's
    /// bound, outside its strict form.
    pub lapsed_overlaps: usize,
    /// Executions of keyed rows.
    pub keyed_executions: usize,
}

// ---------------------------------------------------------------------------------------------
// The shared world: trace, history, fault decisions

#[derive(Debug, Clone)]
struct InsertRec {
    at: Duration,
    now: Timestamp,
    deadline: Option<Timestamp>,
    /// The ordering key the originator asked for (before any injected fault).
    key: Option<String>,
    /// The history position of the insert.
    seq: u64,
}

#[derive(Debug, Clone)]
struct TerminalRec {
    at: Duration,
}

/// How long one claim held its row.
#[derive(Debug, Clone, Copy)]
struct Holding {
    /// The claim's history position.
    claimed: u64,
    /// Its latest accepted lease (the claimer's or renewer's clock).
    until: Timestamp,
    /// When the store accepted its outcome (history position).
    finished: Option<u64>,
}

/// One execution, as the executor saw it.
#[derive(Debug, Clone)]
struct ExecRec {
    id: DispatchId,
    broker: BrokerId,
    node: NodeId,
    attempt: u32,
    /// True time and history position of the executor's call and of its end (return or drop).
    start: Duration,
    start_seq: u64,
    end: Option<(Duration, u64)>,
}

/// A connection of a broker that a node's connect claim won: from the store's acceptance until
/// the node sees the socket go (its teardown, or a crash), or is told a newer one holds it.
#[derive(Debug, Clone)]
struct Hold {
    session: SessionId,
    node: NodeId,
    /// `(connected_at, session)`: the newest-connection-wins order.
    key: (Timestamp, SessionId),
    accepted: u64,
    /// The node's teardown of this session, or its crash (true time, history position).
    ended: Option<(Duration, u64)>,
    /// A newer connect of the broker was accepted (true time, history position).
    superseded: Option<(Duration, u64)>,
    /// The node's first affinity refresh of this session made after `superseded`, answered or not.
    asked: Option<Duration>,
    /// The first refresh of this session the store answered "not held", the node's own newer
    /// connection of the broker, or the node's report that it lost it ([`Hub::lost`]): the
    /// node has been told (true time, history position).
    told: Option<(Duration, u64)>,
}

#[derive(Debug)]
enum Outcome {
    Dispatch(Result<serde_json::Value, Error>),
    Send(Result<DispatchId, Error>),
}

#[derive(Debug)]
struct World {
    origin: Instant,
    verbose: bool,
    trace: Vec<String>,
    digest: u64,
    events: u64,
    /// History positions: orders happenings that share a (paused-clock) instant.
    seq: u64,
    violations: Vec<Violation>,
    rng: SplitMix,
    /// Store calls from these nodes fail until the instant.
    outages: BTreeMap<NodeId, Instant>,
    /// (id, attempt) pairs a claim handed out (I1), with the claim's true time and the
    /// claimer's `now` (I8).
    claimed: BTreeMap<(DispatchId, u32), (Duration, Timestamp)>,
    /// The newest attempt each dispatch was claimed at (I2).
    latest_attempt: BTreeMap<DispatchId, u32>,
    /// Per claimed (id, attempt): the claim's history position, and until when (store clock) the
    /// claim holds the row: its latest accepted lease, or the moment its outcome was accepted
    /// (I11).
    holding: BTreeMap<(DispatchId, u32), Holding>,
    /// Executions of a key that overlapped an earlier one whose claim no longer held the row
    /// (allowed by I11's bound; what its strict form would forbid).
    lapsed_overlaps: usize,
    inserts: BTreeMap<DispatchId, InsertRec>,
    terminal: BTreeMap<DispatchId, TerminalRec>,
    /// Failure reasons of rows that ended Cancelled or Expired (I5).
    dead: BTreeMap<DispatchId, FailReason>,
    /// Executions per dispatch: attempts, in order (I1, I4).
    executions: BTreeMap<DispatchId, Vec<u32>>,
    /// Every execution, in start order (I8–I11).
    execs: Vec<ExecRec>,
    /// Hand-backs the hubs asked for and the store accepted, per dispatch (I10).
    releases: BTreeMap<DispatchId, u32>,
    /// The newest (connected_at, session) a connect claim won, per broker (I7).
    newest_connect: BTreeMap<BrokerId, (Timestamp, SessionId)>,
    /// Every connection a connect claim won, per broker (I9).
    holds: BTreeMap<BrokerId, Vec<Hold>>,
    /// Executions that started on a connection after a newer one was accepted elsewhere, before
    /// the node was told (allowed by I9's bound; what its strict form would forbid).
    stale_starts: usize,
    /// Report what only the strict forms of I9 and I11 forbid.
    strict: bool,
    outcomes: Vec<Outcome>,
}

impl World {
    fn new(seed: u64, verbose: bool) -> Self {
        World {
            origin: Instant::now(),
            verbose,
            trace: Vec::new(),
            digest: 0xcbf2_9ce4_8422_2325,
            events: 0,
            seq: 0,
            violations: Vec::new(),
            rng: SplitMix::new(seed ^ 0x5EED_FA17),
            outages: BTreeMap::new(),
            claimed: BTreeMap::new(),
            latest_attempt: BTreeMap::new(),
            holding: BTreeMap::new(),
            lapsed_overlaps: 0,
            inserts: BTreeMap::new(),
            terminal: BTreeMap::new(),
            dead: BTreeMap::new(),
            executions: BTreeMap::new(),
            execs: Vec::new(),
            releases: BTreeMap::new(),
            newest_connect: BTreeMap::new(),
            holds: BTreeMap::new(),
            stale_starts: 0,
            strict: false,
            outcomes: Vec::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn log(&mut self, line: String) {
        let at = self.elapsed();
        let line = format!(
            "{:>7}.{:03}ms {line}",
            at.as_millis(),
            at.as_micros() % 1000
        );
        for b in line.bytes() {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.digest = (self.digest ^ 0x0a).wrapping_mul(0x0100_0000_01b3);
        self.events += 1;
        if self.verbose {
            self.trace.push(line);
        }
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.log(format!("VIOLATION {invariant}: {detail}"));
        self.violations.push(Violation { invariant, detail });
    }

    fn ended(&mut self, d: &Dispatch) {
        if !d.state.is_terminal() || self.terminal.contains_key(&d.id) {
            return;
        }
        let at = self.elapsed();
        self.terminal.insert(d.id, TerminalRec { at });
        // A terminal row is held by no claim any more, whichever call ended it (I11).
        let seq = self.next_seq();
        for (_, h) in self.holding.range_mut((d.id, 0)..=(d.id, u32::MAX)) {
            h.finished.get_or_insert(seq);
        }
        if let Some(r @ (FailReason::Cancelled | FailReason::Expired)) = &d.failure {
            self.dead.insert(d.id, r.clone());
        }
    }

    /// A holder's write (heartbeat or finish) was accepted: it must carry the newest attempt.
    fn holder_write_accepted(&mut self, op: &str, c: &Claimed) {
        let latest = self.latest_attempt.get(&c.id()).copied().unwrap_or(0);
        if c.attempt() < latest {
            self.violate(
                "I2",
                format!(
                    "{op} of {} carrying stale attempt {} accepted (newest claim: attempt {latest})",
                    c.id(),
                    c.attempt()
                ),
            );
        }
    }

    /// A connect claim of `broker` by `node` was accepted: every older connection of the broker
    /// is superseded from now on.
    fn connect_accepted(&mut self, broker: &BrokerId, node: &NodeId, key: (Timestamp, SessionId)) {
        let seq = self.next_seq();
        let at = self.elapsed();
        let holds = self.holds.entry(broker.clone()).or_default();
        for h in holds.iter_mut().filter(|h| h.key < key) {
            h.superseded.get_or_insert((at, seq));
            if h.node == *node {
                // The same node replaces the old session in its map as it takes the new one.
                h.told.get_or_insert((at, seq));
            }
        }
        holds.push(Hold {
            session: key.1.clone(),
            node: node.clone(),
            key,
            accepted: seq,
            ended: None,
            superseded: None,
            asked: None,
            told: None,
        });
    }

    /// `node` sees the socket of `session` go (its teardown reaches the hub now).
    fn connection_ended(&mut self, broker: &BrokerId, session: &SessionId, node: &NodeId) {
        let seq = self.next_seq();
        let at = self.elapsed();
        for h in self.holds.entry(broker.clone()).or_default() {
            if h.session == *session && h.node == *node && h.ended.is_none() {
                h.ended = Some((at, seq));
            }
        }
    }

    /// `node` crashed: every connection it held is gone.
    fn node_crashed(&mut self, node: &NodeId) {
        let seq = self.next_seq();
        let at = self.elapsed();
        for h in self.holds.values_mut().flatten() {
            if h.node == *node && h.ended.is_none() {
                h.ended = Some((at, seq));
            }
        }
    }

    /// `node` refreshed its affinity of `(broker, session)`; `held`: the store's true answer
    /// (`None`: the call failed).
    fn touched(
        &mut self,
        broker: &BrokerId,
        session: &SessionId,
        node: &NodeId,
        held: Option<bool>,
    ) {
        let seq = self.next_seq();
        let at = self.elapsed();
        for h in self.holds.entry(broker.clone()).or_default() {
            if h.session == *session && h.node == *node {
                if h.superseded.is_some() {
                    h.asked.get_or_insert(at);
                }
                if held == Some(false) {
                    h.told.get_or_insert((at, seq));
                }
            }
        }
    }

    /// `node` reported (through [`Hub::lost`]) that it no longer holds `(broker, session)`.
    fn lost(&mut self, broker: &BrokerId, session: &SessionId, node: &NodeId) {
        let seq = self.next_seq();
        let at = self.elapsed();
        self.log(format!("lost {broker} session={session} on {node}"));
        for h in self.holds.entry(broker.clone()).or_default() {
            if h.session == *session && h.node == *node {
                h.told.get_or_insert((at, seq));
            }
        }
    }

    /// An execution began (the executor was called); checks I1, I4, I5, I8, I9 and I10 and
    /// returns its index in `execs`.
    fn executed(&mut self, node: &NodeId, ctx: &ExecContext, d: &Dispatch) -> usize {
        let (id, attempt, execution) = (ctx.id(), ctx.attempt(), ctx.execution());
        // The local fast path runs an ad-hoc record that no claim produced.
        let fast = d.claimed_by.is_none();
        self.log(format!(
            "exec {id} attempt={attempt} execution={execution}{} on {node}",
            if fast { " (fast path)" } else { "" }
        ));
        let seq = self.next_seq();
        let start = self.elapsed();
        if let Some(reason) = self.dead.get(&id).cloned() {
            self.violate(
                "I5",
                format!("{id} executed (attempt {attempt} on {node}) after it ended {reason}"),
            );
        }
        let runs = self.executions.entry(id).or_default();
        let twice = runs.contains(&attempt);
        runs.push(attempt);
        let n = runs.len();
        if twice {
            self.violate("I1", format!("{id} attempt {attempt} executed twice"));
        }
        if n > d.max_attempts as usize {
            self.violate(
                "I4",
                format!("{id} executed {n} times > max_attempts {}", d.max_attempts),
            );
        }
        if !fast {
            self.check_start_deadline(id, attempt, start, node);
        }
        self.check_numbering(id, attempt, execution, n, d.max_attempts);
        self.check_session(d, ctx.session(), node, seq);
        self.execs.push(ExecRec {
            id,
            broker: d.broker.clone(),
            node: node.clone(),
            attempt,
            start,
            start_seq: seq,
            end: None,
        });
        self.execs.len() - 1
    }

    /// The execution `i` ended (returned, or was dropped: timed out, crashed, aborted).
    fn execution_ended(&mut self, i: usize) {
        let seq = self.next_seq();
        let at = self.elapsed();
        if let Some(e) = self.execs.get_mut(i) {
            e.end.get_or_insert((at, seq));
        }
    }

    /// **I8, no late start**: an execution of a claimed row starts before the row's deadline
    /// (from the insert record) by the claiming node's clock, advanced by the true time since the
    /// claim: `claim.now + (start − claim.at) < deadline`. This is what the hub promises (it
    /// measures the time left on its monotonic clock from before it sent the claim), with no
    /// allowance; in true time it puts every start before the originator's deadline plus
    /// `2 × SKEW_BOUND` (the claimer's clock may be `SKEW_BOUND` ahead of true time... or behind,
    /// and the originator's the other way).
    fn check_start_deadline(
        &mut self,
        id: DispatchId,
        attempt: u32,
        start: Duration,
        node: &NodeId,
    ) {
        let Some(deadline) = self.inserts.get(&id).and_then(|r| r.deadline) else {
            return;
        };
        let Some((claim_at, claim_now)) = self.claimed.get(&(id, attempt)).copied() else {
            return;
        };
        let seen = claim_now.saturating_add(start.saturating_sub(claim_at));
        if seen >= deadline {
            self.violate(
                "I8",
                format!(
                    "{id} attempt {attempt} started on {node} at {seen} by its claimer's clock, at or after its deadline {deadline}"
                ),
            );
        }
    }

    /// **I10, executions ≤ `max_attempts` counting hand-backs**: each execution's
    /// `ctx.execution()` is its fencing token less the hand-backs of that row the hubs asked for
    /// and the store accepted (`attempt − released`), never less than its position among the
    /// row's executions in the executor log (claims lost before they could start, to a crash,
    /// count as executions: the store cannot tell they never began), and never more than
    /// `max_attempts`.
    fn check_numbering(
        &mut self,
        id: DispatchId,
        attempt: u32,
        execution: u32,
        n: usize,
        max: u32,
    ) {
        let released = self.releases.get(&id).copied().unwrap_or(0);
        let expected = attempt.saturating_sub(released);
        if execution != expected {
            self.violate(
                "I10",
                format!(
                    "{id} attempt {attempt} ran as execution {execution}, but {released} hand-backs make it execution {expected}"
                ),
            );
        } else if (execution as usize) < n {
            self.violate(
                "I10",
                format!("{id} ran as execution {execution}, but it is the {n}th in the log"),
            );
        } else if execution > max {
            self.violate(
                "I10",
                format!("{id} ran as execution {execution} > max_attempts {max}"),
            );
        }
    }

    /// **I9, no execution on a connection this node no longer holds**: an execution (fast path
    /// or claimed row) for session `S` of broker `B` on node `N` starts only while `N` holds `S`:
    /// after the store accepted `N`'s connect claim for `S`, before `N` saw the socket go (its
    /// teardown, or its crash), and before `N` was told that it no longer holds `B` — by the
    /// first affinity refresh of `S` the store answered "not held" (after a newer connect was
    /// accepted elsewhere, the first answered one), or at once when a newer connection arrived at
    /// `N` itself. The
    /// refresh cadence bounds that window: `N` asks within `1.25 × freshness / 3` of the newer
    /// connect (checked in [`check`]); a refresh that fails (outage, blip) defers it to the next.
    ///
    /// The strict form (nothing starts on `S` once a newer connection was accepted anywhere) is
    /// not what the hub promises: claims and the fast path consult only the node's own map of
    /// connections, which learns of a newer connection elsewhere at the next refresh. Such starts
    /// are counted in `stale_starts`, not reported.
    fn check_session(
        &mut self,
        d: &Dispatch,
        session: Option<&SessionId>,
        node: &NodeId,
        seq: u64,
    ) {
        let Some(session) = session else {
            self.violate("I9", format!("{} executed on {node} with no session", d.id));
            return;
        };
        let holds = self
            .holds
            .get(&d.broker)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mine: Vec<&Hold> = holds
            .iter()
            .filter(|h| h.session == *session && h.node == *node && h.accepted < seq)
            .collect();
        if mine.is_empty() {
            self.violate(
                "I9",
                format!(
                    "{} executed on {node} for session {session} of {}, which never connected there",
                    d.id, d.broker
                ),
            );
            return;
        }
        let live = mine
            .iter()
            .find(|h| h.ended.is_none_or(|(_, e)| seq < e) && h.told.is_none_or(|(_, t)| seq < t));
        match live {
            Some(h) => {
                if let Some((at, _)) = h.superseded.filter(|(_, s)| *s < seq) {
                    self.stale_starts += 1;
                    if self.strict {
                        self.violate(
                            "I9",
                            format!(
                                "(strict) {} executed on {node} for session {session} of {}, superseded at {}ms by a newer connection",
                                d.id,
                                d.broker,
                                at.as_millis()
                            ),
                        );
                    }
                }
            }
            None => {
                let h = mine[mine.len() - 1];
                let why = if h.ended.is_some_and(|(_, e)| e <= seq) {
                    "after the node saw that connection go"
                } else {
                    "after the node was told a newer connection holds the broker"
                };
                self.violate(
                    "I9",
                    format!(
                        "{} executed on {node} for session {session} of {} {why}",
                        d.id, d.broker
                    ),
                );
            }
        }
    }

    /// Whether a store call from `node` fails now (an outage, or a random blip).
    fn store_fails(&mut self, node: Option<&NodeId>, per_mille: u64) -> bool {
        let down = node.is_some_and(|n| {
            self.outages
                .get(n)
                .is_some_and(|until| Instant::now() < *until)
        });
        down || self.rng.chance(per_mille)
    }
}

type Shared = Arc<Mutex<World>>;

fn unavailable() -> StoreError {
    StoreError::Unavailable("injected fault".into())
}

fn brief(d: &Dispatch) -> String {
    let why = d
        .failure
        .as_ref()
        .map(|f| format!("({f})"))
        .unwrap_or_default();
    format!("{} {}{why} a={}", d.id, d.state, d.attempt)
}

// ---------------------------------------------------------------------------------------------
// The auditing store

/// A [`Store`] around [`MemoryStore`] that records every call (its `now` and what it returned) in
/// the world's trace, checks I1, I2, I5 and I7 as the history unfolds (and records the claims,
/// leases, hand-backs, connects and affinity refreshes that I8–I11 are checked against), and
/// injects unavailability: whole-node outages, random blips before a call, lost replies after a
/// heartbeat or finish was applied, and slow claim replies. With a [`SimFault`] set it also
/// breaks the store's side of the contract in that one way.
#[derive(Debug)]
pub struct AuditStore {
    inner: MemoryStore,
    world: Shared,
    fault: Option<SimFault>,
}

/// Random store failures, per mille of calls.
const STORE_BLIP: u64 = 15;

/// Claims whose reply is slow (per mille), and how slow: the claim is applied at once, its reply
/// arrives up to 40 ms later (so the broker may have left meanwhile, and the row is handed back).
const CLAIM_SLOW: u64 = 200;
const CLAIM_SLOW_MAX_MS: u64 = 40;

impl AuditStore {
    fn new(world: Shared, fault: Option<SimFault>) -> Self {
        let inner = MemoryStore::new();
        if let Some(SimFault::Store(f)) = fault {
            inner.set_fault(f);
        }
        AuditStore {
            inner,
            world,
            fault,
        }
    }

    fn faulty(&self, f: SimFault) -> bool {
        self.fault == Some(f)
    }

    fn gate(&self, op: &str, node: Option<&NodeId>) -> Result<(), StoreError> {
        let mut w = self.world.lock();
        if w.store_fails(node, STORE_BLIP) {
            let who = node.map_or("-", |n| n.as_str());
            w.log(format!("store {op} from {who}: unavailable (injected)"));
            return Err(unavailable());
        }
        Ok(())
    }

    /// Records a claim's result (I1, I2, I5, I8).
    fn audit_claim(
        &self,
        res: &Result<Vec<Claimed>, StoreError>,
        broker: &BrokerId,
        node: &NodeId,
        now: Option<Timestamp>,
    ) {
        let mut w = self.world.lock();
        match res {
            Ok(claimed) if claimed.is_empty() => {}
            Ok(claimed) => {
                for c in claimed {
                    let d = c.dispatch();
                    w.log(format!(
                        "store claim {broker} by {node} now={:?} -> {}",
                        now.map(Timestamp::as_micros),
                        brief(d)
                    ));
                    let at = w.elapsed();
                    let stamp = now.unwrap_or(d.updated_at);
                    let seq = w.next_seq();
                    let until = d.lease_until.unwrap_or(stamp);
                    w.holding.insert(
                        (d.id, d.attempt),
                        Holding {
                            claimed: seq,
                            until,
                            finished: None,
                        },
                    );
                    if w.claimed.insert((d.id, d.attempt), (at, stamp)).is_some() {
                        w.violate(
                            "I1",
                            format!("{} attempt {} claimed twice", d.id, d.attempt),
                        );
                    }
                    w.latest_attempt.insert(d.id, d.attempt);
                    if let (Some(now), Some(deadline)) = (now, d.deadline) {
                        if now >= deadline {
                            w.violate(
                                "I5",
                                format!(
                                    "{} claimed at {now} at or after its deadline {deadline}",
                                    d.id
                                ),
                            );
                        }
                    }
                    if w.terminal.contains_key(&d.id) {
                        w.violate("I5", format!("{} claimed after it was terminal", d.id));
                    }
                }
            }
            Err(e) => w.log(format!("store claim {broker} by {node} -> {e}")),
        }
    }

    fn reply_lost(&self) -> bool {
        self.world.lock().rng.chance(STORE_BLIP)
    }
}

#[async_trait]
impl Store for AuditStore {
    fn name(&self) -> &'static str {
        "audited-memory"
    }

    async fn insert(&self, mut new: NewDispatch) -> Result<Dispatch, StoreError> {
        let now = new.now;
        let key = new.key.clone();
        if self.faulty(SimFault::IgnoreKeys) {
            new.key = None;
        }
        let res = self.inner.insert(new).await;
        let mut w = self.world.lock();
        match &res {
            Ok(d) => {
                let at = w.elapsed();
                let seq = w.next_seq();
                w.inserts.entry(d.id).or_insert(InsertRec {
                    at,
                    now: d.created_at,
                    deadline: d.deadline,
                    key: key.clone(),
                    seq,
                });
                w.log(format!(
                    "store insert {} broker={} key={key:?} now={:?} deadline={:?} max={} executions={}",
                    d.id,
                    d.broker,
                    now.map(Timestamp::as_micros),
                    d.deadline.map(Timestamp::as_micros),
                    d.max_attempts,
                    d.executions()
                ));
            }
            Err(e) => w.log(format!("store insert -> {e}")),
        }
        res
    }

    async fn claim(&self, mut p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.gate("claim", Some(&p.node))?;
        let (node, broker, now) = (p.node.clone(), p.broker.clone(), p.now);
        if self.faulty(SimFault::SlowClaimClock) {
            p.now = p.now.map(|n| n.saturating_sub(Duration::from_millis(300)));
        }
        let mut res = self.inner.claim(p).await;
        if self.faulty(SimFault::DoubleClaim) {
            if let Ok(claimed) = &mut res {
                let twins: Vec<Claimed> = claimed
                    .iter()
                    .map(|c| Claimed::new(c.dispatch().clone()))
                    .collect();
                claimed.extend(twins);
            }
        }
        let slow = {
            let mut w = self.world.lock();
            (res.as_ref().is_ok_and(|c| !c.is_empty()) && w.rng.chance(CLAIM_SLOW))
                .then(|| w.rng.millis(1, CLAIM_SLOW_MAX_MS))
        };
        self.audit_claim(&res, &broker, &node, now);
        if let Some(d) = slow {
            self.world.lock().log(format!(
                "store claim {broker} by {node}: reply takes {}ms",
                d.as_millis()
            ));
            tokio::time::sleep(d).await;
        }
        res
    }

    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        self.gate("heartbeat", c.dispatch().claimed_by.as_ref())?;
        let res = self.inner.heartbeat(c, p).await;
        {
            let mut w = self.world.lock();
            match &res {
                Ok(d) => {
                    w.log(format!("store heartbeat a={} -> {}", c.attempt(), brief(d)));
                    w.holder_write_accepted("heartbeat", c);
                    if let (Some(h), Some(l)) =
                        (w.holding.get_mut(&(c.id(), c.attempt())), d.lease_until)
                    {
                        h.until = h.until.max(l);
                    }
                }
                Err(e) => w.log(format!(
                    "store heartbeat {} a={} -> {e}",
                    c.id(),
                    c.attempt()
                )),
            }
        }
        if res.is_ok() && self.reply_lost() {
            self.world
                .lock()
                .log("store heartbeat: reply lost (injected)".into());
            return Err(unavailable());
        }
        res
    }

    async fn finish(&self, c: Claimed, mut p: FinishParams) -> Result<Dispatch, StoreError> {
        self.gate("finish", c.dispatch().claimed_by.as_ref())?;
        let (id, attempt) = (c.id(), c.attempt());
        let probe = Claimed::new(c.dispatch().clone());
        let outcome = format!("{:?}", p.outcome);
        let release = matches!(p.outcome, StoreOutcome::Release);
        p.outcome = match p.outcome {
            StoreOutcome::Retry { .. } if self.faulty(SimFault::RetryAsRelease) => {
                StoreOutcome::Release
            }
            StoreOutcome::Release if self.faulty(SimFault::ReleaseAsRetry) => StoreOutcome::Retry {
                after: Duration::ZERO,
            },
            o => o,
        };
        let res = self.inner.finish(c, p).await;
        {
            let mut w = self.world.lock();
            match &res {
                Ok(d) => {
                    w.log(format!(
                        "store finish a={attempt} {outcome} -> {}",
                        brief(d)
                    ));
                    w.holder_write_accepted("finish", &probe);
                    let seq = w.next_seq();
                    if let Some(h) = w.holding.get_mut(&(id, attempt)) {
                        h.finished.get_or_insert(seq);
                    }
                    if release {
                        *w.releases.entry(id).or_default() += 1;
                    }
                    w.ended(d);
                }
                Err(e) => w.log(format!("store finish {id} a={attempt} {outcome} -> {e}")),
            }
        }
        if res.is_ok() && self.reply_lost() {
            self.world
                .lock()
                .log("store finish: reply lost (injected)".into());
            return Err(unavailable());
        }
        res
    }

    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.gate("cancel", None)?;
        let res = self.inner.cancel(p).await;
        let mut w = self.world.lock();
        match &res {
            Ok(d) => {
                w.log(format!("store cancel -> {}", brief(d)));
                w.ended(d);
            }
            Err(e) => w.log(format!("store cancel {} -> {e}", p.id)),
        }
        res
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        self.gate("cancel", None)?;
        let res = self.inner.request_cancel(p).await;
        let mut w = self.world.lock();
        match &res {
            Ok(d) => {
                w.log(format!("store request_cancel -> {}", brief(d)));
                if d.state.is_terminal() {
                    w.ended(d);
                }
            }
            Err(e) => w.log(format!("store request_cancel {} -> {e}", p.id)),
        }
        res
    }

    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.gate("get", None)?;
        let mut res = self.inner.get(id).await;
        if self.faulty(SimFault::ForgedRead) {
            if let Ok(Some(d)) = &mut res {
                if d.state == DispatchState::Done {
                    d.result = Some(json!({ "id": d.id.to_string(), "forged": true }));
                }
            }
        }
        res
    }

    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        self.inner.list(f).await
    }

    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        self.gate("sweep", None)?;
        if self.faulty(SimFault::NoSweep) {
            return Ok(SweepReport::default());
        }
        let now = p.now;
        let res = self.inner.sweep(p).await;
        if let Ok(r) = &res {
            if !r.expired.is_empty() || !r.exhausted.is_empty() {
                let mut ended = Vec::new();
                for id in r.expired.iter().chain(&r.exhausted) {
                    if let Ok(Some(d)) = self.inner.get(*id).await {
                        ended.push(d);
                    }
                }
                let mut w = self.world.lock();
                for d in &ended {
                    w.log(format!(
                        "store sweep now={:?} -> {}",
                        now.map(Timestamp::as_micros),
                        brief(d)
                    ));
                    w.ended(d);
                }
            }
        }
        res
    }

    async fn connect(&self, mut p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        // The simulation's hubs run on explicit clocks, so they stamp every connect.
        let key = (
            p.connected_at.or(p.now).unwrap_or(Timestamp::EPOCH),
            p.session.clone(),
        );
        let (broker, node) = (p.broker.clone(), p.node.clone());
        if self.faulty(SimFault::ConnectStampedNow) {
            p.connected_at = p.now.or(p.connected_at);
        }
        let res = self.inner.connect(p).await;
        let mut w = self.world.lock();
        match &res {
            Ok(ConnectOutcome::Claimed(_)) => {
                w.log(format!(
                    "store connect {broker} on {node} session={} at={} -> claimed",
                    key.1,
                    key.0.as_micros()
                ));
                if let Some(newest) = w.newest_connect.get(&broker).cloned() {
                    if key < newest {
                        w.violate(
                            "I7",
                            format!(
                                "{broker}: connect of {} (at {}) won over newer {} (at {})",
                                key.1, key.0, newest.1, newest.0
                            ),
                        );
                    }
                }
                let newest = w
                    .newest_connect
                    .entry(broker.clone())
                    .or_insert(key.clone());
                if key > *newest {
                    *newest = key.clone();
                }
                w.connect_accepted(&broker, &node, key);
            }
            Ok(ConnectOutcome::Superseded(_)) => w.log(format!(
                "store connect {broker} on {node} session={} -> superseded",
                key.1
            )),
            Err(e) => w.log(format!("store connect {broker} -> {e}")),
        }
        res
    }

    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        let (broker, node, session) = (p.broker.clone(), p.node.clone(), p.session.clone());
        let res = self.inner.disconnect(p).await;
        self.world.lock().log(format!(
            "store disconnect {broker} on {node} session={session} -> {res:?}"
        ));
        res
    }

    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        let (broker, node, session) = (p.broker.clone(), p.node.clone(), p.session.clone());
        if let Err(e) = self.gate("touch", Some(&p.node)) {
            self.world.lock().touched(&broker, &session, &node, None);
            return Err(e);
        }
        let res = self.inner.touch(p).await;
        let mut w = self.world.lock();
        w.touched(&broker, &session, &node, res.as_ref().ok().copied());
        if matches!(res, Ok(false)) {
            w.log(format!(
                "store touch {broker} on {node} session={session} -> not held"
            ));
        }
        if self.faulty(SimFault::StaleTouch) {
            return res.map(|_| true);
        }
        res
    }

    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
}

// ---------------------------------------------------------------------------------------------
// The fault-injecting transport

/// Per mille of notices each subscriber loses, gets twice, gets late (reordered), or gets as a
/// `Resync` instead.
const NOTICE_LOSS: u64 = 150;
const NOTICE_DUP: u64 = 60;
const NOTICE_DELAY: u64 = 150;
const NOTICE_RESYNC: u64 = 5;

/// A [`Transport`] around [`MemoryTransport`] that, per subscriber and per notice, loses,
/// duplicates, delays (and so reorders) notices, or turns one into a `Resync`, by seeded chance.
/// Subscriptions are live when `subscribe` returns (the inner one is), as the contract asks.
#[derive(Debug, Clone)]
pub struct FaultyTransport {
    inner: MemoryTransport,
    world: Shared,
}

enum Fate {
    Deliver,
    Lose,
    Duplicate,
    Delay(Duration),
    Resync,
}

#[async_trait]
impl Transport for FaultyTransport {
    fn name(&self) -> &'static str {
        "faulty-memory"
    }

    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        let mut upstream = self.inner.subscribe().await?;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Notice>();
        let world = Arc::clone(&self.world);
        tokio::spawn(async move {
            while let Some(n) = upstream.next().await {
                if tx.is_closed() {
                    return;
                }
                let fate = {
                    let mut w = world.lock();
                    let r = w.rng.below(1000);
                    let fate = if r < NOTICE_LOSS {
                        Fate::Lose
                    } else if r < NOTICE_LOSS + NOTICE_DUP {
                        Fate::Duplicate
                    } else if r < NOTICE_LOSS + NOTICE_DUP + NOTICE_DELAY {
                        Fate::Delay(w.rng.millis(1, 400))
                    } else if r < NOTICE_LOSS + NOTICE_DUP + NOTICE_DELAY + NOTICE_RESYNC {
                        Fate::Resync
                    } else {
                        Fate::Deliver
                    };
                    let what = match &fate {
                        Fate::Deliver => "deliver".to_owned(),
                        Fate::Lose => "lose".to_owned(),
                        Fate::Duplicate => "duplicate".to_owned(),
                        Fate::Delay(d) => format!("delay {}ms", d.as_millis()),
                        Fate::Resync => "resync".to_owned(),
                    };
                    w.log(format!("notice {n:?}: {what}"));
                    fate
                };
                match fate {
                    Fate::Deliver => {
                        let _ = tx.unbounded_send(n);
                    }
                    Fate::Lose => {}
                    Fate::Duplicate => {
                        let _ = tx.unbounded_send(n.clone());
                        let _ = tx.unbounded_send(n);
                    }
                    Fate::Delay(d) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(d).await;
                            let _ = tx.unbounded_send(n);
                        });
                    }
                    Fate::Resync => {
                        let _ = tx.unbounded_send(Notice::Resync);
                    }
                }
            }
        });
        Ok(Subscription::new(rx))
    }

    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        self.inner.publish(notice).await
    }
}

// ---------------------------------------------------------------------------------------------
// Clock and executor

/// A hub's clock: tokio's (paused) monotonic time since the run began, plus a fixed epoch, plus
/// this hub's skew (changed by clock jumps, always within ±[`SKEW_BOUND`]).
#[derive(Debug)]
pub struct SimClock {
    origin: Instant,
    skew_micros: AtomicI64,
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let elapsed = i64::try_from(self.origin.elapsed().as_micros()).unwrap_or(i64::MAX);
        Timestamp::from_micros(
            EPOCH_BASE_MICROS + elapsed + self.skew_micros.load(Ordering::Relaxed),
        )
    }
}

/// An executor that records every execution in the world (I1, I4, I5, I8–I11: its start, and
/// its end when it returns or is dropped), then behaves as the command's `kind` says: `ok`,
/// `slow` (sleeps `slow_ms`, within `execute_timeout`), `fatal`, `retry` (retryable until
/// attempt > `retries`), `hang` (sleeps `hang_ms`, past the lease or past `execute_timeout`),
/// `panic`, or `progress`.
#[derive(Debug)]
pub struct SimExecutor {
    node: NodeId,
    world: Shared,
}

#[async_trait]
impl Executor for SimExecutor {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let index = self.world.lock().executed(&self.node, &ctx, d);
        let _end = EndGuard {
            world: Arc::clone(&self.world),
            index,
        };
        let ok = json!({ "id": ctx.id().to_string(), "attempt": ctx.attempt(), "n": d.args["n"] });
        let number = |k: &str| d.args[k].as_u64().unwrap_or(0);
        match d.args["kind"].as_str().unwrap_or("ok") {
            "fatal" => Err(ExecError::fatal(format!("fatal #{}", number("n")))),
            "retry" if u64::from(ctx.attempt()) <= number("retries") => Err(
                ExecError::retry_after(Duration::from_millis(number("after_ms")), "not yet"),
            ),
            "hang" => {
                tokio::time::sleep(Duration::from_millis(number("hang_ms"))).await;
                Ok(ok)
            }
            "slow" => {
                tokio::time::sleep(Duration::from_millis(number("slow_ms"))).await;
                Ok(ok)
            }
            "panic" => panic!("simulated panic #{}", number("n")),
            "progress" => {
                for step in 0..3 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    ctx.report_progress(json!({ "step": step }));
                }
                Ok(ok)
            }
            _ => Ok(ok),
        }
    }
}

/// Records the end of an execution when the executor's future finishes or is dropped.
struct EndGuard {
    world: Shared,
    index: usize,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.world.lock().execution_ended(self.index);
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario

struct Replica {
    hub: Option<Hub>,
    generation: u32,
    clock: Arc<SimClock>,
    /// Originator tasks running on this incarnation (a crash kills them too).
    tasks: Vec<AbortHandle>,
    restart_at: Option<Instant>,
}

struct BrokerSim {
    id: BrokerId,
    /// (replica, generation, session) it is connected to.
    conn: Option<(usize, u32, SessionId)>,
    sessions: u32,
    reconnect_at: Option<Instant>,
    /// Sessions it used before, with their connect time (for delayed claims).
    old: Vec<(SessionId, Timestamp)>,
}

struct Sim {
    world: Shared,
    rng: SplitMix,
    store: Arc<AuditStore>,
    transport: FaultyTransport,
    ids: IdSource,
    config: HubConfig,
    replicas: Vec<Replica>,
    brokers: Vec<BrokerSim>,
    origin: Instant,
    handles: Vec<JoinHandle<()>>,
}

impl Sim {
    fn log(&self, line: String) {
        self.world.lock().log(line);
    }

    fn node_id(i: usize, generation: u32) -> NodeId {
        NodeId::new(format!("hub-{i}.r{generation}")).expect("valid node id")
    }

    async fn start_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.generation += 1;
        r.restart_at = None;
        r.tasks.clear();
        let skew = self.rng.below(2 * SKEW_BOUND.as_micros() as u64 + 1) as i64
            - SKEW_BOUND.as_micros() as i64;
        r.clock = Arc::new(SimClock {
            origin: self.origin,
            skew_micros: AtomicI64::new(skew),
        });
        let node = Self::node_id(i, r.generation);
        let hub = Hub::builder(node.clone())
            .store(Arc::clone(&self.store) as Arc<dyn Store>)
            .transport(Arc::new(self.transport.clone()))
            .executor(Arc::new(SimExecutor {
                node: node.clone(),
                world: Arc::clone(&self.world),
            }))
            .clock(Arc::clone(&r.clock) as Arc<dyn Clock>)
            .id_source(Arc::clone(&self.ids))
            .config(self.config.clone())
            .start()
            .await
            .expect("hub starts");
        // The hub's own word that it let a connection go counts as its being told (I9).
        let mut lost = hub.lost();
        let world = Arc::clone(&self.world);
        let lost_node = node.clone();
        tokio::spawn(async move {
            while let Some(l) = lost.next().await {
                world.lock().lost(&l.broker, &l.session, &lost_node);
            }
        });
        r.hub = Some(hub);
        self.log(format!("start {node} skew={skew}us"));
    }

    fn live(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|i| self.replicas[*i].hub.is_some())
            .collect()
    }

    fn pick_live(&mut self) -> usize {
        let live = self.live();
        live[self.rng.below(live.len() as u64) as usize]
    }

    async fn connect(&mut self, b: usize, to: usize) {
        let Some(hub) = self.replicas[to].hub.clone() else {
            return;
        };
        let generation = self.replicas[to].generation;
        let broker = &mut self.brokers[b];
        broker.sessions += 1;
        let session = SessionId::new(format!("{}-s{}", broker.id, broker.sessions)).expect("id");
        // The connection was accepted a little before its claim reaches the store.
        let lag = self.rng.millis(0, 80);
        let at = self.replicas[to].clock.now().saturating_sub(lag);
        let id = broker.id.clone();
        broker.old.push((session.clone(), at));
        let res = hub.connect_at(id.clone(), session.clone(), (), at).await;
        self.log(format!("connect {id} -> {} {session}: {res:?}", hub.node()));
        let broker = &mut self.brokers[b];
        match res {
            Ok(()) => {
                broker.conn = Some((to, generation, session));
                broker.reconnect_at = None;
            }
            Err(_) => {
                broker.conn = None;
                broker.reconnect_at = Some(Instant::now() + Duration::from_millis(100));
            }
        }
    }

    async fn disconnect(&mut self, b: usize) {
        let Some((r, generation, session)) = self.brokers[b].conn.take() else {
            return;
        };
        let id = self.brokers[b].id.clone();
        let replica = &self.replicas[r];
        let Some(hub) = replica
            .hub
            .clone()
            .filter(|_| replica.generation == generation)
        else {
            return;
        };
        if self.rng.chance(120) {
            // A half-open socket: the old node never sees it go, and learns that the broker is
            // elsewhere only from its affinity refresh.
            self.log(format!(
                "half-open {id} {session} on {}: no teardown",
                hub.node()
            ));
        } else if self.rng.chance(300) {
            // The old socket's teardown reaches its node late, after the broker reconnected.
            let delay = self.rng.millis(10, 300);
            let world = Arc::clone(&self.world);
            self.handles.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                world.lock().connection_ended(&id, &session, hub.node());
                let res = hub.disconnect(&id, &session).await;
                world.lock().log(format!(
                    "late teardown {id} {session} on {}: {res:?}",
                    hub.node()
                ));
            }));
        } else {
            self.world
                .lock()
                .connection_ended(&id, &session, hub.node());
            let res = hub.disconnect(&id, &session).await;
            self.log(format!(
                "disconnect {id} {session} on {}: {res:?}",
                hub.node()
            ));
        }
    }

    fn command(&mut self, n: usize) {
        let r = self.pick_live();
        let Some(hub) = self.replicas[r].hub.clone() else {
            return;
        };
        let b = self.rng.below(self.brokers.len() as u64) as usize;
        let roll = self.rng.below(100);
        let args = match roll {
            0..=44 => json!({ "n": n, "kind": "ok" }),
            45..=54 => json!({ "n": n, "kind": "slow", "slow_ms": self.rng.range(50, 500) }),
            55..=62 => json!({ "n": n, "kind": "fatal" }),
            63..=74 => json!({
                "n": n, "kind": "retry",
                "retries": self.rng.range(1, 3), "after_ms": self.rng.range(0, 200),
            }),
            75..=80 => json!({ "n": n, "kind": "hang", "hang_ms": self.rng.range(700, 1200) }),
            81..=84 => json!({ "n": n, "kind": "panic" }),
            _ => json!({ "n": n, "kind": "progress" }),
        };
        let max_attempts = self.rng.range(1, 3) as u32;
        let mut cmd =
            Command::new(self.brokers[b].id.clone(), "op", args).max_attempts(max_attempts);
        if self.rng.chance(350) {
            // A few keys per broker, so that keyed commands queue behind each other.
            cmd = cmd.key(format!("k{}", self.rng.below(3)));
        }
        if self.rng.chance(350) {
            // A start deadline of its own, often shorter than the wait window.
            cmd = cmd.timeout(self.rng.millis(100, 1500));
        }
        let send = self.rng.chance(250);
        self.log(format!(
            "command #{n} {} on {} max={max_attempts} {} key={:?} timeout={:?}: {}",
            if send { "send" } else { "dispatch" },
            hub.node(),
            cmd.broker,
            cmd.key,
            cmd.timeout,
            cmd.args
        ));
        let world = Arc::clone(&self.world);
        let task = tokio::spawn(async move {
            let outcome = if send {
                Outcome::Send(hub.send(cmd).await.map(|r| r.id))
            } else {
                Outcome::Dispatch(hub.dispatch(cmd).await)
            };
            let mut w = world.lock();
            w.log(format!("outcome #{n}: {outcome:?}"));
            w.outcomes.push(outcome);
        });
        self.replicas[r].tasks.push(task.abort_handle());
        self.handles.push(task);
    }

    fn crash(&mut self) {
        let r = self.pick_live();
        let Some(hub) = self.replicas[r].hub.take() else {
            return;
        };
        self.world.lock().node_crashed(hub.node());
        hub.abort();
        for t in self.replicas[r].tasks.drain(..) {
            t.abort();
        }
        let down = self.rng.millis(200, 1000);
        self.replicas[r].restart_at = Some(Instant::now() + down);
        for i in 0..self.brokers.len() {
            if self.brokers[i].conn.as_ref().is_some_and(|c| c.0 == r) {
                self.brokers[i].conn = None;
                self.brokers[i].reconnect_at = Some(Instant::now() + self.rng.millis(50, 600));
            }
        }
        self.log(format!(
            "crash {} (down {}ms)",
            hub.node(),
            down.as_millis()
        ));
    }

    async fn due(&mut self) {
        let now = Instant::now();
        for i in 0..self.replicas.len() {
            if self.replicas[i].restart_at.is_some_and(|t| t <= now) {
                self.start_replica(i).await;
            }
        }
        for b in 0..self.brokers.len() {
            if self.brokers[b].reconnect_at.is_some_and(|t| t <= now) {
                let to = self.pick_live();
                self.connect(b, to).await;
            }
        }
    }

    async fn step(&mut self, n: usize) {
        match self.rng.below(100) {
            0..=59 => self.command(n),
            60..=71 => {
                // A flap: the broker's connection drops and comes back on some live hub.
                let b = self.rng.below(self.brokers.len() as u64) as usize;
                self.disconnect(b).await;
                let to = self.pick_live();
                self.connect(b, to).await;
            }
            72..=77 => {
                // A delayed connect claim from an older session arrives late.
                let b = self.rng.below(self.brokers.len() as u64) as usize;
                let current = self.brokers[b].conn.as_ref().map(|c| c.2.clone());
                let old: Vec<_> = self.brokers[b]
                    .old
                    .iter()
                    .filter(|(s, _)| Some(s) != current.as_ref())
                    .cloned()
                    .collect();
                if old.is_empty() || self.brokers[b].sessions < 2 {
                    return;
                }
                let (session, at) = old[self.rng.below(old.len() as u64) as usize].clone();
                let r = self.pick_live();
                if let Some(hub) = self.replicas[r].hub.clone() {
                    let id = self.brokers[b].id.clone();
                    let res = hub.connect_at(id.clone(), session.clone(), (), at).await;
                    self.log(format!(
                        "delayed connect {id} {session} on {}: {res:?}",
                        hub.node()
                    ));
                    if res.is_ok() {
                        // The socket behind it is long gone: its node sees the teardown now.
                        self.world
                            .lock()
                            .connection_ended(&id, &session, hub.node());
                        let _ = hub.disconnect(&id, &session).await;
                    }
                }
            }
            78..=83 => {
                let r = self.pick_live();
                let skew = self.rng.below(2 * SKEW_BOUND.as_micros() as u64 + 1) as i64
                    - SKEW_BOUND.as_micros() as i64;
                self.replicas[r]
                    .clock
                    .skew_micros
                    .store(skew, Ordering::Relaxed);
                self.log(format!("clock jump hub-{r} skew={skew}us"));
            }
            84..=86 => {
                if self.live().len() == self.replicas.len() {
                    self.crash();
                }
            }
            87..=90 => {
                let r = self.pick_live();
                let node = Self::node_id(r, self.replicas[r].generation);
                let d = self.rng.millis(300, 1500);
                let mut w = self.world.lock();
                w.outages.insert(node.clone(), Instant::now() + d);
                w.log(format!("store outage for {node}: {}ms", d.as_millis()));
            }
            _ => self.command(n),
        }
    }
}

/// Runs one seed and checks it.
pub fn run_seed(seed: u64, opts: &SimOptions) -> SeedReport {
    quiet_simulated_panics();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(simulate(seed, opts))
}

async fn simulate(seed: u64, opts: &SimOptions) -> SeedReport {
    let world: Shared = Arc::new(Mutex::new(World::new(seed, opts.verbose)));
    world.lock().strict = opts.strict;
    let origin = world.lock().origin;
    let mut rng = SplitMix::new(seed);
    let hubs = rng.range(3, 5) as usize;
    let brokers = rng.range(5, 20) as usize;
    let commands = if opts.soak {
        rng.range(200, 400)
    } else {
        rng.range(20, 60)
    } as usize;
    let store = Arc::new(AuditStore::new(Arc::clone(&world), opts.fault));
    let counter = Arc::new(AtomicU64::new(0));
    let ids: IdSource = Arc::new(move || {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        DispatchId::from_uuid(uuid::Uuid::from_u64_pair(n, seed))
    });
    let config = sim_config();
    world.lock().log(format!(
        "seed {seed}: {hubs} hubs, {brokers} brokers, {commands} commands, fault={:?}",
        opts.fault
    ));
    let mut sim = Sim {
        transport: FaultyTransport {
            inner: MemoryTransport::new(),
            world: Arc::clone(&world),
        },
        world: Arc::clone(&world),
        rng,
        store: Arc::clone(&store),
        ids,
        config: config.clone(),
        replicas: (0..hubs)
            .map(|_| Replica {
                hub: None,
                generation: 0,
                clock: Arc::new(SimClock {
                    origin,
                    skew_micros: AtomicI64::new(0),
                }),
                tasks: Vec::new(),
                restart_at: None,
            })
            .collect(),
        brokers: (0..brokers)
            .map(|i| BrokerSim {
                id: BrokerId::new(format!("b{i}")).expect("id"),
                conn: None,
                sessions: 0,
                reconnect_at: None,
                old: Vec::new(),
            })
            .collect(),
        origin,
        handles: Vec::new(),
    };
    for i in 0..hubs {
        sim.start_replica(i).await;
    }
    // Most brokers start connected; the rest come later (their work parks meanwhile).
    for b in 0..brokers {
        if sim.rng.chance(800) {
            let to = sim.pick_live();
            sim.connect(b, to).await;
        } else {
            sim.brokers[b].reconnect_at = Some(Instant::now() + sim.rng.millis(100, 1500));
        }
    }
    for n in 0..commands {
        let pause = sim.rng.millis(5, 60);
        tokio::time::sleep(pause).await;
        sim.due().await;
        sim.step(n).await;
    }
    // Settle: keep restarting and reconnecting until every originator has its answer and every
    // row's I3 bound has passed.
    let bound = terminal_bound(&config);
    let limit = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sim.due().await;
        let settled = sim.handles.iter().all(JoinHandle::is_finished);
        let last_bound = {
            let w = world.lock();
            w.inserts
                .values()
                .map(|r| r.at + deadline_offset(r) + bound)
                .max()
                .unwrap_or_default()
        };
        if (settled && origin.elapsed() > last_bound) || Instant::now() > limit {
            break;
        }
    }
    for r in &sim.replicas {
        if let Some(h) = &r.hub {
            h.abort();
        }
    }
    for h in &sim.handles {
        h.abort();
    }
    let rows = all_rows(&store.inner).await;
    let mut w = world.lock();
    check(&mut w, &rows, bound, &config);
    let simulated = origin.elapsed();
    SeedReport {
        seed,
        digest: w.digest,
        trace: std::mem::take(&mut w.trace),
        violations: w.violations.clone(),
        events: w.events,
        rows: rows.len(),
        executions: w.executions.values().map(Vec::len).sum(),
        simulated,
        stale_starts: w.stale_starts,
        lapsed_overlaps: w.lapsed_overlaps,
        releases: w.releases.values().sum(),
        keyed_executions: w
            .execs
            .iter()
            .filter(|e| w.inserts.get(&e.id).is_some_and(|r| r.key.is_some()))
            .count(),
    }
}

/// How long after the insert (in true time) its deadline falls.
fn deadline_offset(r: &InsertRec) -> Duration {
    r.deadline
        .map_or(Duration::ZERO, |d| d.duration_since(r.now))
}

async fn all_rows(store: &MemoryStore) -> Vec<Dispatch> {
    list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await
    .expect("list")
}

/// The end-of-run checks (I1, I2, I4, I5, I7, I8, I10 and most of I9 are checked as the history
/// unfolds; see `World::executed`):
///
/// - **I3**: every row is terminal, and became so within its deadline (converted to true time
///   from the insert's own clock) plus [`terminal_bound`].
/// - **I6**: every originator's outcome equals the row's final state: `Ok(v)` ⇔ `Done` with
///   result `v`; `Failed { reason }` ⇔ `Failed` with that reason; `TimedOut { Failed }` ⇔
///   `Failed(Cancelled)`; `TimedOut { InProgress }` ⇒ the row was claimed (attempt ≥ 1);
///   `TimedOut` in any other state is a violation. Local fast-path results (no row) must match
///   an execution of that id and attempt; a fast-path failure with no row (`Failed(Error)`, or
///   `Failed(Expired)` when its retry could not have started before the command's deadline)
///   must match an execution of that id.
/// - **I9** (the refresh cadence): [`check_refresh_cadence`].
/// - **I11**: [`check_key_order`].
fn check(w: &mut World, rows: &[Dispatch], bound: Duration, cfg: &HubConfig) {
    let by_id: BTreeMap<DispatchId, &Dispatch> = rows.iter().map(|d| (d.id, d)).collect();
    let inserts: Vec<(DispatchId, InsertRec)> =
        w.inserts.iter().map(|(k, v)| (*k, v.clone())).collect();
    for (id, ins) in inserts {
        let limit = ins.at + deadline_offset(&ins) + bound;
        match (by_id.get(&id), w.terminal.get(&id).cloned()) {
            (Some(d), _) if !d.state.is_terminal() => w.violate(
                "I3",
                format!(
                    "{id} is still {} at the end (bound {}ms)",
                    d.state,
                    limit.as_millis()
                ),
            ),
            (_, Some(t)) if t.at > limit => w.violate(
                "I3",
                format!(
                    "{id} became terminal at {}ms, after its bound {}ms",
                    t.at.as_millis(),
                    limit.as_millis()
                ),
            ),
            (None, _) => w.violate("I3", format!("{id} was written and then lost")),
            _ => {}
        }
    }
    let outcomes = std::mem::take(&mut w.outcomes);
    for o in &outcomes {
        if let Some(v) = check_outcome(w, &by_id, o) {
            w.violate("I6", v);
        }
    }
    w.outcomes = outcomes;
    check_refresh_cadence(w, cfg);
    check_key_order(w);
}

/// I9's bound on how long a node may go on believing it holds a connection that a newer one
/// elsewhere replaced: it asks the store (an affinity refresh of that session) within
/// `1.25 × freshness / 3` (the jittered refresh period) of the newer connect, unless it saw the
/// socket go or crashed first.
fn check_refresh_cadence(w: &mut World, cfg: &HubConfig) {
    let period = cfg.freshness / 3 * 5 / 4 + Duration::from_millis(1);
    let end = w.elapsed();
    let mut late = Vec::new();
    for (broker, holds) in &w.holds {
        for h in holds {
            let Some((at, _)) = h.superseded else {
                continue;
            };
            let by = at + period;
            let asked = h.asked.is_some_and(|a| a <= by);
            let told = h.told.is_some_and(|(t, _)| t <= by);
            let gone = h.ended.is_some_and(|(e, _)| e <= by);
            if by > end || told || asked || gone {
                continue;
            }
            late.push(format!(
                "{broker}: {} on {} was superseded at {}ms and not refreshed within {}ms (first refresh: {:?})",
                h.session,
                h.node,
                at.as_millis(),
                period.as_millis(),
                h.asked.map(|a| a.as_millis())
            ));
        }
    }
    for v in late {
        w.violate("I9", v);
    }
}

/// **I11, per-key order**: for each broker and ordering key (from the insert records), the
/// executions of the key's rows never overlap in time (each starts after every earlier one of
/// the key ended: returned, or was dropped by a timeout or a crash), and follow insertion order:
/// no execution of a row starts after an execution of a younger row of the key (by the store's
/// `(created_at, id)`) had been claimed, if the older row was already written then. Re-executions
/// of one row keep its place.
///
/// Bound: two executions of a key may overlap only if the first one's claim no longer held its
/// row when the second was claimed — its lease had run out by the second claimer's clock (its
/// holder lost the store and could not renew, yet its executor ran on, up to
/// `execute_timeout`), or its outcome was already recorded or the row was already terminal (a
/// timed-out execution is dropped only once its outcome is durable). Those are counted in `lapsed_overlaps`; the strict form
/// (no overlap at all) would need the hub to stop an execution whose lease it can no longer
/// renew before the lease runs out.
fn check_key_order(w: &mut World) {
    let mut by_key: BTreeMap<(BrokerId, String), Vec<&ExecRec>> = BTreeMap::new();
    for e in &w.execs {
        if let Some(key) = w.inserts.get(&e.id).and_then(|r| r.key.clone()) {
            by_key.entry((e.broker.clone(), key)).or_default().push(e);
        }
    }
    let mut found = Vec::new();
    let mut lapsed = 0;
    for ((broker, key), execs) in &by_key {
        // `execs` is in start order (the log is appended as executions start).
        for (i, e) in execs.iter().enumerate() {
            for r in execs[..i]
                .iter()
                .filter(|r| r.end.is_none_or(|(_, s)| s > e.start_seq))
            {
                // Did the first of the two claims still hold its row when the second was made
                // (by the second claimer's clock, as the store judged it)?
                let claim = |x: &ExecRec| {
                    let h = *w.holding.get(&(x.id, x.attempt))?;
                    let now = w.claimed.get(&(x.id, x.attempt))?.1;
                    Some((h, now))
                };
                let held = match (claim(r), claim(e)) {
                    (Some(a), Some(b)) => {
                        let (first, second) = if a.0.claimed < b.0.claimed {
                            (a, b)
                        } else {
                            (b, a)
                        };
                        first.0.finished.is_none_or(|f| f > second.0.claimed)
                            && first.0.until > second.1
                    }
                    _ => true,
                };
                if held {
                    found.push(format!(
                        "{broker}/{key}: {} (attempt {} on {}) started at {}ms while {} (attempt {} on {}) still ran and held its row",
                        e.id, e.attempt, e.node, e.start.as_millis(), r.id, r.attempt, r.node
                    ));
                } else {
                    lapsed += 1;
                    if w.strict {
                        found.push(format!(
                            "(strict) {broker}/{key}: {} (attempt {} on {}) started at {}ms while {} (attempt {} on {}) still ran, after its claim lapsed",
                            e.id, e.attempt, e.node, e.start.as_millis(), r.id, r.attempt, r.node
                        ));
                    }
                }
            }
            let mine = &w.inserts[&e.id];
            for earlier in &execs[..i] {
                let theirs = &w.inserts[&earlier.id];
                // Order is decided at the claim: the older row must have existed by then.
                let decided = w
                    .holding
                    .get(&(earlier.id, earlier.attempt))
                    .map_or(earlier.start_seq, |h| h.claimed);
                if earlier.id != e.id
                    && (mine.now, e.id) < (theirs.now, earlier.id)
                    && mine.seq < decided
                {
                    found.push(format!(
                        "{broker}/{key}: {} started at {}ms after the younger {} had started at {}ms",
                        e.id,
                        e.start.as_millis(),
                        earlier.id,
                        earlier.start.as_millis()
                    ));
                    break;
                }
            }
        }
    }
    w.lapsed_overlaps += lapsed;
    for v in found {
        w.violate("I11", v);
    }
}

fn check_outcome(w: &World, rows: &BTreeMap<DispatchId, &Dispatch>, o: &Outcome) -> Option<String> {
    let local_ran = |id: DispatchId, attempt: Option<u32>| {
        w.executions
            .get(&id)
            .is_some_and(|runs| attempt.is_none_or(|a| runs.contains(&a)))
    };
    match o {
        Outcome::Send(Ok(id)) => (!rows.contains_key(id)).then(|| format!("sent {id} has no row")),
        Outcome::Send(Err(_)) => None,
        Outcome::Dispatch(Ok(v)) => {
            let id = v["id"].as_str().and_then(|s| DispatchId::parse(s).ok())?;
            match rows.get(&id) {
                Some(d) if d.state == DispatchState::Done && d.result.as_ref() == Some(v) => None,
                Some(d) => Some(format!(
                    "originator got Ok({v}) but the row is {}",
                    brief(d)
                )),
                None if local_ran(id, v["attempt"].as_u64().map(|a| a as u32)) => None,
                None => Some(format!("originator got Ok({v}) for an id nobody executed")),
            }
        }
        Outcome::Dispatch(Err(Error::Failed { id, reason })) => match rows.get(id) {
            Some(d) if d.state == DispatchState::Failed && d.failure.as_ref() == Some(reason) => {
                None
            }
            Some(d) => Some(format!(
                "originator got Failed({reason}) but the row is {}",
                brief(d)
            )),
            // The fast path fails a command fatally, or as expired when its retry could not start
            // before the command's deadline, without writing a row.
            None if matches!(reason, FailReason::Error(_) | FailReason::Expired)
                && local_ran(*id, None) =>
            {
                None
            }
            None => Some(format!(
                "originator got Failed({reason}) for {id}, which has no row"
            )),
        },
        Outcome::Dispatch(Err(Error::TimedOut { id, last_state })) => {
            let Some(d) = rows.get(id) else {
                return Some(format!("TimedOut for {id}, which has no row"));
            };
            match last_state {
                DispatchState::Failed
                    if d.state == DispatchState::Failed
                        && d.failure == Some(FailReason::Cancelled) =>
                {
                    None
                }
                DispatchState::InProgress if d.attempt >= 1 => None,
                s => Some(format!(
                    "originator got TimedOut({s}) but the row is {}",
                    brief(d)
                )),
            }
        }
        Outcome::Dispatch(Err(_)) => None,
    }
}

/// Keeps the deliberate executor panics from flooding stderr; every other panic still prints.
fn quiet_simulated_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with("simulated panic") {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// Command line

/// The deterministic cluster simulation: seeded runs of several hubs over one store with
/// faults injected, each checked against the invariants.
#[derive(Debug, clap::Parser)]
#[command(name = "simulate")]
struct Cli {
    /// Seeds to run: N (0..N) or A..B.
    #[arg(long, value_name = "N|A..B", default_value = "200", value_parser = parse_seeds, conflicts_with = "seed")]
    seeds: std::ops::Range<u64>,
    /// Replay one seed, printing its trace.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Longer runs per seed.
    #[arg(long)]
    soak: bool,
    /// Also check the strict invariants.
    #[arg(long)]
    strict: bool,
    /// Disable one store guard, to see the simulation catch it.
    #[arg(long, value_name = "NAME", value_parser = parse_fault)]
    fault: Option<SimFault>,
}

fn parse_seeds(v: &str) -> Result<std::ops::Range<u64>, String> {
    match v.split_once("..") {
        Some((lo, hi)) => Ok(lo.parse().map_err(|e| format!("{v}: {e}"))?
            ..hi.parse().map_err(|e| format!("{v}: {e}"))?),
        None => Ok(0..v.parse().map_err(|e| format!("{v}: {e}"))?),
    }
}

fn parse_fault(name: &str) -> Result<SimFault, String> {
    SimFault::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let names: Vec<&str> = SimFault::ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown fault {name} (one of {})", names.join(", "))
        })
}

struct Args {
    seeds: std::ops::Range<u64>,
    opts: SimOptions,
}

fn main() {
    let cli = <Cli as clap::Parser>::parse();
    let mut opts = SimOptions {
        soak: cli.soak,
        strict: cli.strict,
        fault: cli.fault,
        ..SimOptions::default()
    };
    let seeds = match cli.seed {
        Some(s) => {
            opts.verbose = true;
            s..s + 1
        }
        None => cli.seeds,
    };
    let args = Args { seeds, opts };
    let started = std::time::Instant::now();
    let (mut n, mut bad, mut events, mut rows) = (0u64, 0u64, 0u64, 0usize);
    let (mut execs, mut keyed, mut stale, mut releases) = (0usize, 0usize, 0usize, 0u32);
    let mut lapsed = 0usize;
    for seed in args.seeds.clone() {
        let report = run_seed(seed, &args.opts);
        n += 1;
        events += report.events;
        rows += report.rows;
        execs += report.executions;
        keyed += report.keyed_executions;
        stale += report.stale_starts;
        releases += report.releases;
        lapsed += report.lapsed_overlaps;
        for line in &report.trace {
            println!("{line}");
        }
        if args.opts.verbose {
            println!(
                "seed {seed}: digest={:016x} events={} rows={} executions={} simulated={}ms",
                report.digest,
                report.events,
                report.rows,
                report.executions,
                report.simulated.as_millis()
            );
        }
        if let Some(v) = report.violations.first() {
            bad += 1;
            println!(
                "violation seed={seed} {}: {} (replay: --seed {seed})",
                v.invariant, v.detail
            );
        }
    }
    eprintln!(
        "simulate: {n} seeds, {events} events, {rows} rows, {execs} executions ({keyed} keyed), {releases} hand-backs, {stale} starts on a superseded connection before its node was told, {lapsed} same-key overlaps after a lapsed claim, in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!("simulate: seeds={n} violations={bad}");
    if bad > 0 {
        std::process::exit(1);
    }
}
