//! One execution of a claimed row: the executor, bounded by `execute_timeout`, beside the lease
//! renewal that keeps the claim (every `lease / 3`, and at once with each progress report) until
//! the outcome is durable.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::drain::Runner;
use super::{instant_after, run_guarded, ExecContext, Shared};
use crate::error::{Error, ExecError, StoreError};
use crate::fsm::{Progress, SessionId};
use crate::store::{
    check_json, Claimed, HeartbeatParams, Outcome, MAX_DETAIL_BYTES, MAX_RESULT_BYTES,
};
use crate::transport::Notice;

/// Runs the executor on a claimed row, renews its lease meanwhile, hands the outcome to the
/// broker's finisher and keeps renewing until the finisher has written it.
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
        Some(session),
        Some(progress_tx),
    );
    metrics::counter!("broker_dispatch_started_total").increment(1);
    // The executor runs in a task of its own, so that a slow store answering a renewal or a
    // progress report never stalls it; dropping this execution (an aborted hub) stops it too.
    let exec = {
        let executor = Arc::clone(&sh.executor);
        let dispatch = d.clone();
        let limit = sh.config.execute_timeout;
        AbortOnDrop(tokio::spawn(async move {
            tokio::time::timeout(limit, run_guarded(executor.execute(ctx, &dispatch))).await
        }))
    };
    let mut exec = exec;
    let mut renewal = Renewal::new(&sh, lease_until);
    let mut seq = d.progress.as_ref().map_or(0, |p| p.seq);
    let mut progress_open = true;
    let result = loop {
        // Biased: a fixed polling order keeps seeded simulations replayable.
        tokio::select! {
            biased;
            r = &mut exec.0 => break r.unwrap_or_else(|e| {
                // Only an abort ends the task otherwise (panics are caught inside it).
                Ok(Err(ExecError::Fatal(format!("execution task ended: {e}"))))
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
        let res = sh
            .bounded(sh.store.heartbeat(
                c,
                HeartbeatParams {
                    lease: sh.config.lease,
                    progress,
                    now: sh.store_now(),
                },
            ))
            .await;
        match res {
            Ok(_) => {
                self.until = instant_after(asked, sh.config.lease);
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
