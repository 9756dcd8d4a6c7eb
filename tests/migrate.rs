//! `migrate::sqlite_to_postgres` against a real Postgres (the test binary's throwaway server
//! unless `DATABASE_URL` is set) and a temporary SQLite file: an exact copy of every kind of
//! row, an idempotent rerun, refusal of a conflicting destination with nothing written, count
//! checks, and `drop_source`.

#![cfg(all(feature = "postgres", feature = "sqlite"))]

#[path = "support/pg.rs"]
mod pg;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::fsm::{
    Affinity, BrokerId, Dispatch, DispatchId, DispatchState, FailReason, NodeId, Progress,
    SessionId, Timestamp,
};
use broker_dispatch::migrate::{sqlite_to_postgres, MigrateError, MigrateOptions};
use broker_dispatch::store::ArgsCodec;
use broker_dispatch::store::{
    list_all, CancelParams, ClaimParams, ConnectParams, DisconnectParams, FinishParams,
    HeartbeatParams, ListFilter, NewDispatch, Outcome, PgStore, PgStoreOptions, SqliteOptions,
    SqliteStore, Store,
};
use broker_dispatch::StoreError;
use serde_json::json;

const T0: i64 = 1_700_000_000_000_000;

fn at(micros: i64) -> Option<Timestamp> {
    Some(Timestamp::from_micros(T0 + micros))
}

fn b(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

fn n(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn new_dispatch(broker: &str, k: i64, args: serde_json::Value) -> NewDispatch {
    let mut new = NewDispatch::new(b(broker), "start", args);
    new.now = at(k);
    new
}

/// A SQLite file holding every kind of row: pending (plain, delayed, with a deadline and a
/// key), in progress with a lease and progress, done (with a float, a null and a nested
/// result), failed (error message, cancelled), retried, released; connected and released
/// affinity.
async fn populate(path: &Path) -> SqliteStore {
    let s = SqliteStore::open(path).unwrap();
    s.insert(new_dispatch("b1", 0, json!({ "n": 0 })))
        .await
        .unwrap();
    let mut delayed = new_dispatch("b1", 1, json!([1, "two", null]));
    delayed.available_at = at(1_000_000);
    delayed.deadline = at(9_000_000);
    delayed.idempotency_key = Some("key-1".into());
    delayed.max_attempts = 5;
    s.insert(delayed).await.unwrap();
    for (i, broker) in ["b2", "b2", "b2", "b2", "b2", "b2"].iter().enumerate() {
        s.insert(new_dispatch(broker, 10 + i as i64, json!({ "i": i })))
            .await
            .unwrap();
    }
    let claim = |limit, now| ClaimParams {
        broker: b("b2"),
        node: n("node-a"),
        limit,
        lease: Duration::from_secs(30),
        now: at(now),
    };
    let mut held = s.claim(claim(6, 100)).await.unwrap().into_iter();
    let fin = |outcome, now| FinishParams {
        outcome,
        now: at(now),
    };
    s.finish(
        held.next().unwrap(),
        fin(
            Outcome::Complete(json!({ "x": 0.1_f64 + 0.2_f64, "e": [2.5e-300] })),
            200,
        ),
    )
    .await
    .unwrap();
    s.finish(
        held.next().unwrap(),
        fin(Outcome::Complete(json!(null)), 201),
    )
    .await
    .unwrap();
    s.finish(
        held.next().unwrap(),
        fin(Outcome::Fail("broker said \"no\" ✗".into()), 202),
    )
    .await
    .unwrap();
    s.finish(
        held.next().unwrap(),
        fin(
            Outcome::Retry {
                after: Duration::from_secs(7),
            },
            203,
        ),
    )
    .await
    .unwrap();
    s.finish(held.next().unwrap(), fin(Outcome::Release, 204))
        .await
        .unwrap();
    let running = held.next().unwrap();
    s.heartbeat(
        &running,
        HeartbeatParams {
            lease: Duration::from_secs(60),
            progress: Some(Progress {
                seq: 3,
                detail: json!({ "pct": 42.5 }),
            }),
            now: at(300),
        },
    )
    .await
    .unwrap();
    let doomed = s
        .insert(new_dispatch("b3", 20, json!("cancel me")))
        .await
        .unwrap();
    s.cancel(CancelParams {
        id: doomed.id,
        now: at(400),
    })
    .await
    .unwrap();
    for (broker, node, session, t) in [
        ("b1", "node-a", "s1", 10),
        ("b2", "node-b", "s2", 20),
        ("b3", "node-a", "s3", 30),
    ] {
        s.connect(ConnectParams {
            broker: b(broker),
            node: n(node),
            session: SessionId::new(session).unwrap(),
            connected_at: Some(Timestamp::from_micros(T0 + t)),
            now: at(t + 1),
        })
        .await
        .unwrap();
    }
    s.disconnect(DisconnectParams {
        broker: b("b3"),
        node: n("node-a"),
        session: SessionId::new("s3").unwrap(),
        now: at(500),
    })
    .await
    .unwrap();
    s
}

async fn all_dispatches(store: &dyn Store) -> Vec<Dispatch> {
    list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await
    .unwrap()
}

async fn all_affinity(store: &dyn Store, brokers: &[&str]) -> Vec<Affinity> {
    let mut out = Vec::new();
    for broker in brokers {
        out.extend(store.affinity(&b(broker)).await.unwrap());
    }
    out
}

async fn dest(db: &pg::TestDb) -> PgStore {
    let store = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: db.schema.clone(),
            channel_prefix: db.schema.clone(),
            pool_size: 2,
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store
}

fn options(db: &pg::TestDb) -> MigrateOptions {
    MigrateOptions {
        schema: db.schema.clone(),
        batch: 3, // several pages even for a handful of rows
        drop_source: false,
        ..MigrateOptions::default()
    }
}

#[tokio::test]
async fn copies_every_field_and_a_rerun_copies_nothing() {
    let Some(db) = pg::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let source = populate(&file).await;
    let expected = all_dispatches(&source).await;
    let expected_affinity = all_affinity(&source, &["b1", "b2", "b3"]).await;
    assert_eq!(expected.len(), 9);
    assert_eq!(expected_affinity.len(), 3);
    assert!(expected_affinity.iter().any(|a| a.node.is_none()));
    source.close().await;

    let from = format!("sqlite://{}", file.display());
    let report = sqlite_to_postgres(&from, &db.dsn, &options(&db))
        .await
        .unwrap();
    assert_eq!(report.dispatches_read, 9);
    assert_eq!(report.dispatches_copied, 9);
    assert_eq!(report.dispatches_present, 0);
    assert_eq!(report.affinity_read, 3);
    assert_eq!(report.affinity_copied, 3);
    assert!(!report.source_removed);

    let pg = dest(&db).await;
    assert_eq!(all_dispatches(&pg).await, expected, "every field survives");
    assert_eq!(
        all_affinity(&pg, &["b1", "b2", "b3"]).await,
        expected_affinity
    );

    // The copy is live data: the in-progress row's holder can still finish it, fenced by its
    // attempt, and the released broker's high-water mark still refuses an older session.
    let running = expected
        .iter()
        .find(|d| d.progress.is_some())
        .expect("the running row");
    let done = pg
        .finish(
            broker_dispatch::store::Claimed::new(running.clone()),
            FinishParams {
                outcome: Outcome::Complete(json!("late")),
                now: at(600),
            },
        )
        .await
        .unwrap();
    assert_eq!(done.result, Some(json!("late")));
    let older = pg
        .connect(ConnectParams {
            broker: b("b3"),
            node: n("node-z"),
            session: SessionId::new("s0").unwrap(),
            connected_at: Some(Timestamp::from_micros(T0 + 29)),
            now: at(700),
        })
        .await
        .unwrap();
    assert!(matches!(
        older,
        broker_dispatch::store::ConnectOutcome::Superseded(_)
    ));

    // The row finished above now differs from the source, so the rerun check uses a second,
    // untouched schema: the first run copies everything, the rerun nothing.
    let again = pg::TestDb {
        dsn: db.dsn.clone(),
        schema: pg::unique_name("bdt"),
    };
    let first = sqlite_to_postgres(&from, &again.dsn, &options(&again))
        .await
        .unwrap();
    assert_eq!(first.dispatches_copied, 9);
    let rerun = sqlite_to_postgres(&from, &again.dsn, &options(&again))
        .await
        .unwrap();
    assert_eq!(rerun.dispatches_read, 9);
    assert_eq!(rerun.dispatches_copied, 0);
    assert_eq!(rerun.dispatches_present, 9);
    assert_eq!(rerun.affinity_copied, 0);
    assert_eq!(rerun.affinity_present, 3);
    assert_eq!(all_dispatches(&dest(&again).await).await, expected);
}

#[tokio::test]
async fn a_conflicting_destination_is_refused_and_nothing_is_written() {
    let Some(db) = pg::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let source = populate(&file).await;
    let from = file.display().to_string(); // a bare path
    sqlite_to_postgres(&from, &db.dsn, &options(&db))
        .await
        .unwrap();
    let pg = dest(&db).await;

    // The destination moves on (a pending row is cancelled there) while the source gains rows.
    let pending = all_dispatches(&pg)
        .await
        .into_iter()
        .find(|d| d.broker.as_str() == "b1" && d.idempotency_key.is_none())
        .unwrap();
    pg.cancel(CancelParams {
        id: pending.id,
        now: at(800),
    })
    .await
    .unwrap();
    let added: Vec<DispatchId> = {
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                source
                    .insert(new_dispatch("b9", 900 + i, json!({ "new": i })))
                    .await
                    .unwrap()
                    .id,
            );
        }
        ids
    };
    source.close().await;
    let before = all_dispatches(&pg).await;

    let err = sqlite_to_postgres(&from, &db.dsn, &options(&db))
        .await
        .unwrap_err();
    match err {
        MigrateError::Conflict { table, key } => {
            assert_eq!(table, "dispatch");
            assert_eq!(key, pending.id.to_string());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(all_dispatches(&pg).await, before, "nothing was written");
    for id in added {
        assert!(pg.get(id).await.unwrap().is_none());
    }

    // An affinity row that moved on in the destination is a conflict too.
    let db2 = pg::TestDb {
        dsn: db.dsn.clone(),
        schema: pg::unique_name("bdt"),
    };
    let pg2 = dest(&db2).await;
    pg2.connect(ConnectParams {
        broker: b("b2"),
        node: n("node-new"),
        session: SessionId::new("s-new").unwrap(),
        connected_at: Some(Timestamp::from_micros(T0 + 10_000)),
        now: at(10_001),
    })
    .await
    .unwrap();
    let err = sqlite_to_postgres(&from, &db2.dsn, &options(&db2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::Conflict { table: "affinity", key } if key == "b2"),
        "{err:?}"
    );
    assert!(all_dispatches(&pg2).await.is_empty(), "nothing was written");
}

#[tokio::test]
async fn drop_source_closes_and_removes_the_files() {
    let Some(db) = pg::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let source = populate(&file).await;
    // Keep a second connection open so the -wal and -shm files exist during the copy.
    let wal = dir.path().join("hub.db-wal");
    let shm = dir.path().join("hub.db-shm");
    assert!(wal.exists() && shm.exists());
    let report = sqlite_to_postgres(
        &format!("file://{}?mode=ro", file.display()),
        &db.dsn,
        &MigrateOptions {
            drop_source: true,
            ..options(&db)
        },
    )
    .await
    .unwrap();
    source.close().await;
    assert!(report.source_removed);
    assert_eq!(report.dispatches_copied, 9);
    for f in [&file, &wal, &shm] {
        assert!(!f.exists(), "{} still exists", f.display());
    }
    let err = sqlite_to_postgres(&file.display().to_string(), &db.dsn, &options(&db))
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::SourceMissing(_)), "{err:?}");
}

#[tokio::test]
async fn bad_dsns_fail_before_touching_anything() {
    for (from, to) in [
        ("", "postgres://localhost/x"),
        ("mysql://h/db", "postgres://localhost/x"),
        ("sqlite://", "postgres://localhost/x"),
        ("/tmp/x.db", "sqlite:///tmp/y.db"),
    ] {
        let err = sqlite_to_postgres(from, to, &MigrateOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, MigrateError::Dsn(_)), "{from} {to}: {err:?}");
    }
}

/// `PgImport` checks every row with the rules a store applies to what it writes before it
/// writes any row of the call: a row no store could have written (or read back) is
/// `InvalidInput`, and the good row beside it is not written either.
#[tokio::test]
async fn an_import_refuses_rows_out_of_bounds_and_writes_nothing_of_the_call() {
    use broker_dispatch::fsm::{DispatchState, FailReason};
    use broker_dispatch::store::{MAX_ARGS_BYTES, MAX_DETAIL_BYTES};
    use broker_dispatch::StoreError;
    let Some(db) = pg::fresh() else { return };
    let store = dest(&db).await;
    let row = || new_dispatch("b1", 0, json!({})).into_dispatch(Timestamp::from_micros(T0));
    let deep = (0..100).fold(json!(1), |v, _| json!([v]));
    let done = || Dispatch {
        state: DispatchState::Done,
        attempt: 1,
        ..row()
    };
    let cases: Vec<(&str, Dispatch)> = vec![
        (
            "max_attempts 0",
            Dispatch {
                max_attempts: 0,
                ..row()
            },
        ),
        (
            "empty op",
            Dispatch {
                op: String::new(),
                ..row()
            },
        ),
        (
            "args nested 100 levels",
            Dispatch {
                args: deep.clone(),
                ..row()
            },
        ),
        (
            "args over MAX_ARGS_BYTES",
            Dispatch {
                args: json!("a".repeat(MAX_ARGS_BYTES)),
                ..row()
            },
        ),
        (
            "result nested 100 levels",
            Dispatch {
                result: Some(deep.clone()),
                ..done()
            },
        ),
        (
            "progress detail over MAX_DETAIL_BYTES",
            Dispatch {
                progress: Some(Progress {
                    seq: 1,
                    detail: json!("p".repeat(MAX_DETAIL_BYTES)),
                }),
                ..done()
            },
        ),
        (
            "failure text over MAX_DETAIL_BYTES",
            Dispatch {
                state: DispatchState::Failed,
                failure: Some(FailReason::Error("f".repeat(MAX_DETAIL_BYTES + 1))),
                ..done()
            },
        ),
        (
            "released beyond attempt",
            Dispatch {
                released: 2,
                ..done()
            },
        ),
    ];
    for (name, bad) in cases {
        let mut import = store.begin_import().await.unwrap();
        let before = import.counts().await.unwrap();
        let err = import.dispatches(&[row(), bad]).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidInput(_)),
            "{name}: {err:?}"
        );
        assert_eq!(
            import.counts().await.unwrap(),
            before,
            "{name}: a row was written"
        );
        import.commit().await.unwrap();
    }
    assert!(all_dispatches(&store).await.is_empty());
}

/// Wraps args in an envelope naming the codec, and refuses to decode another codec's.
#[derive(Debug)]
struct Tagged(&'static str);

impl ArgsCodec for Tagged {
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError> {
        Ok(json!({ "codec": self.0, "args": args }))
    }
    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError> {
        if stored["codec"] != json!(self.0) {
            return Err(StoreError::Backend(
                format!("not sealed by {}", self.0).into(),
            ));
        }
        Ok(stored["args"].clone())
    }
}

/// Args are decoded with the source's codec and encoded with the destination's, so a copy
/// between differently encoded deployments arrives readable and encoded once; results are not
/// covered by any codec and arrive as they were.
#[tokio::test]
async fn args_are_decoded_with_the_source_codec_and_encoded_with_the_destinations() {
    let Some(db) = pg::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let source = SqliteOptions::new()
        .args_codec(Arc::new(Tagged("old")))
        .open(&file)
        .unwrap();
    let plain = source
        .insert(new_dispatch("b1", 0, json!({ "token": "secret" })))
        .await
        .unwrap();
    let done = source
        .insert(new_dispatch("b1", 1, json!({ "n": 1 })))
        .await
        .unwrap();
    let claimed = source
        .claim(ClaimParams {
            broker: b("b1"),
            node: n("node-a"),
            limit: 2,
            lease: Duration::from_secs(30),
            now: at(10),
        })
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.id() == done.id)
        .unwrap();
    source
        .finish(
            claimed,
            FinishParams {
                outcome: Outcome::Complete(json!({ "ok": true })),
                now: at(20),
            },
        )
        .await
        .unwrap();
    source.close().await;

    let report = sqlite_to_postgres(
        &file.display().to_string(),
        &db.dsn,
        &MigrateOptions {
            source_args_codec: Some(Arc::new(Tagged("old"))),
            destination_args_codec: Some(Arc::new(Tagged("new"))),
            ..options(&db)
        },
    )
    .await
    .unwrap();
    assert_eq!(report.dispatches_copied, 2);

    // Read through the destination's codec: the caller's args.
    let decoded = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: db.schema.clone(),
            channel_prefix: db.schema.clone(),
            pool_size: 2,
            args_codec: Some(Arc::new(Tagged("new"))),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    let row = decoded.get(plain.id).await.unwrap().unwrap();
    assert_eq!(row.args, json!({ "token": "secret" }));
    // At rest: encoded once, by the destination's codec.
    let raw = dest(&db).await;
    let row = raw.get(plain.id).await.unwrap().unwrap();
    assert_eq!(
        row.args,
        json!({ "codec": "new", "args": { "token": "secret" } })
    );
    let row = raw.get(done.id).await.unwrap().unwrap();
    assert_eq!(
        row.result,
        Some(json!({ "ok": true })),
        "results are not encoded"
    );
}

/// A row the source's codec cannot decode (sealed by another key) neither aborts the copy nor
/// arrives runnable: a live one is quarantined as `failed: corrupt` with its args as stored, a
/// finished one keeps its outcome, and the report names both.
#[tokio::test]
async fn rows_the_source_codec_cannot_decode_are_quarantined_not_copied_as_plain() {
    let Some(db) = pg::fresh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.db");
    let source = SqliteOptions::new()
        .args_codec(Arc::new(Tagged("old")))
        .open(&file)
        .unwrap();
    let good = source
        .insert(new_dispatch("b1", 0, json!({ "n": 0 })))
        .await
        .unwrap();
    source.close().await;
    // Rows written by a hub with another key.
    let foreign = SqliteOptions::new()
        .args_codec(Arc::new(Tagged("rotated")))
        .open(&file)
        .unwrap();
    let live = foreign
        .insert(new_dispatch("b1", 1, json!({ "n": 1 })))
        .await
        .unwrap();
    let finished = foreign
        .insert(new_dispatch("b2", 2, json!({ "n": 2 })))
        .await
        .unwrap();
    let claimed = foreign
        .claim(ClaimParams {
            broker: b("b2"),
            node: n("node-a"),
            limit: 1,
            lease: Duration::from_secs(30),
            now: at(10),
        })
        .await
        .unwrap()
        .pop()
        .unwrap();
    foreign
        .finish(
            claimed,
            FinishParams {
                outcome: Outcome::Complete(json!({ "ok": true })),
                now: at(20),
            },
        )
        .await
        .unwrap();
    foreign.close().await;

    let report = sqlite_to_postgres(
        &file.display().to_string(),
        &db.dsn,
        &MigrateOptions {
            source_args_codec: Some(Arc::new(Tagged("old"))),
            ..options(&db)
        },
    )
    .await
    .unwrap();
    assert_eq!(report.dispatches_copied, 3);
    let mut quarantined = report.dispatches_quarantined.clone();
    quarantined.sort();
    let mut expected = vec![live.id, finished.id];
    expected.sort();
    assert_eq!(quarantined, expected);

    let raw = dest(&db).await;
    let row = raw.get(good.id).await.unwrap().unwrap();
    assert_eq!(row.state, DispatchState::Pending);
    assert_eq!(row.args, json!({ "n": 0 }), "decoded by the source codec");
    let row = raw.get(live.id).await.unwrap().unwrap();
    assert_eq!(row.state, DispatchState::Failed, "never runnable: {row:?}");
    assert!(
        matches!(&row.failure, Some(FailReason::Corrupt(m)) if m.contains("not sealed by old")),
        "{:?}",
        row.failure
    );
    assert_eq!(
        row.args,
        json!({ "codec": "rotated", "args": { "n": 1 } }),
        "args as stored"
    );
    let row = raw.get(finished.id).await.unwrap().unwrap();
    assert_eq!(row.state, DispatchState::Done);
    assert_eq!(row.result, Some(json!({ "ok": true })));
}
