//! [proptest](https://docs.rs/proptest) strategies for the values this crate takes and keeps:
//! every one generates only values the crate accepts (ids within their rules, JSON within the
//! store's depth limit), so a property fails on your logic, not on input validation.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::Value;

use crate::fsm::{
    BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, Progress, SessionId,
    Timestamp,
};
use crate::store::NewDispatch;

/// Identifier text: 1 to 60 characters, none of them control characters.
pub fn id_text() -> impl Strategy<Value = String> {
    "\\PC{1,60}"
}

/// A broker id.
pub fn broker_id() -> impl Strategy<Value = BrokerId> {
    id_text().prop_map(|s| BrokerId::new(s).expect("id_text is a valid id"))
}

/// A node id.
pub fn node_id() -> impl Strategy<Value = NodeId> {
    id_text().prop_map(|s| NodeId::new(s).expect("id_text is a valid id"))
}

/// A session id.
pub fn session_id() -> impl Strategy<Value = SessionId> {
    id_text().prop_map(|s| SessionId::new(s).expect("id_text is a valid id"))
}

/// A dispatch id (any UUID, not only v7).
pub fn dispatch_id() -> impl Strategy<Value = DispatchId> {
    any::<u128>().prop_map(|n| DispatchId::from_uuid(uuid::Uuid::from_u128(n)))
}

/// Any timestamp, from the far past to the far future.
pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<i64>().prop_map(Timestamp::from_micros)
}

/// A JSON value up to 3 levels deep: nulls, booleans, integers, floats that round-trip,
/// strings (any Unicode, NUL included), arrays and objects.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        // Binary fractions round-trip exactly through every store's JSON text.
        (-1_000_000_000i64..1_000_000_000).prop_map(|n| serde_json::json!(n as f64 / 64.0)),
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

/// A dispatch state.
pub fn state() -> impl Strategy<Value = DispatchState> {
    prop::sample::select(DispatchState::ALL.to_vec())
}

/// A failure reason (`Corrupt` included).
pub fn fail_reason() -> impl Strategy<Value = FailReason> {
    prop_oneof![
        any::<String>().prop_map(FailReason::Error),
        Just(FailReason::AttemptsExhausted),
        Just(FailReason::Expired),
        Just(FailReason::Cancelled),
        Just(FailReason::Undeliverable),
        any::<String>().prop_map(FailReason::Corrupt),
    ]
}

/// A command as a store takes it: any broker, op and args; 1 to 5 attempts; sometimes a
/// delay, a time to live, an idempotency key or an ordering key.
pub fn new_dispatch() -> impl Strategy<Value = NewDispatch> {
    (
        dispatch_id(),
        broker_id(),
        id_text(),
        json_value(),
        1u32..=5,
        proptest::option::of((1u64..60_000).prop_map(Duration::from_millis)),
        proptest::option::of((1u64..600_000).prop_map(Duration::from_millis)),
        proptest::option::of(id_text()),
        proptest::option::of(id_text()),
    )
        .prop_map(
            |(id, broker, op, args, max_attempts, delay, ttl, idempotency_key, key)| {
                let mut new = NewDispatch::new(broker, op, args);
                new.id = id;
                new.max_attempts = max_attempts;
                new.delay = delay;
                new.ttl = ttl;
                new.idempotency_key = idempotency_key;
                new.key = key;
                new
            },
        )
}

/// Any row a store might hold or return, consistent or not (for codecs, wire formats and
/// readers that must not trust what they read).
pub fn dispatch() -> impl Strategy<Value = Dispatch> {
    (
        (dispatch_id(), broker_id(), id_text(), json_value(), state()),
        (any::<u32>(), any::<u32>(), proptest::option::of(node_id())),
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
            proptest::option::of(id_text()),
            timestamp(),
            timestamp(),
            proptest::option::of(id_text()),
        ),
    )
        .prop_map(
            |(
                (id, broker, op, args, state),
                (attempt, max_attempts, claimed_by),
                (lease_until, available_at, deadline),
                (result, failure, progress),
                (idempotency_key, created_at, updated_at, key),
            )| Dispatch {
                id,
                broker,
                op,
                args,
                state,
                attempt,
                max_attempts,
                claimed_by,
                lease_until,
                available_at,
                deadline,
                result,
                failure,
                progress: progress.map(|(seq, detail)| Progress { seq, detail }),
                idempotency_key,
                created_at,
                updated_at,
                key,
                released: 0,
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Every generated command is one the stores accept.
        #[test]
        fn generated_commands_are_valid(new in new_dispatch()) {
            prop_assert!(new.validate().is_ok(), "{:?}", new.validate());
        }

        /// Generated JSON is within the stores' limits.
        #[test]
        fn generated_json_is_within_the_limits(v in json_value()) {
            prop_assert!(crate::store::check_json("args", &v, crate::store::MAX_ARGS_BYTES).is_ok());
        }
    }
}
