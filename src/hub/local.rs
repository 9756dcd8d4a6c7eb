//! The paths that write no row up front: the local fast path (the broker is connected here) and
//! the HTTP fallback.
//!
//! The fast path is a first attempt, not a second system: it runs the executor once, bounded by
//! `execute_timeout`. A retryable failure or a timeout becomes a durable row whose first
//! execution already happened (`available_at` = now + the delay asked for); that row follows the
//! broker to whichever node holds it next, survives a crash of this one, and is waited for like a
//! forward. Nothing is ever re-executed from memory on a connection this node may have lost.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use super::{run_guarded, Command, Dispatched, ExecContext, HttpFallback, Hub, Shared};
use crate::error::{Error, ExecError};
use crate::fsm::{BrokerId, Dispatch, DispatchId, DispatchState, FailReason, Route, Timestamp};
use crate::store::{check_json, fit_failure_text, MAX_RESULT_BYTES};

/// Runs `cmd` on the connection held here; see the module docs.
pub(crate) async fn run_local(
    hub: &Hub,
    cmd: Command,
    max_attempts: u32,
) -> Result<Dispatched, Error> {
    let sh = &hub.shared;
    let id = sh.id_for(&cmd);
    let Some((session, handle)) = sh
        .local_session(&cmd.broker)
        .and_then(|s| sh.conn_handle(&cmd.broker, &s).map(|h| (s, h)))
    else {
        // The broker left between the routing decision and now: the row finds it.
        return hub
            .write_and_wait(cmd, id, max_attempts, 0, Route::Local)
            .await;
    };
    // The command's window opens now: a retry row inherits what is left of it, not a new one.
    let started = tokio::time::Instant::now();
    let d = adhoc_dispatch(id, &cmd, max_attempts, sh.now());
    let running = sh.running.register(id, cmd.broker.clone(), session.clone());
    let ctx = ExecContext::new(id, 1, 1, Some(session), None).on(Some(handle), running.cancel());
    metrics::counter!("broker_dispatch_started_total").increment(1);
    let res = tokio::time::timeout(
        sh.config.execute_timeout,
        run_guarded(sh.executor.execute(ctx, &d)),
    )
    .await;
    if running.was_cancelled() && !matches!(res, Ok(Ok(_))) {
        // Cancelled while it ran (`Hub::cancel`): whatever it failed with, it is cancelled,
        // and never retried as a row.
        return Err(Error::Failed {
            id,
            reason: FailReason::Cancelled,
        });
    }
    let (after, message) = match res {
        Ok(Ok(v)) => {
            // The same rule as for a result written to a row, so a command's outcome does not
            // depend on which node took it.
            return match check_json("result", &v, MAX_RESULT_BYTES) {
                Ok(()) => Ok(Dispatched {
                    id,
                    attempt: 1,
                    node: Some(sh.node.clone()),
                    route: Route::Local,
                    durable: false,
                    value: v,
                }),
                Err(e) => Err(Error::Failed {
                    id,
                    reason: FailReason::Error(format!("executor result refused: {e}")),
                }),
            };
        }
        Ok(Err(ExecError::Fatal(m))) => {
            // The same text a row would hold, whichever path ran the command.
            return Err(Error::Failed {
                id,
                reason: FailReason::Error(fit_failure_text(m)),
            });
        }
        Ok(Err(ExecError::Retryable { after, message })) => (after, message),
        Err(_) => (Duration::ZERO, "executor timed out".to_owned()),
    };
    if max_attempts <= 1 {
        return Err(exec_failure(id, ExecError::Retryable { after, message }));
    }
    let window = cmd.timeout.unwrap_or(sh.config.wait_window);
    let left = window.saturating_sub(started.elapsed());
    // Delays are whole milliseconds or more, like every duration a row takes.
    let after = if after.is_zero() {
        after
    } else {
        after.max(super::config::MIN_DURATION)
    };
    if after >= left || left < super::config::MIN_DURATION {
        // The retry could not start before the command's deadline.
        return Err(Error::Failed {
            id,
            reason: FailReason::Expired,
        });
    }
    tracing::debug!(node = %sh.node, %id, error = %message, "fast path failed; retrying as a durable row");
    let mut retry = cmd;
    retry.delay = (!after.is_zero()).then_some(after);
    retry.timeout = Some(left);
    hub.write_and_wait(retry, id, max_attempts, 1, Route::Local)
        .await
}

/// Calls the broker over HTTP, bounded by `execute_timeout`; a panic fails the call.
pub(crate) async fn run_http(
    sh: &Shared,
    http: &dyn HttpFallback,
    cmd: Command,
    max_attempts: u32,
    now: Timestamp,
) -> Result<Dispatched, Error> {
    let d = adhoc_dispatch(sh.id_for(&cmd), &cmd, max_attempts, now);
    match tokio::time::timeout(sh.config.execute_timeout, run_guarded(http.call(&d))).await {
        Ok(r) => r
            .map(|value| Dispatched {
                id: d.id,
                attempt: 1,
                node: None,
                route: Route::Http,
                durable: false,
                value,
            })
            .map_err(|e| exec_failure(d.id, e)),
        Err(_) => Err(exec_failure(
            d.id,
            ExecError::fatal("http fallback timed out"),
        )),
    }
}

/// Whether the fallback knows an endpoint for `broker`; a call that hangs (past
/// `store_timeout`) or panics counts as "no".
pub(crate) async fn has_endpoint(sh: &Shared, http: &dyn HttpFallback, broker: &BrokerId) -> bool {
    let call = AssertUnwindSafe(http.has_endpoint(broker)).catch_unwind();
    match tokio::time::timeout(sh.config.store_timeout, call).await {
        Ok(Ok(yes)) => yes,
        Ok(Err(_)) => {
            tracing::warn!(%broker, "http fallback panicked in has_endpoint; treating it as no endpoint");
            false
        }
        Err(_) => {
            tracing::warn!(%broker, "http fallback's has_endpoint timed out; treating it as no endpoint");
            false
        }
    }
}

/// A dispatch record for work that never touches the store (local fast path, HTTP).
fn adhoc_dispatch(id: DispatchId, cmd: &Command, max_attempts: u32, now: Timestamp) -> Dispatch {
    Dispatch {
        id,
        broker: cmd.broker.clone(),
        op: cmd.op.clone(),
        args: cmd.args.clone(),
        state: DispatchState::InProgress,
        attempt: 1,
        max_attempts,
        claimed_by: None,
        lease_until: None,
        available_at: now,
        deadline: None,
        result: None,
        failure: None,
        progress: None,
        idempotency_key: cmd.idempotency_key.clone(),
        key: cmd.key.clone(),
        released: 0,
        created_at: now,
        updated_at: now,
    }
}

/// The error an executor's failure becomes for the caller.
pub(crate) fn exec_failure(id: DispatchId, e: ExecError) -> Error {
    let msg = match e {
        ExecError::Retryable { message, .. } => format!("{message} (no attempts left)"),
        ExecError::Fatal(m) => m,
    };
    Error::Failed {
        id,
        reason: FailReason::Error(fit_failure_text(msg)),
    }
}
