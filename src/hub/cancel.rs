//! `Hub::cancel`, from any node.

use super::Hub;
use crate::error::{Error, StoreError};
use crate::fsm::{Dispatch, DispatchId, DispatchState};
use crate::store::CancelParams;
use crate::transport::Notice;

/// What [`Hub::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// It was pending: it ended `Failed(Cancelled)` and will never run.
    Cancelled(Dispatch),
    /// It is running: its holder was asked to stop (`ExecContext::cancelled`); it ends
    /// `Failed(Cancelled)` when the executor returns, unless it completed.
    Requested(Dispatch),
    /// It runs on this node's fast path (it has no row): its `cancelled()` fired.
    Stopping,
    /// It had already finished; nothing changed.
    Finished(Dispatch),
}

impl Hub {
    /// Cancels dispatch `id`, from any node: a pending one ends `Failed(Cancelled)` at once and
    /// never runs; a running one is marked in the store (never claimed again) and its holder,
    /// told by a notice or at its next lease renewal, fires the execution's
    /// [`ExecContext::cancelled`](super::ExecContext::cancelled); the row then ends
    /// `Failed(Cancelled)` when the executor
    /// returns, unless it completed. A command running on this node's fast path (no row) has
    /// its `cancelled()` fired directly; one running on another node's fast path cannot be
    /// reached (give it an [`id`](super::Command::id) and a row by sending it with a
    /// [`key`](super::Command::key) or [`send`](Hub::send) if it must be cancellable from anywhere).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] with [`StoreError::NotFound`] for an id no store row or local execution
    /// has; other store errors.
    ///
    /// # Cancel safety
    ///
    /// The cancel takes effect if the store call landed, whether or not this future completes.
    pub async fn cancel(&self, id: DispatchId) -> Result<CancelOutcome, Error> {
        let sh = &self.shared;
        let stopped_here = sh.running.cancel(&id);
        let res = sh
            .bounded(sh.store.request_cancel(CancelParams {
                id,
                now: sh.store_now(),
            }))
            .await;
        match res {
            Ok(row) => {
                // Its waiters (anywhere) re-read it; its holder (if elsewhere) checks the mark.
                sh.publish(Notice::Event { id }).await;
                sh.notify_waiter(&id);
                if row.state == DispatchState::InProgress {
                    metrics::counter!("broker_dispatch_cancel_requested_total").increment(1);
                    Ok(CancelOutcome::Requested(row))
                } else {
                    metrics::counter!("broker_dispatch_failed_total", "reason" => "cancelled")
                        .increment(1);
                    Ok(CancelOutcome::Cancelled(row))
                }
            }
            Err(Error::Store(StoreError::NotFound(_))) if stopped_here => {
                Ok(CancelOutcome::Stopping)
            }
            Err(Error::Store(StoreError::Illegal { .. })) => {
                match sh.bounded(sh.store.get(id)).await? {
                    Some(row) => Ok(CancelOutcome::Finished(row)),
                    None => Err(Error::Store(StoreError::NotFound(id))),
                }
            }
            Err(e) => Err(e),
        }
    }
}
