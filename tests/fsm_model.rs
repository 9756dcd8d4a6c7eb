//! Property tests of the pure core.
//!
//! Random event sequences go through `fsm::apply` and through a small reference model written here
//! from the DESIGN §3 table (it shares no code with the crate); both must agree on every step.
//! The records' JSON forms must round-trip.

use std::time::Duration;

use broker_dispatch::fsm::{
    apply, BrokerId, Dispatch, DispatchId, DispatchState, Event, EventKind, FailReason, NodeId,
    Progress, Timestamp, TransitionError,
};
use broker_dispatch::transport::Notice;
use proptest::prelude::*;
use serde_json::{json, Value};

// ---- the reference model ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MState {
    Pending,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MFail {
    Error(String),
    Exhausted,
    Expired,
    Cancelled,
}

/// The fields the §3 table reads and writes, in the model's own terms.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    state: MState,
    attempt: u32,
    /// Claims handed back unexecuted; `attempt - released` executions began.
    released: u32,
    max_attempts: u32,
    claimed_by: Option<String>,
    lease_until: Option<i64>,
    available_at: i64,
    deadline: Option<i64>,
    failure: Option<MFail>,
    result: Option<Value>,
    progress: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Fenced,
    Illegal,
}

/// What a generated op becomes once the clock and the current attempt are known.
#[derive(Debug, Clone)]
enum Step {
    Claim {
        node: String,
        now: i64,
        lease_us: u64,
    },
    Heartbeat {
        attempt: u32,
        now: i64,
        lease_us: u64,
        seq: Option<u64>,
    },
    Complete {
        attempt: u32,
        now: i64,
        result: Value,
    },
    Fail {
        attempt: u32,
        now: i64,
        error: String,
    },
    Retry {
        attempt: u32,
        now: i64,
        at: i64,
    },
    Release {
        attempt: u32,
        now: i64,
    },
    Late {
        attempt: u32,
        now: i64,
    },
    Cancel {
        now: i64,
    },
    Expire {
        now: i64,
    },
    Exhaust {
        now: i64,
    },
}

fn plus(now: i64, micros: u64) -> i64 {
    i64::try_from(i128::from(now) + i128::from(micros)).unwrap_or(i64::MAX)
}

impl Model {
    fn holder_attempt(step: &Step) -> Option<u32> {
        match step {
            Step::Heartbeat { attempt, .. }
            | Step::Complete { attempt, .. }
            | Step::Fail { attempt, .. }
            | Step::Retry { attempt, .. }
            | Step::Release { attempt, .. }
            | Step::Late { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }

    fn step(&self, step: &Step) -> Result<Model, Refusal> {
        if Self::holder_attempt(step).is_some_and(|a| a != self.attempt) {
            return Err(Refusal::Fenced);
        }
        let mut m = self.clone();
        let lease_lapsed = |now: i64| self.lease_until.is_some_and(|l| l <= now);
        let deadline_passed = |now: i64| self.deadline.is_some_and(|d| d <= now);
        let executions_left = self.attempt - self.released < self.max_attempts;
        match (self.state, step) {
            (
                MState::Pending,
                Step::Claim {
                    node,
                    now,
                    lease_us,
                },
            ) if self.available_at <= *now
                && !deadline_passed(*now)
                && self.attempt < u32::MAX
                && executions_left =>
            {
                m.state = MState::Running;
                m.attempt += 1;
                m.claimed_by = Some(node.clone());
                m.lease_until = Some(plus(*now, *lease_us));
            }
            (
                MState::Running,
                Step::Claim {
                    node,
                    now,
                    lease_us,
                },
            ) if lease_lapsed(*now)
                && executions_left
                && self.attempt < u32::MAX
                && !deadline_passed(*now) =>
            {
                m.attempt += 1;
                m.claimed_by = Some(node.clone());
                m.lease_until = Some(plus(*now, *lease_us));
            }
            (
                MState::Running,
                Step::Heartbeat {
                    now, lease_us, seq, ..
                },
            ) if !lease_lapsed(*now) => {
                m.lease_until = Some(plus(*now, *lease_us));
                if seq.is_some() {
                    m.progress = *seq;
                }
            }
            (MState::Running, Step::Complete { result, .. }) => {
                m.state = MState::Done;
                m.result = Some(result.clone());
                m.lease_until = None;
            }
            (MState::Running, Step::Fail { error, .. }) => {
                m.state = MState::Failed;
                m.failure = Some(MFail::Error(error.clone()));
                m.lease_until = None;
            }
            (MState::Running, Step::Retry { at, .. }) if executions_left => {
                m.state = MState::Pending;
                m.available_at = *at;
                m.lease_until = None;
            }
            (MState::Running, Step::Release { now, .. }) => {
                m.state = MState::Pending;
                m.available_at = *now;
                m.lease_until = None;
                m.released += 1;
            }
            (MState::Running, Step::Late { .. }) if self.deadline.is_some() => {
                m.state = MState::Failed;
                m.failure = Some(MFail::Expired);
                m.lease_until = None;
            }
            (MState::Pending, Step::Cancel { .. }) => {
                m.state = MState::Failed;
                m.failure = Some(MFail::Cancelled);
            }
            (MState::Pending, Step::Expire { now }) if deadline_passed(*now) => {
                m.state = MState::Failed;
                m.failure = Some(MFail::Expired);
            }
            (MState::Running, Step::Expire { now })
                if lease_lapsed(*now) && deadline_passed(*now) =>
            {
                m.state = MState::Failed;
                m.failure = Some(MFail::Expired);
                m.lease_until = None;
            }
            (MState::Running, Step::Exhaust { now }) if lease_lapsed(*now) && !executions_left => {
                m.state = MState::Failed;
                m.failure = Some(MFail::Exhausted);
                m.lease_until = None;
            }
            _ => return Err(Refusal::Illegal),
        }
        Ok(m)
    }

    /// The model's view of a crate record.
    fn of(d: &Dispatch) -> Model {
        Model {
            state: match d.state {
                DispatchState::Pending => MState::Pending,
                DispatchState::InProgress => MState::Running,
                DispatchState::Done => MState::Done,
                DispatchState::Failed => MState::Failed,
            },
            attempt: d.attempt,
            released: d.released,
            max_attempts: d.max_attempts,
            claimed_by: d.claimed_by.as_ref().map(|n| n.as_str().to_owned()),
            lease_until: d.lease_until.map(Timestamp::as_micros),
            available_at: d.available_at.as_micros(),
            deadline: d.deadline.map(Timestamp::as_micros),
            failure: d.failure.as_ref().map(|f| match f {
                FailReason::Error(m) => MFail::Error(m.clone()),
                FailReason::AttemptsExhausted => MFail::Exhausted,
                FailReason::Expired => MFail::Expired,
                FailReason::Cancelled => MFail::Cancelled,
                FailReason::Undeliverable => panic!("apply never writes Undeliverable"),
                FailReason::Corrupt(_) => panic!("apply never writes Corrupt (stores do)"),
            }),
            result: d.result.clone(),
            progress: d.progress.as_ref().map(|p| p.seq),
        }
    }
}

fn event_of(step: &Step) -> Event {
    let ts = Timestamp::from_micros;
    match step.clone() {
        Step::Claim {
            node,
            now,
            lease_us,
        } => Event::Claim {
            node: NodeId::new(node).unwrap(),
            now: ts(now),
            lease: Duration::from_micros(lease_us),
        },
        Step::Heartbeat {
            attempt,
            now,
            lease_us,
            seq,
        } => Event::Heartbeat {
            attempt,
            now: ts(now),
            lease: Duration::from_micros(lease_us),
            progress: seq.map(|seq| Progress {
                seq,
                detail: json!({ "seq": seq }),
            }),
        },
        Step::Complete {
            attempt,
            now,
            result,
        } => Event::Complete {
            attempt,
            now: ts(now),
            result,
        },
        Step::Fail {
            attempt,
            now,
            error,
        } => Event::Fail {
            attempt,
            now: ts(now),
            error,
        },
        Step::Retry { attempt, now, at } => Event::Retry {
            attempt,
            now: ts(now),
            at: ts(at),
        },
        Step::Release { attempt, now } => Event::Release {
            attempt,
            now: ts(now),
        },
        Step::Late { attempt, now } => Event::Late {
            attempt,
            now: ts(now),
        },
        Step::Cancel { now } => Event::Cancel { now: ts(now) },
        Step::Expire { now } => Event::Expire { now: ts(now) },
        Step::Exhaust { now } => Event::Exhaust { now: ts(now) },
    }
}

// ---- generated operations ----------------------------------------------------------------------

const MS: i64 = 1_000;
const T0: i64 = 1_700_000_000_000_000;

/// Which attempt a holder's op presents: mostly the current one, sometimes a stale or future one.
#[derive(Debug, Clone)]
enum Pick {
    Current,
    Offset(i8),
    Raw(u32),
}

impl Pick {
    fn resolve(&self, current: u32) -> u32 {
        match self {
            Pick::Current => current,
            Pick::Offset(o) => current.saturating_add_signed(i32::from(*o)),
            Pick::Raw(a) => *a,
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Claim {
        node: usize,
        lease_ms: u64,
    },
    Heartbeat {
        pick: Pick,
        lease_ms: u64,
        seq: Option<u64>,
    },
    Complete {
        pick: Pick,
        result: i64,
    },
    Fail {
        pick: Pick,
        error: String,
    },
    Retry {
        pick: Pick,
        after_ms: i64,
    },
    Release {
        pick: Pick,
    },
    Late {
        pick: Pick,
    },
    Cancel,
    Expire,
    Exhaust,
}

/// An op: a clock move (mostly forward, sometimes backward, as clocks of different nodes do) and
/// an event kind.
#[derive(Debug, Clone)]
struct Op {
    dt_ms: i64,
    kind: Kind,
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => Just(Pick::Current),
        2 => (-2i8..=2).prop_map(Pick::Offset),
        1 => (0u32..6).prop_map(Pick::Raw),
    ]
}

fn lease_ms() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..20_000, 1 => Just(0), 1 => Just(u64::MAX / 1_000)]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        5 => (0usize..8, lease_ms()).prop_map(|(node, lease_ms)| Kind::Claim { node, lease_ms }),
        3 => (pick(), lease_ms(), proptest::option::of(0u64..100))
            .prop_map(|(pick, lease_ms, seq)| Kind::Heartbeat { pick, lease_ms, seq }),
        2 => (pick(), any::<i64>()).prop_map(|(pick, result)| Kind::Complete { pick, result }),
        1 => (pick(), ".{0,12}").prop_map(|(pick, error)| Kind::Fail { pick, error }),
        2 => (pick(), -3_000i64..10_000).prop_map(|(pick, after_ms)| Kind::Retry { pick, after_ms }),
        2 => pick().prop_map(|pick| Kind::Release { pick }),
        1 => pick().prop_map(|pick| Kind::Late { pick }),
        1 => Just(Kind::Cancel),
        2 => Just(Kind::Expire),
        2 => Just(Kind::Exhaust),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let dt = prop_oneof![8 => 0i64..15_000, 2 => -5_000i64..0, 1 => 30_000i64..120_000];
    (dt, kind()).prop_map(|(dt_ms, kind)| Op { dt_ms, kind })
}

fn node_names() -> impl Strategy<Value = Vec<String>> {
    let name = prop_oneof![
        Just("n1".to_owned()),
        Just("nœud-2".to_owned()),
        "[a-z0-9-]{1,10}",
        "\\PC{1,12}",
    ];
    prop::collection::vec(name, 1..4)
}

/// A fresh pending row with a random attempt budget, availability and deadline.
fn start() -> impl Strategy<Value = Dispatch> {
    (
        1u32..5,
        -5_000i64..5_000,
        proptest::option::of(0i64..120_000),
    )
        .prop_map(|(max_attempts, avail_ms, deadline_ms)| Dispatch {
            id: DispatchId::from_uuid(uuid::Uuid::from_u128(7)),
            broker: BrokerId::new("broker-1").unwrap(),
            op: "start".into(),
            args: json!({ "agent": "a1" }),
            state: DispatchState::Pending,
            attempt: 0,
            max_attempts,
            claimed_by: None,
            lease_until: None,
            available_at: Timestamp::from_micros(T0 + avail_ms * MS),
            deadline: deadline_ms.map(|d| Timestamp::from_micros(T0 + d * MS)),
            result: None,
            failure: None,
            progress: None,
            idempotency_key: None,
            created_at: Timestamp::from_micros(T0),
            updated_at: Timestamp::from_micros(T0),
            key: None,
            released: 0,
        })
}

fn resolve(op: &Op, nodes: &[String], clock: &mut i64, attempt: u32) -> Step {
    *clock += op.dt_ms * MS;
    let now = *clock;
    match &op.kind {
        Kind::Claim { node, lease_ms } => Step::Claim {
            node: nodes[node % nodes.len()].clone(),
            now,
            lease_us: lease_ms * 1_000,
        },
        Kind::Heartbeat {
            pick,
            lease_ms,
            seq,
        } => Step::Heartbeat {
            attempt: pick.resolve(attempt),
            now,
            lease_us: lease_ms * 1_000,
            seq: *seq,
        },
        Kind::Complete { pick, result } => Step::Complete {
            attempt: pick.resolve(attempt),
            now,
            result: json!(result),
        },
        Kind::Fail { pick, error } => Step::Fail {
            attempt: pick.resolve(attempt),
            now,
            error: error.clone(),
        },
        Kind::Retry { pick, after_ms } => Step::Retry {
            attempt: pick.resolve(attempt),
            now,
            at: now + after_ms * MS,
        },
        Kind::Release { pick } => Step::Release {
            attempt: pick.resolve(attempt),
            now,
        },
        Kind::Late { pick } => Step::Late {
            attempt: pick.resolve(attempt),
            now,
        },
        Kind::Cancel => Step::Cancel { now },
        Kind::Expire => Step::Expire { now },
        Kind::Exhaust => Step::Exhaust { now },
    }
}

/// Fields `apply` must never touch, whatever the event.
#[allow(clippy::type_complexity)]
fn identity(
    d: &Dispatch,
) -> (
    DispatchId,
    &BrokerId,
    &String,
    &Value,
    u32,
    Option<Timestamp>,
    &Option<String>,
    Timestamp,
) {
    (
        d.id,
        &d.broker,
        &d.op,
        &d.args,
        d.max_attempts,
        d.deadline,
        &d.idempotency_key,
        d.created_at,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn apply_agrees_with_the_reference_model(
        initial in start(),
        nodes in node_names(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut d = initial;
        let mut model = Model::of(&d);
        let mut clock = T0;
        for (i, op) in ops.iter().enumerate() {
            let step = resolve(op, &nodes, &mut clock, d.attempt);
            let event = event_of(&step);
            let kind = event.kind();
            let presented = event.attempt();
            let got = apply(&d, event);
            let want = model.step(&step);
            match (&got, &want) {
                (Ok(next), Ok(next_model)) => {
                    prop_assert_eq!(&Model::of(next), next_model, "step {}: {:?}", i, step);
                    prop_assert_eq!(next.updated_at, Timestamp::from_micros(clock), "step {}", i);
                    prop_assert_eq!(identity(next), identity(&d), "step {}", i);
                    prop_assert!(next.attempt >= d.attempt, "attempt went backwards at step {}", i);
                    prop_assert!(!d.state.is_terminal(), "left terminal {:?} at step {}", d.state, i);
                    if next.attempt != d.attempt {
                        prop_assert_eq!(kind, EventKind::Claim);
                        prop_assert_eq!(next.attempt, d.attempt + 1);
                    }
                }
                (Err(TransitionError::Fenced { presented: p, current }), Err(Refusal::Fenced)) => {
                    prop_assert_eq!(Some(*p), presented);
                    prop_assert_eq!(*current, d.attempt);
                }
                (Err(TransitionError::Illegal { from, event }), Err(Refusal::Illegal)) => {
                    prop_assert_eq!(*from, d.state);
                    prop_assert_eq!(*event, kind);
                }
                _ => prop_assert!(false, "step {}: {:?} on {:?}: apply {:?}, model {:?}", i, step, d, got, want),
            }
            // Fenced exactly when a holder's event presents another attempt, whatever the state.
            let mismatch = presented.is_some_and(|a| a != d.attempt);
            prop_assert_eq!(matches!(got, Err(TransitionError::Fenced { .. })), mismatch, "step {}", i);
            if d.state.is_terminal() {
                prop_assert!(got.is_err(), "terminal state changed at step {}", i);
            }
            if let (Ok(next), Ok(next_model)) = (got, want) {
                d = next;
                model = next_model;
            }
        }
    }
}

// ---- JSON round trips -------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        // At most 15 significant digits: serde_json without its `float_roundtrip` feature may
        // misread longer decimals by one ulp, which would test that feature, not this crate.
        (-1_000_000_000i64..1_000_000_000).prop_map(|n| json!(n as f64 / 64.0)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn state() -> impl Strategy<Value = DispatchState> {
    prop::sample::select(DispatchState::ALL.to_vec())
}

fn fail_reason() -> impl Strategy<Value = FailReason> {
    prop_oneof![
        any::<String>().prop_map(FailReason::Error),
        Just(FailReason::AttemptsExhausted),
        Just(FailReason::Expired),
        Just(FailReason::Cancelled),
        Just(FailReason::Undeliverable),
    ]
}

/// Identifier text: any non-control characters, within the byte limit.
fn id_text() -> impl Strategy<Value = String> {
    "\\PC{1,60}"
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<i64>().prop_map(Timestamp::from_micros)
}

fn dispatch() -> impl Strategy<Value = Dispatch> {
    (
        (
            any::<u128>(),
            id_text(),
            any::<String>(),
            json_value(),
            state(),
        ),
        (any::<u32>(), any::<u32>(), proptest::option::of(id_text())),
        (
            proptest::option::of(timestamp()),
            timestamp(),
            proptest::option::of(timestamp()),
        ),
        (
            proptest::option::of(json_value()),
            proptest::option::of(fail_reason()),
            proptest::option::of((any::<u64>(), json_value())),
        ),
        (
            proptest::option::of(any::<String>()),
            timestamp(),
            timestamp(),
        ),
    )
        .prop_map(
            |(
                (id, broker, op, args, state),
                (attempt, max_attempts, claimed_by),
                (lease_until, available_at, deadline),
                (result, failure, progress),
                (idempotency_key, created_at, updated_at),
            )| Dispatch {
                id: DispatchId::from_uuid(uuid::Uuid::from_u128(id)),
                broker: BrokerId::new(broker).unwrap(),
                op,
                args,
                state,
                attempt,
                max_attempts,
                claimed_by: claimed_by.map(|n| NodeId::new(n).unwrap()),
                lease_until,
                available_at,
                deadline,
                result,
                failure,
                progress: progress.map(|(seq, detail)| Progress { seq, detail }),
                idempotency_key,
                created_at,
                updated_at,
                key: None,
                released: 0,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn dispatch_state_json_round_trip(s in state()) {
        let text = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(&text, &format!("\"{s}\""));
        prop_assert_eq!(serde_json::from_str::<DispatchState>(&text).unwrap(), s);
    }

    #[test]
    fn fail_reason_json_round_trip(r in fail_reason()) {
        let text = serde_json::to_string(&r).unwrap();
        let back: FailReason = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &r);
        let v: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(v["kind"].as_str(), Some(r.kind()));
    }

    #[test]
    fn dispatch_json_round_trip(d in dispatch()) {
        let text = serde_json::to_string(&d).unwrap();
        let back: Dispatch = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &d);
        let pretty = serde_json::to_vec_pretty(&d).unwrap();
        prop_assert_eq!(serde_json::from_slice::<Dispatch>(&pretty).unwrap(), d);
    }

    #[test]
    fn notice_json_round_trip(b in id_text(), id in any::<u128>(), which in 0u8..3) {
        let n = match which {
            0 => Notice::Signal { broker: BrokerId::new(b).unwrap() },
            1 => Notice::Event { id: DispatchId::from_uuid(uuid::Uuid::from_u128(id)) },
            _ => Notice::Resync,
        };
        let text = serde_json::to_string(&n).unwrap();
        prop_assert_eq!(serde_json::from_str::<Notice>(&text).unwrap(), n);
    }

    #[test]
    fn dispatch_json_with_an_invalid_broker_is_rejected(d in dispatch(), bad in "[\\x00-\\x1f]{1,3}") {
        let mut v = serde_json::to_value(&d).unwrap();
        v["broker"] = Value::String(bad);
        prop_assert!(serde_json::from_value::<Dispatch>(v).is_err());
    }
}

/// The committed fuzz seeds for `dispatch_json` must stay valid documents, or the fuzzer would
/// start from inputs the parser rejects at once.
#[test]
fn dispatch_json_fuzz_seeds_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dispatch_json");
    let mut dispatches = 0;
    let mut notices = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        if name.starts_with("seed-dispatch-") {
            let d: Dispatch =
                serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let back: Dispatch = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
            assert_eq!(back, d, "{name}");
            dispatches += 1;
        } else if name.starts_with("seed-notice-") {
            serde_json::from_slice::<Notice>(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            notices += 1;
        }
    }
    assert!(
        dispatches >= 3 && notices >= 3,
        "seeds missing in {}",
        dir.display()
    );
}
