//! Model checks (loom) of the shipped in-memory store and transport: claim exclusivity, fencing of
//! a stale finisher, and the transport's no-lost-wake-up permit.
//!
//! Run with `scripts/loom.sh` (it sets `--cfg broker_dispatch_loom` and a separate target dir).
#![cfg(broker_dispatch_loom)]

use std::collections::BTreeSet;
use std::time::Duration;

use broker_dispatch::fsm::{BrokerId, DispatchId, DispatchState, NodeId, Timestamp};
use broker_dispatch::store::{ClaimParams, FinishParams, MemoryStore, NewDispatch, Outcome};
use broker_dispatch::transport::{MemoryTransport, Notice, Transport};
use broker_dispatch::StoreError;
use futures::StreamExt;
use loom::future::block_on;
use loom::sync::Arc;
use loom::thread;
use serde_json::json;

const T0: i64 = 1_000_000_000;
const LEASE: Duration = Duration::from_secs(30);
/// The first instant at which a claim taken at `T0` has lapsed.
const LAPSED: i64 = T0 + 30_000_000;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    // At most three racing threads with a handful of lock acquisitions each. A bound of 6
    // preemptions checks the suite in about 12 s here (10 takes over a minute) and is far above
    // the single preemption each race under test needs. LOOM_MAX_PREEMPTIONS overrides it.
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = Some(6);
    }
    builder.check(f);
}

fn broker() -> BrokerId {
    BrokerId::new("broker-1").unwrap()
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A store holding one pending row for `broker-1`, written at `T0`.
fn store_with_one_row() -> (Arc<MemoryStore>, DispatchId) {
    let store = Arc::new(MemoryStore::new());
    let mut new = NewDispatch::new(broker(), "start", json!({ "agent": "a1" }));
    new.id = DispatchId::from_uuid(uuid::Uuid::from_u128(1));
    new.now = Some(Timestamp::from_micros(T0));
    let row = store.insert_sync(new).unwrap();
    (store, row.id)
}

fn claim_params(by: &str, now: i64) -> ClaimParams {
    ClaimParams {
        broker: broker(),
        node: node(by),
        limit: 10,
        lease: LEASE,
        now: Some(Timestamp::from_micros(now)),
    }
}

fn complete(who: &str, now: i64) -> FinishParams {
    FinishParams {
        outcome: Outcome::Complete(json!({ "by": who })),
        now: Some(Timestamp::from_micros(now)),
    }
}

fn row(store: &MemoryStore, id: DispatchId) -> broker_dispatch::fsm::Dispatch {
    use broker_dispatch::store::Store;
    block_on(store.get(id)).unwrap().unwrap()
}

#[test]
fn concurrent_claims_at_the_same_instant_have_one_winner() {
    model(|| {
        let (store, id) = store_with_one_row();
        let handles: Vec<_> = ["n1", "n2", "n3"]
            .into_iter()
            .map(|n| {
                let store = Arc::clone(&store);
                thread::spawn(move || (n, store.claim_sync(claim_params(n, T0)).unwrap()))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter(|(_, c)| !c.is_empty()).collect();
        assert_eq!(winners.len(), 1, "claims: {results:?}");
        let (winner, claimed) = winners[0];
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempt(), 1);
        let d = row(&store, id);
        assert_eq!(d.state, DispatchState::InProgress);
        assert_eq!(d.attempt, 1);
        assert_eq!(d.claimed_by, Some(node(winner)));
    });
}

#[test]
fn claims_across_a_lapsed_lease_have_one_winner_per_attempt() {
    model(|| {
        let (store, id) = store_with_one_row();
        // Two nodes claim at T0; a third claims after a T0 lease would have lapsed, so it may
        // legitimately take attempt 2 (or attempt 1, if it runs first).
        let handles: Vec<_> = [("n1", T0), ("n2", T0), ("n3", LAPSED)]
            .into_iter()
            .map(|(n, now)| {
                let store = Arc::clone(&store);
                thread::spawn(move || (n, store.claim_sync(claim_params(n, now)).unwrap()))
            })
            .collect();
        let mut won: Vec<(u32, &str)> = Vec::new();
        for h in handles {
            let (n, claimed) = h.join().unwrap();
            assert!(claimed.len() <= 1);
            won.extend(claimed.iter().map(|c| (c.attempt(), n)));
        }
        won.sort();
        let attempts: Vec<u32> = won.iter().map(|(a, _)| *a).collect();
        let distinct: BTreeSet<u32> = attempts.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "an attempt was won twice: {won:?}"
        );
        assert!(
            attempts == [1] || attempts == [1, 2],
            "attempts won: {won:?}"
        );
        let (last_attempt, last_node) = *won.last().unwrap();
        let d = row(&store, id);
        assert_eq!(d.attempt, last_attempt);
        assert_eq!(d.claimed_by, Some(node(last_node)));
    });
}

#[test]
fn stale_finisher_is_fenced_after_a_reclaim() {
    model(|| {
        let (store, id) = store_with_one_row();
        let a = store
            .claim_sync(claim_params("a", T0))
            .unwrap()
            .pop()
            .unwrap();
        let b = store
            .claim_sync(claim_params("b", LAPSED))
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!((a.attempt(), b.attempt()), (1, 2));

        let sa = Arc::clone(&store);
        let ta = thread::spawn(move || sa.finish_sync(a, complete("a", LAPSED + 1)));
        let sb = Arc::clone(&store);
        let tb = thread::spawn(move || sb.finish_sync(b, complete("b", LAPSED + 2)));
        let ra = ta.join().unwrap();
        let rb = tb.join().unwrap();

        assert!(
            matches!(
                ra,
                Err(StoreError::Fenced {
                    presented: 1,
                    current: 2
                })
            ),
            "stale finisher: {ra:?}"
        );
        let done = rb.expect("the current holder finishes");
        assert_eq!(done.state, DispatchState::Done);
        let d = row(&store, id);
        assert_eq!(d.result, Some(json!({ "by": "b" })));
        assert_eq!(d.attempt, 2);
    });
}

#[test]
fn racing_reclaim_and_stale_finish_never_both_succeed() {
    model(|| {
        let (store, id) = store_with_one_row();
        let a = store
            .claim_sync(claim_params("a", T0))
            .unwrap()
            .pop()
            .unwrap();

        let sb = Arc::clone(&store);
        let tb = thread::spawn(move || {
            let claimed = sb.claim_sync(claim_params("b", LAPSED)).unwrap();
            claimed
                .into_iter()
                .next()
                .map(|b| (b.attempt(), sb.finish_sync(b, complete("b", LAPSED + 1))))
        });
        let sa = Arc::clone(&store);
        let ta = thread::spawn(move || sa.finish_sync(a, complete("a", LAPSED)));
        let ra = ta.join().unwrap();
        let rb = tb.join().unwrap();

        let d = row(&store, id);
        assert_eq!(d.state, DispatchState::Done);
        match rb {
            Some((attempt, finished)) => {
                // B re-claimed first: A is a stale holder and must be fenced.
                assert_eq!(attempt, 2);
                assert!(finished.is_ok(), "current holder refused: {finished:?}");
                assert!(
                    matches!(
                        ra,
                        Err(StoreError::Fenced {
                            presented: 1,
                            current: 2
                        })
                    ),
                    "stale finisher after a re-claim: {ra:?}"
                );
                assert_eq!(d.result, Some(json!({ "by": "b" })));
            }
            None => {
                // A finished before B looked: nothing was left to claim.
                assert!(ra.is_ok(), "holder refused without a re-claim: {ra:?}");
                assert_eq!(d.attempt, 1);
                assert_eq!(d.result, Some(json!({ "by": "a" })));
            }
        }
    });
}

fn signal(b: &str) -> Notice {
    Notice::Signal {
        broker: BrokerId::new(b).unwrap(),
    }
}

#[test]
fn notice_published_before_or_while_polling_is_not_lost() {
    model(|| {
        let transport = MemoryTransport::with_capacity(4);
        let mut sub = block_on(transport.subscribe()).unwrap();
        let publisher = transport.clone();
        let t = thread::spawn(move || block_on(publisher.publish(signal("b1"))).unwrap());
        // If the wake-up were lost, this would park forever and loom would report a deadlock.
        assert_eq!(block_on(sub.next()), Some(signal("b1")));
        t.join().unwrap();
    });
}

#[test]
fn notices_from_two_publishers_all_arrive() {
    model(|| {
        let transport = MemoryTransport::with_capacity(4);
        let mut sub = block_on(transport.subscribe()).unwrap();
        let handles: Vec<_> = ["b1", "b2"]
            .into_iter()
            .map(|b| {
                let publisher = transport.clone();
                thread::spawn(move || block_on(publisher.publish(signal(b))).unwrap())
            })
            .collect();
        let mut got = vec![block_on(sub.next()), block_on(sub.next())];
        got.sort_by_key(|n| format!("{n:?}"));
        assert_eq!(got, [Some(signal("b1")), Some(signal("b2"))]);
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
fn close_while_polling_ends_the_stream() {
    model(|| {
        let transport = MemoryTransport::with_capacity(4);
        let mut sub = block_on(transport.subscribe()).unwrap();
        let closer = transport.clone();
        let t = thread::spawn(move || closer.close());
        assert_eq!(block_on(sub.next()), None);
        t.join().unwrap();
    });
}
