//! The store conformance suite: one behaviour per `pub async fn`, run by every [`Store`].
//!
//! Each case takes a fresh, empty store and panics on a violation. Time is controlled with
//! explicit `now` values (never real sleeps), and errors are asserted by variant and fields,
//! never by message text. [`fsm::apply`] is the oracle: where a case checks a transition, it
//! also checks that the store's answer is exactly what `apply` says for the row as it was.
//!
//! A backend runs the whole suite with one macro call in its test module; each case becomes its
//! own `#[tokio::test]`, so a failure names the case and (by module path) the backend:
//!
//! ```ignore
//! mod conformance {
//!     broker_dispatch::store_conformance_tests!(async {
//!         std::sync::Arc::new(my_crate::MyStore::connect_for_tests().await)
//!     });
//! }
//! ```
//!
//! The argument is an expression evaluated once per case; awaited, it yields an
//! `Arc<S>` for some `S: Store` (a fresh, empty store). The calling crate needs `tokio` with the
//! `macros` and `rt-multi-thread` features. Enable this crate's `conformance` feature to use the
//! suite from outside it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, NewDispatch, Outcome, Store, SweepParams, MAX_BATCH,
};
use crate::error::StoreError;
use crate::fsm::{
    self, BrokerId, Dispatch, DispatchId, DispatchState, Event, EventKind, FailReason, NodeId,
    Progress, SessionId, Timestamp,
};

/// Expands into one `#[tokio::test]` per conformance case, each on a fresh store from
/// `$factory` (an expression that, awaited, yields an `Arc<S>` with `S: Store`). See the
/// [module docs](crate::store::conformance).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            insert_writes_a_pending_row,
            insert_is_idempotent_on_id,
            insert_is_idempotent_on_key,
            claim_moves_pending_to_in_progress,
            claim_waits_for_available_at,
            claim_never_takes_a_row_past_its_deadline,
            claim_batch_honours_limit_oldest_first_one_broker,
            claim_leaves_held_rows_until_the_lease_expires,
            reclaim_after_lease_expiry_fences_the_old_holder,
            heartbeat_extends_the_lease_and_keeps_progress,
            complete_and_fail_are_terminal,
            retry_respects_available_at,
            retry_is_refused_without_attempts_left,
            release_hands_the_row_back_at_once,
            attempts_exhausted_blocks_reclaim_and_sweep_exhausts,
            cancel_only_while_pending,
            double_finish_is_a_typed_error,
            finish_many_agrees_with_apply_entry_by_entry,
            finish_many_agrees_with_apply_without_repeats,
            finish_many_takes_a_full_claim_batch,
            unknown_id_is_not_found,
            store_agrees_with_apply_in_every_state,
            concurrent_claimers_partition_the_rows,
            affinity_newest_connection_wins,
            affinity_delayed_older_claim_is_superseded,
            affinity_disconnect_is_compare_and_clear,
            affinity_late_claim_after_release_is_superseded,
            affinity_touch_refreshes_only_the_holder,
            sweep_expires_exhausts_purges_and_reports,
            sweep_honours_its_limit,
            sweep_reports_pending_gauges,
            list_filters_and_pages,
            timestamps_round_trip_exactly,
            large_and_unicode_args_round_trip,
            bad_input_is_rejected_and_changes_nothing,
            keys_run_one_at_a_time_in_insertion_order,
            a_held_row_blocks_its_key_until_its_lease_runs_out,
            a_retry_keeps_its_place_and_a_dead_row_gives_it_up,
            hand_backs_do_not_use_up_executions,
            request_cancel_agrees_with_apply,
            a_cancel_request_is_never_reclaimed_and_the_sweeper_ends_it,
            late_fails_an_unstarted_row_as_expired,
            a_lapsed_lease_cannot_be_renewed,
            insert_many_is_all_or_nothing,
            insert_measures_delay_and_ttl_from_its_now,
            claims_agree_with_claim_order,
            values_no_store_can_read_back_are_refused_and_change_nothing,
            durations_under_a_millisecond_are_refused_and_change_nothing,
            a_connected_at_in_the_future_is_refused_and_changes_nothing,
            a_connect_without_connected_at_takes_the_stores_now,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store: ::std::sync::Arc<dyn $crate::store::Store> = $factory.await;
                $crate::store::conformance::$case(store).await;
            }
        )*
    };
}

const T0: i64 = 1_700_000_000_000_000;
const LEASE: Duration = Duration::from_secs(10);

fn at(offset_micros: i64) -> Timestamp {
    Timestamp::from_micros(T0 + offset_micros)
}

fn secs(s: i64) -> i64 {
    s * 1_000_000
}

fn id(n: u128) -> DispatchId {
    DispatchId::from_uuid(Uuid::from_u128(n))
}

fn broker(s: &str) -> BrokerId {
    BrokerId::new(s).expect("valid broker id")
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

fn session(s: &str) -> SessionId {
    SessionId::new(s).expect("valid session id")
}

fn new_dispatch(n: u128, b: &str, now: Timestamp) -> NewDispatch {
    NewDispatch {
        id: id(n),
        broker: broker(b),
        op: "start".into(),
        args: serde_json::json!({ "n": n as u64 }),
        max_attempts: 3,
        available_at: None,
        deadline: None,
        idempotency_key: None,
        key: None,
        delay: None,
        ttl: None,
        executions: 0,
        now: Some(now),
    }
}

async fn insert(store: &dyn Store, new: NewDispatch) -> Dispatch {
    store.insert(new).await.expect("insert")
}

fn claim_params(b: &str, n: &str, limit: u32, now: Timestamp) -> ClaimParams {
    ClaimParams {
        broker: broker(b),
        node: node(n),
        limit,
        lease: LEASE,
        now: Some(now),
    }
}

async fn claim(store: &dyn Store, b: &str, n: &str, limit: u32, now: Timestamp) -> Vec<Claimed> {
    store
        .claim(claim_params(b, n, limit, now))
        .await
        .expect("claim")
}

async fn claim_one(store: &dyn Store, b: &str, n: &str, now: Timestamp) -> Claimed {
    let mut got = claim(store, b, n, 1, now).await;
    assert_eq!(got.len(), 1, "expected exactly one claimable row");
    got.remove(0)
}

async fn get(store: &dyn Store, d: DispatchId) -> Dispatch {
    store.get(d).await.expect("get").expect("row exists")
}

async fn finish(
    store: &dyn Store,
    c: Claimed,
    outcome: Outcome,
    now: Timestamp,
) -> Result<Dispatch, StoreError> {
    store
        .finish(
            c,
            FinishParams {
                outcome,
                now: Some(now),
            },
        )
        .await
}

async fn heartbeat(store: &dyn Store, c: &Claimed, now: Timestamp) -> Result<Dispatch, StoreError> {
    store
        .heartbeat(
            c,
            HeartbeatParams {
                lease: LEASE,
                progress: None,
                now: Some(now),
            },
        )
        .await
}

async fn cancel(store: &dyn Store, d: DispatchId, now: Timestamp) -> Result<Dispatch, StoreError> {
    store
        .cancel(CancelParams {
            id: d,
            now: Some(now),
        })
        .await
}

async fn all_rows(store: &dyn Store) -> Vec<Dispatch> {
    super::list_all(
        store,
        ListFilter {
            limit: MAX_BATCH,
            ..ListFilter::default()
        },
    )
    .await
    .expect("list")
}

fn sweep_params(limit: u32, retention: Duration, now: Timestamp) -> SweepParams {
    SweepParams {
        retention,
        limit,
        now: Some(now),
    }
}

/// Asserts an error by variant and fields (never by message).
#[track_caller]
fn assert_same_error(actual: &StoreError, expected: &StoreError) {
    let same = match (actual, expected) {
        (StoreError::NotFound(a), StoreError::NotFound(b)) => a == b,
        (
            StoreError::Fenced {
                presented: a,
                current: b,
            },
            StoreError::Fenced {
                presented: c,
                current: d,
            },
        ) => a == c && b == d,
        (StoreError::Illegal { from: a, event: b }, StoreError::Illegal { from: c, event: d }) => {
            a == c && b == d
        }
        (StoreError::Conflict(_), StoreError::Conflict(_))
        | (StoreError::InvalidInput(_), StoreError::InvalidInput(_))
        | (StoreError::SchemaTooNew { .. }, StoreError::SchemaTooNew { .. })
        | (StoreError::Unavailable(_), StoreError::Unavailable(_))
        | (StoreError::Backend(_), StoreError::Backend(_)) => true,
        _ => false,
    };
    assert!(same, "expected {expected:?}, got {actual:?}");
}

#[track_caller]
fn assert_illegal(r: Result<Dispatch, StoreError>, from: DispatchState, event: EventKind) {
    match r {
        Err(e) => assert_same_error(&e, &StoreError::Illegal { from, event }),
        Ok(d) => panic!("expected Illegal {{ {from}, {event} }}, got Ok({d:?})"),
    }
}

#[track_caller]
fn assert_fenced(r: Result<Dispatch, StoreError>, presented: u32, current: u32) {
    match r {
        Err(e) => assert_same_error(&e, &StoreError::Fenced { presented, current }),
        Ok(d) => panic!("expected Fenced, got Ok({d:?})"),
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    match r {
        Err(StoreError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// Insert writes exactly the row [`NewDispatch::into_dispatch`] describes, readable by `get`.
pub async fn insert_writes_a_pending_row(store: Arc<dyn Store>) {
    let new = NewDispatch {
        deadline: Some(at(secs(60))),
        idempotency_key: Some("key-1".into()),
        ..new_dispatch(1, "b1", at(0))
    };
    let d = insert(&*store, new.clone()).await;
    assert_eq!(d, new.into_dispatch(at(0)));
    assert_eq!(d.state, DispatchState::Pending);
    assert_eq!(d.attempt, 0);
    assert_eq!(get(&*store, id(1)).await, d);
    assert_eq!(store.get(id(2)).await.expect("get"), None);
}

/// Re-inserting an id with the same payload returns the existing row; a different payload is a
/// conflict and changes nothing.
pub async fn insert_is_idempotent_on_id(store: Arc<dyn Store>) {
    let first = insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let again = insert(&*store, new_dispatch(1, "b1", at(secs(5)))).await;
    assert_eq!(again, first, "same payload: the existing row, unchanged");

    for changed in [
        NewDispatch {
            op: "stop".into(),
            ..new_dispatch(1, "b1", at(1))
        },
        NewDispatch {
            broker: broker("b2"),
            ..new_dispatch(1, "b1", at(1))
        },
        NewDispatch {
            args: serde_json::json!({ "n": 99 }),
            ..new_dispatch(1, "b1", at(1))
        },
    ] {
        match store.insert(changed).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    assert_eq!(all_rows(&*store).await, vec![first]);
}

/// A second insert with the same idempotency key (new id) returns the first row; a different
/// payload under that key is a conflict.
pub async fn insert_is_idempotent_on_key(store: Arc<dyn Store>) {
    let keyed = |n| NewDispatch {
        idempotency_key: Some("order-42".into()),
        ..new_dispatch(n, "b1", at(0))
    };
    let first = insert(&*store, keyed(1)).await;
    let mut same = keyed(2);
    same.args = first.args.clone();
    assert_eq!(insert(&*store, same).await, first);

    let mut different = keyed(3);
    different.op = "stop".into();
    match store.insert(different).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(all_rows(&*store).await, vec![first]);
}

/// Claim moves a pending row to in progress: attempt 1, holder, lease, update time.
pub async fn claim_moves_pending_to_in_progress(store: Arc<dyn Store>) {
    let d = insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(secs(1))).await;
    let expected = fsm::apply(
        &d,
        Event::Claim {
            node: node("n1"),
            now: at(secs(1)),
            lease: LEASE,
        },
    )
    .expect("claimable");
    assert_eq!(c.dispatch(), &expected);
    assert_eq!(c.attempt(), 1);
    assert_eq!(c.dispatch().claimed_by, Some(node("n1")));
    assert_eq!(c.dispatch().lease_until, Some(at(secs(11))));
    assert_eq!(get(&*store, id(1)).await, expected);
    assert!(claim(&*store, "b1", "n2", 10, at(secs(2))).await.is_empty());
}

/// A row is not claimable before its `available_at`, and is at that instant.
pub async fn claim_waits_for_available_at(store: Arc<dyn Store>) {
    let new = NewDispatch {
        available_at: Some(at(secs(30))),
        ..new_dispatch(1, "b1", at(0))
    };
    insert(&*store, new).await;
    assert!(claim(&*store, "b1", "n1", 10, at(secs(30) - 1))
        .await
        .is_empty());
    assert_eq!(get(&*store, id(1)).await.state, DispatchState::Pending);
    let c = claim_one(&*store, "b1", "n1", at(secs(30))).await;
    assert_eq!(c.attempt(), 1);
}

/// No zombies: a pending row at or past its deadline is never claimed, and the sweep expires it.
pub async fn claim_never_takes_a_row_past_its_deadline(store: Arc<dyn Store>) {
    let new = NewDispatch {
        deadline: Some(at(secs(10))),
        ..new_dispatch(1, "b1", at(0))
    };
    insert(&*store, new).await;
    assert!(claim(&*store, "b1", "n1", 10, at(secs(10)))
        .await
        .is_empty());
    assert!(claim(&*store, "b1", "n1", 10, at(secs(99)))
        .await
        .is_empty());
    assert_eq!(get(&*store, id(1)).await.state, DispatchState::Pending);

    let report = store
        .sweep(sweep_params(10, Duration::from_secs(3600), at(secs(11))))
        .await
        .expect("sweep");
    assert_eq!(report.expired, vec![id(1)]);
    assert!(report.claimable.is_empty());
    let d = get(&*store, id(1)).await;
    assert_eq!(d.state, DispatchState::Failed);
    assert_eq!(d.failure, Some(FailReason::Expired));
    assert_eq!(d.attempt, 0, "never ran");
}

/// A batch claim takes at most `limit` rows of the requested broker only, oldest first
/// (creation time, then id).
pub async fn claim_batch_honours_limit_oldest_first_one_broker(store: Arc<dyn Store>) {
    // Ids deliberately disagree with creation order: claim order is created_at, then id.
    let plan = [(9, 0), (3, 1), (7, 1), (1, 2), (5, 3)];
    for (n, t) in plan {
        insert(&*store, new_dispatch(n, "b1", at(t))).await;
    }
    insert(&*store, new_dispatch(100, "other", at(0))).await;

    let first = claim(&*store, "b1", "n1", 2, at(secs(1))).await;
    let ids: Vec<_> = first.iter().map(Claimed::id).collect();
    assert_eq!(ids, vec![id(9), id(3)]);
    let rest = claim(&*store, "b1", "n1", MAX_BATCH, at(secs(1))).await;
    let ids: Vec<_> = rest.iter().map(Claimed::id).collect();
    assert_eq!(ids, vec![id(7), id(1), id(5)]);
    assert_eq!(get(&*store, id(100)).await.state, DispatchState::Pending);
}

/// A held row is not claimable while its lease runs, and is from the lease's end.
pub async fn claim_leaves_held_rows_until_the_lease_expires(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let lease_end = c.dispatch().lease_until.expect("lease");
    assert!(claim(&*store, "b1", "n2", 10, at(secs(10) - 1))
        .await
        .is_empty());
    let again = claim_one(&*store, "b1", "n2", lease_end).await;
    assert_eq!(again.attempt(), 2);
}

/// Re-claim after the lease bumps the attempt; the old holder's heartbeat and finish are fenced.
pub async fn reclaim_after_lease_expiry_fences_the_old_holder(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let old = claim_one(&*store, "b1", "n1", at(0)).await;
    let old_snapshot = old.dispatch().clone();
    let new = claim_one(&*store, "b1", "n2", at(secs(20))).await;
    assert_eq!(new.attempt(), 2);
    assert_eq!(new.dispatch().claimed_by, Some(node("n2")));

    let before = get(&*store, id(1)).await;
    assert_fenced(heartbeat(&*store, &old, at(secs(21))).await, 1, 2);
    for outcome in [
        Outcome::Complete(serde_json::json!("stale")),
        Outcome::Fail("stale".into()),
        Outcome::Retry {
            after: Duration::ZERO,
        },
        Outcome::Release,
    ] {
        let forged = Claimed::new(old_snapshot.clone());
        assert_fenced(finish(&*store, forged, outcome, at(secs(21))).await, 1, 2);
    }
    assert_eq!(
        get(&*store, id(1)).await,
        before,
        "fenced writes change nothing"
    );

    let done = finish(
        &*store,
        new,
        Outcome::Complete(serde_json::json!(1)),
        at(secs(22)),
    )
    .await
    .expect("current holder completes");
    assert_eq!(done.state, DispatchState::Done);
    assert_fenced(
        finish(&*store, old, Outcome::Release, at(secs(23))).await,
        1,
        2,
    );
}

/// Heartbeat moves the lease to `now + lease`, stores new progress, and keeps the last progress
/// when none is given.
pub async fn heartbeat_extends_the_lease_and_keeps_progress(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let progress = Progress {
        seq: u64::MAX,
        detail: serde_json::json!({ "step": "pulling image", "pct": 40.5 }),
    };
    let d = store
        .heartbeat(
            &c,
            HeartbeatParams {
                lease: Duration::from_secs(30),
                progress: Some(progress.clone()),
                now: Some(at(secs(5))),
            },
        )
        .await
        .expect("heartbeat");
    assert_eq!(d.lease_until, Some(at(secs(35))));
    assert_eq!(d.progress.as_ref(), Some(&progress));
    assert_eq!(d.updated_at, at(secs(5)));
    let d = heartbeat(&*store, &c, at(secs(6)))
        .await
        .expect("heartbeat");
    assert_eq!(d.progress, Some(progress), "no new progress keeps the last");
    assert_eq!(d, get(&*store, id(1)).await);
    // The extended lease protects the holder past the original one.
    assert!(claim(&*store, "b1", "n2", 10, at(secs(12)))
        .await
        .is_empty());
}

/// Complete stores the result (Done); fail stores the message (Failed(Error)).
pub async fn complete_and_fail_are_terminal(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    insert(&*store, new_dispatch(2, "b1", at(1))).await;
    let mut cs = claim(&*store, "b1", "n1", 2, at(secs(1))).await.into_iter();
    let (c1, c2) = (cs.next().expect("c1"), cs.next().expect("c2"));
    let result = serde_json::json!({ "ok": true, "list": [1, 2.5, null, "x"] });
    let done = finish(&*store, c1, Outcome::Complete(result.clone()), at(secs(2)))
        .await
        .expect("complete");
    assert_eq!(done.state, DispatchState::Done);
    assert_eq!(done.result, Some(result));
    assert_eq!(done.lease_until, None);
    assert_eq!(done.updated_at, at(secs(2)));
    let failed = finish(
        &*store,
        c2,
        Outcome::Fail("boom: ünïcödé".into()),
        at(secs(3)),
    )
    .await
    .expect("fail");
    assert_eq!(failed.state, DispatchState::Failed);
    assert_eq!(
        failed.failure,
        Some(FailReason::Error("boom: ünïcödé".into()))
    );
    assert_eq!(get(&*store, id(1)).await, done);
    assert_eq!(get(&*store, id(2)).await, failed);
    assert!(claim(&*store, "b1", "n1", 10, at(secs(100)))
        .await
        .is_empty());
}

/// Retry hands the row back as pending, claimable from `now + after`, at the next attempt.
pub async fn retry_respects_available_at(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let d = finish(
        &*store,
        c,
        Outcome::Retry {
            after: Duration::from_secs(5),
        },
        at(secs(1)),
    )
    .await
    .expect("retry");
    assert_eq!(d.state, DispatchState::Pending);
    assert_eq!(d.available_at, at(secs(6)));
    assert_eq!(d.lease_until, None);
    assert_eq!(d.attempt, 1);
    assert!(claim(&*store, "b1", "n1", 10, at(secs(6) - 1))
        .await
        .is_empty());
    let c = claim_one(&*store, "b1", "n2", at(secs(6))).await;
    assert_eq!(c.attempt(), 2);
}

/// A retry on the last attempt is illegal and leaves the row as it was.
pub async fn retry_is_refused_without_attempts_left(store: Arc<dyn Store>) {
    let new = NewDispatch {
        max_attempts: 1,
        ..new_dispatch(1, "b1", at(0))
    };
    insert(&*store, new).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let snapshot = c.dispatch().clone();
    let before = get(&*store, id(1)).await;
    assert_illegal(
        finish(
            &*store,
            c,
            Outcome::Retry {
                after: Duration::ZERO,
            },
            at(secs(1)),
        )
        .await,
        DispatchState::InProgress,
        EventKind::Retry,
    );
    assert_eq!(get(&*store, id(1)).await, before);
    // The holder still holds it and may finish otherwise.
    let done = finish(
        &*store,
        Claimed::new(snapshot),
        Outcome::Fail("gave up".into()),
        at(secs(2)),
    )
    .await
    .expect("fail after refused retry");
    assert_eq!(done.state, DispatchState::Failed);
}

/// Release hands the row back unexecuted, claimable at once; the released attempt is fenced
/// after the next claim and illegal before it.
pub async fn release_hands_the_row_back_at_once(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let snapshot = c.dispatch().clone();
    let d = finish(&*store, c, Outcome::Release, at(secs(1)))
        .await
        .expect("release");
    assert_eq!(d.state, DispatchState::Pending);
    assert_eq!(d.available_at, at(secs(1)));
    assert_eq!(d.lease_until, None);
    assert_eq!(d.attempt, 1);
    assert_illegal(
        heartbeat(&*store, &Claimed::new(snapshot.clone()), at(secs(1))).await,
        DispatchState::Pending,
        EventKind::Heartbeat,
    );
    let again = claim_one(&*store, "b1", "n2", at(secs(1))).await;
    assert_eq!(again.attempt(), 2);
    assert_fenced(
        finish(
            &*store,
            Claimed::new(snapshot),
            Outcome::Release,
            at(secs(2)),
        )
        .await,
        1,
        2,
    );
}

/// At `max_attempts`, an expired lease is not re-claimed; the sweep fails the row as exhausted.
pub async fn attempts_exhausted_blocks_reclaim_and_sweep_exhausts(store: Arc<dyn Store>) {
    let new = NewDispatch {
        max_attempts: 2,
        ..new_dispatch(1, "b1", at(0))
    };
    insert(&*store, new).await;
    claim_one(&*store, "b1", "n1", at(0)).await;
    let c2 = claim_one(&*store, "b1", "n2", at(secs(10))).await;
    assert_eq!(c2.attempt(), 2);
    assert!(claim(&*store, "b1", "n3", 10, at(secs(20)))
        .await
        .is_empty());

    let early = store
        .sweep(sweep_params(
            10,
            Duration::from_secs(3600),
            at(secs(20) - 1),
        ))
        .await
        .expect("sweep");
    assert!(early.exhausted.is_empty(), "lease still running");
    let report = store
        .sweep(sweep_params(10, Duration::from_secs(3600), at(secs(20))))
        .await
        .expect("sweep");
    assert_eq!(report.exhausted, vec![id(1)]);
    assert!(report.expired.is_empty());
    let d = get(&*store, id(1)).await;
    assert_eq!(d.state, DispatchState::Failed);
    assert_eq!(d.failure, Some(FailReason::AttemptsExhausted));
    assert_illegal(
        heartbeat(&*store, &c2, at(secs(21))).await,
        DispatchState::Failed,
        EventKind::Heartbeat,
    );
}

/// Cancel works on a pending row only.
pub async fn cancel_only_while_pending(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let d = cancel(&*store, id(1), at(secs(1)))
        .await
        .expect("cancel pending");
    assert_eq!(d.state, DispatchState::Failed);
    assert_eq!(d.failure, Some(FailReason::Cancelled));
    assert_eq!(d.updated_at, at(secs(1)));
    assert!(claim(&*store, "b1", "n1", 10, at(secs(2))).await.is_empty());
    assert_illegal(
        cancel(&*store, id(1), at(secs(2))).await,
        DispatchState::Failed,
        EventKind::Cancel,
    );

    insert(&*store, new_dispatch(2, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(secs(3))).await;
    assert_illegal(
        cancel(&*store, id(2), at(secs(4))).await,
        DispatchState::InProgress,
        EventKind::Cancel,
    );
    finish(
        &*store,
        c,
        Outcome::Complete(serde_json::Value::Null),
        at(secs(5)),
    )
    .await
    .expect("complete");
    assert_illegal(
        cancel(&*store, id(2), at(secs(6))).await,
        DispatchState::Done,
        EventKind::Cancel,
    );
}

/// Finishing twice with the same attempt is a typed error, whatever the second outcome.
pub async fn double_finish_is_a_typed_error(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let c = claim_one(&*store, "b1", "n1", at(0)).await;
    let snapshot = c.dispatch().clone();
    let done = finish(
        &*store,
        c,
        Outcome::Complete(serde_json::json!(1)),
        at(secs(1)),
    )
    .await
    .expect("first finish");
    for (outcome, kind) in [
        (Outcome::Complete(serde_json::json!(2)), EventKind::Complete),
        (Outcome::Fail("again".into()), EventKind::Fail),
        (
            Outcome::Retry {
                after: Duration::ZERO,
            },
            EventKind::Retry,
        ),
        (Outcome::Release, EventKind::Release),
    ] {
        assert_illegal(
            finish(
                &*store,
                Claimed::new(snapshot.clone()),
                outcome,
                at(secs(2)),
            )
            .await,
            DispatchState::Done,
            kind,
        );
    }
    assert_eq!(get(&*store, id(1)).await, done);
}

/// Every id-addressed call on an unknown id is `NotFound`.
pub async fn unknown_id_is_not_found(store: Arc<dyn Store>) {
    let d = new_dispatch(7, "b1", at(0)).into_dispatch(at(0));
    let ghost = Claimed::new(Dispatch {
        state: DispatchState::InProgress,
        attempt: 1,
        ..d
    });
    for r in [
        heartbeat(&*store, &ghost, at(1)).await,
        finish(
            &*store,
            Claimed::new(ghost.dispatch().clone()),
            Outcome::Release,
            at(1),
        )
        .await,
        cancel(&*store, id(7), at(1)).await,
    ] {
        match r {
            Err(e) => assert_same_error(&e, &StoreError::NotFound(id(7))),
            Ok(d) => panic!("expected NotFound, got {d:?}"),
        }
    }
    assert_eq!(store.get(id(7)).await.expect("get"), None);
}

/// The store's answer to every event in every state is exactly [`fsm::apply`]'s on the row as
/// it was: the same next row, or the same typed error with the row unchanged.
pub async fn store_agrees_with_apply_in_every_state(store: Arc<dyn Store>) {
    // Each setup leaves one row (the last inserted) in a distinct situation at `now`.
    #[derive(Clone, Copy, Debug)]
    enum Setup {
        Pending,
        PendingNotYetAvailable,
        PendingPastDeadline,
        Held,
        HeldLeaseExpired,
        HeldLastAttemptExpired,
        Done,
        Failed,
        Cancelled,
    }
    const SETUPS: [Setup; 9] = [
        Setup::Pending,
        Setup::PendingNotYetAvailable,
        Setup::PendingPastDeadline,
        Setup::Held,
        Setup::HeldLeaseExpired,
        Setup::HeldLastAttemptExpired,
        Setup::Done,
        Setup::Failed,
        Setup::Cancelled,
    ];
    const EVENTS: [EventKind; 7] = [
        EventKind::Claim,
        EventKind::Heartbeat,
        EventKind::Complete,
        EventKind::Fail,
        EventKind::Retry,
        EventKind::Release,
        EventKind::Cancel,
    ];
    let now = at(secs(100));
    let mut n = 0u128;
    for setup in SETUPS {
        for event in EVENTS {
            for stale in [false, true] {
                n += 1;
                let b = format!("b{n}");
                let mut new = new_dispatch(n, &b, at(0));
                new.max_attempts = 2;
                if matches!(setup, Setup::PendingNotYetAvailable) {
                    new.available_at = Some(at(secs(200)));
                }
                if matches!(setup, Setup::PendingPastDeadline) {
                    new.deadline = Some(at(secs(50)));
                }
                insert(&*store, new).await;
                let mut holder: Option<Dispatch> = None;
                match setup {
                    Setup::Pending | Setup::PendingNotYetAvailable | Setup::PendingPastDeadline => {
                    }
                    Setup::Held | Setup::Done | Setup::Failed => {
                        let c = claim_one(&*store, &b, "n1", at(secs(95))).await;
                        holder = Some(c.dispatch().clone());
                        let outcome = match setup {
                            Setup::Done => Some(Outcome::Complete(serde_json::json!("r"))),
                            Setup::Failed => Some(Outcome::Fail("f".into())),
                            _ => None,
                        };
                        if let Some(o) = outcome {
                            finish(&*store, c, o, at(secs(96))).await.expect("finish");
                        }
                    }
                    Setup::HeldLeaseExpired => {
                        let c = claim_one(&*store, &b, "n1", at(secs(80))).await;
                        holder = Some(c.into_dispatch());
                    }
                    Setup::HeldLastAttemptExpired => {
                        claim_one(&*store, &b, "n1", at(secs(60))).await;
                        let c = claim_one(&*store, &b, "n1", at(secs(80))).await;
                        holder = Some(c.into_dispatch());
                    }
                    Setup::Cancelled => {
                        cancel(&*store, id(n), at(secs(90))).await.expect("cancel");
                    }
                }
                let before = get(&*store, id(n)).await;
                // The handle presented: the holder's, or a forged one for the row as it is; a
                // stale variant presents an attempt one higher than the row's.
                let mut handle = holder.unwrap_or_else(|| before.clone());
                if stale {
                    handle.attempt += 1;
                }
                let attempt = handle.attempt;
                let (expected, actual) = match event {
                    EventKind::Claim => {
                        let expected = fsm::apply(
                            &before,
                            Event::Claim {
                                node: node("n2"),
                                now,
                                lease: LEASE,
                            },
                        );
                        let got = claim(&*store, &b, "n2", 10, now).await;
                        let actual = match got.len() {
                            0 => Err(None::<StoreError>),
                            1 => Ok(got.into_iter().next().expect("one").into_dispatch()),
                            k => panic!("{setup:?}: claimed {k} rows"),
                        };
                        match (expected, actual) {
                            (Ok(e), Ok(a)) => assert_eq!(a, e, "{setup:?} claim"),
                            (Err(_), Err(None)) => {}
                            (e, a) => panic!("{setup:?} claim: apply says {e:?}, store {a:?}"),
                        }
                        if stale {
                            continue;
                        }
                        let after = get(&*store, id(n)).await;
                        assert!(after == before || after.attempt == before.attempt + 1);
                        continue;
                    }
                    EventKind::Heartbeat => (
                        fsm::apply(
                            &before,
                            Event::Heartbeat {
                                attempt,
                                now,
                                lease: LEASE,
                                progress: None,
                            },
                        ),
                        heartbeat(&*store, &Claimed::new(handle), now).await,
                    ),
                    EventKind::Cancel => (
                        fsm::apply(&before, Event::Cancel { now }),
                        cancel(&*store, id(n), now).await,
                    ),
                    kind => {
                        let (event, outcome) = match kind {
                            EventKind::Complete => (
                                Event::Complete {
                                    attempt,
                                    now,
                                    result: serde_json::json!([n as u64]),
                                },
                                Outcome::Complete(serde_json::json!([n as u64])),
                            ),
                            EventKind::Fail => (
                                Event::Fail {
                                    attempt,
                                    now,
                                    error: "e".into(),
                                },
                                Outcome::Fail("e".into()),
                            ),
                            EventKind::Retry => (
                                Event::Retry {
                                    attempt,
                                    now,
                                    at: now.saturating_add(Duration::from_secs(7)),
                                },
                                Outcome::Retry {
                                    after: Duration::from_secs(7),
                                },
                            ),
                            _ => (Event::Release { attempt, now }, Outcome::Release),
                        };
                        (
                            fsm::apply(&before, event),
                            finish(&*store, Claimed::new(handle), outcome, now).await,
                        )
                    }
                };
                match (expected, actual) {
                    (Ok(e), Ok(a)) => {
                        assert_eq!(a, e, "{setup:?} {event} stale={stale}");
                        assert_eq!(get(&*store, id(n)).await, e);
                    }
                    (Err(e), Err(a)) => {
                        assert_same_error(&a, &StoreError::from(e));
                        assert_eq!(get(&*store, id(n)).await, before, "{setup:?} {event}");
                    }
                    (e, a) => panic!("{setup:?} {event} stale={stale}: apply {e:?}, store {a:?}"),
                }
            }
        }
    }
}

/// Concurrent claimers partition the rows: every row is claimed exactly once, by one claimer.
pub async fn concurrent_claimers_partition_the_rows(store: Arc<dyn Store>) {
    const ROWS: u128 = 400;
    const CLAIMERS: usize = 8;
    for n in 1..=ROWS {
        insert(&*store, new_dispatch(n, "b1", at(n as i64))).await;
    }
    let now = at(secs(1));
    let tasks: Vec<_> = (0..CLAIMERS)
        .map(|k| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim(claim_params("b1", &format!("n{k}"), 7, now))
                        .await
                        .expect("claim");
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|c| (c.id(), c.attempt())));
                }
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for t in tasks {
        for (d, attempt) in t.await.expect("claimer task") {
            assert_eq!(attempt, 1);
            assert!(seen.insert(d), "{d} claimed twice");
            total += 1;
        }
    }
    assert_eq!(total, ROWS as usize);
    assert_eq!(seen, (1..=ROWS).map(id).collect());
}

fn connect_params(b: &str, n: &str, s: &str, connected_at: i64, now: i64) -> ConnectParams {
    ConnectParams {
        broker: broker(b),
        node: node(n),
        session: session(s),
        connected_at: Some(at(connected_at)),
        now: Some(at(now)),
    }
}

fn release_params(b: &str, n: &str, s: &str, now: i64) -> DisconnectParams {
    DisconnectParams {
        broker: broker(b),
        node: node(n),
        session: session(s),
        now: Some(at(now)),
    }
}

/// The newest `connected_at` wins, whatever the write order; the same session reconnecting is
/// idempotent.
pub async fn affinity_newest_connection_wins(store: Arc<dyn Store>) {
    assert_eq!(store.affinity(&broker("b1")).await.expect("affinity"), None);
    let first = store
        .connect(connect_params("b1", "n1", "s1", 10, 10))
        .await
        .expect("connect");
    let ConnectOutcome::Claimed(a) = first else {
        panic!("first connect must claim: {first:?}");
    };
    assert_eq!(a.node, Some(node("n1")));
    assert_eq!(a.last_seen, at(10));
    let second = store
        .connect(connect_params("b1", "n2", "s2", 20, 21))
        .await
        .expect("connect");
    assert!(matches!(second, ConnectOutcome::Claimed(ref a) if a.node == Some(node("n2"))));
    let again = store
        .connect(connect_params("b1", "n2", "s2", 20, 25))
        .await
        .expect("reconnect");
    assert!(matches!(again, ConnectOutcome::Claimed(ref a) if a.last_seen == at(25)));
    let row = store
        .affinity(&broker("b1"))
        .await
        .expect("affinity")
        .expect("row");
    assert_eq!(row.node, Some(node("n2")));
    assert_eq!(row.session, session("s2"));
    assert_eq!(row.connected_at, at(20));
    assert_eq!(row.last_seen, at(25));
}

/// A claim from an older connection arriving late is superseded and changes nothing.
pub async fn affinity_delayed_older_claim_is_superseded(store: Arc<dyn Store>) {
    store
        .connect(connect_params("b1", "n2", "s2", 20, 20))
        .await
        .expect("connect");
    let before = store.affinity(&broker("b1")).await.expect("affinity");
    let late = store
        .connect(connect_params("b1", "n1", "s1", 10, 30))
        .await
        .expect("connect");
    assert!(matches!(late, ConnectOutcome::Superseded(ref a) if Some(a) == before.as_ref()));
    assert_eq!(
        store.affinity(&broker("b1")).await.expect("affinity"),
        before
    );
}

/// Disconnect clears only for the holding node and session; otherwise it returns false and the
/// row is unchanged. A release keeps the row as a high-water mark.
pub async fn affinity_disconnect_is_compare_and_clear(store: Arc<dyn Store>) {
    assert!(!store
        .disconnect(release_params("nobody", "n1", "s1", 5))
        .await
        .expect("disconnect"));
    store
        .connect(connect_params("b1", "n1", "s1", 10, 10))
        .await
        .expect("connect");
    let before = store.affinity(&broker("b1")).await.expect("affinity");
    for (n, s) in [("n1", "s0"), ("n2", "s1"), ("n2", "s2")] {
        assert!(!store
            .disconnect(release_params("b1", n, s, 11))
            .await
            .expect("disconnect"));
        assert_eq!(
            store.affinity(&broker("b1")).await.expect("affinity"),
            before
        );
    }
    assert!(store
        .disconnect(release_params("b1", "n1", "s1", 12))
        .await
        .expect("disconnect"));
    let row = store
        .affinity(&broker("b1"))
        .await
        .expect("affinity")
        .expect("row kept");
    assert_eq!(row.node, None);
    assert_eq!(row.session, session("s1"));
    assert_eq!(row.connected_at, at(10));
    assert_eq!(row.last_seen, at(12));
    assert!(!store
        .disconnect(release_params("b1", "n1", "s1", 13))
        .await
        .expect("second disconnect"));
}

/// After a release, a late claim from an older session (or a duplicate of the released one) is
/// still superseded; a newer one claims.
pub async fn affinity_late_claim_after_release_is_superseded(store: Arc<dyn Store>) {
    store
        .connect(connect_params("b1", "n2", "s2", 20, 20))
        .await
        .expect("connect");
    assert!(store
        .disconnect(release_params("b1", "n2", "s2", 25))
        .await
        .expect("disconnect"));
    let released = store.affinity(&broker("b1")).await.expect("affinity");
    for p in [
        connect_params("b1", "n1", "s1", 10, 30),
        connect_params("b1", "n2", "s2", 20, 30),
    ] {
        let got = store.connect(p).await.expect("connect");
        assert!(matches!(got, ConnectOutcome::Superseded(_)), "{got:?}");
        assert_eq!(
            store.affinity(&broker("b1")).await.expect("affinity"),
            released
        );
    }
    let newer = store
        .connect(connect_params("b1", "n3", "s3", 40, 40))
        .await
        .expect("connect");
    assert!(matches!(newer, ConnectOutcome::Claimed(ref a) if a.node == Some(node("n3"))));
}

/// Touch refreshes `last_seen` (never backwards) for the holder only.
pub async fn affinity_touch_refreshes_only_the_holder(store: Arc<dyn Store>) {
    assert!(!store
        .touch(release_params("b1", "n1", "s1", 5))
        .await
        .expect("touch"));
    store
        .connect(connect_params("b1", "n1", "s1", 10, 10))
        .await
        .expect("connect");
    assert!(store
        .touch(release_params("b1", "n1", "s1", 50))
        .await
        .expect("touch"));
    let row = store
        .affinity(&broker("b1"))
        .await
        .expect("affinity")
        .expect("row");
    assert_eq!(row.last_seen, at(50));
    assert!(store
        .touch(release_params("b1", "n1", "s1", 40))
        .await
        .expect("touch"));
    let row = store
        .affinity(&broker("b1"))
        .await
        .expect("affinity")
        .expect("row");
    assert_eq!(
        row.last_seen,
        at(50),
        "a stale touch never moves last_seen back"
    );
    assert!(!store
        .touch(release_params("b1", "n2", "s1", 60))
        .await
        .expect("touch"));
    assert!(!store
        .touch(release_params("b1", "n1", "s9", 60))
        .await
        .expect("touch"));
    assert_eq!(
        store.affinity(&broker("b1")).await.expect("affinity"),
        Some(row)
    );
    store
        .disconnect(release_params("b1", "n1", "s1", 70))
        .await
        .expect("disconnect");
    assert!(!store
        .touch(release_params("b1", "n1", "s1", 80))
        .await
        .expect("touch"));
}

/// One sweep expires, exhausts, purges terminal rows older than the retention, and reports the
/// brokers with claimable work (sorted, distinct).
pub async fn sweep_expires_exhausts_purges_and_reports(store: Arc<dyn Store>) {
    let now = at(secs(1000));
    let retention = Duration::from_secs(100);
    // 1: pending past its deadline -> expired.
    insert(
        &*store,
        NewDispatch {
            deadline: Some(at(secs(500))),
            ..new_dispatch(1, "a", at(0))
        },
    )
    .await;
    // 2: held, lease expired, past deadline -> expired (not re-run after the deadline).
    insert(
        &*store,
        NewDispatch {
            deadline: Some(at(secs(900))),
            ..new_dispatch(2, "h2", at(0))
        },
    )
    .await;
    claim_one(&*store, "h2", "n1", at(secs(800))).await;
    // 3: held, lease expired, no attempts left -> exhausted.
    insert(
        &*store,
        NewDispatch {
            max_attempts: 1,
            ..new_dispatch(3, "h3", at(0))
        },
    )
    .await;
    claim_one(&*store, "h3", "n1", at(secs(800))).await;
    // 4: held, lease running -> untouched.
    insert(
        &*store,
        NewDispatch {
            max_attempts: 1,
            ..new_dispatch(4, "h4", at(0))
        },
    )
    .await;
    claim_one(&*store, "h4", "n1", at(secs(995))).await;
    // 5: done long ago -> purged; 6: done recently -> kept.
    for (n, t) in [(5u128, 800), (6, 950)] {
        let b = format!("d{n}");
        insert(&*store, new_dispatch(n, &b, at(0))).await;
        let c = claim_one(&*store, &b, "n1", at(secs(t))).await;
        finish(
            &*store,
            c,
            Outcome::Complete(serde_json::Value::Null),
            at(secs(t)),
        )
        .await
        .expect("complete");
    }
    // 10: held, lease expired, attempts left -> claimable again.
    insert(&*store, new_dispatch(10, "c", at(1))).await;
    claim_one(&*store, "c", "n1", at(secs(800))).await;
    // 7, 8: claimable pending rows of brokers "z" and "c"; 9: pending but not yet available.
    insert(&*store, new_dispatch(7, "z", at(0))).await;
    insert(&*store, new_dispatch(8, "c", at(0))).await;
    insert(
        &*store,
        NewDispatch {
            available_at: Some(at(secs(2000))),
            ..new_dispatch(9, "y", at(0))
        },
    )
    .await;

    let report = store
        .sweep(sweep_params(100, retention, now))
        .await
        .expect("sweep");
    assert!(report.swept);
    assert_eq!(report.expired, vec![id(1), id(2)]);
    assert_eq!(report.exhausted, vec![id(3)]);
    assert_eq!(report.purged, 1);
    assert_eq!(report.claimable, vec![broker("c"), broker("z")]);
    assert_eq!(store.get(id(5)).await.expect("get"), None);
    assert!(store.get(id(6)).await.expect("get").is_some());
    assert_eq!(get(&*store, id(2)).await.failure, Some(FailReason::Expired));
    assert_eq!(get(&*store, id(2)).await.updated_at, now);
    assert_eq!(get(&*store, id(4)).await.state, DispatchState::InProgress);

    // A purged key is free again.
    let keyed = NewDispatch {
        idempotency_key: Some("k".into()),
        ..new_dispatch(20, "k", at(0))
    };
    insert(&*store, keyed).await;
    cancel(&*store, id(20), at(secs(1))).await.expect("cancel");
    let report = store
        .sweep(sweep_params(100, retention, now))
        .await
        .expect("sweep");
    assert!(report.expired.is_empty() && report.exhausted.is_empty());
    assert_eq!(report.purged, 1);
    let reused = NewDispatch {
        idempotency_key: Some("k".into()),
        ..new_dispatch(21, "k", at(0))
    };
    assert_eq!(insert(&*store, reused).await.id, id(21));
}

/// The sweep reports how many rows are pending and when the oldest was written (in-progress
/// and terminal rows do not count).
pub async fn sweep_reports_pending_gauges(store: Arc<dyn Store>) {
    let hour = Duration::from_secs(3600);
    let r = store
        .sweep(sweep_params(10, hour, at(0)))
        .await
        .expect("sweep");
    assert_eq!((r.pending, r.oldest_pending), (0, None));
    insert(&*store, new_dispatch(1, "a", at(secs(1)))).await;
    insert(&*store, new_dispatch(2, "b", at(secs(2)))).await;
    insert(&*store, new_dispatch(3, "b", at(secs(3)))).await;
    claim_one(&*store, "a", "n1", at(secs(4))).await;
    let r = store
        .sweep(sweep_params(10, hour, at(secs(4))))
        .await
        .expect("sweep");
    assert_eq!(r.pending, 2);
    assert_eq!(r.oldest_pending, Some(at(secs(2))));
}

/// Each kind of sweep work stops at the limit, in id order; the rest waits for the next sweep.
pub async fn sweep_honours_its_limit(store: Arc<dyn Store>) {
    for n in 1..=5u128 {
        insert(
            &*store,
            NewDispatch {
                deadline: Some(at(secs(10))),
                ..new_dispatch(n, &format!("e{n}"), at(0))
            },
        )
        .await;
    }
    for n in 11..=15u128 {
        let b = format!("x{n}");
        insert(
            &*store,
            NewDispatch {
                max_attempts: 1,
                ..new_dispatch(n, &b, at(0))
            },
        )
        .await;
        claim_one(&*store, &b, "n1", at(secs(1))).await;
    }
    for n in 21..=25u128 {
        insert(&*store, new_dispatch(n, &format!("p{n}"), at(0))).await;
    }
    let now = at(secs(20));
    let r = store
        .sweep(sweep_params(2, Duration::from_secs(3600), now))
        .await
        .expect("sweep");
    assert_eq!(r.expired, vec![id(1), id(2)]);
    assert_eq!(r.exhausted, vec![id(11), id(12)]);
    assert_eq!(r.claimable, vec![broker("p21"), broker("p22")]);
    let r = store
        .sweep(sweep_params(2, Duration::from_secs(3600), now))
        .await
        .expect("sweep");
    assert_eq!(r.expired, vec![id(3), id(4)]);
    assert_eq!(r.exhausted, vec![id(13), id(14)]);
    // Purge: the ten terminal rows, two at a time, in id order.
    let later = at(secs(20) + secs(3601));
    let r = store
        .sweep(sweep_params(2, Duration::from_secs(3600), later))
        .await
        .expect("sweep");
    assert_eq!(r.purged, 2);
    assert_eq!(store.get(id(1)).await.expect("get"), None);
    assert_eq!(store.get(id(2)).await.expect("get"), None);
    assert!(store.get(id(3)).await.expect("get").is_some());
}

/// List filters by broker and state, orders by id, pages with `after` and `limit`.
pub async fn list_filters_and_pages(store: Arc<dyn Store>) {
    for n in 1..=10u128 {
        let b = if n % 2 == 0 { "even" } else { "odd" };
        insert(&*store, new_dispatch(n, b, at(100 - n as i64))).await;
    }
    claim(&*store, "even", "n1", 2, at(secs(1))).await;
    let ids = |rows: Vec<Dispatch>| rows.into_iter().map(|d| d.id).collect::<Vec<_>>();

    let page = store
        .list(ListFilter {
            limit: 3,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(page), vec![id(1), id(2), id(3)]);
    let page = store
        .list(ListFilter {
            after: Some(id(3)),
            limit: 3,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(page), vec![id(4), id(5), id(6)]);
    let page = store
        .list(ListFilter {
            broker: Some(broker("even")),
            after: Some(id(4)),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(page), vec![id(6), id(8), id(10)]);
    // Claim order is creation order: the two newest-id even rows were created first.
    let page = store
        .list(ListFilter {
            state: Some(DispatchState::InProgress),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(page), vec![id(8), id(10)]);
    let page = store
        .list(ListFilter {
            broker: Some(broker("odd")),
            state: Some(DispatchState::InProgress),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert!(page.is_empty());
    let page = store
        .list(ListFilter {
            after: Some(id(10)),
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert!(page.is_empty());
    assert_eq!(all_rows(&*store).await.len(), 10);
}

/// Timestamps come back exactly, including negative and extreme values.
pub async fn timestamps_round_trip_exactly(store: Arc<dyn Store>) {
    let cases = [
        (i64::MIN + 1, i64::MIN + 2, Some(i64::MIN + 3)),
        (-1, 0, Some(1)),
        (-1_234_567_890_123, -5, None),
        (T0 + 1, T0 + 999_999, Some(i64::MAX)),
        (i64::MAX - 10, i64::MAX - 1, Some(i64::MAX)),
    ];
    for (k, (created, available, deadline)) in cases.into_iter().enumerate() {
        let n = k as u128 + 1;
        let new = NewDispatch {
            available_at: Some(Timestamp::from_micros(available)),
            deadline: deadline.map(Timestamp::from_micros),
            ..new_dispatch(n, &format!("t{n}"), Timestamp::from_micros(created))
        };
        let d = insert(&*store, new).await;
        assert_eq!(get(&*store, id(n)).await, d);
        assert_eq!(d.created_at.as_micros(), created);
        assert_eq!(d.available_at.as_micros(), available);
        assert_eq!(d.deadline.map(Timestamp::as_micros), deadline);
    }
    // A lease running past the end of time saturates instead of wrapping.
    let c = claim_one(&*store, "t5", "n1", Timestamp::from_micros(i64::MAX - 1)).await;
    assert_eq!(c.dispatch().lease_until, Some(Timestamp::MAX));
    assert_eq!(get(&*store, id(5)).await.lease_until, Some(Timestamp::MAX));
}

/// Args of 1 MiB and non-ASCII text (emoji, RTL, combining marks, escapes) round-trip.
pub async fn large_and_unicode_args_round_trip(store: Arc<dyn Store>) {
    let big = "x".repeat(1024 * 1024);
    let text = "héllo 👋🏽 — مرحبا — e\u{301} \"quoted\" \\ \t tab \u{0} nul";
    let args =
        serde_json::json!({ "big": big, "text": text, "🔑": [text, 1.5e300, -0.0, u64::MAX] });
    let new = NewDispatch {
        args: args.clone(),
        op: "sënd 📨".into(),
        idempotency_key: Some("ключ-🗝".into()),
        ..new_dispatch(1, "brökér-🚀", at(0))
    };
    let d = insert(&*store, new.clone()).await;
    assert_eq!(d.args, args);
    let read = get(&*store, id(1)).await;
    assert_eq!(read, d);
    assert_eq!(
        insert(&*store, new).await,
        d,
        "the idempotency comparison sees equal args"
    );
    let c = claim_one(&*store, "brökér-🚀", "nödé-✨", at(1)).await;
    assert_eq!(c.dispatch().args, args);
    let done = finish(
        &*store,
        c,
        Outcome::Complete(serde_json::json!({ "text": text })),
        at(2),
    )
    .await
    .expect("complete");
    assert_eq!(get(&*store, id(1)).await, done);
}

/// Malformed requests are `InvalidInput` and leave the store unchanged.
pub async fn bad_input_is_rejected_and_changes_nothing(store: Arc<dyn Store>) {
    insert(&*store, new_dispatch(1, "b1", at(0))).await;
    let held = claim_one(&*store, "b1", "n1", at(0)).await;
    insert(&*store, new_dispatch(2, "b1", at(0))).await;
    let before = all_rows(&*store).await;

    assert_invalid(
        store
            .insert(NewDispatch {
                op: String::new(),
                ..new_dispatch(3, "b1", at(0))
            })
            .await,
    );
    assert_invalid(
        store
            .insert(NewDispatch {
                op: "a\nb".into(),
                ..new_dispatch(3, "b1", at(0))
            })
            .await,
    );
    assert_invalid(
        store
            .insert(NewDispatch {
                max_attempts: 0,
                ..new_dispatch(3, "b1", at(0))
            })
            .await,
    );
    assert_invalid(
        store
            .insert(NewDispatch {
                idempotency_key: Some(String::new()),
                ..new_dispatch(3, "b1", at(0))
            })
            .await,
    );
    for limit in [0, MAX_BATCH + 1] {
        assert_invalid(
            store
                .claim(claim_params("b1", "n1", limit, at(secs(1))))
                .await,
        );
        assert_invalid(
            store
                .list(ListFilter {
                    limit,
                    ..ListFilter::default()
                })
                .await,
        );
        assert_invalid(
            store
                .sweep(sweep_params(limit, Duration::ZERO, at(secs(99))))
                .await,
        );
    }
    assert_invalid(
        store
            .claim(ClaimParams {
                lease: Duration::ZERO,
                ..claim_params("b1", "n1", 1, at(secs(1)))
            })
            .await,
    );
    assert_invalid(
        store
            .heartbeat(
                &held,
                HeartbeatParams {
                    lease: Duration::ZERO,
                    progress: None,
                    now: Some(at(1)),
                },
            )
            .await,
    );
    assert_eq!(all_rows(&*store).await, before);
}

/// `finish_many` answers each entry exactly as `finish` would, in input order: every outcome
/// kind, a stale holder (fenced), a retry with no attempts left (illegal), an unknown id (not
/// found), and one attempt finished twice in the batch (the second entry sees the first's
/// write). Refused entries change nothing and do not stop the others.
pub async fn finish_many_agrees_with_apply_entry_by_entry(store: Arc<dyn Store>) {
    finish_many_against_apply(store, true).await;
}

/// The same batch without the entries that repeat an attempt: a store may take a faster path
/// when every id in the batch is distinct, and its refusals must still be `finish`'s.
pub async fn finish_many_agrees_with_apply_without_repeats(store: Arc<dyn Store>) {
    finish_many_against_apply(store, false).await;
}

async fn finish_many_against_apply(store: Arc<dyn Store>, repeats: bool) {
    let s = &*store;
    for n in 1..=5 {
        insert(s, new_dispatch(n, "b1", at(n as i64))).await;
    }
    let mut one_shot = new_dispatch(7, "b1", at(7));
    one_shot.max_attempts = 1;
    insert(s, one_shot).await;
    insert(s, new_dispatch(6, "b2", at(6))).await;
    let stale = claim_one(s, "b2", "n1", at(secs(1))).await;
    let current = claim_one(s, "b2", "n2", at(secs(20))).await;
    assert_eq!(current.attempt(), 2);
    let mut held = claim(s, "b1", "n1", 10, at(secs(15))).await;
    assert_eq!(held.len(), 6);
    let by_id = |held: &mut Vec<Claimed>, n: u128| {
        let i = held.iter().position(|c| c.id() == id(n)).expect("held");
        held.remove(i)
    };
    let mut unknown = stale.dispatch().clone();
    unknown.id = id(99);
    let c5 = by_id(&mut held, 5);
    let c5_again = Claimed::new(c5.dispatch().clone());
    let c1 = by_id(&mut held, 1);
    let c1_again = Claimed::new(c1.dispatch().clone());
    let now = at(secs(21));
    let mut entries: Vec<(Claimed, Outcome)> = vec![
        (c1, Outcome::Complete(serde_json::json!({ "r": 1 }))),
        (by_id(&mut held, 2), Outcome::Fail("boom".into())),
        (
            by_id(&mut held, 3),
            Outcome::Retry {
                after: Duration::from_secs(5),
            },
        ),
        (by_id(&mut held, 4), Outcome::Release),
        (stale, Outcome::Complete(serde_json::json!("stale"))),
        (
            by_id(&mut held, 7),
            Outcome::Retry {
                after: Duration::ZERO,
            },
        ),
        (
            Claimed::new(unknown),
            Outcome::Complete(serde_json::json!(0)),
        ),
        (c5, Outcome::Complete(serde_json::json!(5))),
        (c5_again, Outcome::Complete(serde_json::json!("again"))),
        (c1_again, Outcome::Release),
    ];
    if !repeats {
        entries.truncate(entries.len() - 2);
    }

    // The oracle: `apply` on each row as the entries before it left it.
    let mut rows = std::collections::HashMap::new();
    for n in 1..=7 {
        rows.insert(id(n), get(s, id(n)).await);
    }
    let mut expected = Vec::new();
    for (c, outcome) in &entries {
        let event = outcome.clone().into_event(c.attempt(), now);
        expected.push(match rows.get(&c.id()) {
            None => Err(StoreError::NotFound(c.id())),
            Some(row) => match fsm::apply(row, event) {
                Ok(next) => {
                    rows.insert(c.id(), next.clone());
                    Ok(next)
                }
                Err(e) => Err(StoreError::from(e)),
            },
        });
    }

    let batch = entries
        .into_iter()
        .map(|(c, outcome)| {
            (
                c,
                FinishParams {
                    outcome,
                    now: Some(now),
                },
            )
        })
        .collect();
    let got = s.finish_many(batch).await;
    assert_eq!(got.len(), expected.len(), "one answer per entry");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        match (g, e) {
            (Ok(g), Ok(e)) => assert_eq!(g, e, "entry {i}"),
            (Err(g), Err(e)) => assert_same_error(g, e),
            _ => panic!("entry {i}: expected {e:?}, got {g:?}"),
        }
    }
    for n in 1..=7 {
        assert_eq!(get(s, id(n)).await, rows[&id(n)], "row {n} after the batch");
    }
    assert!(s.finish_many(Vec::new()).await.is_empty());
}

/// A large `finish_many` batch (the most one claim hands out) finishes every row.
pub async fn finish_many_takes_a_full_claim_batch(store: Arc<dyn Store>) {
    let s = &*store;
    for n in 0..u128::from(MAX_BATCH) {
        let mut new = new_dispatch(n + 1, "b1", at(0));
        new.args = serde_json::json!(null);
        insert(s, new).await;
    }
    let held = claim(s, "b1", "n1", MAX_BATCH, at(1)).await;
    assert_eq!(held.len(), MAX_BATCH as usize);
    let batch = held
        .into_iter()
        .map(|c| {
            let n = c.id();
            (
                c,
                FinishParams {
                    outcome: Outcome::Complete(serde_json::json!(n.to_string())),
                    now: Some(at(2)),
                },
            )
        })
        .collect();
    for r in s.finish_many(batch).await {
        let d = r.expect("every held row finishes");
        assert_eq!(d.state, DispatchState::Done);
        assert_eq!(d.result, Some(serde_json::json!(d.id.to_string())));
    }
    assert!(claim(s, "b1", "n1", MAX_BATCH, at(secs(100)))
        .await
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// The execution model: ordering keys, hand-backs, late rows, live leases, batches.

fn keyed(n: u128, b: &str, key: &str, now: Timestamp) -> NewDispatch {
    NewDispatch {
        key: Some(key.to_owned()),
        ..new_dispatch(n, b, now)
    }
}

fn ids_of(claimed: &[Claimed]) -> Vec<DispatchId> {
    claimed.iter().map(Claimed::id).collect()
}

/// Rows of one broker with the same key are claimed one at a time, in insertion order; rows of
/// other keys and unkeyed rows are not held up.
pub async fn keys_run_one_at_a_time_in_insertion_order(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, keyed(1, "b", "agent-1", at(0))).await;
    insert(s, keyed(2, "b", "agent-1", at(1))).await;
    insert(s, new_dispatch(3, "b", at(2))).await;
    insert(s, keyed(4, "b", "agent-2", at(3))).await;
    insert(s, keyed(5, "b", "agent-1", at(4))).await;
    let first = claim(s, "b", "n1", 10, at(secs(1))).await;
    assert_eq!(ids_of(&first), vec![id(1), id(3), id(4)]);
    // While 1 is held, nothing more of agent-1 is claimable, by any node.
    assert!(claim(s, "b", "n2", 10, at(secs(1))).await.is_empty());
    let one = first.into_iter().next().expect("row 1");
    finish(s, one, Outcome::Complete(serde_json::json!(1)), at(secs(2)))
        .await
        .expect("complete 1");
    let next = claim(s, "b", "n2", 10, at(secs(2))).await;
    assert_eq!(
        ids_of(&next),
        vec![id(2)],
        "then the next of its key, alone"
    );
}

/// A held row blocks its key until its lease runs out; a held row that is younger than a
/// pending one (clocks disagree about creation) still blocks it.
pub async fn a_held_row_blocks_its_key_until_its_lease_runs_out(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, keyed(1, "b", "k", at(secs(5)))).await;
    let held = claim_one(s, "b", "n1", at(secs(6))).await;
    // An older row of the same key, written later by a node whose clock lags.
    insert(s, keyed(2, "b", "k", at(0))).await;
    assert!(claim(s, "b", "n2", 10, at(secs(7))).await.is_empty());
    // Lease gone: the older row comes first again.
    let lapsed = at(secs(6)).saturating_add(LEASE);
    let got = claim(s, "b", "n2", 10, lapsed).await;
    assert_eq!(ids_of(&got), vec![id(2)]);
    drop(held);
}

/// A retried row keeps its place: the later rows of its key wait for it. A row that can never
/// run again (past its deadline) no longer holds them up, even before the sweeper fails it.
pub async fn a_retry_keeps_its_place_and_a_dead_row_gives_it_up(store: Arc<dyn Store>) {
    let s = &*store;
    insert(
        s,
        NewDispatch {
            deadline: Some(at(secs(60))),
            ..keyed(1, "b", "k", at(0))
        },
    )
    .await;
    insert(s, keyed(2, "b", "k", at(1))).await;
    let c = claim_one(s, "b", "n1", at(secs(1))).await;
    finish(
        s,
        c,
        Outcome::Retry {
            after: Duration::from_secs(30),
        },
        at(secs(2)),
    )
    .await
    .expect("retry");
    assert!(
        claim(s, "b", "n1", 10, at(secs(3))).await.is_empty(),
        "row 2 waits behind the retried row 1"
    );
    let c = claim_one(s, "b", "n1", at(secs(32))).await;
    assert_eq!(c.id(), id(1));
    finish(
        s,
        c,
        Outcome::Retry {
            after: Duration::from_secs(100),
        },
        at(secs(33)),
    )
    .await
    .expect("retry again");
    // Row 1 can only be available after its deadline: from the deadline on it is dead.
    assert!(claim(s, "b", "n1", 10, at(secs(59))).await.is_empty());
    let got = claim(s, "b", "n1", 10, at(secs(60))).await;
    assert_eq!(ids_of(&got), vec![id(2)]);
}

/// Hand-backs do not use up executions: a `max_attempts = 1` row handed back twice still runs,
/// at a fresh fencing token each time; after its one execution it is exhausted, not re-run.
pub async fn hand_backs_do_not_use_up_executions(store: Arc<dyn Store>) {
    let s = &*store;
    insert(
        s,
        NewDispatch {
            max_attempts: 1,
            ..new_dispatch(1, "b", at(0))
        },
    )
    .await;
    for round in 1..=2u32 {
        let c = claim_one(s, "b", "n1", at(secs(i64::from(round)))).await;
        assert_eq!(c.attempt(), round);
        let d = finish(s, c, Outcome::Release, at(secs(i64::from(round))))
            .await
            .expect("release");
        assert_eq!(
            (d.state, d.released, d.executions()),
            (DispatchState::Pending, round, 0)
        );
    }
    let c = claim_one(s, "b", "n2", at(secs(3))).await;
    assert_eq!((c.attempt(), c.dispatch().executions()), (3, 1));
    // Its one execution began: a retry is refused, and once its lease lapses it is exhausted.
    let before = get(s, id(1)).await;
    let r = finish(
        s,
        Claimed::new(c.dispatch().clone()),
        Outcome::Retry {
            after: Duration::ZERO,
        },
        at(secs(4)),
    )
    .await;
    assert_illegal(r, DispatchState::InProgress, EventKind::Retry);
    assert_eq!(
        get(s, id(1)).await,
        before,
        "a refused retry changes nothing"
    );
    let lapsed = at(secs(3)).saturating_add(LEASE);
    assert!(claim(s, "b", "n1", 10, lapsed).await.is_empty());
    let report = s
        .sweep(sweep_params(10, Duration::from_secs(3600), lapsed))
        .await
        .expect("sweep");
    assert_eq!(report.exhausted, vec![id(1)]);
}

/// `Late`: the holder did not start the row before its deadline; it fails as expired, fenced
/// like any holder's write, and is refused for a row without a deadline.
pub async fn late_fails_an_unstarted_row_as_expired(store: Arc<dyn Store>) {
    let s = &*store;
    insert(
        s,
        NewDispatch {
            deadline: Some(at(secs(10))),
            ..new_dispatch(1, "b", at(0))
        },
    )
    .await;
    insert(s, new_dispatch(2, "b", at(1))).await;
    let mut got = claim(s, "b", "n1", 2, at(secs(1))).await;
    let no_deadline = got.pop().expect("row 2");
    let with_deadline = got.pop().expect("row 1");
    let stale = Claimed::new(with_deadline.dispatch().clone());
    let d = finish(s, with_deadline, Outcome::Late, at(secs(2)))
        .await
        .expect("late");
    assert_eq!(
        (d.state, d.failure),
        (DispatchState::Failed, Some(FailReason::Expired))
    );
    assert_illegal(
        finish(s, stale, Outcome::Late, at(secs(2))).await,
        DispatchState::Failed,
        EventKind::Late,
    );
    let before = get(s, id(2)).await;
    assert_illegal(
        finish(s, no_deadline, Outcome::Late, at(secs(2))).await,
        DispatchState::InProgress,
        EventKind::Late,
    );
    assert_eq!(get(s, id(2)).await, before);
}

/// A heartbeat renews a live lease only: once the lease ran out the claim cannot be revived,
/// even though nobody re-claimed it yet. Finishing it is still accepted.
pub async fn a_lapsed_lease_cannot_be_renewed(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, new_dispatch(1, "b", at(0))).await;
    let c = claim_one(s, "b", "n1", at(secs(1))).await;
    let end = at(secs(1)).saturating_add(LEASE);
    heartbeat(s, &c, end.saturating_sub(Duration::from_micros(1)))
        .await
        .expect("renew before the end");
    let end = end
        .saturating_sub(Duration::from_micros(1))
        .saturating_add(LEASE);
    let before = get(s, id(1)).await;
    assert_illegal(
        heartbeat(s, &c, end).await,
        DispatchState::InProgress,
        EventKind::Heartbeat,
    );
    assert_eq!(get(s, id(1)).await, before);
    let d = finish(
        s,
        c,
        Outcome::Complete(serde_json::json!("late but done")),
        end,
    )
    .await
    .expect("complete after the lease");
    assert_eq!(d.state, DispatchState::Done);
}

/// `insert_many` writes every row or none: a conflict anywhere leaves the store unchanged; a
/// batch of new rows plus an idempotent repeat is written in full.
pub async fn insert_many_is_all_or_nothing(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, new_dispatch(1, "a", at(0))).await;
    let conflicting = NewDispatch {
        args: serde_json::json!("other"),
        ..new_dispatch(1, "a", at(0))
    };
    let r = s
        .insert_many(vec![
            new_dispatch(2, "a", at(1)),
            new_dispatch(3, "b", at(1)),
            conflicting,
        ])
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(
        all_rows(s).await.len(),
        1,
        "nothing of the batch was written"
    );
    let rows = s
        .insert_many(vec![
            new_dispatch(2, "a", at(1)),
            new_dispatch(1, "a", at(0)),
            keyed(3, "b", "k", at(1)),
        ])
        .await
        .expect("insert_many");
    assert_eq!(
        rows.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![id(2), id(1), id(3)]
    );
    assert_eq!(rows[2].key.as_deref(), Some("k"));
    assert_eq!(all_rows(s).await.len(), 3);
    let bad = NewDispatch {
        max_attempts: 0,
        ..new_dispatch(4, "a", at(1))
    };
    assert_invalid(s.insert_many(vec![new_dispatch(5, "a", at(1)), bad]).await);
    assert_eq!(all_rows(s).await.len(), 3);
}

/// `delay` and `ttl` are measured from the store's `now`; `executions` starts the row at that
/// attempt (a fast path's first execution already happened).
pub async fn insert_measures_delay_and_ttl_from_its_now(store: Arc<dyn Store>) {
    let s = &*store;
    let d = insert(
        s,
        NewDispatch {
            delay: Some(Duration::from_secs(5)),
            ttl: Some(Duration::from_secs(30)),
            deadline: Some(at(secs(60))),
            executions: 1,
            ..new_dispatch(1, "b", at(secs(1)))
        },
    )
    .await;
    assert_eq!(d.available_at, at(secs(6)));
    assert_eq!(
        d.deadline,
        Some(at(secs(31))),
        "the earlier of deadline and ttl"
    );
    assert_eq!((d.attempt, d.released, d.executions()), (1, 0, 1));
    assert!(claim(s, "b", "n", 1, at(secs(5))).await.is_empty());
    let c = claim_one(s, "b", "n", at(secs(6))).await;
    assert_eq!((c.attempt(), c.dispatch().executions()), (2, 2));
    assert_invalid(
        s.insert(NewDispatch {
            executions: 3,
            ..new_dispatch(2, "b", at(0))
        })
        .await,
    );
    assert_invalid(
        s.insert(NewDispatch {
            key: Some(String::new()),
            ..new_dispatch(3, "b", at(0))
        })
        .await,
    );
}

/// On many small random histories of keyed and unkeyed rows, every claim takes exactly the
/// rows [`fsm::claim_order`] names, in that order.
pub async fn claims_agree_with_claim_order(store: Arc<dyn Store>) {
    let s = &*store;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let keys = [None, Some("x"), Some("y")];
    let mut held: Vec<Claimed> = Vec::new();
    let mut t = secs(1);
    for n in 1..=60u128 {
        let key = keys[next(3) as usize].map(str::to_owned);
        let deadline = (next(4) == 0).then(|| at(t + secs(next(20) as i64)));
        insert(
            s,
            NewDispatch {
                key,
                deadline,
                max_attempts: 1 + next(2) as u32,
                ..new_dispatch(n, "b", at(t))
            },
        )
        .await;
        t += secs(next(3) as i64);
        if next(3) == 0 {
            let now = at(t);
            let live: Vec<Dispatch> = all_rows(s)
                .await
                .into_iter()
                .filter(|d| !d.state.is_terminal())
                .collect();
            let refs: Vec<&Dispatch> = live.iter().collect();
            let limit = 1 + next(4) as usize;
            let expected = fsm::claim_order(&refs, now, limit);
            let got = claim(s, "b", "n", limit as u32, now).await;
            assert_eq!(ids_of(&got), expected, "claim at {now} after row {n}");
            held.extend(got);
        }
        if !held.is_empty() && next(2) == 0 {
            let c = held.remove(next(held.len() as u64) as usize);
            let outcome = match next(3) {
                0 => Outcome::Release,
                1 => Outcome::Complete(serde_json::Value::Null),
                _ => Outcome::Retry {
                    after: Duration::from_secs(next(4)),
                },
            };
            // Refusals (a retry with no execution left) are fine: the store is unchanged.
            let _ = finish(s, c, outcome, at(t)).await;
        }
    }
}

/// JSON `depth` levels deep: `[[[…0…]]]`, built without recursion.
fn nested(depth: usize) -> serde_json::Value {
    let mut v = serde_json::json!(0);
    for _ in 0..depth {
        v = serde_json::Value::Array(vec![v]);
    }
    v
}

/// Drops a deeply nested value without recursing (serde_json's own drop would).
fn dispose(mut v: serde_json::Value) {
    while let serde_json::Value::Array(mut a) = v {
        match a.pop() {
            Some(inner) => v = inner,
            None => return,
        }
    }
}

/// Values no store could read back are refused before anything is written, identically by
/// every store: args, results and progress nested deeper than `MAX_JSON_DEPTH` (even thousands
/// of levels: refused, not a stack overflow), oversized results and failure messages, and an
/// idempotency key with a NUL. A refused entry of a batched finish leaves the others written.
pub async fn values_no_store_can_read_back_are_refused_and_change_nothing(store: Arc<dyn Store>) {
    let s = &*store;
    let deepest = nested(super::MAX_JSON_DEPTH - 1);
    for args in [nested(super::MAX_JSON_DEPTH + 1), nested(3_000)] {
        let r = s
            .insert(NewDispatch {
                args,
                ..new_dispatch(1, "b", at(0))
            })
            .await;
        assert_invalid(r.map(|d| dispose(d.args)));
    }
    let r = s
        .insert(NewDispatch {
            idempotency_key: Some("a\0b".into()),
            ..new_dispatch(1, "b", at(0))
        })
        .await;
    assert_invalid(r);
    assert!(all_rows(s).await.is_empty());
    // The deepest value accepted round-trips.
    let d = insert(
        s,
        NewDispatch {
            args: deepest.clone(),
            ..new_dispatch(1, "b", at(0))
        },
    )
    .await;
    assert_eq!(get(s, d.id).await.args, deepest);
    insert(s, new_dispatch(2, "b", at(1))).await;
    insert(s, new_dispatch(3, "b", at(2))).await;
    let mut claimed = claim(s, "b", "n", 3, at(secs(1))).await;
    let third = claimed.pop().expect("row 3");
    let second = claimed.pop().expect("row 2");
    let first = claimed.pop().expect("row 1");
    let before = get(s, first.id()).await;
    let r = s
        .heartbeat(
            &first,
            HeartbeatParams {
                lease: LEASE,
                progress: Some(Progress {
                    seq: 1,
                    detail: nested(super::MAX_JSON_DEPTH + 1),
                }),
                now: Some(at(secs(2))),
            },
        )
        .await;
    assert_invalid(r);
    for outcome in [
        Outcome::Complete(nested(super::MAX_JSON_DEPTH + 1)),
        Outcome::Fail("x".repeat(super::MAX_DETAIL_BYTES + 1)),
    ] {
        let again = Claimed::new(first.dispatch().clone());
        assert_invalid(finish(s, again, outcome, at(secs(2))).await);
    }
    assert_eq!(get(s, first.id()).await, before, "refusals changed nothing");
    let results = s
        .finish_many(vec![
            (
                second,
                FinishParams {
                    outcome: Outcome::Complete(serde_json::json!("fine")),
                    now: Some(at(secs(3))),
                },
            ),
            (
                first,
                FinishParams {
                    outcome: Outcome::Complete(nested(200)),
                    now: Some(at(secs(3))),
                },
            ),
            (
                third,
                FinishParams {
                    outcome: Outcome::Fail("no".into()),
                    now: Some(at(secs(3))),
                },
            ),
        ])
        .await;
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0].as_ref().expect("row 2").state,
        DispatchState::Done
    );
    assert!(
        matches!(results[1], Err(StoreError::InvalidInput(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(
        results[2].as_ref().expect("row 3").state,
        DispatchState::Failed
    );
    assert_eq!(get(s, id(1)).await, before);
    // Every row still reads back, one by one and in a list.
    assert_eq!(all_rows(s).await.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Cancel requests.

async fn request_cancel(
    store: &dyn Store,
    d: DispatchId,
    now: Timestamp,
) -> Result<Dispatch, StoreError> {
    store
        .request_cancel(CancelParams {
            id: d,
            now: Some(now),
        })
        .await
}

/// A cancel request ends a pending row at once, and marks a running one, which its holder can
/// still heartbeat; every outcome of that holder (by `finish` and by `finish_many`) lands as
/// [`fsm::apply`] says: completed rows complete, everything else ends `Failed(Cancelled)`
/// without the outcome's own guard. A finished or unknown row is a typed error.
pub async fn request_cancel_agrees_with_apply(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, new_dispatch(1, "b1", at(0))).await;
    let d = request_cancel(s, id(1), at(secs(1)))
        .await
        .expect("cancel a pending row");
    assert_eq!(
        (d.state, d.failure.clone(), d.updated_at),
        (
            DispatchState::Failed,
            Some(FailReason::Cancelled),
            at(secs(1))
        )
    );
    assert_illegal(
        request_cancel(s, id(1), at(secs(2))).await,
        DispatchState::Failed,
        EventKind::RequestCancel,
    );
    assert!(matches!(
        request_cancel(s, id(99), at(secs(2))).await,
        Err(StoreError::NotFound(_))
    ));

    // Rows 2..=11 running: 2..=6 finish one by one, 7..=11 in one batch; row 4 and 9 (retry)
    // have no execution left, which a cancel request overrides.
    for n in 2..=11 {
        let mut new = new_dispatch(n, "b2", at(n as i64));
        if n == 4 || n == 9 {
            new.max_attempts = 1;
        }
        insert(s, new).await;
    }
    let mut held = claim(s, "b2", "n1", 20, at(secs(2))).await;
    assert_eq!(held.len(), 10);
    for n in 2..=11 {
        let d = request_cancel(s, id(n), at(secs(3)))
            .await
            .expect("cancel a running row");
        assert_eq!(d.state, DispatchState::InProgress, "row {n}");
        assert!(d.cancel_requested(), "row {n}");
        // A second request changes nothing but the time.
        let again = request_cancel(s, id(n), at(secs(3)))
            .await
            .expect("cancel again");
        assert!(again.cancel_requested());
    }
    let beat = heartbeat(s, &held[0], at(secs(4)))
        .await
        .expect("the holder still renews");
    assert!(beat.cancel_requested());
    let outcome = |n: u128| match (n - 2) % 5 {
        0 => Outcome::Complete(serde_json::json!({ "n": n as u64 })),
        1 => Outcome::Fail("stopped".into()),
        2 => Outcome::Retry {
            after: Duration::from_secs(5),
        },
        3 => Outcome::Release,
        _ => Outcome::Late,
    };
    let now = at(secs(5));
    let mut expected = std::collections::HashMap::new();
    for n in 2..=11 {
        let row = get(s, id(n)).await;
        let next = fsm::apply(&row, outcome(n).into_event(row.attempt, now)).expect("apply");
        expected.insert(id(n), next);
    }
    held.sort_by_key(Claimed::id);
    let batch: Vec<Claimed> = held.split_off(5);
    for c in held {
        let n = c.id().as_uuid().as_u128();
        let got = finish(s, c, outcome(n), now).await.expect("finish");
        assert_eq!(got, expected[&id(n)], "row {n}");
    }
    let batch = batch
        .into_iter()
        .map(|c| {
            let n = c.id().as_uuid().as_u128();
            (
                c,
                FinishParams {
                    outcome: outcome(n),
                    now: Some(now),
                },
            )
        })
        .collect();
    for got in s.finish_many(batch).await {
        let got = got.expect("finish_many");
        assert_eq!(got, expected[&got.id], "row {}", got.id);
    }
    for n in 2..=11 {
        let d = get(s, id(n)).await;
        let want = if (n - 2) % 5 == 0 {
            (DispatchState::Done, None)
        } else {
            (DispatchState::Failed, Some(FailReason::Cancelled))
        };
        assert_eq!((d.state, d.failure), want, "row {n}");
    }
}

/// A running row with a cancel request is never claimed again, even once its lease lapsed; the
/// sweeper then ends it `Failed(Cancelled)` (reported with the exhausted rows), and meanwhile it
/// does not hold up the later rows of its ordering key.
pub async fn a_cancel_request_is_never_reclaimed_and_the_sweeper_ends_it(store: Arc<dyn Store>) {
    let s = &*store;
    insert(s, keyed(1, "b1", "k", at(0))).await;
    insert(s, keyed(2, "b1", "k", at(1))).await;
    let c = claim_one(s, "b1", "n1", at(secs(1))).await;
    assert_eq!(c.id(), id(1));
    request_cancel(s, id(1), at(secs(2))).await.expect("cancel");
    let lapsed = at(secs(1)).saturating_add(LEASE);
    let got = claim(s, "b1", "n2", 10, lapsed).await;
    assert_eq!(
        ids_of(&got),
        vec![id(2)],
        "the cancelled row is not reclaimed, and its key's next row runs"
    );
    let report = s
        .sweep(sweep_params(100, Duration::from_secs(3600), lapsed))
        .await
        .expect("sweep");
    assert_eq!(report.exhausted, vec![id(1)]);
    let d = get(s, id(1)).await;
    assert_eq!(
        (d.state, d.failure, d.lease_until),
        (DispatchState::Failed, Some(FailReason::Cancelled), None)
    );
    // Its old holder is refused (the row is finished), and a second sweep finds nothing.
    assert_illegal(
        finish(s, c, Outcome::Complete(serde_json::json!(1)), lapsed).await,
        DispatchState::Failed,
        EventKind::Complete,
    );
    let again = s
        .sweep(sweep_params(100, Duration::from_secs(3600), lapsed))
        .await
        .expect("sweep");
    assert!(again.exhausted.is_empty());
}

/// Every duration a store takes is at least [`MIN_DURATION`](super::MIN_DURATION): a lease
/// under a millisecond (a row two nodes could claim at the same instant), a delay or TTL, a
/// sweep's retention. Each is `InvalidInput` and changes nothing; exactly 1 ms is accepted.
pub async fn durations_under_a_millisecond_are_refused_and_change_nothing(store: Arc<dyn Store>) {
    let s = &*store;
    let short = Duration::from_micros(999);
    for new in [
        NewDispatch {
            delay: Some(short),
            ..new_dispatch(9, "b", at(0))
        },
        NewDispatch {
            ttl: Some(Duration::from_nanos(1)),
            ..new_dispatch(9, "b", at(0))
        },
    ] {
        assert_invalid(s.insert(new.clone()).await);
        assert_invalid(s.insert_many(vec![new]).await);
    }
    assert!(all_rows(s).await.is_empty());
    let row = insert(s, new_dispatch(1, "b", at(0))).await;
    for lease in [Duration::ZERO, Duration::from_nanos(1), short] {
        assert_invalid(
            s.claim(ClaimParams {
                lease,
                ..claim_params("b", "n", 1, at(secs(1)))
            })
            .await,
        );
    }
    assert_eq!(get(s, row.id).await, row, "a refused claim changed the row");
    let held = s
        .claim(ClaimParams {
            lease: super::MIN_DURATION,
            ..claim_params("b", "n", 1, at(secs(1)))
        })
        .await
        .expect("a 1 ms lease is accepted")
        .pop()
        .expect("the row");
    let before = get(s, held.id()).await;
    let r = s
        .heartbeat(
            &held,
            HeartbeatParams {
                lease: short,
                progress: None,
                now: Some(at(secs(1))),
            },
        )
        .await;
    assert_invalid(r);
    assert_eq!(
        get(s, held.id()).await,
        before,
        "a refused heartbeat changed the row"
    );
    assert_invalid(s.sweep(sweep_params(10, short, at(secs(2)))).await);
    assert_eq!(all_rows(s).await, vec![before]);
}

/// A connect whose `connected_at` lies more than
/// [`MAX_CONNECT_LEAD`](crate::fsm::MAX_CONNECT_LEAD) after the store's `now` (explicit, or the
/// store's own clock: the database's on Postgres) is `InvalidInput` and writes nothing, so no
/// caller can pin a broker with a `connected_at` that every later connection is older than.
/// Exactly the lead is accepted.
pub async fn a_connected_at_in_the_future_is_refused_and_changes_nothing(store: Arc<dyn Store>) {
    let s = &*store;
    let lead = i64::try_from(fsm::MAX_CONNECT_LEAD.as_micros()).expect("a small lead");
    let params = |sess: &str, connected_at: Timestamp, now: Option<Timestamp>| ConnectParams {
        broker: broker("b"),
        node: node("n1"),
        session: session(sess),
        connected_at: Some(connected_at),
        now,
    };
    for (connected_at, now) in [
        (at(lead + 1), Some(at(0))),
        (Timestamp::MAX, Some(at(0))),
        (Timestamp::MAX, None),
    ] {
        let r = s.connect(params("s-future", connected_at, now)).await;
        assert_invalid(r);
    }
    assert_eq!(s.affinity(&broker("b")).await.expect("affinity"), None);
    match s.connect(params("s1", at(lead), Some(at(0)))).await {
        Ok(ConnectOutcome::Claimed(a)) => assert_eq!(a.connected_at, at(lead)),
        other => panic!("a connect exactly the lead ahead is claimed, got {other:?}"),
    }
    let held = s.affinity(&broker("b")).await.expect("affinity");
    assert_invalid(
        s.connect(params("s2", Timestamp::MAX, Some(at(secs(1)))))
            .await,
    );
    assert_eq!(s.affinity(&broker("b")).await.expect("affinity"), held);
    // Nothing was pinned: a later connection still wins.
    match s
        .connect(params("s3", at(secs(2)), Some(at(secs(2)))))
        .await
    {
        Ok(ConnectOutcome::Claimed(_)) => {}
        other => panic!("a newer connection is claimed, got {other:?}"),
    }
}

/// A connect without `connected_at` is stamped by the store's clock (the explicit `now`, or the
/// database's), and orders against explicit ones as that instant would.
pub async fn a_connect_without_connected_at_takes_the_stores_now(store: Arc<dyn Store>) {
    let s = &*store;
    let params = |sess: &str, connected_at: Option<Timestamp>, now: i64| ConnectParams {
        broker: broker("b"),
        node: node("n1"),
        session: session(sess),
        connected_at,
        now: Some(at(now)),
    };
    match s
        .connect(params("s1", None, secs(5)))
        .await
        .expect("connect")
    {
        ConnectOutcome::Claimed(a) => assert_eq!(a.connected_at, at(secs(5))),
        other => panic!("claimed, got {other:?}"),
    }
    // An explicit older one is superseded by it; a stamped later one wins.
    assert!(matches!(
        s.connect(params("s0", Some(at(secs(4))), secs(6))).await,
        Ok(ConnectOutcome::Superseded(_))
    ));
    match s
        .connect(params("s2", None, secs(7)))
        .await
        .expect("connect")
    {
        ConnectOutcome::Claimed(a) => {
            assert_eq!((a.session, a.connected_at), (session("s2"), at(secs(7))));
        }
        other => panic!("claimed, got {other:?}"),
    }
}
