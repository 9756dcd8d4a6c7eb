//! Writing outcomes: one finisher per broker runner, in group commits.
//!
//! Executions hand their outcome to the finisher and keep their lease until it is durable. The
//! finisher writes everything queued in one [`Store::finish_many`](crate::store::Store::finish_many)
//! call; outcomes that arrive while that call runs form the next batch. So a lone outcome is
//! written at once, and under load the batches grow by themselves.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::drain::{schedule, Runner};
use super::{instant_after, Shared};
use crate::error::StoreError;
use crate::fsm::{Dispatch, DispatchState, FailReason};
use crate::store::{Claimed, FinishParams, Outcome};
use crate::transport::Notice;

type Entry = (Claimed, Outcome, oneshot::Sender<()>);

/// How many scheduler turns a finisher waits, through a backlog, for the rest of a batch.
const GATHER_TURNS: usize = 8;

/// A broker's queue of outcomes waiting to be written.
#[derive(Debug, Default)]
pub(crate) struct Finisher {
    queue: Mutex<Vec<Entry>>,
    wake: Notify,
    /// A batch is being written.
    busy: AtomicBool,
    stopped: AtomicBool,
}

impl Finisher {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Queues an outcome; the receiver resolves once it is settled (durable, refused, or given
    /// up on after one lease of store failures).
    pub(crate) fn submit(&self, c: Claimed, outcome: Outcome) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.queue.lock().push((c, outcome, tx));
        self.wake.notify_one();
        rx
    }

    pub(crate) fn is_idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire) && self.queue.lock().is_empty()
    }

    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The finisher's task: write whatever is queued, as one batch, until stopped.
pub(crate) async fn run(sh: Arc<Shared>, r: Arc<Runner>) {
    let f = &r.finisher;
    loop {
        // Through a backlog, let the executions that are about to hand in their outcomes do
        // so first (a few turns of the scheduler, no timer): one commit then covers the batch
        // instead of one for the first outcome and one for the rest.
        if r.has_backlog() {
            for _ in 0..GATHER_TURNS {
                // (A slot is freed when its outcome is handed in: `in_flight` counts the
                // executions still running.)
                if f.queue.lock().is_empty() || r.in_flight() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let batch: Vec<Entry> = {
            let mut q = f.queue.lock();
            if !q.is_empty() {
                f.busy.store(true, Ordering::Release);
            }
            std::mem::take(&mut *q)
        };
        if batch.is_empty() {
            // Stopped, and no execution left that could still hand in an outcome.
            if f.stopped.load(Ordering::Acquire) && r.in_flight() == 0 {
                return;
            }
            f.wake.notified().await;
            continue;
        }
        let mut done = Vec::with_capacity(batch.len());
        let pending = batch
            .into_iter()
            .map(|(c, o, tx)| {
                done.push(tx);
                (c, o)
            })
            .collect();
        finish_durably(&sh, pending).await;
        for tx in done {
            let _ = tx.send(());
        }
        f.busy.store(false, Ordering::Release);
        r.poke();
    }
}

/// Finishes attempts (one store call for the lot), retrying store failures for up to one
/// lease: a completion must be durable before anyone is told. An outcome that cannot be written
/// is left to the lease, which runs out so that another attempt may run (at-least-once).
async fn finish_durably(sh: &Arc<Shared>, mut pending: Vec<(Claimed, Outcome)>) {
    // Keep trying for one lease: a short store outage (a foreign lock, a read-only moment, a
    // restart) must not turn a finished execution into a second one.
    let give_up_at = instant_after(Instant::now(), sh.config.lease);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        if pending.is_empty() {
            return;
        }
        if !first {
            let left = give_up_at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        first = false;
        let batch = pending
            .iter()
            .map(|(c, outcome)| {
                (
                    c.renewal_handle(),
                    FinishParams {
                        outcome: outcome.clone(),
                        now: sh.store_now(),
                    },
                )
            })
            .collect();
        let call = AssertUnwindSafe(sh.store.finish_many(batch)).catch_unwind();
        let results = match tokio::time::timeout(sh.config.store_timeout, call).await {
            Ok(Ok(results)) if results.len() == pending.len() => results,
            Ok(Err(panic)) => {
                tracing::error!(node = %sh.node, panic = %super::panic_message(&*panic), "the store panicked finishing a batch; retrying");
                continue;
            }
            Ok(Ok(_)) => {
                tracing::warn!(node = %sh.node, "store answered a finish batch with the wrong number of results; retrying");
                continue;
            }
            Err(_) => {
                tracing::debug!(node = %sh.node, "finish timed out; retrying");
                continue;
            }
        };
        let announced = sh.store.announces_finishes();
        let mut retry = Vec::new();
        for ((c, outcome), res) in pending.into_iter().zip(results) {
            let id = c.id();
            match res {
                Ok(d) => finished(sh, &d, announced).await,
                Err(e @ (StoreError::Unavailable(_) | StoreError::Backend(_))) => {
                    tracing::debug!(%id, error = %e, "finish failed; retrying");
                    retry.push((c, outcome));
                }
                Err(e @ (StoreError::Fenced { .. } | StoreError::Illegal { .. })) => {
                    // A batch retried after a timeout or a lost answer may have landed the
                    // first time: then the row shows this very outcome, and the refusal is the
                    // store refusing it twice, not another holder's work.
                    match landed(sh, &c, &outcome).await {
                        Some(d) => finished(sh, &d, announced).await,
                        None => fenced(sh, id, &e),
                    }
                }
                Err(e) => fenced(sh, id, &e),
            }
        }
        pending = retry;
    }
    for (c, _) in pending {
        tracing::warn!(node = %sh.node, id = %c.id(), "could not record the outcome; the lease will run out and the dispatch be re-claimed");
    }
}

fn fenced(sh: &Shared, id: crate::fsm::DispatchId, e: &StoreError) {
    metrics::counter!("broker_dispatch_fenced_total").increment(1);
    tracing::warn!(node = %sh.node, %id, error = %e, "finish rejected: this node no longer holds the attempt");
}

/// The row as it is now, if it shows `outcome` applied by the holder of `c`'s attempt: same
/// attempt, and the state, result, failure and hand-back count that outcome leaves. `None` if
/// it shows anything else, or cannot be read.
async fn landed(sh: &Shared, c: &Claimed, outcome: &Outcome) -> Option<Dispatch> {
    let row = match sh.bounded(sh.store.get(c.id())).await {
        Ok(Some(row)) => row,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(id = %c.id(), error = %e, "could not re-read a refused finish");
            return None;
        }
    };
    let held = c.dispatch();
    if row.attempt != held.attempt {
        return None;
    }
    let applied = match outcome {
        Outcome::Complete(v) => row.state == DispatchState::Done && row.result.as_ref() == Some(v),
        Outcome::Fail(m) => {
            row.state == DispatchState::Failed
                && matches!(&row.failure, Some(FailReason::Error(f)) if f == m)
        }
        Outcome::Late => {
            row.state == DispatchState::Failed && row.failure == Some(FailReason::Expired)
        }
        Outcome::Retry { .. } => {
            row.state == DispatchState::Pending && row.released == held.released
        }
        Outcome::Release => {
            row.state == DispatchState::Pending
                && Some(row.released) == held.released.checked_add(1)
        }
    };
    applied.then_some(row)
}

/// What follows a durable finish: metrics, another look for a row handed back or retried, and
/// the event for its waiters (unless the store already announced it with the write).
async fn finished(sh: &Arc<Shared>, d: &Dispatch, announced: bool) {
    match d.state {
        DispatchState::Done => {
            metrics::counter!("broker_dispatch_done_total").increment(1);
            let latency = sh.now().duration_since(d.created_at);
            metrics::histogram!("broker_dispatch_intent_to_done_seconds")
                .record(latency.as_secs_f64());
        }
        DispatchState::Failed => {
            let reason = d.failure.as_ref().map_or("error", |f| f.kind());
            metrics::counter!("broker_dispatch_failed_total", "reason" => reason).increment(1);
        }
        DispatchState::Pending | DispatchState::InProgress => {}
    }
    // Retried or handed back, its owner (maybe this node) must look again; and a keyed row that
    // ended frees its key, so the key's next row can be claimed now rather than at the next
    // catch-up poll.
    if d.state == DispatchState::Pending || (d.key.is_some() && d.state.is_terminal()) {
        if sh.local_session(&d.broker).is_some() {
            schedule(sh, &d.broker);
        } else {
            sh.publish(Notice::Signal {
                broker: d.broker.clone(),
            })
            .await;
        }
    }
    if !announced {
        sh.publish(Notice::Event { id: d.id }).await;
    }
}
