//! Table tests for the pure core: one test per row of the state-machine, route and affinity tables,
//! plus the illegal pairs, the guard boundaries, the rolling deadline, timestamps and ids.
//!
//! Every transition case compares the whole record `apply` returns against the input with exactly
//! the fields the table says it writes, so a stray write (or a missing one) fails by name.

use std::str::FromStr;
use std::time::Duration;

use broker_dispatch::fsm::{
    apply, route, Affinity, BrokerId, ConnectDecision, Dispatch, DispatchId, DispatchState, Event,
    FailReason, IdError, NodeId, Progress, Route, RouteInput, SessionId, Timestamp,
    TransitionError, MAX_ID_LEN,
};
use serde_json::json;

const SEC: i64 = 1_000_000;
/// When the fixtures were created.
const T0: i64 = 100 * SEC;
/// The `now` of most events: ten seconds after creation.
const NOW: i64 = T0 + 10 * SEC;
const LEASE: Duration = Duration::from_secs(30);

fn ts(micros: i64) -> Timestamp {
    Timestamp::from_micros(micros)
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn progress(seq: u64) -> Progress {
    Progress {
        seq,
        detail: json!({ "step": seq }),
    }
}

/// A fresh pending row: never claimed, available since creation, no deadline, 3 attempts.
fn pending() -> Dispatch {
    Dispatch {
        id: DispatchId::from_uuid(uuid::Uuid::from_u128(
            0x0190_0000_0000_7000_8000_0000_0000_0001,
        )),
        broker: BrokerId::new("broker-1").unwrap(),
        op: "start".into(),
        args: json!({ "agent": "a1" }),
        state: DispatchState::Pending,
        attempt: 0,
        max_attempts: 3,
        claimed_by: None,
        lease_until: None,
        available_at: ts(T0),
        deadline: None,
        result: None,
        failure: None,
        progress: None,
        idempotency_key: Some("key-1".into()),
        key: None,
        released: 0,
        created_at: ts(T0),
        updated_at: ts(T0),
    }
}

/// Held by `n1` at attempt 1; the lease runs until `NOW + 20 s` (live at `NOW`).
fn in_progress() -> Dispatch {
    Dispatch {
        state: DispatchState::InProgress,
        attempt: 1,
        claimed_by: Some(node("n1")),
        lease_until: Some(ts(NOW + 20 * SEC)),
        progress: Some(progress(1)),
        updated_at: ts(T0 + SEC),
        ..pending()
    }
}

/// Like [`in_progress`], but the lease ran out at `NOW - 1 s`.
fn in_progress_lapsed() -> Dispatch {
    Dispatch {
        lease_until: Some(ts(NOW - SEC)),
        ..in_progress()
    }
}

fn done() -> Dispatch {
    Dispatch {
        state: DispatchState::Done,
        lease_until: None,
        result: Some(json!({ "ok": true })),
        ..in_progress()
    }
}

fn failed() -> Dispatch {
    Dispatch {
        state: DispatchState::Failed,
        lease_until: None,
        failure: Some(FailReason::Error("boom".into())),
        ..in_progress()
    }
}

fn with(mut d: Dispatch, f: impl FnOnce(&mut Dispatch)) -> Dispatch {
    f(&mut d);
    d
}

fn claim(by: &str, now: i64) -> Event {
    Event::Claim {
        node: node(by),
        now: ts(now),
        lease: LEASE,
    }
}

fn heartbeat(attempt: u32, p: Option<Progress>) -> Event {
    Event::Heartbeat {
        attempt,
        now: ts(NOW),
        lease: LEASE,
        progress: p,
    }
}

fn complete(attempt: u32) -> Event {
    Event::Complete {
        attempt,
        now: ts(NOW),
        result: json!({ "answer": 42 }),
    }
}

fn fail(attempt: u32) -> Event {
    Event::Fail {
        attempt,
        now: ts(NOW),
        error: "executor said no".into(),
    }
}

fn retry(attempt: u32) -> Event {
    Event::Retry {
        attempt,
        now: ts(NOW),
        at: ts(NOW + 5 * SEC),
    }
}

fn release(attempt: u32) -> Event {
    Event::Release {
        attempt,
        now: ts(NOW),
    }
}

fn late(attempt: u32) -> Event {
    Event::Late {
        attempt,
        now: ts(NOW),
    }
}

fn cancel() -> Event {
    Event::Cancel { now: ts(NOW) }
}

fn expire() -> Event {
    Event::Expire { now: ts(NOW) }
}

fn exhaust() -> Event {
    Event::Exhaust { now: ts(NOW) }
}

/// What a case expects of `apply`.
enum Expect {
    /// Success: the input with `updated_at = now` and the writes this closure makes.
    Ok(fn(&mut Dispatch)),
    /// `Illegal { from: input state, event: event kind }`.
    Illegal,
    /// `Fenced { presented: event attempt, current: input attempt }`.
    Fenced,
}

fn check(name: &str, before: Dispatch, event: Event, expect: Expect) {
    let got = apply(&before, event.clone());
    let want = match expect {
        Expect::Ok(writes) => {
            let mut d = before.clone();
            d.updated_at = event.now();
            writes(&mut d);
            Ok(d)
        }
        Expect::Illegal => Err(TransitionError::Illegal {
            from: before.state,
            event: event.kind(),
        }),
        Expect::Fenced => Err(TransitionError::Fenced {
            presented: event
                .attempt()
                .expect("a fenced case needs a holder's event"),
            current: before.attempt,
        }),
    };
    assert_eq!(got, want, "case `{name}`: {event:?} on {before:#?}");
}

macro_rules! transitions {
    ($($name:ident: $before:expr, $event:expr => $expect:expr;)*) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name), $before, $event, $expect);
            }
        )*
    };
}

use Expect::{Fenced, Illegal};

transitions! {
    // ---- Pending -------------------------------------------------------------------------------
    claim_pending_available: pending(), claim("n2", NOW) => Expect::Ok(|d| {
        d.state = DispatchState::InProgress;
        d.attempt = 1;
        d.claimed_by = Some(node("n2"));
        d.lease_until = Some(ts(NOW + 30 * SEC));
    });
    claim_pending_available_exactly_now: with(pending(), |d| d.available_at = ts(NOW)),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.state = DispatchState::InProgress;
            d.attempt = 1;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_pending_not_yet_available: with(pending(), |d| d.available_at = ts(NOW + 1)),
        claim("n2", NOW) => Illegal;
    claim_pending_deadline_in_future: with(pending(), |d| d.deadline = Some(ts(NOW + 1))),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.state = DispatchState::InProgress;
            d.attempt = 1;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_pending_deadline_exactly_now: with(pending(), |d| d.deadline = Some(ts(NOW))),
        claim("n2", NOW) => Illegal;
    claim_pending_deadline_passed: with(pending(), |d| d.deadline = Some(ts(NOW - SEC))),
        claim("n2", NOW) => Illegal;
    claim_pending_after_retry_bumps_attempt: with(pending(), |d| {
            d.attempt = 1;
            d.claimed_by = Some(node("n1"));
            d.progress = Some(progress(7));
        }),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.state = DispatchState::InProgress;
            d.attempt = 2;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_pending_lease_saturates: pending(), Event::Claim {
            node: node("n2"),
            now: ts(NOW),
            lease: Duration::MAX,
        } => Expect::Ok(|d| {
            d.state = DispatchState::InProgress;
            d.attempt = 1;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(Timestamp::MAX);
        });
    claim_pending_attempt_counter_full: with(pending(), |d| {
            d.attempt = u32::MAX;
            d.max_attempts = u32::MAX;
        }),
        claim("n2", NOW) => Illegal;
    heartbeat_pending: pending(), heartbeat(0, None) => Illegal;
    heartbeat_pending_stale_attempt: with(pending(), |d| d.attempt = 2), heartbeat(1, None) => Fenced;
    complete_pending: pending(), complete(0) => Illegal;
    complete_pending_stale_attempt: with(pending(), |d| d.attempt = 2), complete(1) => Fenced;
    fail_pending: pending(), fail(0) => Illegal;
    fail_pending_stale_attempt: with(pending(), |d| d.attempt = 2), fail(1) => Fenced;
    retry_pending: pending(), retry(0) => Illegal;
    retry_pending_stale_attempt: with(pending(), |d| d.attempt = 2), retry(1) => Fenced;
    release_pending: pending(), release(0) => Illegal;
    release_pending_stale_attempt: with(pending(), |d| d.attempt = 2), release(1) => Fenced;
    release_pending_future_attempt: pending(), release(1) => Fenced;
    cancel_pending: pending(), cancel() => Expect::Ok(|d| {
        d.state = DispatchState::Failed;
        d.failure = Some(FailReason::Cancelled);
    });
    cancel_pending_not_yet_available: with(pending(), |d| d.available_at = ts(NOW + SEC)),
        cancel() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Cancelled);
        });
    cancel_pending_past_deadline: with(pending(), |d| d.deadline = Some(ts(NOW - SEC))),
        cancel() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Cancelled);
        });
    expire_pending_deadline_passed: with(pending(), |d| d.deadline = Some(ts(NOW - SEC))),
        expire() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Expired);
        });
    expire_pending_deadline_exactly_now: with(pending(), |d| d.deadline = Some(ts(NOW))),
        expire() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Expired);
        });
    expire_pending_deadline_in_future: with(pending(), |d| d.deadline = Some(ts(NOW + 1))),
        expire() => Illegal;
    expire_pending_without_deadline: pending(), expire() => Illegal;
    exhaust_pending: pending(), exhaust() => Illegal;
    exhaust_pending_at_max_attempts: with(pending(), |d| {
            d.attempt = 3;
            d.deadline = Some(ts(NOW - SEC));
        }),
        exhaust() => Illegal;

    // ---- InProgress ----------------------------------------------------------------------------
    claim_in_progress_lease_live: in_progress(), claim("n2", NOW) => Illegal;
    claim_in_progress_lease_lapsed: in_progress_lapsed(), claim("n2", NOW) => Expect::Ok(|d| {
        d.attempt = 2;
        d.claimed_by = Some(node("n2"));
        d.lease_until = Some(ts(NOW + 30 * SEC));
    });
    claim_in_progress_lease_ends_exactly_now: with(in_progress(), |d| d.lease_until = Some(ts(NOW))),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.attempt = 2;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_in_progress_lease_ends_one_micro_later: with(in_progress(), |d| d.lease_until = Some(ts(NOW + 1))),
        claim("n2", NOW) => Illegal;
    claim_in_progress_same_node_after_lapse: in_progress_lapsed(), claim("n1", NOW) => Expect::Ok(|d| {
        d.attempt = 2;
        d.lease_until = Some(ts(NOW + 30 * SEC));
    });
    claim_in_progress_last_attempt_left: with(in_progress_lapsed(), |d| d.attempt = 2),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.attempt = 3;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_in_progress_attempts_exhausted: with(in_progress_lapsed(), |d| d.attempt = 3),
        claim("n2", NOW) => Illegal;
    claim_in_progress_deadline_passed: with(in_progress_lapsed(), |d| d.deadline = Some(ts(NOW - SEC))),
        claim("n2", NOW) => Illegal;
    claim_in_progress_deadline_exactly_now: with(in_progress_lapsed(), |d| d.deadline = Some(ts(NOW))),
        claim("n2", NOW) => Illegal;
    claim_in_progress_deadline_in_future: with(in_progress_lapsed(), |d| d.deadline = Some(ts(NOW + 1))),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.attempt = 2;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    heartbeat_in_progress: in_progress(), heartbeat(1, None) => Expect::Ok(|d| {
        d.lease_until = Some(ts(NOW + 30 * SEC));
    });
    heartbeat_in_progress_with_progress: in_progress(), heartbeat(1, Some(progress(2))) => Expect::Ok(|d| {
        d.lease_until = Some(ts(NOW + 30 * SEC));
        d.progress = Some(progress(2));
    });
    // A lapsed claim is gone: no renewal revives it, even before anyone re-claims it.
    heartbeat_in_progress_lease_lapsed_not_reclaimed: in_progress_lapsed(), heartbeat(1, None) => Illegal;
    heartbeat_in_progress_lease_ends_exactly_now: with(in_progress(), |d| d.lease_until = Some(ts(NOW))),
        heartbeat(1, None) => Illegal;
    heartbeat_in_progress_past_deadline_lease_live: with(in_progress(), |d| d.deadline = Some(ts(NOW - SEC))),
        heartbeat(1, None) => Expect::Ok(|d| {
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    heartbeat_in_progress_stale_attempt: with(in_progress(), |d| d.attempt = 2), heartbeat(1, None) => Fenced;
    heartbeat_in_progress_future_attempt: in_progress(), heartbeat(2, Some(progress(9))) => Fenced;
    complete_in_progress: in_progress(), complete(1) => Expect::Ok(|d| {
        d.state = DispatchState::Done;
        d.result = Some(json!({ "answer": 42 }));
        d.lease_until = None;
    });
    complete_in_progress_lease_lapsed: in_progress_lapsed(), complete(1) => Expect::Ok(|d| {
        d.state = DispatchState::Done;
        d.result = Some(json!({ "answer": 42 }));
        d.lease_until = None;
    });
    complete_in_progress_stale_attempt: with(in_progress(), |d| d.attempt = 2), complete(1) => Fenced;
    complete_in_progress_never_claimed_attempt: in_progress(), complete(0) => Fenced;
    fail_in_progress: in_progress(), fail(1) => Expect::Ok(|d| {
        d.state = DispatchState::Failed;
        d.failure = Some(FailReason::Error("executor said no".into()));
        d.lease_until = None;
    });
    fail_in_progress_stale_attempt: with(in_progress(), |d| d.attempt = 2), fail(1) => Fenced;
    retry_in_progress_attempts_left: in_progress(), retry(1) => Expect::Ok(|d| {
        d.state = DispatchState::Pending;
        d.available_at = ts(NOW + 5 * SEC);
        d.lease_until = None;
    });
    retry_in_progress_one_attempt_left: with(in_progress(), |d| d.attempt = 2), retry(2) => Expect::Ok(|d| {
        d.state = DispatchState::Pending;
        d.available_at = ts(NOW + 5 * SEC);
        d.lease_until = None;
    });
    retry_in_progress_at_max_attempts: with(in_progress(), |d| d.attempt = 3), retry(3) => Illegal;
    retry_in_progress_stale_attempt_at_max: with(in_progress(), |d| d.attempt = 3), retry(2) => Fenced;
    release_in_progress: in_progress(), release(1) => Expect::Ok(|d| {
        d.state = DispatchState::Pending;
        d.available_at = ts(NOW);
        d.lease_until = None;
        d.released = 1;
    });
    release_in_progress_at_max_attempts: with(in_progress(), |d| d.attempt = 3), release(3) => Expect::Ok(|d| {
        d.state = DispatchState::Pending;
        d.available_at = ts(NOW);
        d.lease_until = None;
        d.released = 1;
    });
    // Hand-backs do not count: three claims, two handed back, is one execution of three.
    retry_in_progress_after_hand_backs: with(in_progress(), |d| { d.attempt = 3; d.released = 2; }),
        retry(3) => Expect::Ok(|d| {
            d.state = DispatchState::Pending;
            d.available_at = ts(NOW + 5 * SEC);
            d.lease_until = None;
        });
    claim_pending_after_hand_backs_at_max_attempts: with(pending(), |d| { d.attempt = 5; d.released = 5; d.max_attempts = 1; }),
        claim("n1", NOW) => Expect::Ok(|d| {
            d.state = DispatchState::InProgress;
            d.attempt = 6;
            d.claimed_by = Some(node("n1"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    claim_pending_with_its_executions_used: with(pending(), |d| { d.attempt = 3; d.released = 0; }),
        claim("n1", NOW) => Illegal;
    claim_in_progress_lapsed_after_hand_backs: with(in_progress_lapsed(), |d| { d.attempt = 4; d.released = 2; }),
        claim("n2", NOW) => Expect::Ok(|d| {
            d.attempt = 5;
            d.claimed_by = Some(node("n2"));
            d.lease_until = Some(ts(NOW + 30 * SEC));
        });
    exhaust_in_progress_lapsed_hand_backs_leave_executions: with(in_progress_lapsed(), |d| { d.attempt = 3; d.released = 1; }),
        exhaust() => Illegal;
    late_in_progress_with_deadline: with(in_progress(), |d| d.deadline = Some(ts(NOW + SEC))), late(1) => Expect::Ok(|d| {
        d.state = DispatchState::Failed;
        d.failure = Some(FailReason::Expired);
        d.lease_until = None;
    });
    late_in_progress_without_deadline: in_progress(), late(1) => Illegal;
    late_in_progress_stale_attempt: with(in_progress(), |d| { d.attempt = 2; d.deadline = Some(ts(NOW)); }), late(1) => Fenced;
    late_pending: with(pending(), |d| d.deadline = Some(ts(NOW))), late(0) => Illegal;
    late_done: with(done(), |d| d.deadline = Some(ts(NOW))), late(1) => Illegal;
    late_failed: with(failed(), |d| d.deadline = Some(ts(NOW))), late(1) => Illegal;
    release_in_progress_stale_attempt: with(in_progress(), |d| d.attempt = 2), release(1) => Fenced;
    cancel_in_progress: in_progress(), cancel() => Illegal;
    cancel_in_progress_lease_lapsed: in_progress_lapsed(), cancel() => Illegal;
    expire_in_progress_lease_lapsed_deadline_passed: with(in_progress_lapsed(), |d| d.deadline = Some(ts(NOW - SEC))),
        expire() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Expired);
            d.lease_until = None;
        });
    expire_in_progress_lease_and_deadline_end_exactly_now: with(in_progress(), |d| {
            d.lease_until = Some(ts(NOW));
            d.deadline = Some(ts(NOW));
        }),
        expire() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Expired);
            d.lease_until = None;
        });
    expire_in_progress_lease_live_deadline_passed: with(in_progress(), |d| d.deadline = Some(ts(NOW - SEC))),
        expire() => Illegal;
    expire_in_progress_lease_lapsed_deadline_in_future: with(in_progress_lapsed(), |d| d.deadline = Some(ts(NOW + 1))),
        expire() => Illegal;
    expire_in_progress_lease_lapsed_without_deadline: in_progress_lapsed(), expire() => Illegal;
    exhaust_in_progress_lease_lapsed_at_max: with(in_progress_lapsed(), |d| d.attempt = 3),
        exhaust() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::AttemptsExhausted);
            d.lease_until = None;
        });
    exhaust_in_progress_beyond_max_after_release: with(in_progress_lapsed(), |d| d.attempt = 4),
        exhaust() => Expect::Ok(|d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::AttemptsExhausted);
            d.lease_until = None;
        });
    exhaust_in_progress_lease_live_at_max: with(in_progress(), |d| d.attempt = 3), exhaust() => Illegal;
    exhaust_in_progress_lease_lapsed_attempts_left: in_progress_lapsed(), exhaust() => Illegal;

    // ---- Done (terminal) ------------------------------------------------------------------------
    claim_done: done(), claim("n2", NOW) => Illegal;
    claim_done_lease_lapsed_long_ago: with(done(), |d| d.lease_until = Some(ts(T0))), claim("n2", NOW) => Illegal;
    heartbeat_done: done(), heartbeat(1, Some(progress(2))) => Illegal;
    heartbeat_done_stale_attempt: done(), heartbeat(0, None) => Fenced;
    complete_done_again: done(), complete(1) => Illegal;
    complete_done_stale_attempt: done(), complete(0) => Fenced;
    fail_done: done(), fail(1) => Illegal;
    fail_done_stale_attempt: done(), fail(0) => Fenced;
    retry_done: done(), retry(1) => Illegal;
    retry_done_stale_attempt: done(), retry(0) => Fenced;
    release_done: done(), release(1) => Illegal;
    release_done_future_attempt: done(), release(2) => Fenced;
    cancel_done: done(), cancel() => Illegal;
    expire_done_past_deadline: with(done(), |d| d.deadline = Some(ts(NOW - SEC))), expire() => Illegal;
    exhaust_done_at_max: with(done(), |d| d.attempt = 3), exhaust() => Illegal;

    // ---- Failed (terminal) ----------------------------------------------------------------------
    claim_failed: failed(), claim("n2", NOW) => Illegal;
    claim_failed_cancelled_while_pending: with(pending(), |d| {
            d.state = DispatchState::Failed;
            d.failure = Some(FailReason::Cancelled);
        }),
        claim("n2", NOW) => Illegal;
    heartbeat_failed: failed(), heartbeat(1, None) => Illegal;
    heartbeat_failed_stale_attempt: failed(), heartbeat(0, None) => Fenced;
    complete_failed: failed(), complete(1) => Illegal;
    complete_failed_stale_attempt: failed(), complete(0) => Fenced;
    fail_failed_again: failed(), fail(1) => Illegal;
    fail_failed_stale_attempt: failed(), fail(0) => Fenced;
    retry_failed: failed(), retry(1) => Illegal;
    retry_failed_stale_attempt: failed(), retry(0) => Fenced;
    release_failed: failed(), release(1) => Illegal;
    release_failed_stale_attempt: failed(), release(0) => Fenced;
    cancel_failed: failed(), cancel() => Illegal;
    expire_failed_past_deadline: with(failed(), |d| d.deadline = Some(ts(NOW - SEC))), expire() => Illegal;
    exhaust_failed_at_max: with(failed(), |d| d.attempt = 3), exhaust() => Illegal;
}

#[test]
fn illegal_transition_leaves_the_input_untouched() {
    let before = in_progress();
    let copy = before.clone();
    let _ = apply(&before, cancel());
    let _ = apply(&before, complete(7));
    assert_eq!(before, copy);
}

#[test]
fn every_state_and_event_kind_has_a_case() {
    // The case names above follow `<event>_<state>…`; this keeps the grid complete when an event
    // or state is added (the lists below must then grow, and so must the cases).
    let events = [
        "claim",
        "heartbeat",
        "complete",
        "fail",
        "retry",
        "release",
        "late",
        "cancel",
        "expire",
        "exhaust",
    ];
    let source = include_str!("fsm_table.rs");
    for state in DispatchState::ALL {
        for event in events {
            let prefix = format!("    {event}_{state}");
            assert!(
                source.lines().any(|l| l.starts_with(&prefix)),
                "no table case for {event} in state {state}"
            );
        }
    }
}

// ---- route -----------------------------------------------------------------------------------

const FRESH: Duration = Duration::from_secs(15);

fn affinity_of(owner: Option<&str>, last_seen: i64) -> Affinity {
    Affinity {
        broker: BrokerId::new("broker-1").unwrap(),
        node: owner.map(node),
        session: SessionId::new("s1").unwrap(),
        connected_at: ts(T0),
        last_seen: ts(last_seen),
    }
}

fn route_of(connected_here: bool, affinity: Option<&Affinity>, http: bool) -> Route {
    let me = node("me");
    route(&RouteInput {
        this_node: &me,
        connected_here,
        affinity,
        now: ts(NOW),
        freshness: FRESH,
        has_http_endpoint: http,
    })
}

fn forward_to(owner: &str) -> Route {
    Route::Forward { owner: node(owner) }
}

#[test]
fn route_row1_connected_here_is_local() {
    assert_eq!(route_of(true, None, false), Route::Local);
}

#[test]
fn route_row1_local_beats_a_fresh_owner_elsewhere_and_http() {
    let a = affinity_of(Some("other"), NOW);
    assert_eq!(route_of(true, Some(&a), true), Route::Local);
}

#[test]
fn route_row2_fresh_owner_elsewhere_is_forward() {
    let a = affinity_of(Some("other"), NOW - SEC);
    assert_eq!(route_of(false, Some(&a), false), forward_to("other"));
}

#[test]
fn route_row2_forward_beats_http() {
    let a = affinity_of(Some("other"), NOW);
    assert_eq!(route_of(false, Some(&a), true), forward_to("other"));
}

#[test]
fn route_row2_one_micro_inside_freshness_is_forward() {
    let a = affinity_of(Some("other"), NOW - 15 * SEC + 1);
    assert_eq!(route_of(false, Some(&a), false), forward_to("other"));
}

#[test]
fn route_row2_last_seen_ahead_of_now_counts_as_fresh() {
    // Another node's clock may run ahead: `now - last_seen` is negative, so below the window.
    let a = affinity_of(Some("other"), NOW + 5 * SEC);
    assert_eq!(route_of(false, Some(&a), false), forward_to("other"));
}

#[test]
fn route_row3_no_affinity_with_http_is_http() {
    assert_eq!(route_of(false, None, true), Route::Http);
}

#[test]
fn route_row3_stale_affinity_with_http_is_http() {
    let a = affinity_of(Some("other"), NOW - 60 * SEC);
    assert_eq!(route_of(false, Some(&a), true), Route::Http);
}

#[test]
fn route_row3_affinity_naming_this_node_with_http_is_http() {
    let a = affinity_of(Some("me"), NOW);
    assert_eq!(route_of(false, Some(&a), true), Route::Http);
}

#[test]
fn route_row4_no_affinity_is_undeliverable() {
    assert_eq!(route_of(false, None, false), Route::Undeliverable);
}

#[test]
fn route_row4_stale_affinity_is_undeliverable() {
    let a = affinity_of(Some("other"), NOW - 60 * SEC);
    assert_eq!(route_of(false, Some(&a), false), Route::Undeliverable);
}

#[test]
fn route_row4_stale_exactly_at_the_freshness_boundary() {
    let a = affinity_of(Some("other"), NOW - 15 * SEC);
    assert_eq!(route_of(false, Some(&a), false), Route::Undeliverable);
}

#[test]
fn route_row4_affinity_naming_this_node_without_a_connection() {
    let a = affinity_of(Some("me"), NOW);
    assert_eq!(route_of(false, Some(&a), false), Route::Undeliverable);
}

#[test]
fn route_row4_released_affinity() {
    let a = affinity_of(None, NOW);
    assert_eq!(route_of(false, Some(&a), false), Route::Undeliverable);
    assert_eq!(route_of(false, Some(&a), true), Route::Http);
}

#[test]
fn route_row4_zero_freshness_never_forwards() {
    let me = node("me");
    let a = affinity_of(Some("other"), NOW);
    let r = route(&RouteInput {
        this_node: &me,
        connected_here: false,
        affinity: Some(&a),
        now: ts(NOW),
        freshness: Duration::ZERO,
        has_http_endpoint: false,
    });
    assert_eq!(r, Route::Undeliverable);
}

#[test]
fn route_row4_age_beyond_the_i64_range_is_still_stale() {
    // The age (about 1.1e19 µs) exceeds i64::MAX but not the window's u64 range: it must not be
    // clamped below the window.
    let me = node("me");
    let a = affinity_of(Some("other"), -8_000_000_000_000_000_000);
    let r = route(&RouteInput {
        this_node: &me,
        connected_here: false,
        affinity: Some(&a),
        now: ts(3_000_000_000_000_000_000),
        freshness: Duration::from_micros(10_000_000_000_000_000_000),
        has_http_endpoint: false,
    });
    assert_eq!(r, Route::Undeliverable);
}

// ---- affinity --------------------------------------------------------------------------------

fn session(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn held(owner: Option<&str>, sess: &str, connected_at: i64) -> Affinity {
    Affinity {
        broker: BrokerId::new("broker-1").unwrap(),
        node: owner.map(node),
        session: session(sess),
        connected_at: ts(connected_at),
        last_seen: ts(connected_at),
    }
}

fn decide(current: Option<&Affinity>, by: &str, sess: &str, connected_at: i64) -> ConnectDecision {
    Affinity::decide_connect(
        current,
        &BrokerId::new("broker-1").unwrap(),
        &node(by),
        &session(sess),
        ts(connected_at),
        ts(NOW),
    )
}

fn claimed(by: &str, sess: &str, connected_at: i64) -> ConnectDecision {
    ConnectDecision::Claim(Affinity {
        broker: BrokerId::new("broker-1").unwrap(),
        node: Some(node(by)),
        session: session(sess),
        connected_at: ts(connected_at),
        last_seen: ts(NOW),
    })
}

#[test]
fn affinity_first_claim_wins() {
    assert_eq!(decide(None, "n1", "s1", T0), claimed("n1", "s1", T0));
}

#[test]
fn affinity_newest_connection_wins() {
    let cur = held(Some("n1"), "s1", T0);
    assert_eq!(
        decide(Some(&cur), "n2", "s2", T0 + 1),
        claimed("n2", "s2", T0 + 1)
    );
}

#[test]
fn affinity_older_delayed_claim_is_superseded() {
    let cur = held(Some("n2"), "s2", T0 + SEC);
    assert_eq!(
        decide(Some(&cur), "n1", "s9", T0),
        ConnectDecision::Superseded
    );
}

#[test]
fn affinity_equal_connected_at_ties_by_session() {
    let cur = held(Some("n1"), "s5", T0);
    assert_eq!(
        decide(Some(&cur), "n2", "s4", T0),
        ConnectDecision::Superseded
    );
    assert_eq!(decide(Some(&cur), "n2", "s6", T0), claimed("n2", "s6", T0));
}

#[test]
fn affinity_same_session_reclaim_is_idempotent() {
    let cur = held(Some("n1"), "s1", T0);
    let first = decide(Some(&cur), "n1", "s1", T0);
    assert_eq!(first, claimed("n1", "s1", T0));
    let ConnectDecision::Claim(row) = first else {
        unreachable!()
    };
    assert_eq!(decide(Some(&row), "n1", "s1", T0), claimed("n1", "s1", T0));
}

#[test]
fn affinity_release_then_late_duplicate_claim_is_superseded() {
    let released = held(None, "s1", T0);
    assert_eq!(
        decide(Some(&released), "n1", "s1", T0),
        ConnectDecision::Superseded
    );
}

#[test]
fn affinity_release_then_older_session_is_superseded() {
    let released = held(None, "s2", T0 + SEC);
    assert_eq!(
        decide(Some(&released), "n1", "s1", T0),
        ConnectDecision::Superseded
    );
}

#[test]
fn affinity_release_then_newer_session_claims() {
    let released = held(None, "s1", T0);
    assert_eq!(
        decide(Some(&released), "n3", "s3", T0 + 1),
        claimed("n3", "s3", T0 + 1)
    );
}

#[test]
fn affinity_is_fresh_boundaries() {
    let a = held(Some("n1"), "s1", NOW - 15 * SEC);
    assert!(!a.is_fresh(ts(NOW), FRESH), "exactly at the window: stale");
    assert!(
        a.is_fresh(ts(NOW - 1), FRESH),
        "one micro inside the window: fresh"
    );
    let released = held(None, "s1", NOW);
    assert!(
        !released.is_fresh(ts(NOW), FRESH),
        "a released row is never fresh"
    );
}

#[test]
fn affinity_is_held_by_needs_node_and_session() {
    let a = held(Some("n1"), "s1", T0);
    assert!(a.is_held_by(&node("n1"), &session("s1")));
    assert!(!a.is_held_by(&node("n1"), &session("s2")));
    assert!(!a.is_held_by(&node("n2"), &session("s1")));
    assert!(!held(None, "s1", T0).is_held_by(&node("n1"), &session("s1")));
}

// ---- rolling deadline ------------------------------------------------------------------------

mod waiter {
    use super::*;
    use broker_dispatch::fsm::RollingDeadline;

    const WINDOW: Duration = Duration::from_secs(5);

    #[test]
    fn starts_one_window_out() {
        let d = RollingDeadline::new(ts(T0), WINDOW, None);
        assert_eq!(d.poll_timeout(), ts(T0 + 5 * SEC));
        assert_eq!(d.hard_cap(), None);
    }

    #[test]
    fn touch_extends() {
        let mut d = RollingDeadline::new(ts(T0), WINDOW, None);
        d.touch(ts(T0 + 3 * SEC));
        assert_eq!(d.poll_timeout(), ts(T0 + 8 * SEC));
        assert!(
            !d.is_expired(ts(T0 + 5 * SEC)),
            "the original deadline no longer ends the wait"
        );
    }

    #[test]
    fn touch_never_moves_backwards() {
        let mut d = RollingDeadline::new(ts(T0), WINDOW, None);
        d.touch(ts(T0 + 4 * SEC));
        d.touch(ts(T0 + SEC));
        assert_eq!(d.poll_timeout(), ts(T0 + 9 * SEC));
        d.touch(ts(T0 - 100 * SEC));
        assert_eq!(d.poll_timeout(), ts(T0 + 9 * SEC));
    }

    #[test]
    fn hard_cap_holds() {
        let mut d = RollingDeadline::new(ts(T0), WINDOW, Some(Duration::from_secs(12)));
        assert_eq!(d.hard_cap(), Some(ts(T0 + 12 * SEC)));
        for s in 1..=20 {
            d.touch(ts(T0 + s * SEC));
            assert!(
                d.poll_timeout() <= ts(T0 + 12 * SEC),
                "past the cap after a touch at {s}s"
            );
        }
        assert_eq!(d.poll_timeout(), ts(T0 + 12 * SEC));
        assert!(d.is_expired(ts(T0 + 12 * SEC)));
    }

    #[test]
    fn hard_cap_shorter_than_window() {
        let d = RollingDeadline::new(ts(T0), WINDOW, Some(Duration::from_secs(2)));
        assert_eq!(d.poll_timeout(), ts(T0 + 2 * SEC));
    }

    #[test]
    fn is_expired_exactly_at_the_deadline() {
        let d = RollingDeadline::new(ts(T0), WINDOW, None);
        assert!(!d.is_expired(ts(T0 + 5 * SEC - 1)));
        assert!(d.is_expired(ts(T0 + 5 * SEC)));
        assert!(d.is_expired(ts(T0 + 6 * SEC)));
    }

    #[test]
    fn huge_window_saturates_instead_of_wrapping() {
        let mut d = RollingDeadline::new(ts(T0), Duration::MAX, None);
        assert_eq!(d.poll_timeout(), Timestamp::MAX);
        d.touch(Timestamp::MAX);
        assert_eq!(d.poll_timeout(), Timestamp::MAX);
        assert!(!d.is_expired(ts(i64::MAX - 1)));
    }

    /// The shell's loop, on tokio's paused clock: sleep until `poll_timeout`, touch on progress.
    /// Returns how long after the start it gave up.
    async fn wait_with_progress(progress_at: &[u64], cap: Option<Duration>) -> Duration {
        use tokio::sync::mpsc;
        use tokio::time::{sleep_until, Instant};

        let start = Instant::now();
        let now = move || Timestamp::from_micros(start.elapsed().as_micros() as i64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let schedule = progress_at.to_vec();
        tokio::spawn(async move {
            for at in schedule {
                sleep_until(start + Duration::from_secs(at)).await;
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        let mut deadline = RollingDeadline::new(now(), WINDOW, cap);
        let mut last_progress = now();
        loop {
            let wake = start + Duration::from_micros(deadline.poll_timeout().as_micros() as u64);
            tokio::select! {
                Some(()) = rx.recv() => {
                    last_progress = now();
                    deadline.touch(last_progress);
                }
                () = sleep_until(wake) => {
                    let t = now();
                    if deadline.is_expired(t) {
                        let capped = cap.is_some_and(|c| t >= ts(c.as_micros() as i64));
                        assert!(
                            capped || t >= last_progress.saturating_add(WINDOW),
                            "fired at {t}, less than a window after progress at {last_progress}"
                        );
                        return start.elapsed();
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_one_window_after_the_last_progress() {
        let gave_up = wait_with_progress(&[3, 6, 9, 12, 15], None).await;
        assert_eq!(gave_up, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn without_progress_fires_after_one_window() {
        let gave_up = wait_with_progress(&[], None).await;
        assert_eq!(gave_up, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_after_the_window_is_too_late() {
        let gave_up = wait_with_progress(&[7], None).await;
        assert_eq!(gave_up, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn endless_progress_is_stopped_by_the_hard_cap() {
        let every_second: Vec<u64> = (1..100).collect();
        let gave_up = wait_with_progress(&every_second, Some(Duration::from_secs(12))).await;
        assert_eq!(gave_up, Duration::from_secs(12));
    }
}

// ---- timestamps ------------------------------------------------------------------------------

#[test]
fn timestamp_add_saturates() {
    assert_eq!(
        ts(i64::MAX - 1).saturating_add(Duration::from_micros(5)),
        Timestamp::MAX
    );
    assert_eq!(ts(0).saturating_add(Duration::MAX), Timestamp::MAX);
    assert_eq!(ts(-5).saturating_add(Duration::from_micros(7)), ts(2));
    assert_eq!(ts(i64::MIN).saturating_add(Duration::MAX), Timestamp::MAX);
    assert_eq!(
        ts(i64::MIN).saturating_add(Duration::from_micros(1)),
        ts(i64::MIN + 1)
    );
}

#[test]
fn timestamp_add_truncates_below_a_microsecond() {
    assert_eq!(ts(10).saturating_add(Duration::from_nanos(1_999)), ts(11));
}

#[test]
fn timestamp_sub_saturates() {
    assert_eq!(
        ts(i64::MIN + 1).saturating_sub(Duration::from_micros(5)),
        ts(i64::MIN)
    );
    assert_eq!(ts(0).saturating_sub(Duration::MAX), ts(i64::MIN));
    assert_eq!(ts(10).saturating_sub(Duration::from_micros(3)), ts(7));
    assert_eq!(ts(i64::MAX).saturating_sub(Duration::MAX), ts(i64::MIN));
}

#[test]
fn timestamp_duration_since_is_zero_when_not_after() {
    assert_eq!(ts(10).duration_since(ts(3)), Duration::from_micros(7));
    assert_eq!(ts(3).duration_since(ts(10)), Duration::ZERO);
    assert_eq!(
        ts(i64::MAX).duration_since(ts(i64::MIN)),
        Duration::from_micros(u64::MAX)
    );
}

#[test]
fn timestamp_from_system_time() {
    use std::time::UNIX_EPOCH;
    assert_eq!(Timestamp::from_system_time(UNIX_EPOCH), Timestamp::EPOCH);
    assert_eq!(
        Timestamp::from_system_time(UNIX_EPOCH + Duration::from_secs(2)),
        ts(2 * SEC)
    );
    assert_eq!(
        Timestamp::from_system_time(UNIX_EPOCH - Duration::from_secs(1)),
        ts(-SEC)
    );
}

// ---- ids -------------------------------------------------------------------------------------

#[test]
fn id_empty_is_rejected() {
    assert_eq!(BrokerId::new(""), Err(IdError::Empty { what: "broker id" }));
    assert!(matches!(NodeId::new(""), Err(IdError::Empty { .. })));
    assert!(matches!(SessionId::new(""), Err(IdError::Empty { .. })));
}

#[test]
fn id_length_limit_counts_bytes() {
    assert!(BrokerId::new("b".repeat(MAX_ID_LEN)).is_ok());
    assert_eq!(
        BrokerId::new("b".repeat(MAX_ID_LEN + 1)),
        Err(IdError::TooLong {
            what: "broker id",
            len: 257
        })
    );
    // 'é' is two bytes: 128 of them fill the limit exactly, 129 exceed it.
    assert!(NodeId::new("é".repeat(128)).is_ok());
    assert!(matches!(
        NodeId::new("é".repeat(129)),
        Err(IdError::TooLong { len: 258, .. })
    ));
}

#[test]
fn id_control_characters_are_rejected() {
    for bad in [
        "a\nb",
        "nul\0",
        "tab\t",
        "del\u{7f}",
        "c1\u{85}",
        "\u{1b}[31m",
    ] {
        assert!(
            matches!(BrokerId::new(bad), Err(IdError::ControlChar { .. })),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn id_valid_names_round_trip() {
    for good in ["broker-1", "brøker ✓", "pod-7f/uuid:0190", "a"] {
        let id = BrokerId::new(good).unwrap();
        assert_eq!(id.as_str(), good);
        assert_eq!(id.to_string(), good);
        assert_eq!(BrokerId::from_str(good).unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<BrokerId>(&json).unwrap(), id);
    }
}

#[test]
fn id_deserialize_validates() {
    assert!(serde_json::from_str::<NodeId>(r#""""#).is_err());
    assert!(serde_json::from_str::<NodeId>(r#""a\nb""#).is_err());
    let long = format!("\"{}\"", "x".repeat(MAX_ID_LEN + 1));
    assert!(serde_json::from_str::<SessionId>(&long).is_err());
}

#[test]
fn dispatch_id_parse() {
    let id = DispatchId::new();
    assert_eq!(DispatchId::parse(&id.to_string()).unwrap(), id);
    assert!(matches!(
        DispatchId::parse("not-a-uuid"),
        Err(IdError::NotUuid(_))
    ));
    assert_eq!(id.as_uuid().get_version_num(), 7);
}

// ---- states and failure reasons --------------------------------------------------------------

#[test]
fn dispatch_state_display_from_str_round_trip() {
    let names = ["pending", "in_progress", "done", "failed"];
    for (state, name) in DispatchState::ALL.into_iter().zip(names) {
        assert_eq!(state.to_string(), name);
        assert_eq!(DispatchState::from_str(name).unwrap(), state);
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{name}\"")
        );
    }
    for bad in ["", "Pending", "inprogress", "in-progress", " done"] {
        assert!(DispatchState::from_str(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn dispatch_state_terminality() {
    let terminal: Vec<_> = DispatchState::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .collect();
    assert_eq!(terminal, [DispatchState::Done, DispatchState::Failed]);
}

fn all_reasons() -> Vec<FailReason> {
    vec![
        FailReason::Error("disk: full".into()),
        FailReason::Error(String::new()),
        FailReason::AttemptsExhausted,
        FailReason::Expired,
        FailReason::Cancelled,
        FailReason::Undeliverable,
    ]
}

#[test]
fn fail_reason_display() {
    let shown: Vec<String> = all_reasons().iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "error: disk: full",
            "error: ",
            "attempts_exhausted",
            "expired",
            "cancelled",
            "undeliverable"
        ]
    );
}

#[test]
fn fail_reason_display_from_str_round_trip() {
    for r in all_reasons() {
        assert_eq!(FailReason::from_str(&r.to_string()).unwrap(), r);
    }
    for bad in ["", "Expired", "error", "oops: x"] {
        assert!(FailReason::from_str(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn fail_reason_parts_round_trip() {
    for r in all_reasons() {
        let back = FailReason::from_parts(r.kind(), r.message().map(str::to_owned)).unwrap();
        assert_eq!(back, r);
    }
    assert!(FailReason::from_parts("nope", None).is_err());
}

// ---------------------------------------------------------------------------------------------
// Ordering keys: `claim_order`, one row of the rule per test.

/// Row `n` of one broker, created `n` seconds after `T0`, with ordering key `key`.
fn keyed(n: u128, key: Option<&str>) -> Dispatch {
    with(pending(), |d| {
        d.id = DispatchId::from_uuid(uuid::Uuid::from_u128(
            0x0190_0000_0000_7000_8000_0000_0000_0100 + n,
        ));
        d.created_at = ts(T0 + n as i64 * SEC);
        d.available_at = d.created_at;
        d.key = key.map(str::to_owned);
        d.idempotency_key = None;
    })
}

fn order_of(rows: &[Dispatch], limit: usize) -> Vec<DispatchId> {
    let refs: Vec<&Dispatch> = rows.iter().collect();
    broker_dispatch::fsm::claim_order(&refs, ts(NOW), limit)
}

#[test]
fn key_one_claim_takes_only_the_oldest_row_of_a_key() {
    let rows = [
        keyed(1, Some("a")),
        keyed(2, Some("a")),
        keyed(3, None),
        keyed(4, Some("b")),
        keyed(5, Some("b")),
    ];
    assert_eq!(
        order_of(&rows, 10),
        vec![rows[0].id, rows[2].id, rows[3].id],
        "one per key, oldest first; unkeyed rows are never held back"
    );
}

#[test]
fn key_a_held_row_blocks_its_key_whatever_its_age() {
    // The held row is younger than the pending one: one at a time still holds.
    let held = with(keyed(2, Some("a")), |d| {
        d.state = DispatchState::InProgress;
        d.attempt = 1;
        d.claimed_by = Some(node("n1"));
        d.lease_until = Some(ts(NOW + SEC));
    });
    let rows = [keyed(1, Some("a")), held];
    assert_eq!(order_of(&rows, 10), Vec::<DispatchId>::new());
}

#[test]
fn key_a_held_row_with_a_lapsed_lease_is_reclaimed_first_and_blocks_the_rest() {
    let lapsed = with(keyed(1, Some("a")), |d| {
        d.state = DispatchState::InProgress;
        d.attempt = 1;
        d.claimed_by = Some(node("n1"));
        d.lease_until = Some(ts(NOW - SEC));
    });
    let rows = [lapsed.clone(), keyed(2, Some("a"))];
    assert_eq!(order_of(&rows, 10), vec![lapsed.id]);
}

#[test]
fn key_a_retried_row_keeps_its_place_while_it_waits() {
    // Handed back for a retry at NOW + 5 s: not claimable yet, and its key waits behind it.
    let retried = with(keyed(1, Some("a")), |d| {
        d.attempt = 1;
        d.available_at = ts(NOW + 5 * SEC);
    });
    let rows = [retried, keyed(2, Some("a")), keyed(3, None)];
    assert_eq!(order_of(&rows, 10), vec![rows[2].id]);
}

#[test]
fn key_a_dead_row_stops_holding_up_its_key_before_the_sweeper_fails_it() {
    let expired = with(keyed(1, Some("a")), |d| d.deadline = Some(ts(NOW)));
    let rows = [expired, keyed(2, Some("a"))];
    assert_eq!(order_of(&rows, 10), vec![rows[1].id]);
}

#[test]
fn key_the_same_key_of_another_broker_is_another_key() {
    let other = with(keyed(2, Some("a")), |d| {
        d.broker = BrokerId::new("broker-2").unwrap()
    });
    let rows = [keyed(1, Some("a")), other];
    assert_eq!(order_of(&rows, 10), vec![rows[0].id, rows[1].id]);
}

#[test]
fn key_the_limit_counts_claimed_rows_only() {
    let rows = [
        keyed(1, Some("a")),
        keyed(2, Some("a")),
        keyed(3, Some("a")),
        keyed(4, None),
    ];
    assert_eq!(order_of(&rows, 2), vec![rows[0].id, rows[3].id]);
}

// ---------------------------------------------------------------------------------------------
// Cancel requests: `RequestCancel`, and how a marked row answers every other event.

fn request_cancel() -> Event {
    Event::RequestCancel { now: ts(NOW) }
}

/// [`in_progress`] with a cancel request.
fn cancelling() -> Dispatch {
    with(in_progress(), |d| d.failure = Some(FailReason::Cancelled))
}

/// [`in_progress_lapsed`] with a cancel request.
fn cancelling_lapsed() -> Dispatch {
    with(in_progress_lapsed(), |d| {
        d.failure = Some(FailReason::Cancelled)
    })
}

fn cancelled_now(d: &mut Dispatch) {
    d.state = DispatchState::Failed;
    d.failure = Some(FailReason::Cancelled);
    d.lease_until = None;
}

transitions! {
    request_cancel_pending: pending(), request_cancel() => Expect::Ok(|d| {
        d.state = DispatchState::Failed;
        d.failure = Some(FailReason::Cancelled);
    });
    request_cancel_in_progress_marks_it: in_progress(), request_cancel() => Expect::Ok(|d| {
        d.failure = Some(FailReason::Cancelled);
    });
    request_cancel_in_progress_twice: cancelling(), request_cancel() => Expect::Ok(|_| {});
    request_cancel_lapsed_marks_it: in_progress_lapsed(), request_cancel() => Expect::Ok(|d| {
        d.failure = Some(FailReason::Cancelled);
    });
    request_cancel_done: done(), request_cancel() => Illegal;
    request_cancel_failed: failed(), request_cancel() => Illegal;

    cancelling_heartbeat_keeps_the_mark: cancelling(), heartbeat(1, None) => Expect::Ok(|d| {
        d.lease_until = Some(ts(NOW + 30 * SEC));
    });
    cancelling_complete_completes: cancelling(), complete(1) => Expect::Ok(|d| {
        d.state = DispatchState::Done;
        d.result = Some(json!({ "answer": 42 }));
        d.failure = None;
        d.lease_until = None;
    });
    cancelling_fail_is_cancelled: cancelling(), fail(1) => Expect::Ok(cancelled_now);
    cancelling_retry_is_cancelled: cancelling(), retry(1) => Expect::Ok(cancelled_now);
    cancelling_retry_without_executions_left_is_cancelled:
        with(cancelling(), |d| d.max_attempts = 1), retry(1) => Expect::Ok(cancelled_now);
    cancelling_release_is_cancelled_and_not_counted: cancelling(), release(1)
        => Expect::Ok(cancelled_now);
    cancelling_late_without_a_deadline_is_cancelled: cancelling(), late(1)
        => Expect::Ok(cancelled_now);
    cancelling_stale_holder_is_fenced: cancelling(), complete(0) => Fenced;
    cancelling_lapsed_is_never_claimed: cancelling_lapsed(), claim("n2", NOW) => Illegal;
    cancelling_live_exhaust_is_illegal: cancelling(), exhaust() => Illegal;
    cancelling_lapsed_exhausts_as_cancelled: cancelling_lapsed(), exhaust()
        => Expect::Ok(cancelled_now);
    cancelling_lapsed_past_deadline_expires: with(cancelling_lapsed(), |d| {
        d.deadline = Some(ts(NOW));
    }), expire() => Expect::Ok(|d| {
        d.state = DispatchState::Failed;
        d.failure = Some(FailReason::Expired);
        d.lease_until = None;
    });
}

#[test]
fn a_lapsed_cancelled_row_is_dead_and_does_not_hold_up_its_key() {
    let lapsed = with(cancelling_lapsed(), |d| d.key = Some("k".into()));
    assert!(lapsed.is_dead(ts(NOW)));
    assert!(!lapsed.is_claimable(ts(NOW)));
    assert!(cancelling().cancel_requested() && !in_progress().cancel_requested());
    assert!(!with(failed(), |d| d.failure = Some(FailReason::Cancelled)).cancel_requested());
}
