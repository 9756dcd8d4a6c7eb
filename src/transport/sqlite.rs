//! [`SqliteTransport`]: wake-ups between processes sharing one SQLite file, with no server.
//!
//! Notices go through an outbox table of the transport's own, created if missing:
//!
//! ```sql
//! CREATE TABLE broker_dispatch_notice (
//!     id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL,
//!     at INTEGER NOT NULL);
//! ```
//!
//! A publisher inserts a row (`kind` is `signal`, `event` or `resync`; `payload` is the id;
//! `at` is Unix milliseconds). Each transport instance runs one poller thread that reads the
//! rows past the last one it saw (`WHERE id > ?`, one indexed range read on the primary key)
//! every `poll_interval`, and fans them out to every [`Subscription`] of the instance through
//! a bounded mailbox per subscription (as [`MemoryTransport`]'s: a subscriber that falls behind
//! gets one [`Notice::Resync`]). Idle, that is one empty read of the index per interval.
//!
//! Publishing never blocks the async runtime: [`Transport::publish`] hands the notice to the
//! instance's writer thread through a bounded queue, and the writer inserts whatever has queued
//! up in one transaction. The writer also trims the outbox: a row goes once it is older than
//! `max_age`, or once `keep` newer rows exist, whichever comes first, with two indexed
//! deletes at most once per 256 notices or per second.
//!
//! `AUTOINCREMENT` ids are never reused and SQLite's writers are serialized, so a reader sees
//! ids without holes, except where rows were trimmed before it read them. A hole (the poller
//! fell further behind than the trim), and any database error, turns into one
//! [`Notice::Resync`]: the subscriber re-reads the store, which is the truth.
//!
//! Pickup latency is the poll interval (10 ms by default) plus the time to read the row,
//! instead of the hubs' polling interval; every process pays one cheap read per interval.
//! The file must be on a local disk (SQLite's locking does not hold over network file
//! systems), which is also what [`SqliteStore`](crate::store::SqliteStore) requires.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{MemoryTransport, Notice, Subscription, Transport};
use crate::error::TransportError;
use crate::fsm::{BrokerId, DispatchId};

/// The outbox table.
const TABLE: &str = "broker_dispatch_notice";

/// Rows read per query; a longer backlog is read in several queries without waiting.
const READ_BATCH: usize = 512;

/// Notices inserted per transaction at most.
const WRITE_BATCH: usize = 256;

/// How a [`SqliteTransport`] polls, trims and queues.
#[derive(Debug, Clone)]
pub struct SqliteTransportOptions {
    /// How often the poller reads new notices (at least 1 ms). Pickup latency is about this.
    pub poll_interval: Duration,
    /// Notices kept in the outbox at most; older ones are trimmed.
    pub keep: u64,
    /// Notices older than this are trimmed. A process that stops polling for longer resyncs.
    pub max_age: Duration,
    /// How long a statement waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Notices queued for the writer thread at most; a publish beyond that is refused with
    /// [`TransportError::Unavailable`].
    pub queue: usize,
}

impl Default for SqliteTransportOptions {
    fn default() -> Self {
        SqliteTransportOptions {
            poll_interval: Duration::from_millis(10),
            keep: 10_000,
            max_age: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(5),
            queue: 4_096,
        }
    }
}

/// Cross-process transport over a notice table in a shared SQLite file (`sqlite` feature).
/// Clone it to share one poller.
///
/// Build one per hub with [`SqliteTransport::open`], on the file the hubs'
/// [`SqliteStore`](crate::store::SqliteStore)s use (or any other file all of them can reach).
/// Dropping the last clone stops both threads (the writer first inserts what was queued) and
/// ends every subscription.
#[derive(Clone)]
pub struct SqliteTransport {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    bus: MemoryTransport,
    queue: Option<SyncSender<Notice>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The writer drains what is queued, then sees the channel closed.
        self.queue.take();
        self.bus.close();
    }
}

impl fmt::Debug for SqliteTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTransport")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn db_error(e: rusqlite::Error) -> TransportError {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    if busy {
        TransportError::Unavailable(Box::new(e))
    } else {
        TransportError::Backend(Box::new(e))
    }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, TransportError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(db_error)?;
    conn.busy_timeout(busy_timeout).map_err(db_error)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Creates the outbox if missing and returns the last id ever assigned in it.
fn prepare(conn: &Connection) -> Result<i64, TransportError> {
    // WAL lets the poller read while another process writes.
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .map_err(db_error)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(db_error)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             kind TEXT NOT NULL,
             payload TEXT NOT NULL,
             at INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at);"
    ))
    .map_err(db_error)?;
    last_id(conn)
}

/// The last id ever assigned (ids are never reused, even once the rows are trimmed).
fn last_id(conn: &Connection) -> Result<i64, TransportError> {
    conn.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = ?1",
        [TABLE],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(Option::unwrap_or_default)
    .map_err(db_error)
}

impl SqliteTransport {
    /// Opens (creating if needed) the file at `path`, creates the outbox table if missing, and
    /// starts the writer and poller threads. Every notice published after this returns, by any
    /// process, reaches this instance's subscribers (or a [`Notice::Resync`] does).
    ///
    /// # Errors
    ///
    /// [`TransportError::Payload`] for a poll interval under 1 ms or a `keep` or `queue` of 0;
    /// [`TransportError::Backend`] if the file is not a SQLite database or cannot be opened or
    /// written; [`TransportError::Unavailable`] if another process held the write lock for
    /// longer than the busy timeout.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call starts no thread.
    pub async fn open(
        path: impl AsRef<Path>,
        options: SqliteTransportOptions,
    ) -> Result<Self, TransportError> {
        if options.poll_interval < Duration::from_millis(1) {
            return Err(TransportError::Payload(format!(
                "poll_interval must be at least 1 ms, got {:?}",
                options.poll_interval
            )));
        }
        if options.keep == 0 || options.queue == 0 {
            return Err(TransportError::Payload(
                "keep and queue must be at least 1".to_owned(),
            ));
        }
        let path = path.as_ref().to_path_buf();
        let opened = {
            let path = path.clone();
            let busy = options.busy_timeout;
            tokio::task::spawn_blocking(move || {
                let writer = open_connection(&path, busy)?;
                let last = prepare(&writer)?;
                let reader = open_connection(&path, busy)?;
                Ok::<_, TransportError>((writer, reader, last))
            })
            .await
            .map_err(|e| TransportError::Backend(Box::new(e)))?
        };
        let (writer, reader, last) = opened?;
        let bus = MemoryTransport::new();
        let stop = Arc::new(AtomicBool::new(false));
        let (queue, jobs) = mpsc::sync_channel::<Notice>(options.queue);
        let w = Writer {
            conn: writer,
            jobs,
            bus: bus.clone(),
            keep: i64::try_from(options.keep).unwrap_or(i64::MAX),
            max_age: i64::try_from(options.max_age.as_millis()).unwrap_or(i64::MAX),
        };
        std::thread::Builder::new()
            .name("bd-notice-write".to_owned())
            .spawn(move || w.run())
            .map_err(|e| TransportError::Backend(Box::new(e)))?;
        let p = Poller {
            conn: reader,
            last,
            bus: bus.clone(),
            stop: stop.clone(),
            interval: options.poll_interval,
        };
        std::thread::Builder::new()
            .name("bd-notice-poll".to_owned())
            .spawn(move || p.run())
            .map_err(|e| TransportError::Backend(Box::new(e)))?;
        Ok(SqliteTransport {
            inner: Arc::new(Inner {
                path,
                bus,
                queue: Some(queue),
                stop,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

#[async_trait]
impl Transport for SqliteTransport {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    /// Subscribes. The poller has been reading from construction on, so every notice
    /// published after this returns is delivered (or a [`Notice::Resync`] is).
    ///
    /// # Errors
    ///
    /// [`TransportError::Closed`] if the transport is shutting down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        self.inner.bus.subscribe().await
    }

    /// Queues the notice for the writer thread and returns at once; the row is inserted (in a
    /// batch with whatever else is queued) right after.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] if the queue is full (the writer cannot keep up, or the
    /// file is locked); [`TransportError::Closed`] if the writer thread has stopped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the notice is queued or refused before the call returns.
    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        let queue = self.inner.queue.as_ref().ok_or(TransportError::Closed)?;
        match queue.try_send(notice) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(TransportError::Unavailable(
                "the SQLite notice queue is full".into(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(TransportError::Closed),
        }
    }
}

/// The writer thread: inserts queued notices, trims the outbox.
struct Writer {
    conn: Connection,
    jobs: Receiver<Notice>,
    bus: MemoryTransport,
    keep: i64,
    max_age: i64,
}

impl Writer {
    fn run(mut self) {
        let mut since_trim = 0usize;
        let mut last_trim = Instant::now();
        let mut failing = false;
        while let Ok(first) = self.jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < WRITE_BATCH {
                match self.jobs.try_recv() {
                    Ok(n) => batch.push(n),
                    Err(_) => break,
                }
            }
            match self.insert(&batch) {
                Ok(last) => {
                    failing = false;
                    since_trim += batch.len();
                    if since_trim >= 256 || last_trim.elapsed() >= Duration::from_secs(1) {
                        if let Err(e) = self.trim(last) {
                            tracing::warn!(error = %e, "trimming the SQLite notice outbox failed");
                        }
                        since_trim = 0;
                        last_trim = Instant::now();
                    }
                }
                Err(e) => {
                    // Other processes miss these notices; their hubs' polling finds the work.
                    metrics::counter!("broker_dispatch_transport_errors_total", "transport" => "sqlite")
                        .increment(1);
                    tracing::warn!(error = %e, dropped = batch.len(), "SQLite notices not written");
                    // Once per outage: a resync per failed batch would only repeat itself.
                    if !failing {
                        self.bus.inject_resync();
                    }
                    failing = true;
                }
            }
        }
    }

    /// Inserts the batch in one transaction; returns the last id.
    fn insert(&mut self, batch: &[Notice]) -> Result<i64, rusqlite::Error> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let at = unix_millis();
        {
            let mut stmt = tx.prepare_cached(&format!(
                "INSERT INTO {TABLE} (kind, payload, at) VALUES (?1, ?2, ?3)"
            ))?;
            for n in batch {
                let (kind, payload) = match n {
                    Notice::Signal { broker } => ("signal", broker.as_str().to_owned()),
                    Notice::Event { id } => ("event", id.to_string()),
                    Notice::Resync => ("resync", String::new()),
                };
                stmt.execute(params![kind, payload, at])?;
            }
        }
        let last = tx.last_insert_rowid();
        tx.commit()?;
        Ok(last)
    }

    /// Deletes rows beyond the newest `keep`, and rows older than `max_age`.
    fn trim(&mut self, last: i64) -> Result<(), rusqlite::Error> {
        let cutoff = unix_millis().saturating_sub(self.max_age);
        self.conn
            .prepare_cached(&format!("DELETE FROM {TABLE} WHERE id <= ?1"))?
            .execute([last.saturating_sub(self.keep)])?;
        self.conn
            .prepare_cached(&format!("DELETE FROM {TABLE} WHERE at < ?1"))?
            .execute([cutoff])?;
        Ok(())
    }
}

/// The poller thread: reads new rows, fans them out.
struct Poller {
    conn: Connection,
    last: i64,
    bus: MemoryTransport,
    stop: Arc<AtomicBool>,
    interval: Duration,
}

impl Poller {
    fn run(mut self) {
        let mut failing = false;
        while !self.stop.load(Ordering::Relaxed) {
            match self.read() {
                Ok(full) => {
                    failing = false;
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    if !failing {
                        // Rows written meanwhile stay in the table, but tell subscribers now:
                        // the outage may outlast the rows.
                        tracing::warn!(error = %e, "reading the SQLite notice outbox failed; resyncing");
                        metrics::counter!("broker_dispatch_transport_errors_total", "transport" => "sqlite")
                            .increment(1);
                        self.bus.inject_resync();
                    }
                    failing = true;
                }
            }
            std::thread::sleep(self.interval);
        }
    }

    /// Reads and delivers the rows after `last`; `Ok(true)` if there may be more.
    fn read(&mut self) -> Result<bool, rusqlite::Error> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT id, kind, payload FROM {TABLE} WHERE id > ?1 ORDER BY id LIMIT {READ_BATCH}"
        ))?;
        let rows = stmt
            .query_map([self.last], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        let full = rows.len() == READ_BATCH;
        for (id, kind, payload) in rows {
            if id != self.last + 1 {
                // Before the rows after the hole: a resync empties the mailboxes it reaches.
                metrics::counter!("broker_dispatch_transport_gaps_total", "transport" => "sqlite")
                    .increment(1);
                self.bus.inject_resync();
            }
            self.last = id;
            if let Some(notice) = parse(&kind, &payload) {
                // The bus only refuses once closed, when the transport is dropped.
                if self.bus.deliver(&notice).is_err() {
                    self.stop.store(true, Ordering::Relaxed);
                    return Ok(false);
                }
            }
        }
        Ok(full)
    }
}

/// Turns a row into a notice; what does not parse is logged and ignored.
fn parse(kind: &str, payload: &str) -> Option<Notice> {
    let notice = match kind {
        "signal" => BrokerId::new(payload)
            .map(|broker| Notice::Signal { broker })
            .map_err(|e| e.to_string()),
        "event" => DispatchId::parse(payload)
            .map(|id| Notice::Event { id })
            .map_err(|e| e.to_string()),
        "resync" => Ok(Notice::Resync),
        _ => Err("unknown kind".to_owned()),
    };
    match notice {
        Ok(n) => Some(n),
        Err(error) => {
            let shown: String = payload.chars().take(80).collect();
            tracing::warn!(kind, payload = %shown, %error, "ignoring a notice row that does not parse");
            None
        }
    }
}
