//! The SQLite store against hostile files and neighbours: a file that is not a database, a
//! schema from a newer build, read-only files, a write lock held by a foreign connection, other
//! stores sharing the file, an args codec, and a clean shutdown.

#![cfg(feature = "sqlite")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchId, NodeId, Timestamp};
use broker_dispatch::store::{
    ArgsCodec, ClaimParams, ListFilter, NewDispatch, SqliteOptions, SqliteStore, Store,
};
use broker_dispatch::StoreError;
use rusqlite::Connection;
use uuid::Uuid;

const T0: i64 = 1_700_000_000_000_000;

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("dispatch.db")
}

fn new_dispatch(n: u128) -> NewDispatch {
    NewDispatch {
        id: DispatchId::from_uuid(Uuid::from_u128(n)),
        broker: BrokerId::new("b1").expect("valid"),
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
        now: Some(Timestamp::from_micros(T0 + n as i64)),
    }
}

fn claim_params(node: &str, limit: u32) -> ClaimParams {
    ClaimParams {
        broker: BrokerId::new("b1").expect("valid"),
        node: NodeId::new(node).expect("valid"),
        limit,
        lease: Duration::from_secs(30),
        now: Some(Timestamp::from_micros(T0 + 1_000_000)),
    }
}

async fn all_rows(store: &dyn Store) -> Vec<Dispatch> {
    store
        .list(ListFilter {
            limit: 1000,
            ..ListFilter::default()
        })
        .await
        .expect("list")
}

/// Rows as a foreign connection sees them (bypassing the store).
fn raw_count(path: &Path) -> i64 {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("foreign read-only connection");
    conn.query_row("SELECT COUNT(*) FROM dispatch", [], |r| r.get(0))
        .expect("count")
}

#[test]
fn a_file_that_is_not_a_database_fails_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    std::fs::write(&path, "this is not a sqlite database\n".repeat(200)).expect("write");
    match SqliteStore::open(&path) {
        Err(StoreError::Backend(_)) => {}
        other => panic!("expected Backend, got {other:?}"),
    }
}

#[tokio::test]
async fn a_newer_schema_is_refused_at_open_and_at_migrate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = SqliteStore::open(&path).expect("open");
    store.migrate().await.expect("migrate is idempotent");

    let foreign = Connection::open(&path).expect("foreign connection");
    foreign
        .execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
            [SqliteStore::SCHEMA_VERSION + 1],
        )
        .expect("bump version");
    match store.migrate().await {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, SqliteStore::SCHEMA_VERSION + 1);
            assert_eq!(supported, SqliteStore::SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    drop(store);
    match SqliteStore::open(&path) {
        Err(StoreError::SchemaTooNew { found, .. }) => {
            assert_eq!(found, SqliteStore::SCHEMA_VERSION + 1)
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test]
async fn reopening_migrates_nothing_twice_and_keeps_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let d = {
        let store = SqliteStore::open(&path).expect("open");
        store.insert(new_dispatch(1)).await.expect("insert")
    };
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(all_rows(&store).await, vec![d]);
    let foreign = Connection::open(&path).expect("foreign connection");
    let versions: i64 = foreign
        .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
        .expect("versions");
    assert_eq!(versions, SqliteStore::SCHEMA_VERSION);
}

#[tokio::test]
async fn a_read_only_store_reads_and_refuses_writes_with_no_partial_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let d = {
        let store = SqliteStore::open(&path).expect("open");
        store.insert(new_dispatch(1)).await.expect("insert")
    };
    let store = SqliteOptions::new()
        .read_only(true)
        .open(&path)
        .expect("open read-only");
    assert_eq!(all_rows(&store).await, vec![d.clone()]);
    match store.insert(new_dispatch(2)).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("expected Backend, got {other:?}"),
    }
    match store.claim(claim_params("n1", 10)).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("expected Backend, got {other:?}"),
    }
    assert_eq!(all_rows(&store).await, vec![d]);
    assert_eq!(raw_count(&path), 1);
}

#[test]
fn a_read_only_store_needs_a_current_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    Connection::open(&path)
        .expect("create")
        .execute_batch("CREATE TABLE unrelated (x INTEGER)")
        .expect("create table");
    match SqliteOptions::new().read_only(true).open(&path) {
        Err(StoreError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// File permissions only bind unprivileged users: as root (the usual container user) a mode of
/// 0444 does not stop a write, so the test probes for that and skips with a reason; the
/// read-only open above covers the same error path everywhere.
#[tokio::test]
async fn a_write_protected_file_fails_with_a_typed_error_and_no_partial_rows() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    {
        let store = SqliteStore::open(&path).expect("open");
        store.insert(new_dispatch(1)).await.expect("insert");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    if std::fs::OpenOptions::new().write(true).open(&path).is_ok() {
        eprintln!(
            "skipped: file permissions do not bind this user (root or CAP_DAC_OVERRIDE); \
             a_read_only_store_reads_and_refuses_writes_with_no_partial_rows covers the path"
        );
        return;
    }
    // SQLite opens a write-protected file read-only; the first write (the migration's
    // transaction at open, or a later insert) is what fails.
    match SqliteStore::open(&path) {
        Err(StoreError::Backend(_)) => {}
        Err(other) => panic!("expected Backend, got {other:?}"),
        Ok(store) => match store.insert(new_dispatch(2)).await {
            Err(StoreError::Backend(_)) => {}
            other => panic!("expected Backend, got {other:?}"),
        },
    }
    assert_eq!(raw_count(&path), 1);
}

#[tokio::test]
async fn a_foreign_write_lock_beyond_the_busy_timeout_is_unavailable_then_clears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = SqliteOptions::new()
        .busy_timeout(Duration::from_millis(50))
        .open(&path)
        .expect("open");
    let d = store.insert(new_dispatch(1)).await.expect("insert");

    let foreign = Connection::open(&path).expect("foreign connection");
    foreign
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    for r in [
        store.insert(new_dispatch(2)).await.map(|_| ()),
        store.claim(claim_params("n1", 10)).await.map(|_| ()),
    ] {
        match r {
            Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    // WAL: readers are not blocked by the foreign writer.
    assert_eq!(all_rows(&store).await, vec![d.clone()]);
    foreign.execute_batch("COMMIT").expect("release the lock");

    let claimed = store
        .claim(claim_params("n1", 10))
        .await
        .expect("claim after release");
    assert_eq!(claimed.len(), 1);
    store
        .insert(new_dispatch(2))
        .await
        .expect("insert after release");
    assert_eq!(all_rows(&store).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_sharing_one_file_partition_their_claims() {
    const ROWS: u128 = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let stores: Vec<Arc<SqliteStore>> = (0..3)
        .map(|_| Arc::new(SqliteStore::open(&path).expect("open")))
        .collect();
    for n in 1..=ROWS {
        stores[(n % 3) as usize]
            .insert(new_dispatch(n))
            .await
            .expect("insert");
    }
    let tasks: Vec<_> = (0..6)
        .map(|k| {
            let store = Arc::clone(&stores[k % 3]);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim(claim_params(&format!("n{k}"), 5))
                        .await
                        .expect("claim");
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.iter().map(|c| c.id()));
                }
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        for id in t.await.expect("task") {
            assert!(seen.insert(id), "{id} claimed twice");
        }
    }
    assert_eq!(seen.len(), ROWS as usize);
}

/// A toy codec: stores args as the reversed JSON text, so the plaintext never hits the file.
#[derive(Debug)]
struct Reversed;

impl ArgsCodec for Reversed {
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError> {
        let text =
            serde_json::to_string(args).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        Ok(serde_json::json!({ "sealed": text.chars().rev().collect::<String>() }))
    }

    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError> {
        let sealed = stored["sealed"]
            .as_str()
            .ok_or_else(|| StoreError::Backend("not sealed".into()))?;
        let text: String = sealed.chars().rev().collect();
        serde_json::from_str(&text).map_err(|e| StoreError::Backend(Box::new(e)))
    }
}

#[tokio::test]
async fn the_args_codec_is_applied_on_write_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = SqliteOptions::new()
        .args_codec(Arc::new(Reversed))
        .open(&path)
        .expect("open");
    let secret = serde_json::json!({ "token": "hunter2-secret" });
    let new = NewDispatch {
        args: secret.clone(),
        ..new_dispatch(1)
    };
    let d = store.insert(new.clone()).await.expect("insert");
    assert_eq!(d.args, secret);
    assert_eq!(
        store.insert(new).await.expect("idempotent insert"),
        d,
        "idempotency compares decoded args"
    );
    assert_eq!(
        store.get(d.id).await.expect("get").expect("row").args,
        secret
    );
    let claimed = store.claim(claim_params("n1", 1)).await.expect("claim");
    assert_eq!(claimed[0].dispatch().args, secret);

    let raw: String = Connection::open(&path)
        .expect("foreign connection")
        .query_row("SELECT args FROM dispatch", [], |r| r.get(0))
        .expect("raw args");
    assert!(!raw.contains("hunter2"), "plaintext at rest: {raw}");
    assert!(raw.contains("sealed"));
}

#[tokio::test]
async fn close_stops_the_writer_and_closes_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = SqliteStore::open(&path).expect("open");
    store.insert(new_dispatch(1)).await.expect("insert");
    let wal = dir.path().join("dispatch.db-wal");
    assert!(wal.exists(), "WAL mode keeps a -wal file while open");
    store.close().await;
    // The last connection to close checkpoints and removes the WAL: proof the writer thread
    // has finished and closed its connection by the time `close` returns.
    assert!(
        !wal.exists(),
        "close returned before the writer closed the database"
    );
    assert_eq!(raw_count(&path), 1);
}

/// Dropping a store does not wait for its writer thread: on a current-thread runtime, with a
/// write queued behind a foreign lock the writer waits out for up to its busy timeout, the drop
/// returns at once (the old join stalled the runtime's only thread that long), and the queued
/// write still lands once the lock is gone.
#[test]
fn dropping_a_store_with_queued_work_returns_at_once_and_the_work_lands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = SqliteOptions::new()
            .busy_timeout(Duration::from_secs(20))
            .open(&path)
            .expect("open");
        store.insert(new_dispatch(1)).await.expect("insert");
        let foreign = Connection::open(&path).expect("foreign connection");
        foreign
            .execute_batch("BEGIN IMMEDIATE")
            .expect("foreign write lock");
        // Polled once, each insert is queued for the writer (which blocks on the lock); the
        // futures are then dropped, so only the queued jobs remain.
        for n in 2..=4 {
            let mut insert = Box::pin(store.insert(new_dispatch(n)));
            assert!(futures::poll!(insert.as_mut()).is_pending());
        }
        let started = std::time::Instant::now();
        drop(store);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop waited {:?} for the writer",
            started.elapsed()
        );
        foreign.execute_batch("ROLLBACK").expect("release the lock");
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while raw_count(&path) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued writes never landed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guard that refuses what `fsm::apply` allows on the row as read back (here a foreign
/// trigger swallows every update) is a defect, not a race: `Backend`, not retryable, as
/// Postgres reports it.
#[tokio::test]
async fn a_guard_that_refuses_a_legal_transition_is_a_backend_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let store = SqliteStore::open(&path).expect("open");
    store.insert(new_dispatch(1)).await.expect("insert");
    let held = store
        .claim(claim_params("n1", 1))
        .await
        .expect("claim")
        .pop()
        .expect("one row");
    Connection::open(&path)
        .expect("foreign connection")
        .execute_batch(
            "CREATE TRIGGER swallow BEFORE UPDATE ON dispatch BEGIN SELECT RAISE(IGNORE); END",
        )
        .expect("trigger");
    let err = store
        .finish(
            held,
            broker_dispatch::store::FinishParams {
                outcome: broker_dispatch::store::Outcome::Complete(serde_json::json!(1)),
                now: Some(Timestamp::from_micros(T0 + 2_000_000)),
            },
        )
        .await
        .expect_err("the swallowed update cannot succeed");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(!err.is_retryable());
}

/// `open("")` would be SQLite's private temporary database and `":memory:"` an in-memory one:
/// a caller naming a file gets neither silently.
#[test]
fn an_empty_or_memory_path_is_invalid_input() {
    for path in ["", ":memory:"] {
        match SqliteStore::open(path) {
            Err(StoreError::InvalidInput(_)) => {}
            other => panic!("{path:?}: expected InvalidInput, got {other:?}"),
        }
    }
}

/// Another application's SQLite file is refused before anything is written to it, whether it
/// has no `schema_version` table, one of another shape, or one of ours without our tables: the
/// file stays byte for byte as it was (in particular, not switched to WAL), read-write or
/// read-only.
#[test]
fn a_foreign_sqlite_file_is_refused_and_left_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schemas = [
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); \
         INSERT INTO notes (body) VALUES ('keep me')",
        "CREATE TABLE schema_version (version TEXT NOT NULL, note TEXT); \
         INSERT INTO schema_version VALUES ('v9', 'theirs')",
        "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY, \
           applied_at INTEGER NOT NULL); \
         INSERT INTO schema_version VALUES (1, 0); \
         CREATE TABLE accounts (id INTEGER PRIMARY KEY)",
    ];
    for (i, schema) in schemas.iter().enumerate() {
        let path = dir.path().join(format!("foreign-{i}.db"));
        Connection::open(&path)
            .expect("foreign connection")
            .execute_batch(schema)
            .expect("foreign schema");
        let before = std::fs::read(&path).expect("read");
        for read_only in [false, true] {
            match SqliteOptions::new().read_only(read_only).open(&path) {
                Err(StoreError::InvalidInput(_)) => {}
                other => {
                    panic!("{schema} (read_only {read_only}): expected InvalidInput, got {other:?}")
                }
            }
            assert_eq!(
                std::fs::read(&path).expect("read"),
                before,
                "{schema}: the file was changed"
            );
            let mut wal = path.clone().into_os_string();
            wal.push("-wal");
            assert!(!Path::new(&wal).exists(), "{schema}: a WAL file appeared");
        }
    }
}

/// A codec that cannot decode one row's args (a rotated key, say): `{"poison": true}`.
#[derive(Debug)]
struct PoisonOnRead;

impl ArgsCodec for PoisonOnRead {
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError> {
        Ok(args.clone())
    }

    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError> {
        if stored["poison"] == serde_json::json!(true) {
            return Err(StoreError::Backend("cannot decrypt these args".into()));
        }
        Ok(stored)
    }
}

/// One row a claim cannot read back never poisons the broker's others: the claim returns the
/// rest, quarantines that one as `Failed(Corrupt)` in the same transaction (it is never left
/// `in_progress`), and reads (`get`, `list`) still show it, args as stored.
#[tokio::test]
async fn an_undecodable_row_is_quarantined_and_the_rest_of_the_broker_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteOptions::new()
        .args_codec(Arc::new(PoisonOnRead))
        .open(db_path(&dir))
        .expect("open");
    for n in 1..=5u128 {
        let mut new = new_dispatch(n);
        if n == 3 {
            new.args = serde_json::json!({ "poison": true });
        }
        store.insert(new).await.expect("insert");
    }
    let claimed = store.claim(claim_params("n1", 10)).await.expect("claim");
    let ids: Vec<u128> = claimed.iter().map(|c| c.id().as_uuid().as_u128()).collect();
    assert_eq!(ids, vec![1, 2, 4, 5]);
    let rows = all_rows(&store).await;
    let poisoned = rows
        .iter()
        .find(|d| d.id.as_uuid().as_u128() == 3)
        .expect("still listed");
    assert_eq!(poisoned.state, broker_dispatch::fsm::DispatchState::Failed);
    assert!(
        matches!(
            poisoned.failure,
            Some(broker_dispatch::fsm::FailReason::Corrupt(_))
        ),
        "{poisoned:?}"
    );
    assert_eq!(poisoned.args, serde_json::json!({ "poison": true }));
    assert!(store
        .claim(claim_params("n1", 10))
        .await
        .expect("claim again")
        .is_empty());
}
