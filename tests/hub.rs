//! Several hubs over one `MemoryStore` and one `MemoryTransport`, in one process.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchState, FailReason, NodeId, SessionId};
use broker_dispatch::hub::{Clock, Command, HttpFallback, Hub, HubConfig, UndeliverablePolicy};
use broker_dispatch::store::{ClaimParams, Claimed, FinishParams, MemoryStore, Outcome, Store};
use broker_dispatch::transport::MemoryTransport;
use broker_dispatch::{Error, ExecError, StoreError};
use parking_lot::Mutex;
use serde_json::json;
use support::{eventually, Ledger, PausedClock, Recorder, Rng};

fn fast_config() -> HubConfig {
    HubConfig {
        lease: Duration::from_millis(400),
        freshness: Duration::from_secs(1),
        wait_window: Duration::from_secs(3),
        poll_interval: Duration::from_millis(40),
        sweep_interval: Duration::from_millis(100),
        ..HubConfig::default()
    }
}

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}
fn broker(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}
fn session(s: impl Into<String>) -> SessionId {
    SessionId::new(s).unwrap()
}

/// What an originator saw (`None` for a send) and the dispatch id when known.
type Seen = (
    Option<Result<broker_dispatch::hub::Dispatched, Error>>,
    Option<broker_dispatch::fsm::DispatchId>,
);

struct Cluster {
    hubs: Vec<Hub>,
    clock: Arc<PausedClock>,
    store: Arc<MemoryStore>,
    ledger: Arc<Mutex<Ledger>>,
    transport: MemoryTransport,
}

async fn cluster(n: usize, config: HubConfig, tweak: impl Fn(&mut Recorder)) -> Cluster {
    let store = Arc::new(MemoryStore::new());
    let transport = MemoryTransport::new();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clock = PausedClock::new();
    let mut hubs = Vec::new();
    for i in 0..n {
        let id = node(&format!("node-{i}"));
        let mut exec = Recorder::new(&id, &ledger);
        tweak(&mut exec);
        let hub = Hub::builder(id)
            .clock(clock.clone())
            .store(store.clone())
            .transport(Arc::new(transport.clone()))
            .executor(Arc::new(exec))
            .config(config.clone())
            .start()
            .await
            .unwrap();
        hubs.push(hub);
    }
    Cluster {
        hubs,
        clock,
        store,
        ledger,
        transport,
    }
}

async fn all_rows(store: &MemoryStore) -> Vec<Dispatch> {
    broker_dispatch::store::list_all(
        store,
        broker_dispatch::store::ListFilter {
            limit: 1000,
            ..broker_dispatch::store::ListFilter::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn forward_runs_on_the_owner_and_returns_its_result() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b1");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    let out = c.hubs[1]
        .dispatch(Command::new(b.clone(), "start", json!({"agent": "a"})))
        .await
        .unwrap();
    assert_eq!(out["node"], "node-0");
    assert_eq!(out["args"], json!({"agent": "a"}));
    let rows = all_rows(&c.store).await;
    assert_eq!(rows.len(), 1, "a forward writes exactly one row");
    assert_eq!(rows[0].state, DispatchState::Done);
    assert_eq!(rows[0].result.as_ref(), Some(&out));
    assert_eq!(rows[0].claimed_by.as_ref(), Some(&node("node-0")));
}

#[tokio::test(start_paused = true)]
async fn local_fast_path_writes_no_row() {
    let c = cluster(1, fast_config(), |_| {}).await;
    let b = broker("b1");
    c.hubs[0]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    let out = c.hubs[0]
        .dispatch(Command::new(b, "stop", json!(1)))
        .await
        .unwrap();
    assert_eq!(out["node"], "node-0");
    assert!(
        c.store.is_empty(),
        "the local path must not touch dispatch rows"
    );
}

#[tokio::test(start_paused = true)]
async fn three_hubs_twenty_flapping_brokers_five_thousand_commands() {
    let c = cluster(3, fast_config(), |_| {}).await;
    let brokers: Vec<BrokerId> = (0..20).map(|i| broker(&format!("broker-{i}"))).collect();
    // Where each broker is connected now: (hub index, session).
    let placement: Arc<Mutex<Vec<(usize, SessionId)>>> = Arc::new(Mutex::new(Vec::new()));
    for (i, b) in brokers.iter().enumerate() {
        let s = session(format!("{b}-0"));
        c.hubs[i % 3]
            .connect(b.clone(), s.clone(), ())
            .await
            .unwrap();
        placement.lock().push((i % 3, s));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let hubs = c.hubs.clone();
        let brokers = brokers.clone();
        let placement = placement.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng::new(7);
            let mut gen = 1;
            while !stop.load(Ordering::Relaxed) {
                let i = rng.below(20) as usize;
                let (from, old) = placement.lock()[i].clone();
                let to = (from + 1 + rng.below(2) as usize) % 3;
                let new = session(format!("{}-{gen}", brokers[i]));
                gen += 1;
                hubs[from].disconnect(&brokers[i], &old).await.unwrap();
                hubs[to]
                    .connect(brokers[i].clone(), new.clone(), ())
                    .await
                    .unwrap();
                placement.lock()[i] = (to, new);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let total = 5_000usize;
    let next = Arc::new(AtomicU32::new(0));
    let results: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..48u64 {
        let hubs = c.hubs.clone();
        let brokers = brokers.clone();
        let next = next.clone();
        let results = results.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(100 + w);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= total {
                    return;
                }
                let hub = &hubs[rng.below(3) as usize];
                let b = brokers[rng.below(20) as usize].clone();
                let cmd = Command::new(b, "op", json!({ "n": n }));
                if n.is_multiple_of(3) {
                    let r = hub.send(cmd).await.expect("send must succeed");
                    results.lock().push((None, Some(r.id)));
                } else {
                    let r = hub.dispatch_detailed(cmd).await;
                    results.lock().push((Some(r), None));
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    flapper.await.unwrap();

    // Every row reaches a terminal state (sent ones may still be running briefly).
    eventually(Duration::from_secs(30), "every row terminal", || async {
        all_rows(&c.store)
            .await
            .iter()
            .all(|d| d.state.is_terminal())
    })
    .await;
    let rows = all_rows(&c.store).await;
    let by_id: std::collections::HashMap<_, _> = rows.iter().map(|d| (d.id, d)).collect();
    let results = results.lock();
    assert_eq!(results.len(), total);
    // Every originator's outcome agrees with its row: a result is the row's result (or the
    // fast path's, which writes none), a failure is the row's failure.
    for (r, id) in results.iter() {
        match r {
            Some(Ok(out)) => match by_id.get(&out.id) {
                Some(row) => {
                    assert!(
                        out.durable,
                        "{}: a row, but reported as the fast path",
                        out.id
                    );
                    assert_eq!(row.state, DispatchState::Done, "{}", out.id);
                    assert_eq!(row.result.as_ref(), Some(&out.value), "{}", out.id);
                    assert_eq!(
                        (row.attempt, row.claimed_by.as_ref()),
                        (out.attempt, out.node.as_ref())
                    );
                }
                None => assert!(!out.durable, "{}: reported durable, no row", out.id),
            },
            Some(Err(Error::Failed { id, reason })) => {
                if let Some(row) = by_id.get(id) {
                    assert_eq!(row.state, DispatchState::Failed, "{id}");
                    assert_eq!(row.failure.as_ref(), Some(reason), "{id}");
                }
            }
            Some(Err(Error::TimedOut { id, .. })) => {
                assert!(
                    by_id.get(id).is_some_and(|row| row.state.is_terminal()),
                    "{id}"
                );
            }
            Some(Err(e)) => panic!("unexpected error: {e}"),
            None => {
                let id = id.unwrap();
                assert!(by_id[&id].state.is_terminal());
            }
        }
    }
    // Both paths were taken, and flapping did not make most commands fail.
    let ok = |durable: bool| {
        results
            .iter()
            .filter(|(r, _)| matches!(r, Some(Ok(out)) if out.durable == durable))
            .count()
    };
    let dispatched = total - total.div_ceil(3);
    assert!(
        ok(false) > 0 && ok(true) > 0,
        "fast {} / rows {}",
        ok(false),
        ok(true)
    );
    assert!(
        ok(false) + ok(true) > dispatched * 9 / 10,
        "fast {} + rows {} of {dispatched}",
        ok(false),
        ok(true)
    );
    let ledger = c.ledger.lock();
    assert_eq!(ledger.duplicates(), 0, "an (id, attempt) executed twice");
    for d in &rows {
        let runs = ledger.per_id.get(&d.id).copied().unwrap_or(0);
        assert!(
            runs <= d.max_attempts,
            "{} ran {runs} times > {}",
            d.id,
            d.max_attempts
        );
        if d.state == DispatchState::Done {
            assert!(runs >= 1, "a done row was executed");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn originator_result_equals_the_row() {
    let c = cluster(2, fast_config(), |r| {
        r.behaviour = Some(Arc::new(|_ctx, d| {
            if d.op == "boom" {
                Err(ExecError::fatal("kaput"))
            } else {
                Ok(json!({"ok": d.args}))
            }
        }))
    })
    .await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let ok = c.hubs[1]
        .dispatch(Command::new(b.clone(), "fine", json!(5)))
        .await
        .unwrap();
    assert_eq!(ok, json!({"ok": 5}));
    let err = c.hubs[1]
        .dispatch(Command::new(b.clone(), "boom", json!(null)))
        .await
        .unwrap_err();
    let Error::Failed { id, reason } = err else {
        panic!("{err:?}")
    };
    assert_eq!(reason, FailReason::Error("kaput".into()));
    let row = c.store.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, DispatchState::Failed);
    assert_eq!(row.failure, Some(reason));
}

#[tokio::test(start_paused = true)]
async fn teardown_of_an_old_session_after_a_newer_connect_changes_nothing() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("old"), ())
        .await
        .unwrap();
    // Connections are ordered by when they were accepted: a later one, a moment later.
    tokio::time::sleep(Duration::from_millis(1)).await;
    c.hubs[1]
        .connect(b.clone(), session("new"), ())
        .await
        .unwrap();
    // The old socket's teardown arrives late, on the old node.
    assert!(
        !c.hubs[0].disconnect(&b, &session("old")).await.unwrap() || !c.hubs[0].is_connected(&b)
    );
    let a = c.store.affinity(&b).await.unwrap().unwrap();
    assert_eq!(
        a.node,
        Some(node("node-1")),
        "the newer owner keeps the broker"
    );
    assert_eq!(a.session, session("new"));
    // Same node, two sessions: the old teardown must not remove the new one.
    tokio::time::sleep(Duration::from_millis(1)).await;
    c.hubs[1]
        .connect(b.clone(), session("newer"), ())
        .await
        .unwrap();
    assert!(!c.hubs[1].disconnect(&b, &session("new")).await.unwrap());
    assert!(c.hubs[1].is_connected(&b));
    let out = c.hubs[0]
        .dispatch(Command::new(b.clone(), "x", json!(1)))
        .await
        .unwrap();
    assert_eq!(out["node"], "node-1");
}

#[tokio::test(start_paused = true)]
async fn a_delayed_older_connect_is_superseded() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    let t = c.clock.now();
    c.hubs[1]
        .connect_at(b.clone(), session("s2"), (), t)
        .await
        .unwrap();
    let older = t.saturating_sub(Duration::from_secs(1));
    let err = c.hubs[0]
        .connect_at(b.clone(), session("s1"), (), older)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Superseded), "{err:?}");
    assert!(!c.hubs[0].is_connected(&b));
    assert_eq!(
        c.store.affinity(&b).await.unwrap().unwrap().node,
        Some(node("node-1"))
    );
}

#[tokio::test(start_paused = true)]
async fn an_aborted_holder_is_reclaimed_after_its_lease_and_its_late_finish_is_fenced() {
    let config = fast_config();
    let c = cluster(2, config.clone(), |r| {
        if r.node.as_str() == "node-0" {
            r.delay = Duration::from_secs(3600); // hangs until the hub dies
        }
    })
    .await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s0"), ())
        .await
        .unwrap();
    let receipt = c.hubs[1]
        .send(Command::new(b.clone(), "work", json!(1)))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "node-0 starts executing",
        || async { c.ledger.lock().per_id.contains_key(&receipt.id) },
    )
    .await;
    let held = c.store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(held.state, DispatchState::InProgress);
    assert_eq!(held.attempt, 1);
    c.hubs[0].abort();
    // The broker reconnects to node-1 with a newer session.
    c.hubs[1]
        .connect(b.clone(), session("s1"), ())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "node-1 completes the dispatch",
        || async { c.store.get(receipt.id).await.unwrap().unwrap().state == DispatchState::Done },
    )
    .await;
    let done = c.store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(done.attempt, 2, "re-claim bumps the attempt");
    assert_eq!(done.claimed_by, Some(node("node-1")));
    assert_eq!(c.ledger.lock().duplicates(), 0);
    // The dead holder's late finish is fenced.
    let err = c
        .store
        .finish(
            Claimed::new(held),
            FinishParams::new(Outcome::Complete(json!("late"))),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                presented: 1,
                current: 2
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        c.store.get(receipt.id).await.unwrap().unwrap().result,
        done.result
    );
}

#[tokio::test(start_paused = true)]
async fn a_given_up_dispatch_is_cancelled_and_never_runs() {
    let config = HubConfig {
        wait_window: Duration::from_millis(300),
        ..fast_config()
    };
    let c = cluster(2, config, |_| {}).await;
    let b = broker("absent");
    // Nobody holds the broker: the default policy parks the dispatch, then gives up.
    let err = c.hubs[1]
        .dispatch(Command::new(b.clone(), "start", json!(1)))
        .await
        .unwrap_err();
    // The waiter gives up (and cancels) or the sweeper expires the row at its deadline, which
    // is the same instant: either way the row is failed and will never run.
    let id = match err {
        Error::TimedOut { id, last_state } => {
            assert_eq!(last_state, DispatchState::Failed);
            id
        }
        Error::Failed {
            id,
            reason: FailReason::Expired,
        } => id,
        other => panic!("{other:?}"),
    };
    let row = c.store.get(id).await.unwrap().unwrap();
    assert!(
        matches!(
            row.failure,
            Some(FailReason::Cancelled | FailReason::Expired)
        ),
        "{row:?}"
    );
    // The broker connects later: the zombie must not run.
    c.hubs[0]
        .connect(b.clone(), session("late"), ())
        .await
        .unwrap();
    let probe = c.hubs[1]
        .send(Command::new(b.clone(), "probe", json!(2)))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "later work for the broker runs",
        || async { c.store.get(probe.id).await.unwrap().unwrap().state == DispatchState::Done },
    )
    .await;
    assert!(
        !c.ledger.lock().per_id.contains_key(&id),
        "a cancelled dispatch was executed"
    );
}

#[tokio::test(start_paused = true)]
async fn parked_dispatch_runs_when_the_broker_connects() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("later");
    let hub = c.hubs[1].clone();
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { hub.dispatch(Command::new(b, "start", json!(1))).await }
    });
    eventually(Duration::from_secs(5), "the parked row exists", || async {
        !c.store.is_empty()
    })
    .await;
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let out = waiting.await.unwrap().unwrap();
    assert_eq!(out["node"], "node-0");
}

#[tokio::test(start_paused = true)]
async fn fail_fast_writes_nothing() {
    let config = HubConfig {
        undeliverable: UndeliverablePolicy::FailFast,
        ..fast_config()
    };
    let c = cluster(1, config, |_| {}).await;
    let err = c.hubs[0]
        .dispatch(Command::new(broker("nobody"), "x", json!(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Failed {
                reason: FailReason::Undeliverable,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(c.store.is_empty());
}

#[derive(Debug)]
struct Http {
    calls: AtomicU32,
}

#[async_trait]
impl HttpFallback for Http {
    async fn has_endpoint(&self, broker: &BrokerId) -> bool {
        broker.as_str().starts_with("http-")
    }
    async fn call(&self, d: &Dispatch) -> Result<serde_json::Value, ExecError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(json!({"via": "http", "op": d.op}))
    }
}

#[tokio::test(start_paused = true)]
async fn http_route_with_and_without_a_fallback() {
    let clock = PausedClock::new();
    let store = Arc::new(MemoryStore::new());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let http = Arc::new(Http {
        calls: AtomicU32::new(0),
    });
    let with = Hub::builder(node("with"))
        .clock(clock.clone())
        .store(store.clone())
        .executor(Arc::new(Recorder::new(&node("with"), &ledger)))
        .http_fallback(http.clone())
        .config(HubConfig {
            undeliverable: UndeliverablePolicy::FailFast,
            ..fast_config()
        })
        .start()
        .await
        .unwrap();
    let out = with
        .dispatch(Command::new(broker("http-1"), "ping", json!(1)))
        .await
        .unwrap();
    assert_eq!(out, json!({"via": "http", "op": "ping"}));
    assert_eq!(http.calls.load(Ordering::SeqCst), 1);
    assert!(store.is_empty(), "the HTTP route writes no row");
    // Without an endpoint the broker is undeliverable.
    let err = with
        .dispatch(Command::new(broker("plain"), "ping", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Failed {
            reason: FailReason::Undeliverable,
            ..
        }
    ));
    // Without a fallback, an HTTP broker is treated as undeliverable too.
    let without = Hub::builder(node("without"))
        .clock(clock.clone())
        .store(store.clone())
        .executor(Arc::new(Recorder::new(&node("without"), &ledger)))
        .config(HubConfig {
            undeliverable: UndeliverablePolicy::FailFast,
            ..fast_config()
        })
        .start()
        .await
        .unwrap();
    let err = without
        .dispatch(Command::new(broker("http-1"), "ping", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Failed {
            reason: FailReason::Undeliverable,
            ..
        }
    ));
    assert_eq!(http.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn send_returns_only_after_the_row_is_durable() {
    let c = cluster(2, fast_config(), |r| r.delay = Duration::from_millis(200)).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let receipt = c.hubs[1]
        .send(Command::new(b.clone(), "message", json!("hi")))
        .await
        .unwrap();
    // The row exists the moment send returns, whatever the owner is doing.
    let row = c
        .store
        .get(receipt.id)
        .await
        .unwrap()
        .expect("durable before the receipt");
    assert_eq!(row.op, "message");
    let out = c.hubs[1].wait(receipt.id).await.unwrap();
    assert_eq!(out["args"], json!("hi"));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_executor_fails_only_its_dispatch() {
    let c = cluster(2, fast_config(), |r| {
        r.behaviour = Some(Arc::new(|_ctx, d| {
            if d.op == "panic" {
                panic!("executor blew up");
            }
            Ok(json!("fine"))
        }))
    })
    .await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    for hub in [&c.hubs[0], &c.hubs[1]] {
        let err = hub
            .dispatch(Command::new(b.clone(), "panic", json!(1)))
            .await
            .unwrap_err();
        let Error::Failed {
            reason: FailReason::Error(msg),
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert!(msg.contains("executor panicked: executor blew up"), "{msg}");
        // The hub still works.
        assert_eq!(
            hub.dispatch(Command::new(b.clone(), "ok", json!(1)))
                .await
                .unwrap(),
            json!("fine")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_retry_up_to_max_attempts() {
    let c = cluster(2, fast_config(), |r| {
        r.behaviour = Some(Arc::new(|ctx, _d| {
            if ctx.attempt() < 3 {
                Err(ExecError::retry_after(Duration::from_millis(10), "not yet"))
            } else {
                Ok(json!(ctx.attempt()))
            }
        }))
    })
    .await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let out = c.hubs[1]
        .dispatch(Command::new(b.clone(), "x", json!(1)).max_attempts(3))
        .await
        .unwrap();
    assert_eq!(out, json!(3));
    let err = c.hubs[1]
        .dispatch(Command::new(b.clone(), "x", json!(1)).max_attempts(2))
        .await
        .unwrap_err();
    let Error::Failed {
        reason: FailReason::Error(msg),
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(msg.contains("no attempts left"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn progress_extends_the_originators_wait() {
    let clock = PausedClock::new();
    let config = HubConfig {
        wait_window: Duration::from_millis(400),
        ..fast_config()
    };
    let store = Arc::new(MemoryStore::new());
    let transport = MemoryTransport::new();
    let slow = broker_dispatch::hub::FnExecutor(
        |ctx: broker_dispatch::hub::ExecContext, _d: Dispatch| async move {
            // Runs 5 windows long, reporting progress every half window.
            for i in 0..10 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                ctx.report_progress(json!({ "step": i }));
            }
            Ok(json!("finished"))
        },
    );
    let owner = Hub::builder(node("owner"))
        .clock(clock.clone())
        .store(store.clone())
        .transport(Arc::new(transport.clone()))
        .executor(Arc::new(slow))
        .config(config.clone())
        .start()
        .await
        .unwrap();
    let origin = Hub::builder(node("origin"))
        .clock(clock.clone())
        .store(store.clone())
        .transport(Arc::new(transport.clone()))
        .executor(Arc::new(broker_dispatch::hub::FnExecutor(|_c, _d| async {
            Ok(json!(null))
        })))
        .config(config)
        .start()
        .await
        .unwrap();
    let b = broker("b");
    owner.connect(b.clone(), session("s"), ()).await.unwrap();
    let out = origin
        .dispatch(Command::new(b, "long", json!(1)))
        .await
        .unwrap();
    assert_eq!(out, json!("finished"));
}

#[tokio::test(start_paused = true)]
async fn lost_notices_cost_latency_not_work() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    c.transport.close(); // every notice from now on is lost
    let out = c.hubs[1]
        .dispatch(Command::new(b, "x", json!(1)))
        .await
        .unwrap();
    assert_eq!(out["node"], "node-0");
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_hands_back_and_releases() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    c.hubs[0].shutdown().await.unwrap();
    assert!(matches!(
        c.hubs[0]
            .dispatch(Command::new(b.clone(), "x", json!(1)))
            .await,
        Err(Error::ShuttingDown)
    ));
    let a = c.store.affinity(&b).await.unwrap().unwrap();
    assert_eq!(
        a.node, None,
        "shutdown releases the affinity of its brokers"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_a_typed_error_and_writes_nothing() {
    let clock = PausedClock::new();
    let c = cluster(1, fast_config(), |_| {}).await;
    let hub = &c.hubs[0];
    assert!(BrokerId::new("").is_err());
    assert!(BrokerId::new("x".repeat(257)).is_err());
    assert!(BrokerId::new("a\nb").is_err());
    for cmd in [
        Command::new(broker("b"), "", json!(1)),
        Command::new(broker("b"), "x".repeat(300), json!(1)),
        Command::new(broker("b"), "x", json!(1)).max_attempts(0),
        Command::new(broker("b"), "x", json!(1)).idempotency_key(""),
    ] {
        assert!(
            matches!(hub.dispatch(cmd.clone()).await, Err(Error::InvalidInput(_))),
            "{cmd:?}"
        );
        assert!(matches!(hub.send(cmd).await, Err(Error::InvalidInput(_))));
    }
    assert!(c.store.is_empty());
    for bad in [
        HubConfig {
            lease: Duration::ZERO,
            ..HubConfig::default()
        },
        HubConfig {
            wait_window: Duration::ZERO,
            ..HubConfig::default()
        },
        HubConfig {
            claim_batch: 0,
            ..HubConfig::default()
        },
        HubConfig {
            max_attempts: 0,
            ..HubConfig::default()
        },
    ] {
        let err = Hub::builder(node("n"))
            .clock(clock.clone())
            .store(c.store.clone())
            .executor(Arc::new(Recorder::new(&node("n"), &c.ledger)))
            .config(bad)
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)));
    }
    let unknown = broker_dispatch::fsm::DispatchId::new();
    assert!(matches!(
        hub.wait(unknown).await,
        Err(Error::Store(StoreError::NotFound(_)))
    ));
    // A double finish and a stale finish are typed errors that change nothing.
    let d = c
        .store
        .insert(broker_dispatch::store::NewDispatch::new(
            broker("z"),
            "op",
            json!(1),
        ))
        .await
        .unwrap();
    let mut claimed = c
        .store
        .claim(ClaimParams {
            broker: broker("z"),
            node: node("n"),
            limit: 1,
            lease: Duration::from_secs(5),
            now: None,
        })
        .await
        .unwrap();
    let first = claimed.pop().unwrap();
    let copy = Claimed::new(first.dispatch().clone());
    c.store
        .finish(first, FinishParams::new(Outcome::Complete(json!(1))))
        .await
        .unwrap();
    let before = c.store.get(d.id).await.unwrap();
    let err = c
        .store
        .finish(copy, FinishParams::new(Outcome::Complete(json!(2))))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Illegal { .. }), "{err:?}");
    assert_eq!(c.store.get(d.id).await.unwrap(), before);
}

#[tokio::test(start_paused = true)]
async fn oversized_args_are_refused_before_anything_is_written() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let huge = json!("x".repeat(broker_dispatch::store::MAX_ARGS_BYTES + 1));
    let err = c.hubs[0]
        .send(Command::new(broker("b"), "x", huge))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(c.store.is_empty());
    // Nested deeper than any store could read back: refused whatever the route (here the
    // fast path, which writes no row), and the broker's well-formed work is untouched.
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let mut deep = json!(0);
    for _ in 0..200 {
        deep = json!([deep]);
    }
    for hub in &c.hubs {
        let err = hub
            .dispatch(Command::new(b.clone(), "x", deep.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
        let err = hub
            .send(Command::new(b.clone(), "x", deep.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
    assert!(c.store.is_empty());
    assert!(c.ledger.lock().per_id.is_empty(), "nothing ran");
    let fine = c.hubs[1]
        .send(Command::new(b.clone(), "x", json!(1)))
        .await
        .unwrap();
    let out = c.hubs[1].wait(fine.id).await.unwrap();
    assert_eq!(out["args"], json!(1), "{out}");
}

#[tokio::test(start_paused = true)]
async fn a_repeated_idempotency_key_waits_for_the_first_dispatch() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    c.hubs[0]
        .connect(b.clone(), session("s"), ())
        .await
        .unwrap();
    let cmd =
        Command::new(b.clone(), "start", json!({"agent": 1})).idempotency_key("start-agent-1");
    let first = c.hubs[1].dispatch(cmd.clone()).await.unwrap();
    let again = c.hubs[1].dispatch(cmd.clone()).await.unwrap();
    assert_eq!(
        first, again,
        "the second call reports the first dispatch's result"
    );
    assert_eq!(all_rows(&c.store).await.len(), 1);
    assert_eq!(c.ledger.lock().per_id.len(), 1, "executed once");
    // Same key, different payload: a conflict, nothing written.
    let other = Command::new(b, "stop", json!({"agent": 1})).idempotency_key("start-agent-1");
    let err = c.hubs[1].dispatch(other).await.unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Conflict(_))),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_stops_the_hub() {
    let c = cluster(2, fast_config(), |_| {}).await;
    let b = broker("b");
    let mut hubs = c.hubs;
    let owner = hubs.remove(0);
    owner.connect(b.clone(), session("s"), ()).await.unwrap();
    drop(owner);
    // The dropped hub no longer drains: a send for its broker stays pending.
    let receipt = hubs[0].send(Command::new(b, "x", json!(1))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // several poll intervals
    let row = c.store.get(receipt.id).await.unwrap().unwrap();
    assert_eq!(row.state, DispatchState::Pending);
}

/// A memory store that, whenever a claim hands out rows, makes the runtime busy for `stall`
/// (a task that holds its thread), as a loaded runtime would be right after a claim.
#[derive(Debug)]
struct StallAfterClaim {
    inner: MemoryStore,
    stall: Duration,
}

#[async_trait]
impl Store for StallAfterClaim {
    fn name(&self) -> &'static str {
        "stall-after-claim"
    }
    async fn insert(
        &self,
        new: broker_dispatch::store::NewDispatch,
    ) -> Result<Dispatch, StoreError> {
        self.inner.insert(new).await
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        let claimed = self.inner.claim(p).await?;
        if !claimed.is_empty() {
            let stall = self.stall;
            // Queued before the executions the drain spawns for these rows.
            tokio::spawn(async move { std::thread::sleep(stall) });
        }
        Ok(claimed)
    }
    async fn heartbeat(
        &self,
        c: &Claimed,
        p: broker_dispatch::store::HeartbeatParams,
    ) -> Result<Dispatch, StoreError> {
        self.inner.heartbeat(c, p).await
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.inner.finish(c, p).await
    }
    async fn cancel(
        &self,
        p: broker_dispatch::store::CancelParams,
    ) -> Result<Dispatch, StoreError> {
        self.inner.cancel(p).await
    }

    async fn request_cancel(
        &self,
        p: broker_dispatch::store::CancelParams,
    ) -> Result<Dispatch, StoreError> {
        self.inner.request_cancel(p).await
    }
    async fn get(
        &self,
        id: broker_dispatch::fsm::DispatchId,
    ) -> Result<Option<Dispatch>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        f: broker_dispatch::store::ListFilter,
    ) -> Result<Vec<Dispatch>, StoreError> {
        self.inner.list(f).await
    }
    async fn sweep(
        &self,
        p: broker_dispatch::store::SweepParams,
    ) -> Result<broker_dispatch::store::SweepReport, StoreError> {
        self.inner.sweep(p).await
    }
    async fn connect(
        &self,
        p: broker_dispatch::store::ConnectParams,
    ) -> Result<broker_dispatch::store::ConnectOutcome, StoreError> {
        self.inner.connect(p).await
    }
    async fn disconnect(
        &self,
        p: broker_dispatch::store::DisconnectParams,
    ) -> Result<bool, StoreError> {
        self.inner.disconnect(p).await
    }
    async fn touch(&self, p: broker_dispatch::store::TouchParams) -> Result<bool, StoreError> {
        self.inner.touch(p).await
    }
    async fn affinity(
        &self,
        broker: &BrokerId,
    ) -> Result<Option<broker_dispatch::fsm::Affinity>, StoreError> {
        self.inner.affinity(broker).await
    }
}

/// "No execution starts at or after its deadline" holds even when the runtime polls the
/// execution's task late: the deadline (and the session) are checked in that task, in the same
/// poll that calls the executor. Here the runtime is held for 300 ms right after the claim of a
/// row with 150 ms left; the row must end `Failed(Expired)` without its executor running. (When
/// the check was made where the row was claimed, the executor started ~150 ms past the
/// deadline, and the multi-process test saw 1-55 ms late starts on a loaded machine.)
#[tokio::test(flavor = "current_thread")]
async fn an_execution_never_starts_after_its_deadline_even_on_a_busy_runtime() {
    use broker_dispatch::fsm::Timestamp;
    use broker_dispatch::hub::FnExecutor;
    let store = Arc::new(StallAfterClaim {
        inner: MemoryStore::new(),
        stall: Duration::from_millis(300),
    });
    // (when the executor started, the deadline it was handed)
    type Starts = Vec<(Timestamp, Option<Timestamp>)>;
    let starts: Arc<Mutex<Starts>> = Arc::default();
    let seen = Arc::clone(&starts);
    let exec = FnExecutor(move |_ctx, d: Dispatch| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().push((
                Timestamp::from_system_time(std::time::SystemTime::now()),
                d.deadline,
            ));
            Ok(json!(null))
        }
    });
    let hub = Hub::builder(node("n"))
        .store(store.clone())
        .executor(Arc::new(exec))
        .config(fast_config())
        .start()
        .await
        .unwrap();
    let b = broker("b");
    let r = hub
        .send(Command::new(b.clone(), "op", json!(null)).timeout(Duration::from_millis(150)))
        .await
        .unwrap();
    hub.connect(b, session("s"), ()).await.unwrap();
    eventually(Duration::from_secs(5), "the row terminal", || async {
        store
            .get(r.id)
            .await
            .unwrap()
            .is_some_and(|d| d.state.is_terminal())
    })
    .await;
    for (at, deadline) in starts.lock().iter() {
        let deadline = deadline.expect("the row has a deadline");
        assert!(
            *at < deadline,
            "the executor started {:?} after the deadline it was handed",
            at.duration_since(deadline)
        );
    }
}

/// The crate docs' metrics table names exactly the metrics the source records: a metric added
/// without a row (or a row left after its metric was removed) fails here.
#[test]
fn the_metrics_table_lists_every_metric_recorded() {
    fn names_in(text: &str, after: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices(after) {
            let rest = &text[i + after.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(format!("broker_dispatch_{name}"));
            }
        }
        out
    }
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    let mut recorded = std::collections::BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // A macro call, possibly with its name on the next line.
        let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for kind in ["counter", "gauge", "histogram"] {
            for prefix in [
                format!("{kind}!(\"broker_dispatch_"),
                format!("{kind}!( \"broker_dispatch_"),
            ] {
                recorded.extend(names_in(&compact, &prefix));
            }
        }
    }
    let docs = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let documented = names_in(&docs, "//! | `broker_dispatch_");
    assert!(recorded.len() > 10, "found too few metrics: {recorded:?}");
    assert_eq!(
        documented, recorded,
        "the metrics table in src/lib.rs is out of date"
    );
}

/// Through a backlog, a drain refills its slots in whole batches: about one claim per
/// `claim_batch` rows, not a claim for each slot as it frees while outcomes are being written
/// (a round trip and a commit for a row or two: 124 claims here before).
#[tokio::test(start_paused = true)]
async fn a_backlog_is_claimed_and_finished_in_whole_batches() {
    use broker_dispatch::store::NewDispatch;
    use broker_dispatch::testkit::{Fault, FaultStore, StoreOp};

    let store = Arc::new(FaultStore::new(MemoryStore::new()));
    let clock = PausedClock::new();
    let b = broker("b1");
    for i in 0..1_000 {
        let mut new = NewDispatch::new(b.clone(), "op", json!(i));
        new.now = Some(clock.now());
        store.insert(new).await.unwrap();
    }
    // Executions of a batch end at different moments, over 10 ms.
    let executor = broker_dispatch::hub::FnExecutor(|_ctx, d: Dispatch| async move {
        let n = d.args.as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(n % 10)).await;
        Ok(json!(n))
    });
    let hub = Hub::builder(node("n"))
        .clock(clock)
        .store(store.clone())
        .executor(Arc::new(executor))
        .config(HubConfig {
            claim_batch: 100,
            max_in_flight: 100,
            ..fast_config()
        })
        .start()
        .await
        .unwrap();
    // Each group commit takes a moment, as a real one does: slots free while it runs.
    store.inject_n(
        StoreOp::Finish,
        Fault::Delay(Duration::from_millis(2)),
        10_000,
    );
    hub.connect(b, session("s1"), ()).await.unwrap();
    let rows = || async {
        broker_dispatch::store::list_all(
            store.as_ref(),
            broker_dispatch::store::ListFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap()
    };
    eventually(Duration::from_secs(30), "every row done", || async {
        rows().await.iter().all(|d| d.state == DispatchState::Done)
    })
    .await;
    let (claims, finishes) = (store.calls(StoreOp::Claim), store.calls(StoreOp::Finish));
    // Ten full batches, plus the claim that finds the backlog empty and a catch-up poll or two.
    assert!(
        claims <= 15,
        "{claims} claims for 1,000 rows in batches of 100"
    );
    // Outcomes that trickle in over 10 ms while a commit takes 2 ms: a handful of group
    // commits per batch, never one per row.
    assert!(finishes <= 100, "{finishes} finish calls for 1,000 rows");
    hub.shutdown().await.unwrap();
}
