//! [`SqliteStore`]: the embedded default store, one SQLite file (or an in-memory database).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction,
    TransactionBehavior,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    batch_failure, check_limit, system_now, ArgsCodec, CancelParams, ClaimParams, Claimed,
    ConnectOutcome, ConnectParams, DisconnectParams, FinishParams, HeartbeatParams, ListFilter,
    NewDispatch, Outcome, Store, SweepParams, SweepReport, TouchParams,
};
use crate::error::{BoxError, StoreError};
use crate::fsm::{
    self, Affinity, Attempt, BrokerId, ConnectDecision, Dispatch, DispatchId, DispatchState, Event,
    FailReason, NodeId, SessionId, Timestamp,
};

/// The migrations, in order; the version of each is its position plus one.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_init.sql"),
    include_str!("migrations/sqlite/0002_narrow_lease_index.sql"),
    include_str!("migrations/sqlite/0003_keys_and_hand_backs.sql"),
    include_str!("migrations/sqlite/0004_cancel_requests.sql"),
];

/// The newest schema version this build knows.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The column list every dispatch query selects or returns, in [`RawDispatch::from_row`] order.
macro_rules! dispatch_cols {
    () => {
        "id, broker, op, args, state, attempt, max_attempts, claimed_by, lease_until, \
         available_at, deadline, result, failure_kind, failure_message, progress, \
         idempotency_key, created_at, updated_at, key, released"
    };
}

/// The guard of [`Dispatch::is_claimable`] at `?2` = now (the fencing token must not wrap;
/// `attempt - released` is the executions begun).
macro_rules! claimable_guard {
    () => {
        "state IN ('pending', 'in_progress') AND failure_kind IS NULL \
         AND (deadline IS NULL OR deadline > ?2) \
         AND attempt < 4294967295 AND attempt - released < max_attempts \
         AND ((state = 'pending' AND available_at <= ?2) \
           OR (state = 'in_progress' AND lease_until <= ?2))"
    };
}

/// The claim: one statement, oldest first, guarded by [`Dispatch::is_claimable`] and, for a
/// keyed row, by [`fsm::blocks`]: no other live row of its key is held, or older and able to
/// run (not [`Dispatch::is_dead`]). The subquery reads the rows as they were before the
/// statement, so a claim takes at most the first row of each key. A cancel request is tested
/// as `failure_kind IS NOT NULL`, never `= 'cancelled'`: inside the `NOT (…)` a NULL
/// comparison would make the blocking row look dead.
/// `?1` broker, `?2` now, `?3` node, `?4` lease end, `?5` limit.
const CLAIM_SQL: &str = concat!(
    "UPDATE dispatch SET state = 'in_progress', attempt = attempt + 1, \
     claimed_by = ?3, lease_until = ?4, updated_at = ?2 \
     WHERE id IN (SELECT id FROM dispatch AS c WHERE broker = ?1 AND ",
    claimable_guard!(),
    " AND (c.key IS NULL OR NOT EXISTS (SELECT 1 FROM dispatch AS o \
       WHERE o.broker = c.broker AND o.key = c.key AND o.id <> c.id \
         AND o.state IN ('pending', 'in_progress') \
         AND ((o.state = 'in_progress' AND o.lease_until > ?2) \
           OR ((o.created_at < c.created_at OR (o.created_at = c.created_at AND o.id < c.id)) \
             AND NOT ((o.deadline IS NOT NULL AND o.deadline <= ?2 \
                       AND (o.state = 'pending' OR o.lease_until <= ?2)) \
                   OR (o.state = 'in_progress' AND o.lease_until <= ?2 \
                       AND (o.attempt - o.released >= o.max_attempts \
                            OR o.failure_kind IS NOT NULL))))))) \
     ORDER BY created_at, id LIMIT ?5) RETURNING ",
    dispatch_cols!()
);

/// Sweep, expire step (`Event::Expire`'s guard). `?1` limit, `?2` now.
///
/// The sweep statements sort by `+id`: the unary plus stops SQLite from walking the whole
/// table in id order to skip the sort; the few due rows come from the partial index instead.
const EXPIRE_SQL: &str = "UPDATE dispatch SET state = 'failed', failure_kind = 'expired', \
     failure_message = NULL, lease_until = NULL, updated_at = ?2 \
     WHERE id IN (SELECT id FROM dispatch \
       WHERE state IN ('pending', 'in_progress') AND deadline <= ?2 \
       AND (state = 'pending' OR lease_until <= ?2) ORDER BY +id LIMIT ?1) \
     RETURNING id";

/// Sweep, exhaust step (`Event::Exhaust`'s guard: no execution left, or a cancel requested).
/// `?1` limit, `?2` now. The two terms are whole conjunctions, so each can use its own partial
/// index.
const EXHAUST_SQL: &str = "UPDATE dispatch SET state = 'failed', \
     failure_kind = CASE WHEN failure_kind = 'cancelled' THEN 'cancelled' \
       ELSE 'attempts_exhausted' END, \
     failure_message = NULL, lease_until = NULL, updated_at = ?2 \
     WHERE id IN (SELECT id FROM dispatch \
       WHERE (state = 'in_progress' AND lease_until <= ?2 \
         AND attempt >= max_attempts AND attempt - released >= max_attempts) \
       OR (state = 'in_progress' AND failure_kind = 'cancelled' AND lease_until <= ?2) \
       ORDER BY +id LIMIT ?1) \
     RETURNING id";

/// Sweep, the brokers with claimable work. `?1` limit, `?2` now.
const CLAIMABLE_BROKERS_SQL: &str = concat!(
    "SELECT DISTINCT broker FROM dispatch WHERE ",
    claimable_guard!(),
    " ORDER BY broker LIMIT ?1"
);

/// Sweep, gauges: how many rows are pending and when the oldest was written.
const PENDING_SQL: &str = "SELECT count(*), min(created_at) FROM dispatch \
     WHERE state IN ('pending', 'in_progress') AND state = 'pending'";

/// Sweep, purge step: terminal rows last updated before the cutoff. `?1` limit, `?2` cutoff.
const PURGE_SQL: &str = "DELETE FROM dispatch WHERE id IN (SELECT id FROM dispatch \
     WHERE state IN ('done', 'failed') AND updated_at < ?2 ORDER BY +id LIMIT ?1)";

/// How to open a [`SqliteStore`]: busy timeout, args codec, read-only.
///
/// ```no_run
/// # fn main() -> Result<(), broker_dispatch::StoreError> {
/// use std::time::Duration;
/// use broker_dispatch::store::SqliteOptions;
///
/// let store = SqliteOptions::new()
///     .busy_timeout(Duration::from_secs(2))
///     .open("dispatch.db")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    busy_timeout: Duration,
    args_codec: Option<Arc<dyn ArgsCodec>>,
    read_only: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Self::DEFAULT_BUSY_TIMEOUT,
            args_codec: None,
            read_only: false,
        }
    }
}

impl SqliteOptions {
    /// The default busy timeout: how long a call waits for another connection's write lock.
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

    /// The defaults: a 5 s busy timeout, args stored as given, read-write.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a call waits for a lock held by another connection before it fails with
    /// [`StoreError::Unavailable`].
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Encodes args on write and decodes them on read (to encrypt or redact them at rest).
    pub fn args_codec(mut self, codec: Arc<dyn ArgsCodec>) -> Self {
        self.args_codec = Some(codec);
        self
    }

    /// Opens the file read-only (for inspection tools): reads work, every write fails with
    /// [`StoreError::Backend`], and the schema must already be current (nothing is migrated).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Opens (creating if needed) the database file at `path` and migrates it.
    ///
    /// A SQLite database that holds tables but not this crate's (another application's file) is
    /// refused before anything is written to it: its journal mode is left as it was.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for an empty path or `":memory:"`, or a SQLite database
    /// that is not this crate's (it is left byte for byte as it was);
    /// [`StoreError::SchemaTooNew`] if a newer build wrote the schema; [`StoreError::Backend`] if
    /// the file is not a SQLite database or cannot be opened or written;
    /// [`StoreError::Unavailable`] if another connection held the write lock for longer than
    /// the busy timeout.
    pub fn open(self, path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        // SQLite reads "" as a private temporary database and ":memory:" as an in-memory one:
        // neither is durable, which a caller naming a file cannot have meant.
        if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
            return Err(StoreError::invalid(format!(
                "{path:?} names no database file (use open_in_memory for a private database)"
            )));
        }
        let flags = if self.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&path, flags).map_err(db_err)?;
        SqliteStore::start(conn, self, Some(path))
    }

    /// Opens a private in-memory database (one connection: nothing is shared with other
    /// stores, nothing survives the store).
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if SQLite cannot allocate it.
    pub fn open_in_memory(self) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory().map_err(db_err)?;
        SqliteStore::start(conn, self, None)
    }
}

/// The SQLite store: durable dispatches in one file, shared safely by several processes.
///
/// All database work runs on one writer thread owned by the store. Dropping the store does not
/// wait for it: the thread finishes the calls already queued, then closes the database, on its
/// own; [`close`](SqliteStore::close) waits for that.
///
/// # Design
///
/// - **One writer thread.** SQLite admits one writer at a time; a pool of writers would only
///   queue on the file lock. The store owns one connection on a dedicated thread that receives
///   jobs over a bounded channel ([`SqliteStore::QUEUE`] jobs; a caller finding it full waits
///   for room, it does not fail) and answers each over a oneshot, so async callers never block
///   a runtime worker on file I/O or on the busy timeout.
/// - **Reads run on the same thread.** Every statement here is a short indexed lookup, so a
///   separate reader connection would buy little while costing a second page cache and the
///   chance of reading a snapshot older than the caller's own last write. Other processes
///   sharing the file read concurrently anyway (WAL).
/// - **Every mutation is one `BEGIN IMMEDIATE` transaction**: the write lock is taken up front, so
///   a transaction never fails half-way on a lock upgrade, and several processes may share one
///   file (WAL, `synchronous=NORMAL`, busy timeout). A lock held longer than the busy timeout
///   surfaces as [`StoreError::Unavailable`].
/// - **The guards live in SQL.** The claim is one `UPDATE … WHERE id IN (SELECT … ORDER BY
///   created_at, id LIMIT n) RETURNING …` encoding [`Dispatch::is_claimable`]; every other
///   transition is an `UPDATE … WHERE id = ? AND state = … AND attempt = ?`. When a guard fails,
///   the row is re-read in the same transaction and [`fsm::apply`] names the error, so the errors
///   are exactly the state machine's.
/// - **Schema**: embedded migrations (`src/store/migrations/sqlite/`), applied idempotently by
///   [`SqliteStore::open`] and [`SqliteStore::migrate`], versioned in a `schema_version` table.
///   Ids are stored as the 16 UUID bytes, timestamps as INTEGER microseconds, JSON as TEXT.
///
/// # Cancel safety
///
/// Every call is one job on the writer thread. Dropping a call's future after it was queued does
/// not stop the job: its transaction commits or rolls back in full, and only the answer is lost
/// (a dropped `claim` may leave rows claimed until their lease runs out).
#[derive(Debug)]
pub struct SqliteStore {
    jobs: Option<mpsc::Sender<Job>>,
    /// Resolves once the writer thread has closed the database and ended.
    closed: Option<oneshot::Receiver<()>>,
    path: Option<PathBuf>,
}

/// A unit of work for the writer thread; it answers its caller itself.
type Job = Box<dyn FnOnce(&mut Writer) + Send>;

/// What the writer thread owns.
struct Writer {
    conn: Connection,
    codec: Option<Arc<dyn ArgsCodec>>,
}

impl SqliteStore {
    /// The newest schema version this build knows (the `schema_version` table's latest row).
    pub const SCHEMA_VERSION: i64 = SCHEMA_VERSION;

    /// How many calls may wait for the writer thread at once; a caller finding the queue full
    /// waits for room.
    pub const QUEUE: usize = 1024;

    /// Closes the store and waits until the writer thread has finished the calls already
    /// queued and closed the database (dropping the store does the same without waiting).
    /// Use it before deleting or moving the file.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not stop the writer from finishing and closing; only the
    /// wait is lost.
    pub async fn close(mut self) {
        drop(self.jobs.take());
        if let Some(closed) = self.closed.take() {
            // An error means the thread ended without saying so (it panicked): closed too.
            let _ = closed.await;
        }
    }

    /// Opens (creating if needed) the database file at `path` with default options.
    ///
    /// # Errors
    ///
    /// As [`SqliteOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        SqliteOptions::new().open(path)
    }

    /// Opens a private in-memory database with default options.
    ///
    /// # Errors
    ///
    /// As [`SqliteOptions::open_in_memory`].
    pub fn open_in_memory() -> Result<Self, StoreError> {
        SqliteOptions::new().open_in_memory()
    }

    /// The options builder.
    pub fn options() -> SqliteOptions {
        SqliteOptions::new()
    }

    /// The database file, or `None` for an in-memory store.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Applies any migrations this build knows and the database lacks. [`open`](Self::open)
    /// already did; call it again after another process may have rolled the file back.
    ///
    /// # Errors
    ///
    /// [`StoreError::SchemaTooNew`] if a newer build wrote the schema; otherwise as any write.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not stop the migration; it completes or rolls back in full.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.call(|w| migrate(&mut w.conn)).await
    }

    /// Lists affinity rows by ascending broker id, one page at a time: those whose broker is
    /// strictly greater than `after`, at most `limit` (1..=[`MAX_BATCH`](super::MAX_BATCH)).
    /// Released rows (no node) are included, since they keep the `connected_at` high-water
    /// mark. With [`Store::list`] for the dispatches, this is everything the store holds, field
    /// for field (what a migration to another store copies).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a limit out of range; otherwise as any read.
    pub async fn list_affinity(
        &self,
        after: Option<BrokerId>,
        limit: u32,
    ) -> Result<Vec<Affinity>, StoreError> {
        check_limit(limit)?;
        self.call(move |w| {
            let brokers = w
                .conn
                .prepare_cached(
                    "SELECT broker FROM affinity WHERE (?1 IS NULL OR broker > ?1) \
                     ORDER BY broker LIMIT ?2",
                )
                .map_err(db_err)?
                .query_map(params![after.as_ref().map(BrokerId::as_str), limit], |r| {
                    r.get::<_, String>(0)
                })
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            let mut rows = Vec::with_capacity(brokers.len());
            for b in brokers {
                let broker = BrokerId::new(b).map_err(|_| corrupt("bad broker id"))?;
                rows.extend(read_affinity(&w.conn, &broker)?);
            }
            Ok(rows)
        })
        .await
    }

    fn start(
        mut conn: Connection,
        options: SqliteOptions,
        path: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        conn.busy_timeout(options.busy_timeout).map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        // Before anything is written: a foreign database is refused as it is.
        check_ours(&conn)?;
        if options.read_only {
            check_schema(&conn)?;
        } else {
            // The first statement writing to the file.
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(db_err)?;
            migrate(&mut conn)?;
        }
        let (tx, mut rx) = mpsc::channel::<Job>(Self::QUEUE);
        let (closed_tx, closed) = oneshot::channel();
        let mut writer = Writer {
            conn,
            codec: options.args_codec,
        };
        // Detached: nothing joins the thread (a drop on a runtime thread must not block on
        // the queued work); it ends when the last sender is gone and the queue is empty.
        std::thread::Builder::new()
            .name("broker-dispatch-sqlite".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    // A panicking job drops its answer channel (its caller sees an error) and
                    // rolls back its transaction; the writer keeps serving the others.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut writer)));
                }
                // Close the database before telling `close` it is closed.
                drop(writer);
                let _ = closed_tx.send(());
            })
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Ok(SqliteStore {
            jobs: Some(tx),
            closed: Some(closed),
            path,
        })
    }

    /// Runs `f` on the writer thread and returns its answer.
    async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<R, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |w| {
            // The caller may have gone away (a dropped future); the work is done regardless.
            let _ = answer.send(f(w));
        });
        self.jobs
            .as_ref()
            .ok_or_else(writer_gone)?
            .send(job)
            .await
            .map_err(|_| writer_gone())?;
        answered.await.map_err(|_| writer_gone())?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once the queued jobs are done. No join:
        // the thread may be busy for a whole busy timeout per queued job, and a drop on an
        // async runtime's thread must not stall that thread meanwhile (`close` waits, async).
        drop(self.jobs.take());
    }
}

fn writer_gone() -> StoreError {
    StoreError::Backend("the sqlite writer thread has stopped".into())
}

/// Maps a driver error: lock contention is retryable, everything else is a backend failure.
fn db_err(e: rusqlite::Error) -> StoreError {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    if busy {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Backend(Box::new(e))
    }
}

/// Fails a claimed row that cannot be decoded (`Failed(Corrupt)`), in the claim's transaction.
/// The reason names what could not be read, never the row's content.
fn quarantine(
    tx: &Connection,
    id: &[u8],
    error: &StoreError,
    now: Timestamp,
) -> Result<(), StoreError> {
    let reason = error.to_string();
    tracing::error!(id = ?Uuid::from_slice(id).ok(), %reason, "a claimed row cannot be read back; quarantined as failed: corrupt");
    metrics::counter!("broker_dispatch_corrupt_rows_total").increment(1);
    tx.prepare_cached(
        "UPDATE dispatch SET state = 'failed', failure_kind = 'corrupt', failure_message = ?2, \
         lease_until = NULL, updated_at = ?3 WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![id, reason, now.as_micros()])
    .map_err(db_err)?;
    Ok(())
}

fn corrupt(what: impl Into<String>) -> StoreError {
    let e: BoxError = format!("corrupt row: {}", what.into()).into();
    StoreError::Backend(e)
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn immediate(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

fn schema_version(conn: &Connection) -> Result<i64, StoreError> {
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if !exists {
        return Ok(0);
    }
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )
    .map_err(db_err)
}

/// Whether the database is this crate's, or empty (a new file): no tables at all, or a
/// `schema_version` table of this crate's shape with a version recorded, and the `dispatch` and
/// `affinity` tables. Reads only (a file that is not a database fails here with
/// `Backend`), so a foreign file is refused unchanged.
fn check_ours(conn: &Connection) -> Result<(), StoreError> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(db_err)?;
    if tables.is_empty() {
        return Ok(());
    }
    let foreign = || {
        StoreError::invalid(
            "the database holds tables that are not broker-dispatch's; refusing to touch it",
        )
    };
    if !tables.iter().any(|t| t == "schema_version") {
        return Err(foreign());
    }
    let columns: Vec<(String, String)> = conn
        .prepare("SELECT name, upper(type) FROM pragma_table_info('schema_version') ORDER BY cid")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(db_err)?;
    let shape = [("version", "INTEGER"), ("applied_at", "INTEGER")];
    let same_shape = columns.len() == shape.len()
        && columns
            .iter()
            .zip(shape)
            .all(|((name, ty), (n, t))| name == n && ty == t);
    if !same_shape {
        return Err(foreign());
    }
    // Our migrations create `schema_version` and record a version in one transaction, so a
    // database of ours with tables always has both, and the tables of version 1.
    let has = |name: &str| tables.iter().any(|t| t == name);
    if schema_version(conn)? < 1 || !(has("dispatch") && has("affinity")) {
        return Err(foreign());
    }
    Ok(())
}

fn check_too_new(found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// A read-only store cannot migrate: the schema must already be this build's.
fn check_schema(conn: &Connection) -> Result<(), StoreError> {
    let found = schema_version(conn)?;
    check_too_new(found)?;
    if found < SCHEMA_VERSION {
        return Err(StoreError::invalid(format!(
            "read-only database is at schema version {found}; open it read-write once to migrate it to {SCHEMA_VERSION}"
        )));
    }
    Ok(())
}

/// Applies the missing migrations in one immediate transaction, so concurrent openers serialise
/// and each migration runs exactly once.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = immediate(conn)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
    )
    .map_err(db_err)?;
    let found = schema_version(&tx)?;
    check_too_new(found)?;
    let now = system_now().as_micros();
    for (version, sql) in (1..).zip(MIGRATIONS) {
        if version > found {
            tx.execute_batch(sql).map_err(db_err)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                params![version, now],
            )
            .map_err(db_err)?;
        }
    }
    tx.commit().map_err(db_err)
}

fn id_bytes(id: DispatchId) -> [u8; 16] {
    *id.as_uuid().as_bytes()
}

/// A dispatch row as SQLite holds it, before validation and decoding.
struct RawDispatch {
    id: Vec<u8>,
    broker: String,
    op: String,
    args: String,
    state: String,
    attempt: i64,
    max_attempts: i64,
    claimed_by: Option<String>,
    lease_until: Option<i64>,
    available_at: i64,
    deadline: Option<i64>,
    result: Option<String>,
    failure_kind: Option<String>,
    failure_message: Option<String>,
    progress: Option<String>,
    idempotency_key: Option<String>,
    created_at: i64,
    updated_at: i64,
    key: Option<String>,
    released: i64,
}

impl RawDispatch {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawDispatch {
            id: r.get(0)?,
            broker: r.get(1)?,
            op: r.get(2)?,
            args: r.get(3)?,
            state: r.get(4)?,
            attempt: r.get(5)?,
            max_attempts: r.get(6)?,
            claimed_by: r.get(7)?,
            lease_until: r.get(8)?,
            available_at: r.get(9)?,
            deadline: r.get(10)?,
            result: r.get(11)?,
            failure_kind: r.get(12)?,
            failure_message: r.get(13)?,
            progress: r.get(14)?,
            idempotency_key: r.get(15)?,
            created_at: r.get(16)?,
            updated_at: r.get(17)?,
            key: r.get(18)?,
            released: r.get(19)?,
        })
    }

    fn into_dispatch(self, codec: Option<&dyn ArgsCodec>) -> Result<Dispatch, StoreError> {
        self.decode(codec, false)
    }

    /// For reads (`get`, `list`): args the codec cannot decode come back as stored, so one such
    /// row neither hides its state nor breaks a listing. Only a claim, which hands args to an
    /// executor, insists on decoding them (and quarantines the row when it cannot).
    fn into_dispatch_for_read(self, codec: Option<&dyn ArgsCodec>) -> Result<Dispatch, StoreError> {
        self.decode(codec, true)
    }

    fn decode(self, codec: Option<&dyn ArgsCodec>, lenient: bool) -> Result<Dispatch, StoreError> {
        let id = Uuid::from_slice(&self.id).map_err(|_| corrupt("id is not 16 bytes"))?;
        let attempt =
            Attempt::try_from(self.attempt).map_err(|_| corrupt("attempt out of range"))?;
        let max_attempts =
            u32::try_from(self.max_attempts).map_err(|_| corrupt("max_attempts out of range"))?;
        let state: DispatchState = self.state.parse().map_err(|_| corrupt("unknown state"))?;
        let failure = self
            .failure_kind
            .map(|k| FailReason::from_parts(&k, self.failure_message))
            .transpose()
            .map_err(|_| corrupt("unknown failure kind"))?;
        let stored: serde_json::Value = serde_json::from_str(&self.args).map_err(json_err)?;
        let args = match codec {
            Some(c) if lenient => c.decode(stored.clone()).unwrap_or(stored),
            Some(c) => c.decode(stored)?,
            None => stored,
        };
        Ok(Dispatch {
            id: DispatchId::from_uuid(id),
            broker: BrokerId::new(self.broker).map_err(|_| corrupt("bad broker id"))?,
            op: self.op,
            args,
            state,
            attempt,
            max_attempts,
            claimed_by: self
                .claimed_by
                .map(NodeId::new)
                .transpose()
                .map_err(|_| corrupt("bad node id"))?,
            lease_until: self.lease_until.map(Timestamp::from_micros),
            available_at: Timestamp::from_micros(self.available_at),
            deadline: self.deadline.map(Timestamp::from_micros),
            result: self
                .result
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(json_err)?,
            failure,
            progress: self
                .progress
                .map(|p| serde_json::from_str(&p))
                .transpose()
                .map_err(json_err)?,
            idempotency_key: self.idempotency_key,
            key: self.key,
            released: u32::try_from(self.released).map_err(|_| corrupt("released out of range"))?,
            created_at: Timestamp::from_micros(self.created_at),
            updated_at: Timestamp::from_micros(self.updated_at),
        })
    }
}

impl Writer {
    fn codec(&self) -> Option<&dyn ArgsCodec> {
        self.codec.as_deref()
    }
}

fn read_dispatch(conn: &Connection, id: DispatchId) -> Result<Option<RawDispatch>, StoreError> {
    let mut st = conn
        .prepare_cached(concat!(
            "SELECT ",
            dispatch_cols!(),
            " FROM dispatch WHERE id = ?1"
        ))
        .map_err(db_err)?;
    st.query_row([&id_bytes(id)[..]], RawDispatch::from_row)
        .optional()
        .map_err(db_err)
}

/// Runs one guarded transition in its own immediate transaction: `sql` is an
/// `UPDATE … WHERE id = ?1 AND <guard> RETURNING`. See [`guarded_in`].
fn guarded<P: rusqlite::Params>(
    w: &mut Writer,
    id: DispatchId,
    event: Event,
    sql: &str,
    params: P,
) -> Result<Dispatch, StoreError> {
    let codec = w.codec.clone();
    let tx = immediate(&mut w.conn)?;
    let raw = guarded_in(&tx, codec.as_deref(), id, event, sql, params)?;
    tx.commit().map_err(db_err)?;
    raw.into_dispatch(codec.as_deref())
}

/// Runs one guarded transition inside the caller's transaction. When the guard refuses, the
/// row is re-read in the same transaction and [`fsm::apply`] names the error, so a refusal is
/// exactly the state machine's (and changed nothing).
fn guarded_in<P: rusqlite::Params>(
    tx: &Connection,
    codec: Option<&dyn ArgsCodec>,
    id: DispatchId,
    event: Event,
    sql: &str,
    params: P,
) -> Result<RawDispatch, StoreError> {
    let updated = tx
        .prepare_cached(sql)
        .map_err(db_err)?
        .query_row(params, RawDispatch::from_row)
        .optional()
        .map_err(db_err)?;
    match updated {
        Some(raw) => Ok(raw),
        None => {
            let current = read_dispatch(tx, id)?
                .ok_or(StoreError::NotFound(id))?
                .into_dispatch(codec)?;
            Err(match fsm::apply(&current, event) {
                Err(e) => e.into(),
                Ok(_) => StoreError::Backend(
                    format!("sqlite guard refused a legal transition of {id}").into(),
                ),
            })
        }
    }
}

/// One holder's `finish` inside the caller's transaction.
fn finish_in(
    tx: &Connection,
    codec: Option<&dyn ArgsCodec>,
    id: DispatchId,
    attempt: Attempt,
    p: FinishParams,
) -> Result<RawDispatch, StoreError> {
    let now = p.now.unwrap_or_else(system_now);
    let ts = now.as_micros();
    let key = &id_bytes(id)[..];
    let attempt_param = i64::from(attempt);
    match p.outcome {
        Outcome::Complete(result) => {
            let text = serde_json::to_string(&result).map_err(json_err)?;
            guarded_in(
                tx,
                codec,
                id,
                Event::Complete {
                    attempt,
                    now,
                    result,
                },
                concat!(
                    "UPDATE dispatch SET state = 'done', result = ?3, lease_until = NULL, \
                     failure_kind = NULL, failure_message = NULL, \
                     updated_at = ?4 WHERE id = ?1 AND state = 'in_progress' \
                     AND attempt = ?2 RETURNING ",
                    dispatch_cols!()
                ),
                params![key, attempt_param, text, ts],
            )
        }
        Outcome::Fail(error) => guarded_in(
            tx,
            codec,
            id,
            Event::Fail {
                attempt,
                now,
                error: error.clone(),
            },
            concat!(
                "UPDATE dispatch SET state = 'failed', \
                 failure_kind = CASE WHEN failure_kind = 'cancelled' THEN 'cancelled' \
                   ELSE 'error' END, \
                 failure_message = CASE WHEN failure_kind = 'cancelled' THEN NULL ELSE ?3 END, \
                 lease_until = NULL, updated_at = ?4 \
                 WHERE id = ?1 AND state = 'in_progress' AND attempt = ?2 RETURNING ",
                dispatch_cols!()
            ),
            params![key, attempt_param, error, ts],
        ),
        Outcome::Retry { after } => {
            let at = now.saturating_add(after);
            guarded_in(
                tx,
                codec,
                id,
                Event::Retry { attempt, now, at },
                concat!(
                    "UPDATE dispatch SET \
                     state = CASE WHEN failure_kind = 'cancelled' THEN 'failed' \
                       ELSE 'pending' END, \
                     available_at = CASE WHEN failure_kind = 'cancelled' THEN available_at \
                       ELSE ?3 END, \
                     lease_until = NULL, updated_at = ?4 WHERE id = ?1 \
                     AND state = 'in_progress' AND attempt = ?2 \
                     AND (attempt - released < max_attempts OR failure_kind = 'cancelled') \
                     RETURNING ",
                    dispatch_cols!()
                ),
                params![key, attempt_param, at.as_micros(), ts],
            )
        }
        Outcome::Release => guarded_in(
            tx,
            codec,
            id,
            Event::Release { attempt, now },
            concat!(
                "UPDATE dispatch SET \
                 state = CASE WHEN failure_kind = 'cancelled' THEN 'failed' ELSE 'pending' END, \
                 available_at = CASE WHEN failure_kind = 'cancelled' THEN available_at \
                   ELSE ?3 END, \
                 released = CASE WHEN failure_kind = 'cancelled' THEN released \
                   ELSE released + 1 END, \
                 lease_until = NULL, updated_at = ?3 WHERE id = ?1 \
                 AND state = 'in_progress' AND attempt = ?2 RETURNING ",
                dispatch_cols!()
            ),
            params![key, attempt_param, ts],
        ),
        Outcome::Late => guarded_in(
            tx,
            codec,
            id,
            Event::Late { attempt, now },
            concat!(
                "UPDATE dispatch SET state = 'failed', \
                 failure_kind = CASE WHEN failure_kind = 'cancelled' THEN 'cancelled' \
                   ELSE 'expired' END, \
                 failure_message = NULL, lease_until = NULL, updated_at = ?3 WHERE id = ?1 \
                 AND state = 'in_progress' AND attempt = ?2 \
                 AND (deadline IS NOT NULL OR failure_kind = 'cancelled') RETURNING ",
                dispatch_cols!()
            ),
            params![key, attempt_param, ts],
        ),
    }
}

/// Most rows one batched finish statement carries; larger batches take several statements.
const FINISH_CHUNK: usize = 128;

/// The row counts batched finish statements are prepared for: a chunk is padded up to the
/// next one (with rows matching no id), so at most this many statements are ever cached.
const FINISH_SIZES: [usize; 3] = [8, 32, FINISH_CHUNK];

/// The batched finish for `rows` rows: each row of `v` is one entry (`id`, `attempt`, `kind`
/// 0 complete / 1 fail / 2 retry / 3 release / 4 late, `result`, `message`, `available_at`,
/// `now`), and the guard is [`finish_in`]'s for every kind: in progress, same attempt, for a
/// retry an execution left, for a late row a deadline.
fn finish_batch_sql(rows: usize) -> String {
    let mut sql = String::from(
        "WITH v(vid, vattempt, vkind, vresult, vmessage, vavailable, vnow) AS (VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?)");
    }
    sql.push_str(concat!(
        ") UPDATE dispatch SET \
         state = CASE WHEN v.vkind = 0 THEN 'done' \
           WHEN v.vkind IN (1, 4) OR dispatch.failure_kind = 'cancelled' THEN 'failed' \
           ELSE 'pending' END, \
         result = CASE WHEN v.vkind = 0 THEN v.vresult ELSE dispatch.result END, \
         failure_kind = CASE WHEN v.vkind = 0 THEN NULL \
           WHEN dispatch.failure_kind = 'cancelled' THEN 'cancelled' \
           WHEN v.vkind = 1 THEN 'error' WHEN v.vkind = 4 THEN 'expired' \
           ELSE dispatch.failure_kind END, \
         failure_message = CASE WHEN v.vkind = 0 THEN NULL \
           WHEN dispatch.failure_kind = 'cancelled' THEN NULL \
           WHEN v.vkind = 1 THEN v.vmessage ELSE dispatch.failure_message END, \
         available_at = CASE WHEN v.vkind IN (2, 3) AND dispatch.failure_kind IS NULL \
           THEN v.vavailable ELSE dispatch.available_at END, \
         released = CASE WHEN v.vkind = 3 AND dispatch.failure_kind IS NULL \
           THEN dispatch.released + 1 ELSE dispatch.released END, \
         lease_until = NULL, updated_at = v.vnow \
         FROM v WHERE dispatch.id = v.vid AND dispatch.state = 'in_progress' \
         AND dispatch.attempt = v.vattempt \
         AND (v.vkind <> 2 OR dispatch.failure_kind = 'cancelled' \
              OR dispatch.attempt - dispatch.released < dispatch.max_attempts) \
         AND (v.vkind <> 4 OR dispatch.failure_kind = 'cancelled' \
              OR dispatch.deadline IS NOT NULL) RETURNING ",
        dispatch_cols!()
    ));
    sql
}

/// Several holders' `finish` inside the caller's transaction, in as few statements as
/// possible, with results (in input order) exactly those of [`finish_in`] one entry at a time:
/// the entries a batched statement's guard refused go through [`finish_in`], which refuses
/// again (nothing changed them since) and names the error with [`fsm::apply`]. A batch naming
/// one id twice takes [`finish_in`] throughout, since one statement would apply an arbitrary
/// one of the two entries where the sequence applies the first and refuses the second.
fn finish_batch_in(
    tx: &Connection,
    codec: Option<&dyn ArgsCodec>,
    items: Vec<(DispatchId, Attempt, FinishParams)>,
) -> Result<Vec<Result<RawDispatch, StoreError>>, StoreError> {
    let mut ids: Vec<DispatchId> = items.iter().map(|i| i.0).collect();
    ids.sort_unstable();
    let distinct = ids.windows(2).all(|w| w[0] != w[1]);
    let mut out: Vec<Option<Result<RawDispatch, StoreError>>> = Vec::new();
    out.resize_with(items.len(), || None);
    if distinct {
        for (base, chunk) in (0..).step_by(FINISH_CHUNK).zip(items.chunks(FINISH_CHUNK)) {
            finish_chunk(tx, base, chunk, &mut out)?;
        }
    }
    let mut results = Vec::with_capacity(items.len());
    for ((id, attempt, p), done) in items.into_iter().zip(out) {
        match done {
            Some(r) => results.push(r),
            None => match finish_in(tx, codec, id, attempt, p) {
                Err(e @ (StoreError::Unavailable(_) | StoreError::Backend(_))) => return Err(e),
                r => results.push(r),
            },
        }
    }
    Ok(results)
}

/// One batched finish statement for `chunk` (entries `base..` of the batch, distinct ids):
/// stores each row it finished in `out`; the entries it refused stay `None`.
fn finish_chunk(
    tx: &Connection,
    base: usize,
    chunk: &[(DispatchId, Attempt, FinishParams)],
    out: &mut [Option<Result<RawDispatch, StoreError>>],
) -> Result<(), StoreError> {
    use rusqlite::types::Value;
    let rows = FINISH_SIZES
        .into_iter()
        .find(|&s| s >= chunk.len())
        .unwrap_or(FINISH_CHUNK);
    let mut values: Vec<Value> = Vec::with_capacity(rows * 7);
    let mut index = std::collections::HashMap::with_capacity(chunk.len());
    for (i, (id, attempt, p)) in chunk.iter().enumerate() {
        let now = p.now.unwrap_or_else(system_now);
        let (kind, result, message, available) = match &p.outcome {
            Outcome::Complete(result) => (
                0,
                Value::Text(serde_json::to_string(result).map_err(json_err)?),
                Value::Null,
                Value::Null,
            ),
            Outcome::Fail(error) => (1, Value::Null, Value::Text(error.clone()), Value::Null),
            Outcome::Retry { after } => (
                2,
                Value::Null,
                Value::Null,
                Value::Integer(now.saturating_add(*after).as_micros()),
            ),
            Outcome::Release => (3, Value::Null, Value::Null, Value::Integer(now.as_micros())),
            Outcome::Late => (4, Value::Null, Value::Null, Value::Null),
        };
        let key = id_bytes(*id);
        index.insert(key, base + i);
        values.extend([
            Value::Blob(key.to_vec()),
            Value::Integer(i64::from(*attempt)),
            Value::Integer(kind),
            result,
            message,
            available,
            Value::Integer(now.as_micros()),
        ]);
    }
    // Padding: rows whose NULL id joins nothing.
    values.resize(rows * 7, Value::Null);
    let mut st = tx.prepare_cached(&finish_batch_sql(rows)).map_err(db_err)?;
    let mut returned = st
        .query(rusqlite::params_from_iter(values))
        .map_err(db_err)?;
    while let Some(row) = returned.next().map_err(db_err)? {
        let raw = RawDispatch::from_row(row).map_err(db_err)?;
        let at = raw
            .id
            .as_slice()
            .try_into()
            .ok()
            .and_then(|k: [u8; 16]| index.get(&k).copied())
            .ok_or_else(|| corrupt("batched finish returned a row it was not given"))?;
        out[at] = Some(Ok(raw));
    }
    Ok(())
}

/// One idempotent insert inside the caller's transaction (`new` is validated).
fn insert_in(
    tx: &Connection,
    codec: Option<&dyn ArgsCodec>,
    new: NewDispatch,
) -> Result<Dispatch, StoreError> {
    let now = new.now.unwrap_or_else(system_now);
    let mut existing = read_dispatch(tx, new.id)?;
    if existing.is_none() {
        if let Some(key) = &new.idempotency_key {
            existing = tx
                .prepare_cached(concat!(
                    "SELECT ",
                    dispatch_cols!(),
                    " FROM dispatch WHERE idempotency_key = ?1"
                ))
                .map_err(db_err)?
                .query_row([key], RawDispatch::from_row)
                .optional()
                .map_err(db_err)?;
        }
    }
    if let Some(raw) = existing {
        let d = raw.into_dispatch(codec)?;
        return if new.same_payload(&d) {
            Ok(d)
        } else {
            Err(StoreError::Conflict(format!(
                "dispatch {} exists with a different payload",
                d.id
            )))
        };
    }
    let d = new.into_dispatch(now);
    let stored = match codec {
        Some(c) => c.encode(&d.args)?,
        None => d.args.clone(),
    };
    tx.prepare_cached(concat!(
        "INSERT INTO dispatch (",
        dispatch_cols!(),
        ") VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, NULL, NULL, ?7, ?8, NULL, NULL, \
         NULL, NULL, ?9, ?10, ?10, ?11, 0)"
    ))
    .map_err(db_err)?
    .execute(params![
        &id_bytes(d.id)[..],
        d.broker.as_str(),
        d.op,
        serde_json::to_string(&stored).map_err(json_err)?,
        i64::from(d.attempt),
        i64::from(d.max_attempts),
        d.available_at.as_micros(),
        d.deadline.map(Timestamp::as_micros),
        d.idempotency_key,
        d.created_at.as_micros(),
        d.key,
    ])
    .map_err(db_err)?;
    Ok(d)
}

fn read_affinity(conn: &Connection, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
    let raw = conn
        .prepare_cached(
            "SELECT node, session, connected_at, last_seen FROM affinity WHERE broker = ?1",
        )
        .map_err(db_err)?
        .query_row([broker.as_str()], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()
        .map_err(db_err)?;
    raw.map(|(node, session, connected_at, last_seen)| {
        Ok(Affinity {
            broker: broker.clone(),
            node: node
                .map(NodeId::new)
                .transpose()
                .map_err(|_| corrupt("bad node id"))?,
            session: SessionId::new(session).map_err(|_| corrupt("bad session id"))?,
            connected_at: Timestamp::from_micros(connected_at),
            last_seen: Timestamp::from_micros(last_seen),
        })
    })
    .transpose()
}

impl SqliteStore {
    /// [`Store::finish_many`] for entries whose outcomes passed [`super::check_outcome`].
    async fn finish_valid(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let n = batch.len();
        if n == 0 {
            return Vec::new();
        }
        let items: Vec<(DispatchId, Attempt, FinishParams)> = batch
            .into_iter()
            .map(|(c, p)| (c.id(), c.attempt(), p))
            .collect();
        let answer = self
            .call(move |w| {
                let codec = w.codec.clone();
                let tx = immediate(&mut w.conn)?;
                let raws = finish_batch_in(&tx, codec.as_deref(), items)?;
                tx.commit().map_err(db_err)?;
                Ok(raws
                    .into_iter()
                    .map(|r| r.and_then(|raw| raw.into_dispatch(codec.as_deref())))
                    .collect::<Vec<_>>())
            })
            .await;
        answer.unwrap_or_else(|e| batch_failure(&e, n))
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        new.validate()?;
        self.call(move |w| {
            let codec = w.codec.clone();
            let tx = immediate(&mut w.conn)?;
            let d = insert_in(&tx, codec.as_deref(), new)?;
            tx.commit().map_err(db_err)?;
            Ok(d)
        })
        .await
    }

    /// One immediate transaction for the batch: a conflict rolls every row back.
    async fn insert_many(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        for new in &batch {
            new.validate()?;
        }
        self.call(move |w| {
            let codec = w.codec.clone();
            let tx = immediate(&mut w.conn)?;
            let rows = batch
                .into_iter()
                .map(|new| insert_in(&tx, codec.as_deref(), new))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().map_err(db_err)?;
            Ok(rows)
        })
        .await
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        p.validate()?;
        let now = p.now.unwrap_or_else(system_now);
        let lease_until = now.saturating_add(p.lease);
        self.call(move |w| {
            let codec = w.codec.clone();
            let tx = immediate(&mut w.conn)?;
            let raws = tx
                .prepare_cached(CLAIM_SQL)
                .map_err(db_err)?
                .query_map(
                    params![
                        p.broker.as_str(),
                        now.as_micros(),
                        p.node.as_str(),
                        lease_until.as_micros(),
                        p.limit
                    ],
                    RawDispatch::from_row,
                )
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            // Decoded inside the transaction: a row that cannot be read back is quarantined
            // (`Failed(Corrupt)`) in it, never committed as claimed and reported as an error,
            // and the broker's other rows are claimed as if it were not there.
            let mut claimed = Vec::with_capacity(raws.len());
            for raw in raws {
                let key = raw.id.clone();
                match raw.into_dispatch(codec.as_deref()) {
                    Ok(d) => claimed.push(d),
                    Err(e) => quarantine(&tx, &key, &e, now)?,
                }
            }
            tx.commit().map_err(db_err)?;
            // RETURNING does not promise an order; callers get claim order.
            claimed.sort_by_key(|d| (d.created_at, d.id));
            Ok(claimed.into_iter().map(Claimed::mint).collect())
        })
        .await
    }

    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        super::check_heartbeat(&p)?;
        let now = p.now.unwrap_or_else(system_now);
        let (id, attempt) = (c.id(), c.attempt());
        let progress = p
            .progress
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err)?;
        let event = Event::Heartbeat {
            attempt,
            now,
            lease: p.lease,
            progress: p.progress,
        };
        let lease_until = now.saturating_add(p.lease).as_micros();
        self.call(move |w| {
            guarded(
                w,
                id,
                event,
                concat!(
                    "UPDATE dispatch SET lease_until = ?3, progress = COALESCE(?4, progress), \
                     updated_at = ?5 WHERE id = ?1 AND state = 'in_progress' AND attempt = ?2 \
                     AND lease_until > ?5 RETURNING ",
                    dispatch_cols!()
                ),
                params![
                    &id_bytes(id)[..],
                    i64::from(attempt),
                    lease_until,
                    progress,
                    now.as_micros()
                ],
            )
        })
        .await
    }

    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        super::check_outcome(&p.outcome)?;
        let (id, attempt) = (c.id(), c.attempt());
        self.call(move |w| {
            let codec = w.codec.clone();
            let tx = immediate(&mut w.conn)?;
            let raw = finish_in(&tx, codec.as_deref(), id, attempt, p)?;
            tx.commit().map_err(db_err)?;
            raw.into_dispatch(codec.as_deref())
        })
        .await
    }

    /// One immediate transaction for the whole batch: SQLite has no round trips to save, so
    /// the costs that matter are the commit, paid once, and the statements, one per
    /// `FINISH_CHUNK` rows (`finish_batch_in`). A refused entry (fenced, illegal, not found)
    /// leaves the others to commit; a database failure rolls the batch back.
    async fn finish_many(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        super::finish_checked(batch, |valid| self.finish_valid(valid)).await
    }

    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        let id = p.id;
        self.call(move |w| {
            guarded(
                w,
                id,
                Event::Cancel { now },
                concat!(
                    "UPDATE dispatch SET state = 'failed', failure_kind = 'cancelled', \
                     failure_message = NULL, updated_at = ?2 \
                     WHERE id = ?1 AND state = 'pending' RETURNING ",
                    dispatch_cols!()
                ),
                params![&id_bytes(id)[..], now.as_micros()],
            )
        })
        .await
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        let id = p.id;
        self.call(move |w| {
            guarded(
                w,
                id,
                Event::RequestCancel { now },
                concat!(
                    "UPDATE dispatch SET state = CASE WHEN state = 'pending' THEN 'failed' \
                       ELSE state END, \
                     failure_kind = 'cancelled', failure_message = NULL, updated_at = ?2 \
                     WHERE id = ?1 AND state IN ('pending', 'in_progress') RETURNING ",
                    dispatch_cols!()
                ),
                params![&id_bytes(id)[..], now.as_micros()],
            )
        })
        .await
    }

    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        self.call(move |w| {
            read_dispatch(&w.conn, id)?
                .map(|raw| raw.into_dispatch_for_read(w.codec()))
                .transpose()
        })
        .await
    }

    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        check_limit(f.limit)?;
        self.call(move |w| {
            let raws = w
                .conn
                .prepare_cached(concat!(
                    "SELECT ",
                    dispatch_cols!(),
                    " FROM dispatch WHERE (?1 IS NULL OR broker = ?1) \
                     AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR id > ?3) \
                     ORDER BY id LIMIT ?4"
                ))
                .map_err(db_err)?
                .query_map(
                    params![
                        f.broker.as_ref().map(BrokerId::as_str),
                        f.state.map(DispatchState::as_str),
                        f.after.map(|a| id_bytes(a).to_vec()),
                        f.limit
                    ],
                    RawDispatch::from_row,
                )
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            raws.into_iter()
                .map(|raw| raw.into_dispatch_for_read(w.codec()))
                .collect()
        })
        .await
    }

    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        p.validate()?;
        let now = p.now.unwrap_or_else(system_now);
        let cutoff = now.saturating_sub(p.retention);
        self.call(move |w| {
            let tx = immediate(&mut w.conn)?;
            let ids = |sql: &str| -> Result<Vec<DispatchId>, StoreError> {
                let mut ids = tx
                    .prepare_cached(sql)
                    .map_err(db_err)?
                    .query_map(params![p.limit, now.as_micros()], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .map_err(db_err)?
                    .map(|bytes| {
                        let bytes = bytes.map_err(db_err)?;
                        Uuid::from_slice(&bytes)
                            .map(DispatchId::from_uuid)
                            .map_err(|_| corrupt("id is not 16 bytes"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                ids.sort();
                Ok(ids)
            };
            // Expire first, then exhaust among what is left: the order MemoryStore applies.
            let expired = ids(EXPIRE_SQL)?;
            let exhausted = ids(EXHAUST_SQL)?;
            let claimable = tx
                .prepare_cached(CLAIMABLE_BROKERS_SQL)
                .map_err(db_err)?
                .query_map(params![p.limit, now.as_micros()], |r| r.get::<_, String>(0))
                .map_err(db_err)?
                .map(|b| BrokerId::new(b.map_err(db_err)?).map_err(|_| corrupt("bad broker id")))
                .collect::<Result<Vec<_>, _>>()?;
            let (pending, oldest_pending) = tx
                .prepare_cached(PENDING_SQL)
                .map_err(db_err)?
                .query_row([], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .map_err(db_err)?;
            let purged = tx
                .prepare_cached(PURGE_SQL)
                .map_err(db_err)?
                .execute(params![p.limit, cutoff.as_micros()])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(SweepReport {
                expired,
                exhausted,
                purged: purged as u64,
                claimable,
                pending: u64::try_from(pending).unwrap_or(0),
                oldest_pending: oldest_pending.map(Timestamp::from_micros),
                swept: true,
            })
        })
        .await
    }

    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        p.check_connected_at(now)?;
        self.call(move |w| {
            let tx = immediate(&mut w.conn)?;
            let current = read_affinity(&tx, &p.broker)?;
            let decision = Affinity::decide_connect(
                current.as_ref(),
                &p.broker,
                &p.node,
                &p.session,
                p.connected_at.unwrap_or(now),
                now,
            );
            match decision {
                ConnectDecision::Claim(a) => {
                    tx.prepare_cached(
                        "INSERT INTO affinity (broker, node, session, connected_at, last_seen) \
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (broker) DO UPDATE SET \
                         node = excluded.node, session = excluded.session, \
                         connected_at = excluded.connected_at, last_seen = excluded.last_seen",
                    )
                    .map_err(db_err)?
                    .execute(params![
                        a.broker.as_str(),
                        a.node.as_ref().map(NodeId::as_str),
                        a.session.as_str(),
                        a.connected_at.as_micros(),
                        a.last_seen.as_micros()
                    ])
                    .map_err(db_err)?;
                    tx.commit().map_err(db_err)?;
                    Ok(ConnectOutcome::Claimed(a))
                }
                ConnectDecision::Superseded => {
                    Ok(ConnectOutcome::Superseded(current.ok_or_else(|| {
                        StoreError::invalid("superseded without a row")
                    })?))
                }
            }
        })
        .await
    }

    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        self.call(move |w| {
            let tx = immediate(&mut w.conn)?;
            let changed = tx
                .prepare_cached(
                    "UPDATE affinity SET node = NULL, last_seen = ?4 \
                     WHERE broker = ?1 AND node = ?2 AND session = ?3",
                )
                .map_err(db_err)?
                .execute(params![
                    p.broker.as_str(),
                    p.node.as_str(),
                    p.session.as_str(),
                    now.as_micros()
                ])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        self.call(move |w| {
            let tx = immediate(&mut w.conn)?;
            let changed = tx
                .prepare_cached(
                    "UPDATE affinity SET last_seen = MAX(last_seen, ?4) \
                     WHERE broker = ?1 AND node = ?2 AND session = ?3",
                )
                .map_err(db_err)?
                .execute(params![
                    p.broker.as_str(),
                    p.node.as_str(),
                    p.session.as_str(),
                    now.as_micros()
                ])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        let broker = broker.clone();
        self.call(move |w| read_affinity(&w.conn, &broker)).await
    }
}

#[cfg(test)]
mod conformance {
    crate::store_conformance_tests!(async {
        std::sync::Arc::new(super::SqliteStore::open_in_memory().expect("open in-memory sqlite"))
    });
}

#[cfg(test)]
mod query_plans {
    use super::*;

    /// The plan of `sql`, one line per step.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut st = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        // Unbound parameters are NULL: the plan does not depend on them.
        let mut rows = st.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next().expect("plan row") {
            steps.push(row.get::<_, String>(3).expect("detail"));
        }
        steps
    }

    /// Every hot query reads `dispatch` through the index meant for it, never by a full scan,
    /// so throughput stays flat as the table grows.
    #[test]
    fn hot_queries_use_their_indexes() {
        let mut conn = Connection::open_in_memory().expect("open");
        migrate(&mut conn).expect("migrate");
        let by_id = concat!("SELECT ", dispatch_cols!(), " FROM dispatch WHERE id = ?1");
        let by_key = concat!(
            "SELECT ",
            dispatch_cols!(),
            " FROM dispatch WHERE idempotency_key = ?1"
        );
        for (sql, index) in [
            (CLAIM_SQL, "dispatch_claim"),
            (EXPIRE_SQL, "dispatch_deadline"),
            (EXHAUST_SQL, "dispatch_lease"),
            (CLAIMABLE_BROKERS_SQL, "dispatch_claim"),
            (PURGE_SQL, "dispatch_terminal"),
            (by_id, "sqlite_autoindex_dispatch_1"),
            (by_key, "sqlite_autoindex_dispatch_2"),
        ] {
            let steps = plan(&conn, sql);
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{index} unused by {sql}: {steps:?}"
            );
            // A scan is fine only over the partial index meant for it (the live or terminal
            // rows), never over the whole table, whatever index it walks.
            assert!(
                !steps
                    .iter()
                    .any(|s| s.starts_with("SCAN dispatch") && !s.contains(index)),
                "table scan in {sql}: {steps:?}"
            );
        }
    }
}
