//! Per-broker drains: claim a batch, execute each item on the local connection, renew leases
//! while it runs, finish fenced by attempt.
//!
//! One drain task per broker, coalesced: a signal during a drain sets a flag that schedules one
//! more pass, never a queue of passes. Drains run off the listener task, so a slow executor never
//! blocks notices (fixes the reference's head-of-line blocking).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{instant_after, run_guarded, ExecContext, Shared};
use crate::error::{Error, ExecError, StoreError};
use crate::fsm::{BrokerId, Dispatch, DispatchId, DispatchState, Progress, SessionId};
use crate::store::{ClaimParams, Claimed, FinishParams, HeartbeatParams, Outcome};
use crate::transport::Notice;

/// A running drain: its task, and whether another pass was asked for meanwhile.
#[derive(Debug)]
pub(crate) struct DrainSlot {
    again: bool,
    task: Option<AbortHandle>,
}

impl DrainSlot {
    pub(crate) fn abort(&self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Makes sure a drain of `broker` runs soon: starts one, or asks the running one for one more
/// pass.
pub(crate) fn schedule(sh: &Arc<Shared>, broker: &BrokerId) {
    let mut drains = sh.drains.lock();
    if let Some(slot) = drains.get_mut(broker) {
        slot.again = true;
        return;
    }
    if sh.is_shutting_down() {
        return;
    }
    let task = tokio::spawn(run(Arc::clone(sh), broker.clone()));
    drains.insert(
        broker.clone(),
        DrainSlot {
            again: false,
            task: Some(task.abort_handle()),
        },
    );
}

async fn run(sh: Arc<Shared>, broker: BrokerId) {
    loop {
        let started = Instant::now();
        pass(&sh, &broker).await;
        metrics::histogram!("broker_dispatch_drain_seconds")
            .record(started.elapsed().as_secs_f64());
        let mut drains = sh.drains.lock();
        match drains.get_mut(&broker) {
            Some(slot) if slot.again && !sh.is_shutting_down() => slot.again = false,
            _ => {
                drains.remove(&broker);
                return;
            }
        }
    }
}

/// Claims and executes until the broker has no claimable work, leaves this node, or the hub
/// shuts down. A batch's outcomes are written before the next claim: claiming first could
/// re-claim one of this node's own rows whose lease lapsed while its outcome was pending, and
/// run it a second time.
async fn pass(sh: &Arc<Shared>, broker: &BrokerId) {
    let batch = sh.config.claim_batch as usize;
    while let Some((session, claimed, lease_until)) = claim_next(sh, broker).await {
        let full = claimed.len() >= batch;
        execute_batch(sh, broker, &session, claimed, lease_until)
            .await
            .finish(sh, broker)
            .await;
        if !full {
            return;
        }
    }
}

/// The broker's next batch, with the session it was claimed under and the instant (monotonic)
/// until which its leases are known to hold; `None` when there is nothing to claim, the broker
/// is no longer connected here, the hub is shutting down, or the claim failed.
async fn claim_next(
    sh: &Arc<Shared>,
    broker: &BrokerId,
) -> Option<(SessionId, Vec<Claimed>, Instant)> {
    if sh.is_shutting_down() {
        return None;
    }
    let session = sh.local_session(broker)?;
    // The lease is measured from before the request left, on the monotonic clock: the store
    // stamps it no earlier, so this node never believes in a lease the store dropped.
    let asked = Instant::now();
    let claimed = sh
        .bounded(sh.store.claim(ClaimParams {
            broker: broker.clone(),
            node: sh.node.clone(),
            limit: sh.config.claim_batch,
            lease: sh.config.lease,
            now: sh.store_now(),
        }))
        .await;
    match claimed {
        Ok(c) if c.is_empty() => None,
        Ok(c) => {
            metrics::counter!("broker_dispatch_claimed_total").increment(c.len() as u64);
            Some((session, c, instant_after(asked, sh.config.lease)))
        }
        Err(e) => {
            tracing::warn!(node = %sh.node, %broker, error = %e, "claim failed; the next signal or catch-up retries");
            None
        }
    }
}

/// A batch whose executions are over and whose outcomes remain to be written. Its leases are
/// renewed until then.
struct Finishing {
    held: Held,
    outcomes: Vec<(Claimed, Outcome)>,
    released: bool,
    _renewal: AbortOnDrop,
}

impl Finishing {
    async fn finish(self, sh: &Arc<Shared>, broker: &BrokerId) {
        finish_durably(sh, &self.held, self.outcomes).await;
        if self.released {
            sh.publish(Notice::Signal {
                broker: broker.clone(),
            })
            .await;
        }
    }
}

/// Aborts a task when dropped (so an aborted drain also stops its lease renewals).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The claims of a batch this node still holds, each with the instant (monotonic) until which
/// its lease is known to hold.
type Held = Arc<Mutex<BTreeMap<DispatchId, (Claimed, Instant)>>>;

/// How long a finished execution's outcome may wait to be written with later ones. Outcomes of
/// fast executions are written together (one store call per batch instead of one per dispatch);
/// once the oldest has waited this long, they are written while the next execution runs.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

async fn execute_batch(
    sh: &Arc<Shared>,
    broker: &BrokerId,
    session: &SessionId,
    claimed: Vec<Claimed>,
    lease_until: Instant,
) -> Finishing {
    let held: Held = Arc::new(Mutex::new(
        claimed
            .iter()
            .map(|c| (c.id(), (c.renewal_handle(), lease_until)))
            .collect(),
    ));
    let renewal =
        AbortOnDrop(tokio::spawn(renew(Arc::clone(sh), Arc::clone(&held))).abort_handle());
    // Outcomes not yet written, and when the oldest of them was decided.
    let mut outcomes: Vec<(Claimed, Outcome)> = Vec::with_capacity(claimed.len());
    let mut oldest = Instant::now();
    let mut released = false;
    for c in claimed {
        let still_here = sh.local_session(broker).as_ref() == Some(session);
        if sh.is_shutting_down() || !still_here {
            // Hand it back unexecuted instead of re-routing from inside the drain: the
            // broker's new owner (or this node after a reconnect) claims it on the signal
            // sent once the release is durable.
            if outcomes.is_empty() {
                oldest = Instant::now();
            }
            outcomes.push((c, Outcome::Release));
            released = true;
            continue;
        }
        if !still_held(sh, &held, &c).await {
            tracing::warn!(node = %sh.node, id = %c.id(), "lost the claim before executing; skipping");
            held.lock().remove(&c.id());
            continue;
        }
        let outcome = if outcomes.is_empty() {
            run_with_progress(sh, &c).await
        } else {
            let exec = run_with_progress(sh, &c);
            tokio::pin!(exec);
            let flush_at = oldest + FLUSH_AFTER;
            tokio::select! {
                biased;
                outcome = &mut exec => outcome,
                () = tokio::time::sleep_until(flush_at) => {
                    let earlier = std::mem::take(&mut outcomes);
                    let (outcome, ()) = tokio::join!(exec, finish_durably(sh, &held, earlier));
                    outcome
                }
            }
        };
        if outcomes.is_empty() {
            oldest = Instant::now();
        }
        outcomes.push((c, outcome));
    }
    Finishing {
        held,
        outcomes,
        released,
        _renewal: renewal,
    }
}

/// Whether this node may start executing `c`: it still holds the claim, with at least a renewal
/// period of lease left (else it renews first). A row waiting behind slow items of its batch
/// while renewals failed may have been expired, cancelled after a release, or re-claimed
/// meanwhile; running it then would be a zombie execution.
async fn still_held(sh: &Arc<Shared>, held: &Held, c: &Claimed) -> bool {
    let Some(valid_until) = held.lock().get(&c.id()).map(|h| h.1) else {
        return false;
    };
    if instant_after(Instant::now(), sh.config.lease / 3) < valid_until {
        return true;
    }
    match renew_one(sh, held, c).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(id = %c.id(), error = %e, "could not confirm the lease before executing");
            false
        }
    }
}

/// Extends one held claim's lease and records until when it now holds (measured from before the
/// request left, on the monotonic clock).
async fn renew_one(sh: &Arc<Shared>, held: &Held, c: &Claimed) -> Result<(), Error> {
    let asked = Instant::now();
    sh.bounded(sh.store.heartbeat(
        c,
        HeartbeatParams {
            lease: sh.config.lease,
            progress: None,
            now: sh.store_now(),
        },
    ))
    .await?;
    if let Some(h) = held.lock().get_mut(&c.id()) {
        h.1 = instant_after(asked, sh.config.lease);
    }
    Ok(())
}

/// Renews the lease of every held claim every `lease / 3`; drops claims the store says are lost.
async fn renew(sh: Arc<Shared>, held: Held) {
    let period = sh.config.lease / 3;
    loop {
        tokio::time::sleep(period).await;
        let handles: Vec<Claimed> = held.lock().values().map(|h| h.0.renewal_handle()).collect();
        for c in handles {
            match renew_one(&sh, &held, &c).await {
                Ok(()) => {}
                Err(Error::Store(StoreError::Fenced { .. } | StoreError::Illegal { .. })) => {
                    held.lock().remove(&c.id());
                }
                Err(e) => {
                    tracing::debug!(id = %c.id(), error = %e, "lease renewal failed; retrying next period")
                }
            }
        }
    }
}

/// Runs the executor, storing each progress report (which also renews the lease) and telling
/// the originator about it.
async fn run_with_progress(sh: &Arc<Shared>, c: &Claimed) -> Outcome {
    let d = c.dispatch();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = ExecContext::new(d.id, d.attempt, Some(tx));
    let exec = tokio::time::timeout(
        sh.config.execute_timeout,
        run_guarded(sh.executor.execute(ctx, d)),
    );
    tokio::pin!(exec);
    let mut seq = d.progress.as_ref().map_or(0, |p| p.seq);
    let result = loop {
        // Biased: a fixed polling order keeps seeded simulations replayable.
        tokio::select! {
            biased;
            r = &mut exec => break r,
            Some(detail) = rx.recv() => {
                seq += 1;
                let res = sh
                    .bounded(sh.store.heartbeat(
                        c,
                        HeartbeatParams {
                            lease: sh.config.lease,
                            progress: Some(Progress { seq, detail }),
                            now: sh.store_now(),
                        },
                    ))
                    .await;
                match res {
                    Ok(_) => sh.publish(Notice::Event { id: d.id }).await,
                    Err(e) => tracing::debug!(id = %d.id, error = %e, "progress report not stored"),
                }
            }
        }
    };
    match result {
        Ok(Ok(v)) => Outcome::Complete(v),
        Ok(Err(ExecError::Fatal(m))) => Outcome::Fail(m),
        Ok(Err(ExecError::Retryable { after, message })) => retry_or_fail(c, after, message),
        Err(_) => retry_or_fail(c, std::time::Duration::ZERO, "executor timed out".into()),
    }
}

fn retry_or_fail(c: &Claimed, after: std::time::Duration, message: String) -> Outcome {
    let d = c.dispatch();
    if d.attempt < d.max_attempts {
        Outcome::Retry { after }
    } else {
        Outcome::Fail(format!("{message} (no attempts left)"))
    }
}

/// Finishes attempts (one store call for the lot), retrying store failures for up to one
/// lease: a completion must be durable before anyone is told. An outcome that cannot be written
/// is left to the lease, which runs out so that another attempt runs (at-least-once). Every
/// attempt passed in is dropped from `held` once settled either way.
async fn finish_durably(sh: &Arc<Shared>, held: &Held, mut pending: Vec<(Claimed, Outcome)>) {
    // Keep trying for one lease: a short store outage (a foreign lock, a read-only moment, a
    // restart) must not turn a finished execution into a second one.
    let give_up_at = instant_after(Instant::now(), sh.config.lease);
    let mut backoff = std::time::Duration::from_millis(50);
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
            backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
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
        let results = match tokio::time::timeout(
            sh.config.store_timeout,
            sh.store.finish_many(batch),
        )
        .await
        {
            Ok(results) if results.len() == pending.len() => results,
            Ok(_) => {
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
                Ok(d) => {
                    held.lock().remove(&id);
                    finished(sh, &d, announced).await;
                }
                Err(e @ (StoreError::Unavailable(_) | StoreError::Backend(_))) => {
                    tracing::debug!(%id, error = %e, "finish failed; retrying");
                    retry.push((c, outcome));
                }
                Err(e) => {
                    held.lock().remove(&id);
                    metrics::counter!("broker_dispatch_fenced_total").increment(1);
                    tracing::warn!(node = %sh.node, %id, error = %e, "finish rejected: this node no longer holds the attempt");
                }
            }
        }
        pending = retry;
    }
    for (c, _) in pending {
        held.lock().remove(&c.id());
        tracing::warn!(node = %sh.node, id = %c.id(), "could not record the outcome; the lease will run out and the dispatch be re-claimed");
    }
}

/// What follows a durable finish: metrics, another drain pass for a row handed back, and the
/// event for its waiters (unless the store already announced it with the write).
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
        DispatchState::Pending => {
            // Retried or released: the owner (maybe this node) must look again.
            if sh.local_session(&d.broker).is_some() {
                schedule(sh, &d.broker);
            }
        }
        DispatchState::InProgress => {}
    }
    if !announced {
        sh.publish(Notice::Event { id: d.id }).await;
    }
}
