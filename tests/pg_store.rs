//! `PgStore` against a real Postgres: parity with the memory store (the reference) on a scripted
//! history, claim exclusivity under concurrency, database-clock leases, the sweep's cluster
//! lock, migrations, args codecs, and how driver failures are typed.
//!
//! Each case migrates its own schema, so cases sharing a server never see each other's rows.

#![cfg(feature = "postgres")]

#[path = "support/pg.rs"]
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::fsm::{
    BrokerId, Dispatch, DispatchId, DispatchState, NodeId, Progress, SessionId, Timestamp,
};
use broker_dispatch::store::{
    ArgsCodec, CancelParams, ClaimParams, Claimed, ConnectParams, DisconnectParams, FinishParams,
    HeartbeatParams, ListFilter, MemoryStore, NewDispatch, Outcome, PgStore, PgStoreOptions, Store,
    SweepParams,
};
use broker_dispatch::StoreError;
use serde_json::json;

async fn store_on(dsn: &str, schema: &str, options: PgStoreOptions) -> PgStore {
    let store = PgStore::connect(
        dsn,
        PgStoreOptions {
            schema: schema.to_owned(),
            channel_prefix: schema.to_owned(),
            ..options
        },
    )
    .await
    .expect("connect the store");
    store.migrate().await.expect("migrate");
    store
}

async fn fresh_store() -> Option<(pg::TestDb, PgStore)> {
    let db = pg::fresh()?;
    let store = store_on(&db.dsn, &db.schema, PgStoreOptions::default()).await;
    Some((db, store))
}

fn b(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

fn n(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// `ms` milliseconds after `T0`: the scripted history counts in milliseconds, as leases and
/// retention are at least 1 ms.
fn at(ms: i64) -> Option<Timestamp> {
    Some(Timestamp::from_micros(T0 + ms * 1_000))
}

const T0: i64 = 1_700_000_000_000_000;

fn claim(broker: &str, node: &str, limit: u32, lease_ms: u64, now: i64) -> ClaimParams {
    ClaimParams {
        broker: b(broker),
        node: n(node),
        limit,
        lease: Duration::from_millis(lease_ms),
        now: at(now),
    }
}

fn finish(outcome: Outcome, now: i64) -> FinishParams {
    FinishParams {
        outcome,
        now: at(now),
    }
}

/// A holder's handle forged from a snapshot: what a stale or confused node would present.
fn forged(d: &Dispatch) -> Claimed {
    Claimed::new(d.clone())
}

/// The inserts of the scripted history, minted once so both stores get the same ids.
struct Script {
    a: NewDispatch,
    b: NewDispatch,
    c: NewDispatch,
    d: NewDispatch,
    f: NewDispatch,
    g: NewDispatch,
}

impl Script {
    fn new() -> Script {
        let mk = |broker: &str, op: &str, created: i64| {
            let mut new = NewDispatch::new(b(broker), op, json!({ "op": op, "n": [1, 2.5, null] }));
            new.now = at(created);
            new
        };
        let mut c = mk("b2", "c", 2);
        c.deadline = at(100);
        let mut d = mk("b1", "d", 3);
        d.available_at = at(50);
        d.idempotency_key = Some("key-d".to_owned());
        let mut f = mk("b3", "f", 4);
        f.max_attempts = 1;
        let mut g = mk("b3", "g", 5);
        g.deadline = at(80);
        Script {
            a: mk("b1", "a", 0),
            b: mk("b1", "b", 1),
            c,
            d,
            f,
            g,
        }
    }
}

/// Runs one history on `store` and logs every result, errors included.
async fn run_script(store: &dyn Store, s: &Script) -> Vec<String> {
    let mut log = Vec::new();
    macro_rules! rec {
        ($label:expr, $e:expr) => {{
            let r = $e;
            log.push(format!("{}: {:?}", $label, r));
            r
        }};
    }
    for new in [&s.a, &s.b, &s.c, &s.d, &s.f, &s.g] {
        rec!("insert", store.insert(new.clone()).await).unwrap();
    }
    rec!("reinsert same", store.insert(s.a.clone()).await).unwrap();
    let mut changed = s.a.clone();
    changed.args = json!({"other": true});
    rec!("reinsert changed", store.insert(changed).await).unwrap_err();
    let mut by_key = NewDispatch::new(b("b1"), "d", s.d.args.clone());
    by_key.idempotency_key = s.d.idempotency_key.clone();
    rec!("same key", store.insert(by_key.clone()).await).unwrap();
    by_key.op = "other".to_owned();
    rec!("same key changed", store.insert(by_key).await).unwrap_err();
    let mut bad = NewDispatch::new(b("b1"), "", json!(null));
    rec!("empty op", store.insert(bad.clone()).await).unwrap_err();
    bad.op = "x".to_owned();
    bad.max_attempts = 0;
    rec!("zero attempts", store.insert(bad).await).unwrap_err();

    rec!("limit 0", store.claim(claim("b1", "n1", 0, 10, 10)).await).unwrap_err();
    let mut held = rec!("claim b1", store.claim(claim("b1", "n1", 10, 25, 10)).await).unwrap();
    assert_eq!(held.len(), 2, "a and b; d is not available yet");
    let b1 = held.pop().unwrap();
    let a1 = held.pop().unwrap();
    rec!(
        "heartbeat a1",
        store
            .heartbeat(
                &a1,
                HeartbeatParams {
                    lease: Duration::from_millis(20),
                    progress: Some(Progress {
                        seq: 1,
                        detail: json!("half"),
                    }),
                    now: at(15),
                },
            )
            .await
    )
    .unwrap();
    let zero_lease = HeartbeatParams {
        lease: Duration::ZERO,
        progress: None,
        now: at(15),
    };
    rec!("zero lease", store.heartbeat(&a1, zero_lease).await).unwrap_err();
    let mut stale = a1.dispatch().clone();
    stale.attempt = 0;
    let hb = HeartbeatParams {
        lease: Duration::from_millis(5),
        progress: None,
        now: at(16),
    };
    rec!(
        "stale heartbeat",
        store.heartbeat(&forged(&stale), hb.clone()).await
    )
    .unwrap_err();
    let done = rec!(
        "complete b",
        store
            .finish(b1, finish(Outcome::Complete(json!({"ok": 1})), 16))
            .await
    )
    .unwrap();
    rec!(
        "complete b again",
        store
            .finish(forged(&done), finish(Outcome::Complete(json!(2)), 17))
            .await
    )
    .unwrap_err();
    rec!(
        "heartbeat done",
        store.heartbeat(&forged(&done), hb.clone()).await
    )
    .unwrap_err();

    let mut again = rec!("reclaim", store.claim(claim("b1", "n2", 10, 10, 60)).await).unwrap();
    assert_eq!(again.len(), 2, "a (lease ran out) and d (now available)");
    let d1 = again.pop().unwrap();
    let a2 = again.pop().unwrap();
    rec!(
        "old holder",
        store
            .finish(a1, finish(Outcome::Complete(json!(0)), 61))
            .await
    )
    .unwrap_err();
    rec!(
        "retry a2",
        store
            .finish(
                a2,
                finish(
                    Outcome::Retry {
                        after: Duration::from_millis(5)
                    },
                    61
                )
            )
            .await
    )
    .unwrap();
    rec!(
        "fail d",
        store
            .finish(d1, finish(Outcome::Fail("boom\u{0}zero".to_owned()), 62))
            .await
    )
    .unwrap();

    let cancel = |id: DispatchId, now: i64| CancelParams { id, now: at(now) };
    let c_id = s.c.id;
    rec!("cancel c", store.cancel(cancel(c_id, 62)).await).unwrap();
    rec!("cancel c again", store.cancel(cancel(c_id, 63)).await).unwrap_err();
    rec!(
        "cancel unknown",
        store
            .cancel(cancel(DispatchId::from_uuid(uuid_from(8)), 63))
            .await
    )
    .unwrap_err();
    let mut ghost = done.clone();
    ghost.id = DispatchId::from_uuid(uuid_from(7));
    rec!(
        "heartbeat unknown",
        store.heartbeat(&forged(&ghost), hb).await
    )
    .unwrap_err();

    let f1 = rec!("claim b3", store.claim(claim("b3", "n1", 1, 5, 70)).await).unwrap();
    let f1 = f1.into_iter().next().unwrap();
    let g1 = rec!(
        "claim b3 again",
        store.claim(claim("b3", "n1", 5, 6, 70)).await
    )
    .unwrap();
    assert_eq!(g1.len(), 1, "{log:#?}");
    let released = rec!(
        "release f",
        store.finish(f1, finish(Outcome::Release, 71)).await
    )
    .unwrap();
    let f2 = rec!(
        "claim f after release",
        store.claim(claim("b3", "n2", 1, 5, 72)).await
    )
    .unwrap();
    rec!(
        "retry exhausted",
        store
            .finish(
                f2.into_iter().next().unwrap(),
                finish(
                    Outcome::Retry {
                        after: Duration::ZERO
                    },
                    73
                )
            )
            .await
    )
    .unwrap_err();
    assert_eq!(released.state, DispatchState::Pending);

    let sweep = |limit: u32, now: i64, retention_ms: u64| SweepParams {
        retention: Duration::from_millis(retention_ms),
        limit,
        now: at(now),
    };
    rec!("sweep limit 0", store.sweep(sweep(0, 200, 1)).await).unwrap_err();
    rec!("sweep 1", store.sweep(sweep(1, 200, 50)).await).unwrap();
    rec!("sweep 2", store.sweep(sweep(10, 200, 50)).await).unwrap();
    rec!("sweep 3", store.sweep(sweep(10, 300, 1)).await).unwrap();

    rec!("list all", store.list(ListFilter::default()).await).unwrap();
    let first = rec!(
        "list page",
        store
            .list(ListFilter {
                limit: 1,
                ..ListFilter::default()
            })
            .await
    )
    .unwrap();
    rec!(
        "list next page",
        store
            .list(ListFilter {
                after: first.last().map(|d| d.id),
                limit: 2,
                ..ListFilter::default()
            })
            .await
    )
    .unwrap();
    rec!(
        "list b1 pending",
        store
            .list(ListFilter {
                broker: Some(b("b1")),
                state: Some(DispatchState::Pending),
                ..ListFilter::default()
            })
            .await
    )
    .unwrap();
    rec!(
        "list limit 0",
        store
            .list(ListFilter {
                limit: 0,
                ..ListFilter::default()
            })
            .await
    )
    .unwrap_err();
    for id in [s.a.id, s.b.id, s.g.id] {
        rec!("get", store.get(id).await).unwrap();
    }

    let sess = |s: &str| SessionId::new(s).unwrap();
    let connect = |node: &str, session: &str, connected_at: i64, now: i64| ConnectParams {
        broker: b("b1"),
        node: n(node),
        session: sess(session),
        connected_at: Some(Timestamp::from_micros(connected_at)),
        now: at(now),
    };
    let release = |node: &str, session: &str, now: i64| DisconnectParams {
        broker: b("b1"),
        node: n(node),
        session: sess(session),
        now: at(now),
    };
    rec!("affinity none", store.affinity(&b("b1")).await).unwrap();
    rec!(
        "connect s1",
        store.connect(connect("n1", "s1", 10, 1)).await
    )
    .unwrap();
    rec!(
        "connect older",
        store.connect(connect("n2", "s0", 5, 2)).await
    )
    .unwrap();
    rec!(
        "connect same time, higher session",
        store.connect(connect("n2", "s2", 10, 3)).await
    )
    .unwrap();
    rec!(
        "connect s2 again",
        store.connect(connect("n2", "s2", 10, 4)).await
    )
    .unwrap();
    rec!(
        "disconnect stale",
        store.disconnect(release("n1", "s1", 5)).await
    )
    .unwrap();
    rec!("touch", store.touch(release("n2", "s2", 6)).await).unwrap();
    rec!("touch backwards", store.touch(release("n2", "s2", 2)).await).unwrap();
    rec!("disconnect", store.disconnect(release("n2", "s2", 7)).await).unwrap();
    rec!("touch released", store.touch(release("n2", "s2", 8)).await).unwrap();
    rec!(
        "revive released",
        store.connect(connect("n2", "s2", 10, 9)).await
    )
    .unwrap();
    rec!(
        "connect newer",
        store.connect(connect("n3", "s3", 11, 10)).await
    )
    .unwrap();
    rec!("affinity", store.affinity(&b("b1")).await).unwrap();
    log
}

fn uuid_from(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(n)
}

#[tokio::test]
async fn agrees_with_the_memory_store_on_a_scripted_history() {
    let Some((_db, store)) = fresh_store().await else {
        return;
    };
    let script = Script::new();
    let expected = run_script(&MemoryStore::new(), &script).await;
    let got = run_script(&store, &script).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_share_an_attempt() {
    let Some((db, first)) = fresh_store().await else {
        return;
    };
    let second = store_on(&db.dsn, &db.schema, PgStoreOptions::default()).await;
    const ROWS: usize = 300;
    let mut ids = HashSet::new();
    for i in 0..ROWS {
        let d = first
            .insert(NewDispatch::new(b("busy"), "op", json!(i)))
            .await
            .unwrap();
        ids.insert(d.id);
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim(ClaimParams {
                        broker: b("busy"),
                        node: n(&format!("node-{w}")),
                        limit: 7,
                        lease: Duration::from_secs(600),
                        now: None,
                    })
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|c| (c.id(), c.attempt())));
            }
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for claim in t.await.unwrap() {
            assert!(seen.insert(claim), "{claim:?} was claimed twice");
        }
    }
    assert_eq!(seen.len(), ROWS);
    assert!(seen
        .iter()
        .all(|(id, attempt)| ids.contains(id) && *attempt == 1));
}

/// Points the schema's database clock at a table the test controls.
async fn fake_db_clock(db: &pg::TestDb, micros: i64) -> tokio_postgres::Client {
    let admin = pg::client(&db.dsn).await;
    let s = &db.schema;
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".fake_clock (now bigint NOT NULL); \
             INSERT INTO \"{s}\".fake_clock VALUES ({micros}); \
             CREATE OR REPLACE FUNCTION \"{s}\".clock_micros() RETURNS bigint \
               LANGUAGE sql VOLATILE AS $$ SELECT now FROM \"{s}\".fake_clock $$;"
        ))
        .await
        .unwrap();
    admin
}

async fn set_db_clock(admin: &tokio_postgres::Client, db: &pg::TestDb, micros: i64) {
    admin
        .execute(
            &format!("UPDATE \"{}\".fake_clock SET now = $1", db.schema),
            &[&micros],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn leases_and_deadlines_run_on_the_database_clock() {
    let Some(db) = pg::fresh() else { return };
    let setup = store_on(&db.dsn, &db.schema, PgStoreOptions::default()).await;
    drop(setup);
    // Far from any node's clock: only the database clock can produce these values.
    const DB_NOW: i64 = 5_000_000;
    let admin = fake_db_clock(&db, DB_NOW).await;
    let store = store_on(&db.dsn, &db.schema, PgStoreOptions::default()).await;
    let lease = Duration::from_secs(10);
    let new = |op: &str| NewDispatch::new(b("clocked"), op, json!({}));
    let row = store.insert(new("a")).await.unwrap();
    assert_eq!(row.created_at, Timestamp::from_micros(DB_NOW));
    assert_eq!(row.available_at, Timestamp::from_micros(DB_NOW));
    let mut with_deadline = new("b");
    with_deadline.deadline = Some(Timestamp::from_micros(DB_NOW + 30_000_000));
    let expiring = store.insert(with_deadline).await.unwrap();

    let params = |node: &str| ClaimParams {
        broker: b("clocked"),
        node: n(node),
        limit: 1,
        lease,
        now: None,
    };
    let held = store.claim(params("n1")).await.unwrap().pop().unwrap();
    assert_eq!(held.id(), row.id);
    assert_eq!(
        held.dispatch().lease_until,
        Some(Timestamp::from_micros(DB_NOW + 10_000_000))
    );
    let other = store.claim(params("n2")).await.unwrap().pop().unwrap();
    assert_eq!(other.id(), expiring.id);

    // Before the lease runs out on the database clock, nobody can take `a` back.
    set_db_clock(&admin, &db, DB_NOW + 9_999_999).await;
    assert!(store.claim(params("n3")).await.unwrap().is_empty());
    set_db_clock(&admin, &db, DB_NOW + 10_000_000).await;
    let retaken = store.claim(params("n3")).await.unwrap().pop().unwrap();
    assert_eq!((retaken.id(), retaken.attempt()), (row.id, 2));
    let err = store
        .finish(held, FinishParams::new(Outcome::Complete(json!(1))))
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

    // The sweep reads the same clock: `b` is expired once its lease and deadline have passed.
    set_db_clock(&admin, &db, DB_NOW + 30_000_000).await;
    let report = store
        .sweep(SweepParams {
            retention: Duration::from_secs(3600),
            limit: 10,
            now: None,
        })
        .await
        .unwrap();
    assert_eq!(report.expired, vec![expiring.id]);
    let done = store
        .finish(retaken, FinishParams::new(Outcome::Complete(json!(2))))
        .await
        .unwrap();
    assert_eq!(done.updated_at, Timestamp::from_micros(DB_NOW + 30_000_000));
}

#[tokio::test]
async fn one_sweeper_at_a_time_across_the_cluster() {
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    let mut admin = pg::client(&db.dsn).await;
    let tx = admin.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&store.sweep_lock_key()],
    )
    .await
    .unwrap();
    let params = SweepParams {
        retention: Duration::from_secs(1),
        limit: 10,
        now: None,
    };
    let report = store.sweep(params).await.unwrap();
    assert!(!report.swept);
    assert_eq!(report, Default::default());
    tx.rollback().await.unwrap();
    assert!(store.sweep(params).await.unwrap().swept);
}

#[tokio::test]
async fn migrate_is_idempotent_and_refuses_a_newer_schema() {
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    store.migrate().await.unwrap();
    let twin = store_on(&db.dsn, &db.schema, PgStoreOptions::default()).await;
    twin.migrate().await.unwrap();
    let admin = pg::client(&db.dsn).await;
    admin
        .execute(
            &format!(
                "INSERT INTO \"{}\".schema_version (version) VALUES (999)",
                db.schema
            ),
            &[],
        )
        .await
        .unwrap();
    let err = store.migrate().await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, supported } if supported == broker_dispatch::store::PG_SCHEMA_VERSION),
        "{err:?}"
    );
}

/// Wraps args in an envelope at rest (a stand-in for encryption).
#[derive(Debug)]
struct Envelope;

impl ArgsCodec for Envelope {
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError> {
        Ok(json!({ "sealed": args.to_string() }))
    }

    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError> {
        let text = stored["sealed"]
            .as_str()
            .ok_or_else(|| StoreError::InvalidInput("not sealed".into()))?;
        serde_json::from_str(text).map_err(|e| StoreError::Backend(Box::new(e)))
    }
}

#[tokio::test]
async fn args_codec_applies_at_rest_only() {
    let Some(db) = pg::fresh() else { return };
    let store = store_on(
        &db.dsn,
        &db.schema,
        PgStoreOptions {
            args_codec: Some(Arc::new(Envelope)),
            ..PgStoreOptions::default()
        },
    )
    .await;
    let args = json!({"token": "s3cret"});
    let d = store
        .insert(NewDispatch::new(b("sealed"), "env", args.clone()))
        .await
        .unwrap();
    assert_eq!(d.args, args);
    assert_eq!(store.get(d.id).await.unwrap().unwrap().args, args);
    // Idempotency compares what the caller gave, not what is stored.
    let mut again = NewDispatch::new(b("sealed"), "env", args.clone());
    again.id = d.id;
    assert_eq!(store.insert(again).await.unwrap().id, d.id);
    let admin = pg::client(&db.dsn).await;
    let raw: serde_json::Value = admin
        .query_one(
            &format!("SELECT args FROM \"{}\".dispatch WHERE id = $1", db.schema),
            &[d.id.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(raw, json!({"sealed": args.to_string()}));
}

/// Holds a row lock from another session so the store's next write on `id` blocks.
async fn lock_row(db: &pg::TestDb, id: DispatchId) -> tokio_postgres::Client {
    let locker = pg::client(&db.dsn).await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute(
            &format!(
                "SELECT 1 FROM \"{}\".dispatch WHERE id = $1 FOR UPDATE",
                db.schema
            ),
            &[id.as_uuid()],
        )
        .await
        .unwrap();
    locker
}

async fn claimed_row(store: &PgStore, broker: &str) -> Claimed {
    store
        .insert(NewDispatch::new(b(broker), "op", json!({})))
        .await
        .unwrap();
    store
        .claim(ClaimParams {
            broker: b(broker),
            node: n("n1"),
            limit: 1,
            lease: Duration::from_secs(600),
            now: None,
        })
        .await
        .unwrap()
        .pop()
        .unwrap()
}

fn heartbeat_now() -> HeartbeatParams {
    HeartbeatParams {
        lease: Duration::from_secs(600),
        progress: None,
        now: None,
    }
}

#[tokio::test]
async fn a_connection_killed_mid_call_is_unavailable() {
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    let held = claimed_row(&store, "killed").await;
    let locker = lock_row(&db, held.id()).await;
    let call = {
        let store = store.clone();
        tokio::spawn(async move { store.heartbeat(&held, heartbeat_now()).await })
    };
    // Find the store's backend once it waits on the lock, then kill it.
    let admin = pg::client(&db.dsn).await;
    let pid: i32 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let row = admin
                .query_opt(
                    "SELECT pid FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%' LIMIT 1",
                    &[&db.schema],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                break row.get(0);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the heartbeat waits on the row lock");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());
    locker.batch_execute("ROLLBACK").await.unwrap();
    // The pool drops the dead connection and the next call succeeds.
    assert!(store.get(DispatchId::new()).await.unwrap().is_none());
}

#[tokio::test]
async fn a_statement_timeout_is_unavailable() {
    let Some(db) = pg::fresh() else { return };
    let store = store_on(
        &db.dsn,
        &db.schema,
        PgStoreOptions {
            statement_timeout: Some(Duration::from_millis(200)),
            ..PgStoreOptions::default()
        },
    )
    .await;
    let held = claimed_row(&store, "slow").await;
    let locker = lock_row(&db, held.id()).await;
    let err = store.heartbeat(&held, heartbeat_now()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    store.heartbeat(&held, heartbeat_now()).await.unwrap();
}

/// A guard that keeps refusing what `fsm::apply` allows on the row as read back (here a
/// foreign trigger swallows every update) is a defect, not a race: `Backend`, not retryable,
/// as SQLite reports it, so a caller does not retry it for ever.
#[tokio::test]
async fn a_guard_that_keeps_refusing_a_legal_transition_is_a_backend_error() {
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    let held = claimed_row(&store, "swallowed").await;
    let admin = pg::client(&db.dsn).await;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION \"{s}\".swallow() RETURNS trigger LANGUAGE plpgsql \
               AS $$ BEGIN RETURN NULL; END $$; \
             CREATE TRIGGER swallow BEFORE UPDATE ON \"{s}\".dispatch \
               FOR EACH ROW EXECUTE FUNCTION \"{s}\".swallow()",
            s = db.schema
        ))
        .await
        .unwrap();
    let err = store
        .finish(held, FinishParams::new(Outcome::Complete(json!(1))))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn bad_dsn_wrong_password_and_unreachable_server_are_typed() {
    let err = PgStore::connect("postgres://u@h:99999999/db", PgStoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    let err = PgStore::connect(
        "postgres://u@127.0.0.1/db",
        PgStoreOptions {
            schema: "Not Valid".to_owned(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");

    let Some(server) = pg::private() else { return };
    let admin = pg::client(&server.dsn()).await;
    admin
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'right'")
        .await
        .unwrap();
    let wrong = format!("postgres://app:wrong@127.0.0.1:{}/postgres", server.port());
    let err = PgStore::connect(&wrong, PgStoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let right = format!("postgres://app:right@127.0.0.1:{}/postgres", server.port());
    PgStore::connect(&right, PgStoreOptions::default())
        .await
        .unwrap();

    drop(admin);
    server.stop().unwrap();
    let started = std::time::Instant::now();
    let err = PgStore::connect(
        &right,
        PgStoreOptions {
            connect_timeout: Duration::from_secs(2),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn the_store_recovers_after_a_server_restart() {
    let Some(server) = pg::private() else { return };
    let store = store_on(&server.dsn(), "restarted", PgStoreOptions::default()).await;
    let d = store
        .insert(NewDispatch::new(b("r"), "op", json!({})))
        .await
        .unwrap();
    server.restart().unwrap();
    // Pooled connections died with the server: each call on one fails as retryable and the
    // pool drops it; fresh connections then work.
    let mut got = None;
    for _ in 0..20 {
        match store.get(d.id).await {
            Ok(row) => {
                got = row;
                break;
            }
            Err(e) => assert!(e.is_retryable(), "{e:?}"),
        }
    }
    assert_eq!(got.map(|r| r.id), Some(d.id));
}

/// A fresh store in its own schema for one conformance case, or `None` to skip.
async fn conformance_store() -> Option<Arc<dyn Store>> {
    let (_db, store) = fresh_store().await?;
    Some(Arc::new(store))
}

/// The shared store conformance suite, one schema per case. The factory expression is spliced
/// into each generated test's body, so its `return` skips the case when no Postgres is at hand
/// (the support module has already printed why, or panicked under CI).
mod conformance {
    use super::*;

    broker_dispatch::store_conformance_tests!(std::future::ready(
        match conformance_store().await {
            Some(store) => store,
            None => return,
        }
    ));
}

/// A caller that gives up on a call blocked on the server (its own timeout drops the future)
/// must not leave that busy connection in the pool for the next caller to wait behind.
#[tokio::test]
async fn an_abandoned_call_does_not_poison_the_pool() {
    let Some(db) = pg::fresh() else { return };
    let store = store_on(
        &db.dsn,
        &db.schema,
        PgStoreOptions {
            pool_size: 1,
            ..PgStoreOptions::default()
        },
    )
    .await;
    let held = claimed_row(&store, "abandoned").await;
    let locker = lock_row(&db, held.id()).await;
    // The heartbeat blocks on the row lock; the caller's timeout abandons it.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        store.heartbeat(&held, heartbeat_now()),
    )
    .await;
    assert!(abandoned.is_err(), "the heartbeat should still be blocked");
    // With one pooled connection, a reused busy connection would block this read until the
    // lock is released; a fresh one answers at once.
    let read = tokio::time::timeout(Duration::from_secs(5), store.get(held.id())).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let row = read
        .expect("the read waited behind the abandoned statement")
        .unwrap();
    assert_eq!(row.map(|d| d.attempt), Some(1));
}

/// A fresh store whose statements go out unnamed (`prepared_statements: false`, the setting
/// for PgBouncer's transaction pooling), for one conformance case.
async fn unnamed_conformance_store() -> Option<Arc<dyn Store>> {
    let db = pg::fresh()?;
    let store = store_on(
        &db.dsn,
        &db.schema,
        PgStoreOptions {
            prepared_statements: false,
            ..PgStoreOptions::default()
        },
    )
    .await;
    Some(Arc::new(store))
}

/// The whole conformance suite again with unnamed statements: the same answers, row for row.
mod conformance_unnamed_statements {
    use super::*;

    broker_dispatch::store_conformance_tests!(std::future::ready(
        match unnamed_conformance_store().await {
            Some(store) => store,
            None => return,
        }
    ));
}

/// With `prepared_statements: false` no statement outlives its own execution on the server
/// connection (what transaction pooling needs); by default the store's statements stay
/// prepared there.
#[tokio::test]
async fn unnamed_statements_leave_nothing_prepared_on_the_connection() {
    let Some(db) = pg::fresh() else { return };
    for (named, expect_some) in [(false, false), (true, true)] {
        let store = store_on(
            &db.dsn,
            &format!("{}_{named}", db.schema),
            PgStoreOptions {
                pool_size: 1,
                prepared_statements: named,
                ..PgStoreOptions::default()
            },
        )
        .await;
        store
            .insert(NewDispatch::new(b("b"), "op", serde_json::json!({})))
            .await
            .unwrap();
        let claimed = store
            .claim(ClaimParams {
                now: None,
                ..claim("b", "n", 10, 30_000, 0)
            })
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        store.get(claimed[0].id()).await.unwrap();
        let client = store.pool().get().await.unwrap();
        // The simple query protocol prepares nothing itself.
        let rows = client
            .simple_query("SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap();
        let count: i64 = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .unwrap();
        assert_eq!(count > 0, expect_some, "named={named}: {count} prepared");
    }
}

/// The shared test server's DSN in `key=value` form with one setting replaced.
fn dsn_with(dsn: &str, key: &str, value: &str) -> String {
    let config: tokio_postgres::Config = dsn.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let mut parts = vec![
        ("host", host),
        ("port", config.get_ports()[0].to_string()),
        ("user", config.get_user().unwrap_or("postgres").to_owned()),
        (
            "dbname",
            config.get_dbname().unwrap_or("postgres").to_owned(),
        ),
    ];
    for (k, v) in &mut parts {
        if *k == key {
            *v = value.to_owned();
        }
    }
    parts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the server says when it refuses a connection (a database or role that does not exist)
/// is in the error's display, with its SQLSTATE, not only in its source. Matching text is the
/// point here: the message must reach the operator.
#[tokio::test]
async fn a_refused_connection_shows_the_servers_message_and_sqlstate() {
    let Some(db) = pg::fresh() else { return };
    let err = PgStore::connect(
        &dsn_with(&db.dsn, "dbname", "no_such_database_bdt"),
        PgStoreOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let shown = err.to_string();
    for part in ["no_such_database_bdt", "does not exist", "3D000"] {
        assert!(shown.contains(part), "{shown}");
    }
    // An unknown role: under trust auth the server says it does not exist (28000); where it
    // asks other roles for a password (the throwaway server) it says the password failed
    // (28P01), never whether the role exists. Either way its words reach the display.
    let dsn = format!(
        "{} password=wrong",
        dsn_with(&db.dsn, "user", "no_such_role_bdt")
    );
    let err = PgStore::connect(&dsn, PgStoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("no_such_role_bdt"), "{shown}");
    assert!(
        (shown.contains("does not exist") && shown.contains("28000"))
            || (shown.contains("password authentication failed") && shown.contains("28P01")),
        "{shown}"
    );
}

/// A row the database refuses during an import (here a foreign CHECK constraint) fails the
/// import, and nothing of the row's args (which may be secrets) appears anywhere in the error:
/// not its display, not its `Debug`, not in any source in its chain. The server's detail,
/// which quotes the failing row, is dropped.
#[tokio::test]
async fn an_import_error_never_carries_the_rows_args() {
    use std::error::Error as _;
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    let admin = pg::client(&db.dsn).await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE \"{}\".dispatch ADD CONSTRAINT no_refused CHECK (op <> 'refused')",
            db.schema
        ))
        .await
        .unwrap();
    let secret = "hunter2-very-secret-token";
    let row = NewDispatch::new(b("b1"), "refused", json!({ "password": secret }))
        .into_dispatch(Timestamp::from_micros(T0));
    let mut import = store.begin_import().await.unwrap();
    let err = import.dispatches(&[row]).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(err.to_string().contains("23514"), "{err}");
    let mut chain: Vec<String> = vec![err.to_string(), format!("{err:?}")];
    let mut source = err.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        chain.push(format!("{s:?}"));
        source = s.source();
    }
    for text in chain {
        assert!(!text.contains(secret), "the secret leaked: {text}");
    }
}

/// The claim never takes a row whose fencing token could not grow (attempt at `u32::MAX`), even
/// when it has executions left (hand-backs do not count): the token would wrap or overflow the
/// row's type. The row is left as it was.
#[tokio::test]
async fn a_row_at_the_last_attempt_token_is_never_claimed() {
    let Some((db, store)) = fresh_store().await else {
        return;
    };
    let d = store
        .insert(NewDispatch::new(b("top"), "op", json!({})))
        .await
        .unwrap();
    let admin = pg::client(&db.dsn).await;
    admin
        .execute(
            &format!(
                "UPDATE \"{}\".dispatch SET attempt = $2, released = $3 WHERE id = $1",
                db.schema
            ),
            &[
                d.id.as_uuid(),
                &i64::from(u32::MAX),
                &i64::from(u32::MAX - 1),
            ],
        )
        .await
        .unwrap();
    let before = store.get(d.id).await.unwrap().unwrap();
    assert_eq!(before.attempt, u32::MAX);
    let got = store
        .claim(ClaimParams {
            now: None,
            ..claim("top", "n1", 10, 30_000, 0)
        })
        .await
        .unwrap();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(store.get(d.id).await.unwrap().unwrap(), before);
}

/// A codec that cannot decode one row's args (a rotated key, say): `{"poison": true}`.
#[derive(Debug)]
struct PoisonOnRead;

impl ArgsCodec for PoisonOnRead {
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError> {
        Ok(args.clone())
    }

    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError> {
        if stored["poison"] == json!(true) {
            return Err(StoreError::Backend("cannot decrypt these args".into()));
        }
        Ok(stored)
    }
}

/// One row a claim cannot read back never poisons the broker's others: the claim returns the
/// rest and quarantines that one as `Failed(Corrupt)` (fenced by the attempt it took), and
/// reads (`get`, `list`) still show it, args as stored.
#[tokio::test]
async fn an_undecodable_row_is_quarantined_and_the_rest_of_the_broker_runs() {
    let Some(db) = pg::fresh() else { return };
    let store = store_on(
        &db.dsn,
        &db.schema,
        PgStoreOptions {
            args_codec: Some(Arc::new(PoisonOnRead)),
            ..PgStoreOptions::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let args = if n == 2 {
            json!({ "poison": true })
        } else {
            json!({ "n": n })
        };
        ids.push(
            store
                .insert(NewDispatch::new(b("b"), "op", args))
                .await
                .unwrap()
                .id,
        );
    }
    let claimed = store
        .claim(ClaimParams {
            now: None,
            ..claim("b", "n1", 10, 30_000_000, 0)
        })
        .await
        .expect("the claim is not poisoned");
    let got: Vec<_> = claimed.iter().map(|c| c.id()).collect();
    assert_eq!(got, vec![ids[0], ids[1], ids[3], ids[4]]);
    let poisoned = store.get(ids[2]).await.unwrap().expect("row");
    assert_eq!(poisoned.state, DispatchState::Failed);
    assert!(
        matches!(
            poisoned.failure,
            Some(broker_dispatch::fsm::FailReason::Corrupt(_))
        ),
        "{poisoned:?}"
    );
    assert_eq!(poisoned.args, json!({ "poison": true }));
    let listed = broker_dispatch::store::list_all(
        &store,
        ListFilter {
            limit: 100,
            ..ListFilter::default()
        },
    )
    .await
    .expect("a listing is not poisoned either");
    assert_eq!(listed.len(), 5);
}

/// `affinity_at` reads the row and the database clock in one statement, row or no row.
#[tokio::test]
async fn affinity_at_returns_the_row_and_the_database_clock() {
    let Some((_db, store)) = fresh_store().await else {
        return;
    };
    store
        .connect(ConnectParams {
            broker: b("b"),
            node: n("n1"),
            session: SessionId::new("s").unwrap(),
            connected_at: None,
            now: None,
        })
        .await
        .unwrap();
    let system = Timestamp::from_system_time(std::time::SystemTime::now());
    for (broker, present) in [("b", true), ("unknown", false)] {
        let (row, now) = store.affinity_at(&b(broker)).await.unwrap();
        assert_eq!(row.is_some(), present, "{broker}");
        let now = now.expect("the database clock");
        let gap = now.duration_since(system).max(system.duration_since(now));
        assert!(gap < Duration::from_secs(60), "{now:?} vs {system:?}");
        if let Some(a) = row {
            assert_eq!(a.node.as_ref().map(NodeId::as_str), Some("n1"));
        }
    }
}
