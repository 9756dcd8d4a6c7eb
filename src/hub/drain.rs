//! Per-broker drains: claim only what can start now, start each claimed row at once, refill
//! slots as executions end.
//!
//! One runner task per broker connected here. A broker runs up to `max_in_flight` executions
//! at once ([`HubConfig::max_in_flight`](super::HubConfig::max_in_flight), overridable per
//! broker). The runner claims at most the number of free slots, so no claimed row ever waits
//! behind another row's execution: before it starts, each row is checked against its deadline
//! (measured conservatively from before the claim request left, on the monotonic clock) and
//! against the session it was claimed under; a late row ends `Failed(Expired)` unexecuted, a row
//! whose broker left (or a hub shutting down) is handed back without using up an execution.
//!
//! Signals are coalesced: a signal during a claim marks the runner dirty, which schedules one
//! more claim once slots are free, never a queue of claims. Outcomes are written by the broker's
//! [`finisher`](super::finish) in group commits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::finish::Finisher;
use super::{instant_after, lease, Shared};
use crate::fsm::{BrokerId, SessionId};
use crate::store::{ClaimParams, Claimed};

/// One broker's runner: its slots, its pending wake-up, its finisher and its tasks.
#[derive(Debug)]
pub(crate) struct Runner {
    pub(crate) broker: BrokerId,
    /// Another claim was asked for (a signal, a freed slot after a full claim, a retry).
    dirty: AtomicBool,
    /// Wakes the runner: a signal, a slot freed, the broker left, shutdown.
    wake: Notify,
    /// Executions running now (slots in use).
    in_flight: AtomicU32,
    /// The last claim was full: the broker has a backlog, so slots are refilled in batches.
    backlog: AtomicBool,
    pub(crate) finisher: Finisher,
    /// The runner's own task and its finisher's.
    tasks: Mutex<Vec<AbortHandle>>,
    /// The executions it started.
    execs: Mutex<JoinSet<()>>,
}

impl Runner {
    fn new(broker: BrokerId) -> Self {
        Runner {
            broker,
            dirty: AtomicBool::new(true),
            wake: Notify::new(),
            in_flight: AtomicU32::new(0),
            backlog: AtomicBool::new(false),
            finisher: Finisher::new(),
            tasks: Mutex::new(Vec::new()),
            execs: Mutex::new(JoinSet::new()),
        }
    }

    /// Stops everything at once: the runner, its finisher and every execution it started.
    pub(crate) fn abort(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.execs.lock().abort_all();
    }

    /// Asks for another look without setting the dirty flag (the broker left, shutdown).
    pub(crate) fn poke(&self) {
        self.wake.notify_one();
    }

    /// An execution ended (or a claimed row was settled without one): its slot is free.
    pub(crate) fn slot_freed(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Executions running now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the broker has a backlog (the last claim was full).
    pub(crate) fn has_backlog(&self) -> bool {
        self.backlog.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.finisher.is_idle()
    }
}

/// The brokers' runners, by broker.
pub(crate) type Runners = Mutex<BTreeMap<BrokerId, Arc<Runner>>>;

/// Makes sure `broker`'s runner looks for work soon: starts one, or marks the running one dirty.
pub(crate) fn schedule(sh: &Arc<Shared>, broker: &BrokerId) {
    let mut drains = sh.drains.lock();
    if let Some(r) = drains.get(broker) {
        r.dirty.store(true, Ordering::Release);
        r.wake.notify_one();
        return;
    }
    if sh.is_shutting_down() {
        return;
    }
    let r = Arc::new(Runner::new(broker.clone()));
    let run = tokio::spawn(run(Arc::clone(sh), Arc::clone(&r)));
    let finish = tokio::spawn(super::finish::run(Arc::clone(sh), Arc::clone(&r)));
    r.tasks
        .lock()
        .extend([run.abort_handle(), finish.abort_handle()]);
    drains.insert(broker.clone(), r);
}

/// Wakes `broker`'s runner, if any, so it notices a change (the broker left, shutdown).
pub(crate) fn poke(sh: &Shared, broker: &BrokerId) {
    if let Some(r) = sh.drains.lock().get(broker) {
        r.poke();
    }
}

/// Forgets a runner that ended without leaving on its own (a panic, or an abort), so the next
/// signal starts a fresh one instead of marking a dead one dirty forever.
struct Forget {
    sh: Arc<Shared>,
    r: Arc<Runner>,
    left: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let mut drains = self.sh.drains.lock();
        if drains
            .get(&self.r.broker)
            .is_some_and(|x| Arc::ptr_eq(x, &self.r))
        {
            drains.remove(&self.r.broker);
        }
        drop(drains);
        self.r.finisher.stop();
    }
}

async fn run(sh: Arc<Shared>, r: Arc<Runner>) {
    let mut exit = Forget {
        sh: Arc::clone(&sh),
        r: Arc::clone(&r),
        left: false,
    };
    loop {
        let session = sh.local_session(&r.broker);
        let Some(session) = session.filter(|_| !sh.is_shutting_down()) else {
            // No more claims: let the running executions and their outcomes finish, then leave
            // (unless the broker came back meanwhile).
            if r.is_idle() {
                let mut drains = sh.drains.lock();
                let back = sh.local_session(&r.broker).is_some() && !sh.is_shutting_down();
                if !back {
                    if drains.get(&r.broker).is_some_and(|x| Arc::ptr_eq(x, &r)) {
                        drains.remove(&r.broker);
                    }
                    drop(drains);
                    r.finisher.stop();
                    exit.left = true;
                    return;
                }
                continue;
            }
            r.wake.notified().await;
            continue;
        };
        let limit = sh.max_in_flight(&r.broker);
        let free = limit.saturating_sub(r.in_flight.load(Ordering::Acquire));
        // Through a backlog, refill in batches: while outcomes are still being written (each
        // written batch frees more slots and wakes this runner), a claim for the first slot or
        // two to free up would cost a round trip and a commit for a row or two. Without a
        // backlog, or once nothing is left to write, free slots are filled at once.
        let refill = limit.min(sh.config.claim_batch);
        let batching = r.backlog.load(Ordering::Acquire) && free < refill && !r.finisher.is_idle();
        if free == 0 || batching || !r.dirty.swap(false, Ordering::AcqRel) {
            r.wake.notified().await;
            continue;
        }
        let want = free.min(sh.config.claim_batch);
        // Leases and deadlines are measured from before the request left, on the monotonic
        // clock: the store stamps the claim no earlier, so this node never believes in more time
        // than the store granted.
        let asked = Instant::now();
        let started = std::time::Instant::now();
        let claimed = sh
            .bounded(sh.store.claim(ClaimParams {
                broker: r.broker.clone(),
                node: sh.node.clone(),
                limit: want,
                lease: sh.config.lease,
                now: sh.store_now(),
            }))
            .await;
        metrics::histogram!("broker_dispatch_claim_seconds")
            .record(started.elapsed().as_secs_f64());
        match claimed {
            Ok(claimed) => {
                r.backlog
                    .store(claimed.len() as u32 >= want, Ordering::Release);
                if claimed.len() as u32 >= want {
                    // Maybe more: claim again once slots are free.
                    r.dirty.store(true, Ordering::Release);
                }
                if !claimed.is_empty() {
                    metrics::counter!("broker_dispatch_claimed_total")
                        .increment(claimed.len() as u64);
                }
                for c in claimed {
                    start(&sh, &r, c, &session, asked);
                }
            }
            Err(e) => {
                tracing::warn!(node = %sh.node, broker = %r.broker, error = %e, "claim failed; the next signal or catch-up retries");
            }
        }
    }
}

/// Starts a freshly claimed row at once (its execution decides, at the instant the executor
/// would start, whether it may: see [`lease::execute`]).
fn start(sh: &Arc<Shared>, r: &Arc<Runner>, c: Claimed, session: &SessionId, asked: Instant) {
    r.in_flight.fetch_add(1, Ordering::AcqRel);
    let start_by = start_by(&c, asked);
    let lease_until = instant_after(asked, sh.config.lease);
    let task = lease::execute(
        Arc::clone(sh),
        Arc::clone(r),
        c,
        session.clone(),
        lease_until,
        start_by,
    );
    let mut execs = r.execs.lock();
    // Reap the executions that ended, so the set stays as large as the slots.
    while execs.try_join_next().is_some() {}
    execs.spawn(task);
}

/// The last instant (monotonic) at which the claimed row may start, if it has a deadline:
/// `asked + (deadline - claimed_at)`, never later than the deadline itself since the store
/// stamped the claim after `asked`.
pub(crate) fn start_by(c: &Claimed, asked: Instant) -> Option<Instant> {
    let deadline = c.dispatch().deadline?;
    Some(instant_after(
        asked,
        deadline.duration_since(c.claimed_at()),
    ))
}
