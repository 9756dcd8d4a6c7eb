//! Arbitrary event sequences through `fsm::apply`: it never panics, attempts only grow (by one, on
//! a claim), terminal states never change, and `Fenced` comes back exactly when a holder's event
//! presents an attempt that is not the row's.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use broker_dispatch::fsm::{
    apply, BrokerId, Dispatch, DispatchId, DispatchState, Event, EventKind, FailReason, NodeId,
    Progress, Timestamp, TransitionError,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    max_attempts: u8,
    start: When,
    available_at: i32,
    deadline: Option<i32>,
    nodes: Vec<String>,
    ops: Vec<Op>,
}

/// A `now`: mostly relative to the previous one (forward or backward), sometimes anywhere.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum When {
    Delta(i32),
    Absolute(i64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Pick {
    Current,
    Offset(i8),
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Claim {
        node: u8,
        at: When,
        lease: u64,
    },
    Heartbeat {
        pick: Pick,
        at: When,
        lease: u64,
        seq: Option<u64>,
    },
    Complete {
        pick: Pick,
        at: When,
    },
    Fail {
        pick: Pick,
        at: When,
        error: String,
    },
    Retry {
        pick: Pick,
        at: When,
        to: When,
    },
    Release {
        pick: Pick,
        at: When,
    },
    Cancel {
        at: When,
    },
    RequestCancel {
        at: When,
    },
    Expire {
        at: When,
    },
    Exhaust {
        at: When,
    },
}

fn advance(clock: &mut i64, w: When) -> Timestamp {
    *clock = match w {
        When::Delta(d) => clock.saturating_add(i64::from(d)),
        When::Absolute(t) => t,
    };
    Timestamp::from_micros(*clock)
}

fn resolve(p: Pick, current: u32) -> u32 {
    match p {
        Pick::Current => current,
        Pick::Offset(o) => current.saturating_add_signed(i32::from(o)),
        Pick::Raw(a) => a,
    }
}

fuzz_target!(|input: Input| {
    let mut clock = 0i64;
    let created = advance(&mut clock, input.start);
    let nodes: Vec<NodeId> = input
        .nodes
        .into_iter()
        .filter_map(|n| NodeId::new(n).ok())
        .chain([NodeId::new("n1").unwrap()])
        .collect();
    let mut d = Dispatch {
        id: DispatchId::from_uuid(uuid::Uuid::from_u128(1)),
        broker: BrokerId::new("broker").unwrap(),
        op: "op".into(),
        args: serde_json::Value::Null,
        state: DispatchState::Pending,
        attempt: 0,
        max_attempts: u32::from(input.max_attempts.max(1)),
        claimed_by: None,
        lease_until: None,
        available_at: Timestamp::from_micros(clock.saturating_add(i64::from(input.available_at))),
        deadline: input
            .deadline
            .map(|dl| Timestamp::from_micros(clock.saturating_add(i64::from(dl)))),
        result: None,
        failure: None,
        progress: None,
        idempotency_key: None,
        created_at: created,
        updated_at: created,
        key: None,
        released: 0,
    };

    for op in input.ops {
        let a = d.attempt;
        let event = match op {
            Op::Claim { node, at, lease } => Event::Claim {
                node: nodes[usize::from(node) % nodes.len()].clone(),
                now: advance(&mut clock, at),
                lease: Duration::from_micros(lease),
            },
            Op::Heartbeat {
                pick,
                at,
                lease,
                seq,
            } => Event::Heartbeat {
                attempt: resolve(pick, a),
                now: advance(&mut clock, at),
                lease: Duration::from_micros(lease),
                progress: seq.map(|seq| Progress {
                    seq,
                    detail: serde_json::Value::Null,
                }),
            },
            Op::Complete { pick, at } => Event::Complete {
                attempt: resolve(pick, a),
                now: advance(&mut clock, at),
                result: serde_json::json!(clock),
            },
            Op::Fail { pick, at, error } => Event::Fail {
                attempt: resolve(pick, a),
                now: advance(&mut clock, at),
                error,
            },
            Op::Retry { pick, at, to } => {
                let now = advance(&mut clock, at);
                let mut later = clock;
                Event::Retry {
                    attempt: resolve(pick, a),
                    now,
                    at: advance(&mut later, to),
                }
            }
            Op::Release { pick, at } => Event::Release {
                attempt: resolve(pick, a),
                now: advance(&mut clock, at),
            },
            Op::Cancel { at } => Event::Cancel {
                now: advance(&mut clock, at),
            },
            Op::RequestCancel { at } => Event::RequestCancel {
                now: advance(&mut clock, at),
            },
            Op::Expire { at } => Event::Expire {
                now: advance(&mut clock, at),
            },
            Op::Exhaust { at } => Event::Exhaust {
                now: advance(&mut clock, at),
            },
        };
        let kind = event.kind();
        let now = event.now();
        let presented = event.attempt();
        let claim_lease = match &event {
            Event::Claim { lease, .. } => Some(*lease),
            _ => None,
        };
        let result = apply(&d, event);

        let mismatch = presented.is_some_and(|p| p != d.attempt);
        assert_eq!(
            matches!(result, Err(TransitionError::Fenced { .. })),
            mismatch,
            "fenced iff the attempt mismatches: {kind} presenting {presented:?} on {d:?}"
        );
        match result {
            Ok(next) => {
                assert!(
                    !d.state.is_terminal(),
                    "{kind} left terminal state {}",
                    d.state
                );
                assert!(
                    next.attempt >= d.attempt,
                    "attempt went backwards on {kind}"
                );
                if kind == EventKind::Claim {
                    assert_eq!(next.attempt, d.attempt + 1);
                    assert_eq!(next.state, DispatchState::InProgress);
                    assert_eq!(
                        next.lease_until,
                        Some(now.saturating_add(claim_lease.unwrap()))
                    );
                } else {
                    assert_eq!(next.attempt, d.attempt, "{kind} changed the attempt");
                }
                assert_eq!(next.updated_at, now);
                // Only a holder has a lease.
                assert_eq!(
                    next.lease_until.is_some(),
                    next.state == DispatchState::InProgress,
                    "{kind} left {:?} with lease {:?}",
                    next.state,
                    next.lease_until
                );
                if next.state == DispatchState::Failed {
                    assert!(next.failure.is_some(), "failed without a reason");
                }
                if next.state == DispatchState::Done {
                    assert!(next.result.is_some(), "done without a result");
                    assert!(next.failure.is_none(), "done with a failure");
                }
                // A cancel request sticks until the row ends, and ends it cancelled unless
                // it completed.
                if d.cancel_requested() {
                    assert!(
                        next.cancel_requested()
                            || next.state == DispatchState::Done
                            || next.failure == Some(FailReason::Cancelled)
                            || next.failure == Some(FailReason::Expired),
                        "{kind} dropped a cancel request: {next:?}"
                    );
                    assert_ne!(
                        next.state,
                        DispatchState::Pending,
                        "{kind} re-queued a cancelled row"
                    );
                }
                if next.state == DispatchState::Pending {
                    assert!(
                        next.failure.is_none(),
                        "{kind} left a pending row with a failure"
                    );
                }
                d = next;
            }
            Err(TransitionError::Fenced {
                presented: p,
                current,
            }) => {
                assert_eq!(Some(p), presented);
                assert_eq!(current, d.attempt);
            }
            Err(TransitionError::Illegal { from, event }) => {
                assert_eq!(from, d.state);
                assert_eq!(event, kind);
            }
            Err(e) => panic!("unknown transition error {e:?}"),
        }
    }
});
