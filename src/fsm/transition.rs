//! Events and [`apply`]: the specification of every legal state change.
//!
//! `executions` is `attempt - released`: claims handed back unexecuted do not count, so
//! `max_attempts` bounds executions begun while `attempt` stays a fencing token that is never
//! reused.
//!
//! | event | from | guard | to / writes |
//! |---|---|---|---|
//! | `Claim` | Pending | `available_at <= now`, before the deadline, `executions < max_attempts` | InProgress; `attempt += 1`, `claimed_by`, `lease_until = now + lease` |
//! | `Claim` | InProgress | `lease_until <= now`, `executions < max_attempts`, before the deadline | InProgress; same writes (the old holder is now fenced) |
//! | `Heartbeat` | InProgress | attempt matches, lease still live (`lease_until > now`) | `lease_until = now + lease`; progress stored if given |
//! | `Complete` | InProgress | attempt matches | Done; result stored |
//! | `Fail` | InProgress | attempt matches | Failed(Error) |
//! | `Retry` | InProgress | attempt matches, `executions < max_attempts` | Pending; `available_at = at` |
//! | `Release` | InProgress | attempt matches | Pending; `available_at = now`, `released += 1` (handed back unexecuted) |
//! | `Late` | InProgress | attempt matches, a deadline is set | Failed(Expired) (the holder could not start, or re-run, it before its deadline) |
//! | `Cancel` | Pending | — | Failed(Cancelled) |
//! | `RequestCancel` | Pending | — | Failed(Cancelled) |
//! | `RequestCancel` | InProgress | — | InProgress; `failure = Cancelled` (a cancel request: the holder is told, the row ends cancelled unless it completes) |
//! | `Expire` | Pending, or InProgress with `lease_until <= now` | `deadline <= now` | Failed(Expired) |
//! | `Exhaust` | InProgress | `lease_until <= now`, `executions >= max_attempts` or a cancel requested | Failed(AttemptsExhausted), or Failed(Cancelled) if a cancel was requested |
//!
//! A row with a cancel request ([`Dispatch::cancel_requested`]) is never claimed again, and its
//! holder's outcome is rewritten: `Complete` still completes it (the work happened; its result
//! is not hidden), but `Fail`, `Retry`, `Release` and `Late` all end it `Failed(Cancelled)`
//! (without their guards: a retry needs no execution left, a late row no deadline).
//!
//! Every other pair is a [`TransitionError`]. Events that carry an attempt are checked against the
//! row's attempt first: a mismatch is [`TransitionError::Fenced`], whatever the state.
//!
//! A heartbeat renews a live lease only: once a lease has run out the claim is gone (the row is
//! re-claimable, expirable or exhaustible), so no renewal can revive an abandoned claim, keep an
//! unstarted claim alive past its deadline, or let a lapsed holder run beside the next command of
//! its ordering key. Which rows of a broker a claim may take, in which order, is
//! [`claim_order`](super::claim_order).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dispatch::{Attempt, Dispatch, NodeId, Progress, Timestamp};
use super::state::{DispatchState, FailReason};

/// An input to the state machine. Each carries the `now` of the caller (a store's clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A node takes the dispatch for one attempt, with a lease.
    Claim {
        /// The claiming node.
        node: NodeId,
        /// The current time.
        now: Timestamp,
        /// How long the claim holds without a heartbeat.
        lease: Duration,
    },
    /// The holder of `attempt` is alive (and maybe reports progress).
    Heartbeat {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
        /// The new lease, from `now`.
        lease: Duration,
        /// New progress, if any.
        progress: Option<Progress>,
    },
    /// The holder of `attempt` finished successfully.
    Complete {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
        /// The executor's result.
        result: serde_json::Value,
    },
    /// The holder of `attempt` failed fatally.
    Fail {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
        /// The executor's message.
        error: String,
    },
    /// The holder of `attempt` asks to run it again later.
    Retry {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
        /// When it becomes claimable again.
        at: Timestamp,
    },
    /// The holder of `attempt` hands it back without having executed it (shutdown, or the broker
    /// left this node). It does not use up an execution.
    Release {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
    },
    /// The holder of `attempt` did not start it (or cannot re-run it) before its deadline.
    Late {
        /// The attempt the holder claimed.
        attempt: Attempt,
        /// The current time.
        now: Timestamp,
    },
    /// The originator gave up on a pending dispatch.
    Cancel {
        /// The current time.
        now: Timestamp,
    },
    /// Someone cancels the dispatch whatever its state: a pending one at once, a running one
    /// by asking its holder to stop.
    RequestCancel {
        /// The current time.
        now: Timestamp,
    },
    /// The deadline passed before the work could (re-)run.
    Expire {
        /// The current time.
        now: Timestamp,
    },
    /// The holder's lease ran out with no attempts left.
    Exhaust {
        /// The current time.
        now: Timestamp,
    },
}

/// The name of an [`Event`], for errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// [`Event::Claim`].
    Claim,
    /// [`Event::Heartbeat`].
    Heartbeat,
    /// [`Event::Complete`].
    Complete,
    /// [`Event::Fail`].
    Fail,
    /// [`Event::Retry`].
    Retry,
    /// [`Event::Release`].
    Release,
    /// [`Event::Late`].
    Late,
    /// [`Event::Cancel`].
    Cancel,
    /// [`Event::RequestCancel`].
    RequestCancel,
    /// [`Event::Expire`].
    Expire,
    /// [`Event::Exhaust`].
    Exhaust,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            EventKind::Claim => "claim",
            EventKind::Heartbeat => "heartbeat",
            EventKind::Complete => "complete",
            EventKind::Fail => "fail",
            EventKind::Retry => "retry",
            EventKind::Release => "release",
            EventKind::Late => "late",
            EventKind::Cancel => "cancel",
            EventKind::RequestCancel => "request_cancel",
            EventKind::Expire => "expire",
            EventKind::Exhaust => "exhaust",
        };
        f.write_str(s)
    }
}

impl Event {
    /// The event's name.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Claim { .. } => EventKind::Claim,
            Event::Heartbeat { .. } => EventKind::Heartbeat,
            Event::Complete { .. } => EventKind::Complete,
            Event::Fail { .. } => EventKind::Fail,
            Event::Retry { .. } => EventKind::Retry,
            Event::Release { .. } => EventKind::Release,
            Event::Late { .. } => EventKind::Late,
            Event::Cancel { .. } => EventKind::Cancel,
            Event::RequestCancel { .. } => EventKind::RequestCancel,
            Event::Expire { .. } => EventKind::Expire,
            Event::Exhaust { .. } => EventKind::Exhaust,
        }
    }

    /// The attempt a holder's event presents, if it is a holder's event.
    pub fn attempt(&self) -> Option<Attempt> {
        match self {
            Event::Heartbeat { attempt, .. }
            | Event::Complete { attempt, .. }
            | Event::Fail { attempt, .. }
            | Event::Retry { attempt, .. }
            | Event::Release { attempt, .. }
            | Event::Late { attempt, .. } => Some(*attempt),
            Event::Claim { .. }
            | Event::Cancel { .. }
            | Event::RequestCancel { .. }
            | Event::Expire { .. }
            | Event::Exhaust { .. } => None,
        }
    }

    /// The event's `now`.
    pub fn now(&self) -> Timestamp {
        match self {
            Event::Claim { now, .. }
            | Event::Heartbeat { now, .. }
            | Event::Complete { now, .. }
            | Event::Fail { now, .. }
            | Event::Retry { now, .. }
            | Event::Release { now, .. }
            | Event::Late { now, .. }
            | Event::Cancel { now }
            | Event::RequestCancel { now }
            | Event::Expire { now }
            | Event::Exhaust { now } => *now,
        }
    }
}

/// Why [`apply`] refused an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The event carries an attempt that is no longer the dispatch's: its holder was fenced out.
    #[error("fenced: attempt {presented} is stale, the dispatch is at attempt {current}")]
    Fenced {
        /// The attempt the writer presented.
        presented: Attempt,
        /// The dispatch's attempt.
        current: Attempt,
    },
    /// The event is not legal in this state, or its guard does not hold.
    #[error("illegal transition: {event} in state {from}")]
    Illegal {
        /// The dispatch's state.
        from: DispatchState,
        /// The refused event.
        event: EventKind,
    },
}

/// Applies `event` to `d`, returning the next version of the record.
///
/// This is the specification of the dispatch life cycle (see the module table). It never panics,
/// and on error the input is unchanged (it is borrowed).
///
/// ```
/// use std::time::Duration;
/// use broker_dispatch::fsm::{apply, BrokerId, DispatchState, Event, NodeId, Timestamp, TransitionError};
/// use broker_dispatch::store::NewDispatch;
///
/// let t = |s: i64| Timestamp::from_micros(s * 1_000_000);
/// let d = NewDispatch::new(BrokerId::new("b1").unwrap(), "restart", serde_json::json!({}))
///     .into_dispatch(t(0));
/// let lease = Duration::from_secs(10);
/// // Node a claims attempt 1; its lease runs out; node b claims attempt 2.
/// let a = apply(&d, Event::Claim { node: NodeId::new("a").unwrap(), now: t(1), lease }).unwrap();
/// assert_eq!((a.state, a.attempt), (DispatchState::InProgress, 1));
/// let b = apply(&a, Event::Claim { node: NodeId::new("b").unwrap(), now: t(20), lease }).unwrap();
/// assert_eq!(b.attempt, 2);
/// // a's late result is fenced out; b's lands.
/// let late = Event::Complete { attempt: 1, now: t(21), result: serde_json::json!("a") };
/// assert!(matches!(apply(&b, late), Err(TransitionError::Fenced { presented: 1, current: 2 })));
/// let done = apply(&b, Event::Complete { attempt: 2, now: t(22), result: serde_json::json!("b") })
///     .unwrap();
/// assert_eq!(done.state, DispatchState::Done);
/// ```
///
/// # Errors
///
/// [`TransitionError::Fenced`] when a holder's event carries a stale attempt;
/// [`TransitionError::Illegal`] for any other (state, event) pair the table does not allow.
pub fn apply(d: &Dispatch, event: Event) -> Result<Dispatch, TransitionError> {
    let kind = event.kind();
    let illegal = TransitionError::Illegal {
        from: d.state,
        event: kind,
    };
    if let Some(presented) = event.attempt() {
        if presented != d.attempt {
            return Err(TransitionError::Fenced {
                presented,
                current: d.attempt,
            });
        }
    }
    let mut next = d.clone();
    next.updated_at = event.now();
    let cancelled = d.cancel_requested();
    match (d.state, event) {
        (DispatchState::Pending | DispatchState::InProgress, Event::Claim { node, now, lease }) => {
            if !d.is_claimable(now) {
                return Err(illegal);
            }
            next.state = DispatchState::InProgress;
            next.attempt = d.attempt.checked_add(1).ok_or(illegal)?;
            next.claimed_by = Some(node);
            next.lease_until = Some(now.saturating_add(lease));
        }
        (
            DispatchState::InProgress,
            Event::Heartbeat {
                now,
                lease,
                progress,
                ..
            },
        ) => {
            if !d.is_held(now) {
                return Err(illegal);
            }
            next.lease_until = Some(now.saturating_add(lease));
            if progress.is_some() {
                next.progress = progress;
            }
        }
        (DispatchState::InProgress, Event::Complete { result, .. }) => {
            next.state = DispatchState::Done;
            next.result = Some(result);
            next.failure = None;
            next.lease_until = None;
        }
        (
            DispatchState::InProgress,
            Event::Fail { .. } | Event::Retry { .. } | Event::Release { .. } | Event::Late { .. },
        ) if cancelled => {
            next.state = DispatchState::Failed;
            next.lease_until = None;
        }
        (DispatchState::InProgress, Event::Fail { error, .. }) => {
            next.state = DispatchState::Failed;
            next.failure = Some(FailReason::Error(error));
            next.lease_until = None;
        }
        (DispatchState::InProgress, Event::Retry { at, .. }) => {
            if !d.has_attempts_left() {
                return Err(illegal);
            }
            next.state = DispatchState::Pending;
            next.available_at = at;
            next.lease_until = None;
        }
        (DispatchState::InProgress, Event::Release { now, .. }) => {
            next.state = DispatchState::Pending;
            next.available_at = now;
            next.lease_until = None;
            // `released <= attempt < Attempt::MAX` in every reachable state.
            next.released = d.released.checked_add(1).ok_or(illegal)?;
        }
        (DispatchState::InProgress, Event::Late { .. }) => {
            if d.deadline.is_none() {
                return Err(illegal);
            }
            next.state = DispatchState::Failed;
            next.failure = Some(FailReason::Expired);
            next.lease_until = None;
        }
        (DispatchState::Pending, Event::Cancel { .. } | Event::RequestCancel { .. }) => {
            next.state = DispatchState::Failed;
            next.failure = Some(FailReason::Cancelled);
        }
        (DispatchState::InProgress, Event::RequestCancel { .. }) => {
            next.failure = Some(FailReason::Cancelled);
        }
        (DispatchState::Pending | DispatchState::InProgress, Event::Expire { now }) => {
            let abandoned = d.state == DispatchState::Pending || d.lease_expired(now);
            if !(abandoned && d.past_deadline(now)) {
                return Err(illegal);
            }
            next.state = DispatchState::Failed;
            next.failure = Some(FailReason::Expired);
            next.lease_until = None;
        }
        (DispatchState::InProgress, Event::Exhaust { now }) => {
            if !d.lease_expired(now) || (d.has_attempts_left() && !cancelled) {
                return Err(illegal);
            }
            next.state = DispatchState::Failed;
            if !cancelled {
                next.failure = Some(FailReason::AttemptsExhausted);
            }
            next.lease_until = None;
        }
        _ => return Err(illegal),
    }
    Ok(next)
}
