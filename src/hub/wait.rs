//! The originator's wait: a [`RollingDeadline`] driven by real progress, with the row as the
//! authority.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Hub, Shared};
use crate::error::{Error, StoreError};
use crate::fsm::{Dispatch, DispatchId, DispatchState, FailReason, RollingDeadline, Timestamp};
use crate::store::CancelParams;

/// One registration's entry in the hub's waiter map: its token and its notifier.
pub(crate) type Waiter = (u64, Arc<Notify>);

/// A waiter registered in the hub before its row is written, removed on drop (also when the
/// caller's future is dropped).
pub(crate) struct Registration<'a> {
    sh: &'a Shared,
    id: DispatchId,
    token: u64,
    notify: Arc<Notify>,
    cancel_on_give_up: bool,
}

impl<'a> Registration<'a> {
    pub(crate) fn new(sh: &'a Shared, id: DispatchId) -> Self {
        let notify = Arc::new(Notify::new());
        let token = sh.next_waiter.fetch_add(1, Ordering::Relaxed);
        sh.waiters
            .lock()
            .entry(id)
            .or_default()
            .push((token, Arc::clone(&notify)));
        metrics::gauge!("broker_dispatch_waiting").increment(1.0);
        Registration {
            sh,
            id,
            token,
            notify,
            cancel_on_give_up: true,
        }
    }

    pub(crate) fn observe_only(mut self) -> Self {
        self.cancel_on_give_up = false;
        self
    }

    /// Waits for `d` (as just written or read) to reach a terminal state: the `done` row, or
    /// the error its failure (or the wait's end) means.
    pub(crate) async fn wait(self, mut d: Dispatch) -> Result<Dispatch, Error> {
        let sh = self.sh;
        // Time is measured on tokio's monotonic clock (pausable in tests) and expressed as
        // timestamps for the pure deadline.
        let origin = Instant::now();
        let elapsed_ts = || Timestamp::EPOCH.saturating_add(origin.elapsed());
        let mut deadline =
            RollingDeadline::new(elapsed_ts(), sh.config.wait_window, sh.config.wait_hard_cap);
        let mut seen = Seen::of(&d);
        loop {
            if d.state.is_terminal() {
                return outcome_of_row(d);
            }
            if deadline.is_expired(elapsed_ts()) {
                return self.give_up(d).await;
            }
            let until = super::instant_after(
                origin,
                deadline.poll_timeout().duration_since(Timestamp::EPOCH),
            );
            let poll = sh.jitter(sh.config.poll_interval, self.id.as_uuid().as_u128() as u64);
            // Biased: a fixed polling order keeps seeded simulations replayable.
            tokio::select! {
                biased;
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = tokio::time::sleep(poll) => {}
            }
            match sh.bounded(sh.store.get(self.id)).await {
                Ok(Some(row)) => d = row,
                Ok(None) => return Err(Error::Store(StoreError::NotFound(self.id))),
                Err(e) if is_transient(&e) => {
                    tracing::debug!(id = %self.id, error = %e, "re-read failed; will retry");
                    continue;
                }
                Err(e) => return Err(e),
            }
            let now_seen = Seen::of(&d);
            if now_seen != seen {
                deadline.touch(elapsed_ts());
                seen = now_seen;
            }
        }
    }

    /// The wait ran out: re-read once; cancel a row nobody claimed so it never runs later.
    async fn give_up(self, d: Dispatch) -> Result<Dispatch, Error> {
        let sh = self.sh;
        let id = self.id;
        if !self.cancel_on_give_up || d.state != DispatchState::Pending {
            return Err(Error::TimedOut {
                id,
                last_state: d.state,
            });
        }
        match sh
            .bounded(sh.store.cancel(CancelParams {
                id,
                now: sh.store_now(),
            }))
            .await
        {
            Ok(cancelled) => {
                metrics::counter!("broker_dispatch_failed_total", "reason" => "cancelled")
                    .increment(1);
                tracing::debug!(%id, "gave up on an unclaimed dispatch; cancelled it");
                Err(Error::TimedOut {
                    id,
                    last_state: cancelled.state,
                })
            }
            Err(Error::Store(StoreError::Illegal { .. })) => {
                // Claimed (or finished) between the last read and the cancel: report what it is.
                let row = sh.bounded(sh.store.get(id)).await?;
                match row {
                    Some(row) => outcome_of_row(row),
                    None => Err(Error::Store(StoreError::NotFound(id))),
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Store(s) if s.is_retryable())
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiters = self.sh.waiters.lock();
        if let Some(list) = waiters.get_mut(&self.id) {
            list.retain(|(t, _)| *t != self.token);
            if list.is_empty() {
                waiters.remove(&self.id);
            }
        }
        metrics::gauge!("broker_dispatch_waiting").decrement(1.0);
    }
}

/// What counts as real progress: a state change or a new progress sequence number. A repeated
/// heartbeat (lease renewal alone) does not extend the wait.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    state: DispatchState,
    attempt: u32,
    progress_seq: Option<u64>,
}

impl Seen {
    fn of(d: &Dispatch) -> Self {
        Seen {
            state: d.state,
            attempt: d.attempt,
            progress_seq: d.progress.as_ref().map(|p| p.seq),
        }
    }
}

impl Hub {
    /// Waits for a dispatch written by [`send`](Hub::send) (or by another node) to finish, with
    /// the rolling deadline of [`dispatch`](Hub::dispatch). Unlike `dispatch`, it does not
    /// cancel the row when it gives up.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`], [`Error::TimedOut`], [`StoreError::NotFound`] (as
    /// [`Error::Store`]).
    pub async fn wait(&self, id: DispatchId) -> Result<serde_json::Value, Error> {
        let sh = &self.shared;
        let waiter = Registration::new(sh, id).observe_only();
        let d = sh
            .bounded(sh.store.get(id))
            .await?
            .ok_or(Error::Store(StoreError::NotFound(id)))?;
        let done = waiter.wait(d).await?;
        Ok(done.result.unwrap_or(serde_json::Value::Null))
    }
}

/// The outcome a row reports to its originator: the `done` row itself, the failure of a
/// `failed` one; one not yet finished (the wait gave up) is [`Error::TimedOut`].
pub(crate) fn outcome_of_row(d: Dispatch) -> Result<Dispatch, Error> {
    match d.state {
        DispatchState::Done => Ok(d),
        DispatchState::Failed => Err(Error::Failed {
            id: d.id,
            reason: d.failure.unwrap_or(FailReason::Error(String::new())),
        }),
        DispatchState::Pending | DispatchState::InProgress => Err(Error::TimedOut {
            id: d.id,
            last_state: d.state,
        }),
    }
}
