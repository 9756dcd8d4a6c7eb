//! One execution of a claimed row: the executor, bounded by `execute_timeout`, beside the lease
//! renewal that keeps the claim (every `lease / 3`, and at once with each progress report) until
//! the outcome is durable.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::drain::Runner;
use super::{instant_after, run_guarded, ExecContext, Shared};
use crate::error::{Error, ExecError, StoreError};
use crate::fsm::{Progress, SessionId};
use crate::store::{
    check_json, fit_failure_text, Claimed, HeartbeatParams, Outcome, MAX_DETAIL_BYTES,
    MAX_RESULT_BYTES,
};
use crate::transport::Notice;

/// Why a claimed row was not started.
enum NotStarted {
    /// Its deadline would have passed first.
    Late,
    /// The broker is no longer here under the session it was claimed for, or the hub is
    /// shutting down: hand it back, unexecuted.
    Gone,
}

/// How long before its lease is known to end an execution stops (or a claim is no longer
/// started): a tenth of the lease, for the skew between this node's monotonic view and the
/// store's clock, capped at a minute (no clock is that far off; an `Instant` minus a tenth of
/// a huge lease would land decades in the past).
fn stop_margin(sh: &Shared) -> Duration {
    (sh.config.lease / 10).min(Duration::from_secs(60))
}

/// An execution's start, as decided once: not yet, begun, or called off before it began.
const NOT_YET: u8 = 0;
const STARTED: u8 = 1;
const CALLED_OFF: u8 = 2;

/// Stops an execution's task; returns whether it had not begun (and now never will, so the
/// claim can be handed back). One of this and the task's own start wins, never both.
fn call_off<T>(started: &AtomicU8, exec: AbortOnDrop<T>) -> bool {
    let called_off = started
        .compare_exchange(NOT_YET, CALLED_OFF, Ordering::AcqRel, Ordering::Acquire)
        .is_ok();
    drop(exec);
    called_off
}

/// Whether the claimed row may start now: before its deadline (`start_by`, conservative), on
/// the session it was claimed under, while the hub accepts work. Checked at the very instant
/// the executor would be called, in the executor's own task: a check made earlier (when the row
/// was claimed, say) can be outrun by a busy runtime that polls the task late.
///
/// A claim whose reply came back so late that less than its stop margin is left (by this
/// node's monotonic clock, measured from before the request left) is handed back unstarted: the
/// row may already be another node's, and an execution started now could not renew in time.
fn may_start(
    sh: &Shared,
    broker: &crate::fsm::BrokerId,
    session: &SessionId,
    start_by: Option<Instant>,
    lease_until: Instant,
) -> Result<(), NotStarted> {
    let now = Instant::now();
    if start_by.is_some_and(|t| now >= t) {
        return Err(NotStarted::Late);
    }
    let last_start = lease_until
        .checked_sub(stop_margin(sh))
        .unwrap_or(lease_until);
    if now >= last_start {
        return Err(NotStarted::Gone);
    }
    if sh.is_shutting_down() || sh.local_session(broker).as_ref() != Some(session) {
        return Err(NotStarted::Gone);
    }
    Ok(())
}

/// Runs the executor on a claimed row (if it may still start: [`may_start`]), renews its lease
/// meanwhile, hands the outcome to the broker's finisher and keeps renewing until the finisher
/// has written it. A row that may not start is settled unexecuted: `Late` (it ends
/// `Failed(Expired)`) or `Release` (handed back without using an execution).
pub(crate) async fn execute(
    sh: Arc<Shared>,
    r: Arc<Runner>,
    c: Claimed,
    session: SessionId,
    lease_until: Instant,
    start_by: Option<Instant>,
) {
    let d = c.dispatch();
    let (progress_tx, mut progress_rx) = watch::channel(None::<serde_json::Value>);
    let ctx = ExecContext::new(
        d.id,
        d.attempt,
        d.executions(),
        Some(session.clone()),
        Some(progress_tx),
    );
    // The executor runs in a task of its own, so that a slow store answering a renewal or a
    // progress report never stalls it; dropping this execution (an aborted hub) stops it too.
    // Whether this claim began an execution: the task sets STARTED in the same poll that calls
    // the executor, the lease watch below sets CALLED_OFF when it gives up first; one wins.
    let started = Arc::new(AtomicU8::new(NOT_YET));
    // Registered for cancellation (of the dispatch, the connection, the hub) until it ends.
    let running = sh.running.register(d.id, d.broker.clone(), session.clone());
    let mut exec = {
        let sh = Arc::clone(&sh);
        let dispatch = d.clone();
        let session = session.clone();
        let started = Arc::clone(&started);
        let cancel = running.cancel();
        AbortOnDrop(tokio::spawn(async move {
            may_start(&sh, &dispatch.broker, &session, start_by, lease_until)?;
            // The connection's handle, as it is now: if the session left meanwhile, it is gone.
            let Some(handle) = sh.conn_handle(&dispatch.broker, &session) else {
                return Err(NotStarted::Gone);
            };
            let ctx = ctx.on(Some(handle), cancel);
            if started
                .compare_exchange(NOT_YET, STARTED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(NotStarted::Gone);
            }
            metrics::counter!("broker_dispatch_started_total").increment(1);
            // Called in the same poll as the check above: nothing runs in between.
            let run = run_guarded(sh.executor.execute(ctx, &dispatch));
            Ok(tokio::time::timeout(sh.config.execute_timeout, run).await)
        }))
    };
    let mut abandon = sh.abandon.subscribe();
    let mut renewal = Renewal::new(&sh, lease_until);
    let mut seq = d.progress.as_ref().map_or(0, |p| p.seq);
    let mut progress_open = true;
    let result = loop {
        // Biased: a fixed polling order keeps seeded simulations replayable.
        tokio::select! {
            biased;
            r = &mut exec.0 => break r.unwrap_or_else(|e| {
                // Only an abort ends the task otherwise (panics are caught inside it).
                Ok(Ok(Err(ExecError::Fatal(format!("execution task ended: {e}")))))
            }),
            changed = progress_rx.changed(), if progress_open => {
                if changed.is_err() {
                    progress_open = false;
                    continue;
                }
                let detail = progress_rx.borrow_and_update().clone();
                let detail = detail.filter(|detail| match check_json("progress detail", detail, MAX_DETAIL_BYTES) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(id = %d.id, error = %e, "progress report dropped");
                        false
                    }
                });
                if let Some(detail) = detail {
                    seq += 1;
                    if renewal.renew(&sh, &c, Some(Progress { seq, detail })).await {
                        sh.publish(Notice::Event { id: d.id }).await;
                    }
                }
            }
            () = tokio::time::sleep_until(renewal.next) => {
                renewal.renew(&sh, &c, None).await;
            }
            () = tokio::time::sleep_until(renewal.hold_ends(&sh)) => {
                // The claim could not be kept (the store is out of reach, or it says the row
                // moved on): stop the execution before the lease runs out, so it never runs
                // beside the next holder of the row or of its ordering key. The row is
                // re-claimed once the lease has lapsed.
                if call_off(&started, exec) {
                    // Never begun (the claim's answer came too late to start it): hand it back
                    // without using up an execution, while the claim still holds.
                    break Err(NotStarted::Gone);
                }
                metrics::counter!("broker_dispatch_abandoned_total").increment(1);
                tracing::warn!(node = %sh.node, id = %d.id, "lease about to run out without a renewal; execution stopped");
                r.slot_freed();
                return;
            }
            () = async { let _ = abandon.wait_for(|a| *a).await; } => {
                // Shutdown reached its timeout. A claim not yet begun is handed back while the
                // claim still holds; an execution that began is stopped with nothing recorded
                // (how far it got is unknown), and its row is re-claimed after the lease.
                if call_off(&started, exec) {
                    break Err(NotStarted::Gone);
                }
                metrics::counter!("broker_dispatch_abandoned_total").increment(1);
                tracing::warn!(node = %sh.node, id = %d.id, "shutdown timeout; execution stopped, its lease will run out");
                r.slot_freed();
                return;
            }
        }
    };
    // The executor has returned: nothing is left to cancel, and dropping the registration now
    // keeps the notice of its own finish from sending the listener to re-read the row.
    drop(running);
    let result = match result {
        Ok(started) => started,
        Err(not_started) => {
            let outcome = match not_started {
                NotStarted::Late => {
                    metrics::counter!("broker_dispatch_late_total").increment(1);
                    tracing::debug!(node = %sh.node, id = %d.id, "its deadline passed before it could start; not starting it");
                    Outcome::Late
                }
                NotStarted::Gone => Outcome::Release,
            };
            let done = r.finisher.submit(c.renewal_handle(), outcome);
            r.slot_freed();
            let _ = done.await;
            return;
        }
    };
    let outcome = match result {
        // A result no store could hold (or read back) fails the dispatch rather than leaving
        // it to lapse and run again.
        Ok(Ok(v)) => match check_json("result", &v, MAX_RESULT_BYTES) {
            Ok(()) => Outcome::Complete(v),
            Err(e) => Outcome::Fail(format!("executor result refused: {e}")),
        },
        Ok(Err(ExecError::Fatal(m))) => Outcome::Fail(m),
        Ok(Err(ExecError::Retryable { after, message })) => {
            retry_or_fail(&c, after, message, start_by)
        }
        Err(_) => retry_or_fail(&c, Duration::ZERO, "executor timed out".into(), start_by),
    };
    // A message over the store's limit would be refused, the refusal taken for fencing, and
    // the command run again once the lease lapsed: shorten it instead.
    let outcome = match outcome {
        Outcome::Fail(m) => Outcome::Fail(fit_failure_text(m)),
        other => other,
    };
    let done = r.finisher.submit(c.renewal_handle(), outcome);
    r.slot_freed();
    tokio::pin!(done);
    // Keep the claim until the outcome is durable: were its lease to run out first, another
    // claim (maybe this node's own) could run it a second time.
    loop {
        tokio::select! {
            biased;
            _ = &mut done => return,
            () = tokio::time::sleep_until(renewal.next) => {
                renewal.renew(&sh, &c, None).await;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a retryable failure becomes: a retry if an execution is left and it can start before
/// the deadline; otherwise a failure (no executions left) or `Late` (the deadline would pass
/// first).
fn retry_or_fail(
    c: &Claimed,
    after: Duration,
    message: String,
    start_by: Option<Instant>,
) -> Outcome {
    let d = c.dispatch();
    if !d.has_attempts_left() {
        return Outcome::Fail(format!("{message} (no attempts left)"));
    }
    if start_by.is_some_and(|t| instant_after(Instant::now(), after) >= t) {
        return Outcome::Late;
    }
    Outcome::Retry { after }
}

/// The lease renewal of one claim.
struct Renewal {
    /// When to renew next.
    next: Instant,
    /// Until when the lease is known to hold (monotonic).
    until: Instant,
    /// The store refused a renewal: the claim is gone.
    lost: bool,
}

impl Renewal {
    /// When an execution holding this claim must stop: a margin (a tenth of the lease, for the
    /// skew between this node's monotonic view and the store's clock) before the lease is known
    /// to end, or at once once the store refused a renewal.
    fn hold_ends(&self, sh: &Shared) -> Instant {
        if self.lost {
            return Instant::now();
        }
        // Capped at a minute (no clock is that far off), and never below `now`: with a huge
        // lease `until` is clamped to decades ahead, and a tenth of the lease subtracted from it
        // would land in the past.
        let margin = stop_margin(sh).min(self.until.saturating_duration_since(Instant::now()));
        self.until.checked_sub(margin).unwrap_or(self.until)
    }

    fn new(sh: &Shared, until: Instant) -> Self {
        Renewal {
            next: instant_after(Instant::now(), sh.config.lease / 3),
            until,
            lost: false,
        }
    }

    /// Extends the lease (storing progress, if any); returns whether the store took it.
    async fn renew(&mut self, sh: &Shared, c: &Claimed, progress: Option<Progress>) -> bool {
        let asked = Instant::now();
        // After a failure, try again sooner than a full period, while the lease still holds.
        self.next = instant_after(asked, sh.config.lease / 3);
        if self.lost {
            return false;
        }
        // Never wait past the moment the execution must stop: a renewal stuck on a slow store
        // must not keep the execution running beyond its lease.
        let limit = self.hold_ends(sh).saturating_duration_since(asked);
        let call = sh.bounded(sh.store.heartbeat(
            c,
            HeartbeatParams {
                lease: sh.config.lease,
                progress,
                now: sh.store_now(),
            },
        ));
        let res = match tokio::time::timeout(limit, call).await {
            Ok(res) => res,
            Err(_) => Err(Error::Store(StoreError::Unavailable(
                "lease renewal did not answer before the lease ran out".into(),
            ))),
        };
        match res {
            Ok(row) => {
                self.until = instant_after(asked, sh.config.lease);
                if row.cancel_requested() {
                    // Someone cancelled it (any node): the executor hears it here at the latest.
                    sh.running.cancel(&row.id);
                }
                true
            }
            Err(Error::Store(StoreError::Fenced { .. } | StoreError::Illegal { .. })) => {
                // The row moved on without us (finished, re-claimed, expired): stop renewing.
                self.lost = true;
                false
            }
            Err(e) => {
                let left = self.until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // The lease has run out: a renewal can only be refused from now on (see
                    // `fsm::apply`), so stop asking; the outcome may still be recorded.
                    tracing::debug!(id = %c.id(), error = %e, "lease ran out while renewals failed");
                    self.lost = true;
                    return false;
                }
                self.next = instant_after(
                    Instant::now(),
                    (sh.config.lease / 10)
                        .min(left)
                        .max(Duration::from_millis(10)),
                );
                tracing::debug!(id = %c.id(), error = %e, "lease renewal failed; retrying");
                false
            }
        }
    }
}
