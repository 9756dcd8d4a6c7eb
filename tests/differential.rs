//! Differential test: random operation sequences applied to every store must give the same
//! answers, call by call, and leave the same rows.
//!
//! [`MemoryStore`] is the reference. Another backend joins by adding one instance to
//! [`fresh_stores`]; nothing else changes. Postgres (`postgres` feature) shares one emptied
//! schema across cases instead, see [`pg_shared`]. Time is a controlled clock advanced by the sequence
//! itself, so leases, deadlines, retries and retention all come into play without sleeping.

#![cfg(feature = "sqlite")]

use std::time::Duration;

use broker_dispatch::fsm::{
    Affinity, Attempt, BrokerId, Dispatch, DispatchId, DispatchState, EventKind, NodeId, Progress,
    SessionId, Timestamp,
};
use broker_dispatch::store::{
    CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Outcome, SqliteStore,
    Store, SweepParams, SweepReport, MAX_BATCH,
};
use broker_dispatch::StoreError;
use proptest::prelude::*;
use uuid::Uuid;

const SEC: i64 = 1_000_000;
const T0: i64 = 1_700_000_000 * SEC;
const IDS: u8 = 6;
const BROKERS: u8 = 3;
const KEYS: u8 = 3;
const NODES: u8 = 3;
const SESSIONS: u8 = 4;

/// One step of a sequence. Indices are taken modulo small pools so that ids, keys and brokers
/// collide often (idempotency, conflicts, batch claims, affinity races).
#[derive(Debug, Clone)]
enum Op {
    Insert {
        id: u8,
        broker: u8,
        key: Option<u8>,
        /// The ordering key (from a pool of two, so keyed rows of one broker collide often).
        order: Option<u8>,
        op: u8,
        args: u8,
        max_attempts: u8,
        available_in: Option<u8>,
        deadline_in: Option<u8>,
    },
    Claim {
        broker: u8,
        node: u8,
        limit: u32,
        lease: u8,
    },
    Heartbeat {
        handle: usize,
        lease: u8,
        progress: Option<u8>,
    },
    Finish {
        handle: usize,
        outcome: FinishOp,
    },
    Cancel {
        id: u8,
    },
    RequestCancel {
        id: u8,
    },
    Get {
        id: u8,
    },
    List {
        broker: Option<u8>,
        state: Option<u8>,
        after: Option<u8>,
        limit: u32,
    },
    Sweep {
        retention: u8,
        limit: u32,
    },
    Connect {
        broker: u8,
        node: u8,
        session: u8,
        connected_at: u8,
    },
    Disconnect {
        broker: u8,
        node: u8,
        session: u8,
    },
    Touch {
        broker: u8,
        node: u8,
        session: u8,
    },
    /// Moves the clock forward by this many seconds (a large step skips past leases).
    Advance {
        secs: u8,
    },
}

#[derive(Debug, Clone)]
enum FinishOp {
    Complete(u8),
    Fail(u8),
    Retry(u8),
    Release,
    Late,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let finish = prop_oneof![
        any::<u8>().prop_map(FinishOp::Complete),
        any::<u8>().prop_map(FinishOp::Fail),
        (0u8..10).prop_map(FinishOp::Retry),
        Just(FinishOp::Release),
        Just(FinishOp::Late),
    ];
    prop_oneof![
        6 => (
            0..IDS,
            0..BROKERS,
            proptest::option::weighted(0.3, 0..KEYS),
            proptest::option::weighted(0.5, 0u8..2),
            0u8..2,
            0u8..2,
            0u8..4,
            proptest::option::weighted(0.2, 0u8..10),
            proptest::option::weighted(0.3, 0u8..30),
        )
            .prop_map(
                |(id, broker, key, order, op, args, max_attempts, available_in, deadline_in)| Op::Insert {
                    id,
                    broker,
                    key,
                    order,
                    op,
                    args,
                    max_attempts,
                    available_in,
                    deadline_in,
                }
            ),
        6 => (0..BROKERS, 0..NODES, 0u32..4, 0u8..20).prop_map(|(broker, node, limit, lease)| {
            Op::Claim { broker, node, limit, lease }
        }),
        3 => (any::<usize>(), 0u8..20, proptest::option::of(any::<u8>()))
            .prop_map(|(handle, lease, progress)| Op::Heartbeat { handle, lease, progress }),
        5 => (any::<usize>(), finish).prop_map(|(handle, outcome)| Op::Finish { handle, outcome }),
        2 => (0..IDS).prop_map(|id| Op::Cancel { id }),
        2 => (0..IDS).prop_map(|id| Op::RequestCancel { id }),
        1 => (0..IDS).prop_map(|id| Op::Get { id }),
        1 => (
            proptest::option::of(0..BROKERS),
            proptest::option::of(0u8..4),
            proptest::option::of(0..IDS),
            0u32..5,
        )
            .prop_map(|(broker, state, after, limit)| Op::List { broker, state, after, limit }),
        2 => (0u8..60, 0u32..4).prop_map(|(retention, limit)| Op::Sweep { retention, limit }),
        2 => (0..BROKERS, 0..NODES, 0..SESSIONS, 0u8..5).prop_map(
            |(broker, node, session, connected_at)| Op::Connect { broker, node, session, connected_at }
        ),
        1 => (0..BROKERS, 0..NODES, 0..SESSIONS)
            .prop_map(|(broker, node, session)| Op::Disconnect { broker, node, session }),
        1 => (0..BROKERS, 0..NODES, 0..SESSIONS)
            .prop_map(|(broker, node, session)| Op::Touch { broker, node, session }),
        4 => (0u8..25).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// A comparable projection of [`StoreError`]: variant and the fields callers act on.
#[derive(Debug, Clone, PartialEq)]
enum ErrView {
    NotFound(DispatchId),
    Fenced {
        presented: Attempt,
        current: Attempt,
    },
    Illegal {
        from: DispatchState,
        event: EventKind,
    },
    Conflict,
    InvalidInput,
    /// Anything else is a failure of the backend itself and must never happen here.
    Unexpected(String),
}

impl From<StoreError> for ErrView {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ErrView::NotFound(id),
            StoreError::Fenced { presented, current } => ErrView::Fenced { presented, current },
            StoreError::Illegal { from, event } => ErrView::Illegal { from, event },
            StoreError::Conflict(_) => ErrView::Conflict,
            StoreError::InvalidInput(_) => ErrView::InvalidInput,
            other => ErrView::Unexpected(format!("{other:?}")),
        }
    }
}

/// What one store answered to one op.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Row(Result<Dispatch, ErrView>),
    Rows(Result<Vec<Dispatch>, ErrView>),
    MaybeRow(Result<Option<Dispatch>, ErrView>),
    Sweep(Result<SweepReport, ErrView>),
    Connect(Result<ConnectOutcome, ErrView>),
    Flag(Result<bool, ErrView>),
    Skipped,
}

fn view<T>(r: Result<T, StoreError>) -> Result<T, ErrView> {
    r.map_err(ErrView::from)
}

fn dispatch_id(n: u8) -> DispatchId {
    DispatchId::from_uuid(Uuid::from_u128(u128::from(n) + 1))
}

fn broker(n: u8) -> BrokerId {
    BrokerId::new(format!("broker-{n}")).expect("valid")
}

fn node(n: u8) -> NodeId {
    NodeId::new(format!("node-{n}")).expect("valid")
}

fn session(n: u8) -> SessionId {
    SessionId::new(format!("session-{n}")).expect("valid")
}

fn secs(n: u8) -> Duration {
    Duration::from_secs(u64::from(n))
}

/// The state a sequence carries between ops: the clock and every handle ever claimed (so later
/// ops can present stale ones).
struct Run {
    now: Timestamp,
    handles: Vec<Dispatch>,
}

/// One op, seen by a caller whose clock lags the controlled clock by `skew` seconds (nodes'
/// clocks disagree, so stores must not assume `now` only moves forward).
#[derive(Debug, Clone)]
struct Step {
    op: Op,
    skew: u8,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let skew = prop_oneof![4 => Just(0u8), 1 => 1u8..5];
    (op_strategy(), skew).prop_map(|(op, skew)| Step { op, skew })
}

async fn apply_op(store: &dyn Store, step: &Step, run: &Run) -> Answer {
    let now = Some(run.now.saturating_sub(secs(step.skew)));
    let op = &step.op;
    let handle = |i: usize| {
        (!run.handles.is_empty()).then(|| Claimed::new(run.handles[i % run.handles.len()].clone()))
    };
    match op.clone() {
        Op::Insert {
            id,
            broker: b,
            key,
            order,
            op,
            args,
            max_attempts,
            available_in,
            deadline_in,
        } => Answer::Row(view(
            store
                .insert(NewDispatch {
                    id: dispatch_id(id),
                    broker: broker(b),
                    op: ["start", "stop"][usize::from(op)].to_owned(),
                    args: serde_json::json!({ "v": args }),
                    max_attempts: u32::from(max_attempts),
                    available_at: available_in.map(|s| run.now.saturating_add(secs(s))),
                    deadline: deadline_in.map(|s| run.now.saturating_add(secs(s))),
                    idempotency_key: key.map(|k| format!("key-{k}")),
                    now,
                    key: order.map(|k| format!("order-{k}")),
                    delay: None,
                    ttl: None,
                    executions: 0,
                })
                .await,
        )),
        Op::Claim {
            broker: b,
            node: n,
            limit,
            lease,
        } => Answer::Rows(view(
            store
                .claim(ClaimParams {
                    broker: broker(b),
                    node: node(n),
                    limit,
                    lease: secs(lease),
                    now,
                })
                .await
                .map(|cs| cs.into_iter().map(Claimed::into_dispatch).collect()),
        )),
        Op::Heartbeat {
            handle: i,
            lease,
            progress,
        } => match handle(i) {
            None => Answer::Skipped,
            Some(c) => Answer::Row(view(
                store
                    .heartbeat(
                        &c,
                        HeartbeatParams {
                            lease: secs(lease),
                            progress: progress.map(|p| Progress {
                                seq: u64::from(p),
                                detail: serde_json::json!(["step", p]),
                            }),
                            now,
                        },
                    )
                    .await,
            )),
        },
        Op::Finish { handle: i, outcome } => match handle(i) {
            None => Answer::Skipped,
            Some(c) => {
                let outcome = match outcome {
                    FinishOp::Complete(v) => Outcome::Complete(serde_json::json!({ "r": v })),
                    FinishOp::Fail(v) => Outcome::Fail(format!("error {v}")),
                    FinishOp::Retry(s) => Outcome::Retry { after: secs(s) },
                    FinishOp::Release => Outcome::Release,
                    FinishOp::Late => Outcome::Late,
                };
                Answer::Row(view(store.finish(c, FinishParams { outcome, now }).await))
            }
        },
        Op::Cancel { id } => Answer::Row(view(
            store
                .cancel(CancelParams {
                    id: dispatch_id(id),
                    now,
                })
                .await,
        )),
        Op::RequestCancel { id } => Answer::Row(view(
            store
                .request_cancel(CancelParams {
                    id: dispatch_id(id),
                    now,
                })
                .await,
        )),
        Op::Get { id } => Answer::MaybeRow(view(store.get(dispatch_id(id)).await)),
        Op::List {
            broker: b,
            state,
            after,
            limit,
        } => Answer::Rows(view(
            store
                .list(ListFilter {
                    broker: b.map(broker),
                    state: state.map(|s| DispatchState::ALL[usize::from(s)]),
                    after: after.map(dispatch_id),
                    limit,
                })
                .await,
        )),
        Op::Sweep { retention, limit } => Answer::Sweep(view(
            store
                .sweep(SweepParams {
                    retention: secs(retention),
                    limit,
                    now,
                })
                .await,
        )),
        Op::Connect {
            broker: b,
            node: n,
            session: s,
            connected_at,
        } => Answer::Connect(view(
            store
                .connect(ConnectParams {
                    broker: broker(b),
                    node: node(n),
                    session: session(s),
                    connected_at: Some(Timestamp::from_micros(T0 + i64::from(connected_at) * SEC)),
                    now,
                })
                .await,
        )),
        Op::Disconnect {
            broker: b,
            node: n,
            session: s,
        } => Answer::Flag(view(
            store
                .disconnect(DisconnectParams {
                    broker: broker(b),
                    node: node(n),
                    session: session(s),
                    now,
                })
                .await,
        )),
        Op::Touch {
            broker: b,
            node: n,
            session: s,
        } => Answer::Flag(view(
            store
                .touch(DisconnectParams {
                    broker: broker(b),
                    node: node(n),
                    session: session(s),
                    now,
                })
                .await,
        )),
        Op::Advance { .. } => Answer::Skipped,
    }
}

/// Everything a store holds at the end: all rows (paged) and every broker's affinity.
async fn snapshot(store: &dyn Store) -> (Vec<Dispatch>, Vec<Option<Affinity>>) {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(ListFilter {
                after,
                limit: MAX_BATCH,
                ..ListFilter::default()
            })
            .await
            .expect("list");
        match page.last() {
            None => break,
            Some(last) => after = Some(last.id),
        }
        rows.extend(page);
    }
    let mut affinity = Vec::new();
    for b in 0..BROKERS {
        affinity.push(store.affinity(&broker(b)).await.expect("affinity"));
    }
    (rows, affinity)
}

/// Applies `ops` to every store in lockstep; the first store is the reference.
async fn check(stores: &[&dyn Store], steps: &[Step]) -> Result<(), TestCaseError> {
    let mut run = Run {
        now: Timestamp::from_micros(T0),
        handles: Vec::new(),
    };
    for (i, step) in steps.iter().enumerate() {
        let op = &step.op;
        if let Op::Advance { secs: s } = op {
            run.now = run.now.saturating_add(secs(*s));
            continue;
        }
        let expected = apply_op(stores[0], step, &run).await;
        prop_assert!(
            !matches!(
                &expected,
                Answer::Row(Err(ErrView::Unexpected(_)))
                    | Answer::Rows(Err(ErrView::Unexpected(_)))
            ),
            "step {}: reference failed: {:?}",
            i,
            expected
        );
        for other in &stores[1..] {
            let actual = apply_op(*other, step, &run).await;
            prop_assert_eq!(
                &actual,
                &expected,
                "step {}: {:?}: {} disagrees with {}",
                i,
                step,
                other.name(),
                stores[0].name()
            );
        }
        if let Answer::Rows(Ok(rows)) = &expected {
            if matches!(op, Op::Claim { .. }) {
                run.handles.extend(rows.iter().cloned());
            }
        }
    }
    let expected = snapshot(stores[0]).await;
    for other in &stores[1..] {
        prop_assert_eq!(
            &snapshot(*other).await,
            &expected,
            "final state of {}",
            other.name()
        );
    }
    Ok(())
}

/// Postgres joins the differential test through one long-lived store on a runtime of its own
/// (pool connections are bound to the runtime that made them), emptied before each case:
/// a schema per case would cost more than the case itself.
#[cfg(feature = "postgres")]
#[path = "support/pg.rs"]
mod pg;

#[cfg(feature = "postgres")]
struct PgShared {
    rt: tokio::runtime::Runtime,
    store: broker_dispatch::store::PgStore,
    admin: tokio_postgres::Client,
    schema: String,
}

#[cfg(feature = "postgres")]
fn pg_shared() -> Option<&'static PgShared> {
    static PG: std::sync::OnceLock<Option<PgShared>> = std::sync::OnceLock::new();
    PG.get_or_init(|| {
        let db = pg::fresh()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (store, admin) = rt.block_on(async {
            let options = broker_dispatch::store::PgStoreOptions {
                schema: db.schema.clone(),
                channel_prefix: db.schema.clone(),
                ..Default::default()
            };
            let store = broker_dispatch::store::PgStore::connect(&db.dsn, options)
                .await
                .expect("connect the store");
            store.migrate().await.expect("migrate");
            (store, pg::client(&db.dsn).await)
        });
        Some(PgShared {
            rt,
            store,
            admin,
            schema: db.schema,
        })
    })
    .as_ref()
}

#[cfg(feature = "postgres")]
impl PgShared {
    async fn empty(&self) {
        let s = &self.schema;
        self.admin
            .batch_execute(&format!(
                "DELETE FROM \"{s}\".dispatch; DELETE FROM \"{s}\".affinity;"
            ))
            .await
            .expect("empty the shared schema");
    }
}

/// One fresh instance of every store under test; the first is the reference.
fn fresh_stores() -> Vec<Box<dyn Store>> {
    vec![
        Box::new(MemoryStore::new()),
        Box::new(SqliteStore::open_in_memory().expect("open in-memory sqlite")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn stores_agree_on_random_sequences(steps in proptest::collection::vec(step_strategy(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let stores = fresh_stores();
        #[allow(unused_mut)]
        let mut refs: Vec<&dyn Store> = stores.iter().map(|s| &**s).collect();
        #[cfg(feature = "postgres")]
        if let Some(pg) = pg_shared() {
            refs.push(&pg.store);
            return pg.rt.block_on(async {
                pg.empty().await;
                check(&refs, &steps).await
            });
        }
        rt.block_on(check(&refs, &steps))?;
    }
}
