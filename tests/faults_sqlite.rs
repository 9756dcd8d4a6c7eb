//! Faults injected under running hubs that share one SQLite file (each hub with its own
//! `SqliteStore`, as separate processes would have): a foreign connection holding the write
//! lock beyond the busy timeout, and the files turning read-only under open connections.
//!
//! Every case asserts: no row lost, no (id, attempt) executed twice, each originator told the
//! truth (a result, a receipt, or a typed error), an outage shorter than a lease costs no second
//! execution, and the same hubs keep working once the fault is gone (no restart).

#![cfg(feature = "sqlite")]

mod support;

#[path = "support/fault_cluster.rs"]
mod fault_cluster;

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::store::{SqliteOptions, Store};
use broker_dispatch::transport::{MemoryTransport, Transport};
use fault_cluster::{fault_config, load, settle_and_check, start, still_works, Cluster};
use support::eventually;

/// How long each fault lasts: beyond the busy timeout and the hub's first finish retries, but
/// well under the 5 s lease.
const OUTAGE: Duration = Duration::from_millis(2500);

/// Three hubs on one file (two own two brokers each, the third only originates), one in-process
/// transport between them.
async fn cluster_on(path: &Path) -> Cluster {
    let transport = MemoryTransport::new();
    let nodes = (0..3)
        .map(|_| {
            let store: Arc<dyn Store> = Arc::new(
                SqliteOptions::new()
                    .busy_timeout(Duration::from_millis(50))
                    .open(path)
                    .expect("open the shared file"),
            );
            let transport: Arc<dyn Transport> = Arc::new(transport.clone());
            (store, transport)
        })
        .collect();
    start(nodes, 2, 2, fault_config(), Duration::from_millis(100)).await
}

/// Waits until the load is well under way (executions happening), so the fault lands on
/// claims, executions and finishes in flight.
async fn under_way(c: &Cluster, executions: usize) {
    let ledger = Arc::clone(&c.ledger);
    eventually(Duration::from_secs(20), "the load is under way", || {
        let n = ledger.lock().runs.len();
        async move { n >= executions }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_write_lock_beyond_the_busy_timeout_stalls_the_hubs_then_everything_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dispatch.db");
    let c = cluster_on(&path).await;
    let running = load(&c, 2, 0..120, Duration::from_millis(40));
    under_way(&c, 10).await;

    let foreign_path = path.clone();
    tokio::task::spawn_blocking(move || {
        let foreign = rusqlite::Connection::open(&foreign_path).expect("foreign connection");
        foreign
            .execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        // Holding a fault for a fixed span is the fault, not a wait for a condition.
        std::thread::sleep(OUTAGE);
        foreign.execute_batch("COMMIT").expect("release the lock");
    })
    .await
    .expect("the lock holder");
    let mut records = running.await.expect("load");
    // The hubs saw the lock as a retryable error, never as a backend failure.
    let seen: Vec<_> = c.stores.iter().map(|s| s.errors()).collect();
    let total = |method: &str| -> u32 {
        c.stores
            .iter()
            .map(|s| s.count(method, "unavailable"))
            .sum()
    };
    assert!(
        total("claim") + total("finish") + total("insert") > 0,
        "no call hit the lock: {seen:?}"
    );
    // Besides `unavailable`: a finish can find its row re-claimed (fenced), and a renewal that
    // waited behind the lock past its lease's end is refused as such (illegal: a lapsed lease
    // cannot be renewed), which is the guard working, not a backend failure.
    for s in &c.stores {
        for ((method, variant), _) in s.errors() {
            assert!(
                variant == "unavailable"
                    || (method == "finish" && variant == "fenced")
                    || (method == "heartbeat" && variant == "illegal"),
                "{method} failed with {variant}: {seen:?}"
            );
        }
    }
    still_works(&c, 2, 10_000, 20).await;
    records.extend(
        load(&c, 1, 20_000..20_010, Duration::ZERO)
            .await
            .expect("load"),
    );
    let s = settle_and_check(&c, &records, Duration::from_secs(40)).await;
    eprintln!("lock fault: {s:?}; errors seen by the hubs: {seen:?}");
    assert!(s.ok > 0);
    assert_eq!(
        s.max_executions, 1,
        "an outage shorter than the lease must not cost a second execution"
    );
}

/// Sets the immutable attribute on files and clears it again on drop (also when the test
/// panics, so the temporary directory can be removed).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: Vec<PathBuf>) -> Result<Self, String> {
        let guard = Immutable(Vec::new());
        let mut guard = guard;
        for p in paths {
            let out = Process::new("chattr")
                .arg("+i")
                .arg(&p)
                .output()
                .map_err(|e| format!("chattr unavailable: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "chattr +i {} failed: {}",
                    p.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            guard.0.push(p);
        }
        Ok(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Process::new("chattr").arg("-i").arg(p).status();
        }
    }
}

/// Whether the immutable attribute works here and binds this user: it needs
/// CAP_LINUX_IMMUTABLE and a filesystem that supports it (ext4, xfs, btrfs; not tmpfs or
/// overlayfs on every kernel).
fn immutable_probe(dir: &Path) -> Result<(), String> {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").map_err(|e| e.to_string())?;
    let mut open = std::fs::OpenOptions::new()
        .append(true)
        .open(&probe)
        .map_err(|e| e.to_string())?;
    let guard = Immutable::set(vec![probe.clone()])?;
    let write = std::io::Write::write_all(&mut open, b"y");
    drop(guard);
    let _ = std::fs::remove_file(&probe);
    match write {
        Err(_) => Ok(()),
        Ok(()) => Err("the immutable attribute does not stop writes on an open file here".into()),
    }
}

/// The database turns read-only under the hubs' open connections, and back.
///
/// How: `chmod` cannot do it. Permissions are checked when a file is opened, and the stores
/// opened theirs long before (as root they would not bind even at open). A read-only remount
/// is refused by the kernel while files are open for writing. What does bind an already open
/// file descriptor, for every user including root, is the immutable attribute (`chattr +i`,
/// Linux ≥ 5.x refuses writes to immutable files in `generic_write_checks`), which is what a
/// live SQLite connection sees when its disk goes read-only: every write fails with
/// `SQLITE_IOERR`, reads keep working. The attribute goes on the database and its WAL, not on
/// the `-shm` index: SQLite maps that file, and a refused write to a mapped page is a SIGBUS.
/// Where the attribute is not available (no CAP_LINUX_IMMUTABLE, a filesystem without it),
/// the test prints why and skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_turning_read_only_mid_run_fails_writes_then_everything_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = immutable_probe(dir.path()) {
        eprintln!("skipped: cannot make an open file read-only here: {why}");
        return;
    }
    let path = dir.path().join("dispatch.db");
    let c = cluster_on(&path).await;
    let running = load(&c, 2, 0..120, Duration::from_millis(40));
    under_way(&c, 10).await;

    let wal = PathBuf::from(format!("{}-wal", path.display()));
    {
        let _read_only = Immutable::set(vec![path.clone(), wal]).expect("make the files read-only");
        // Holding a fault for a fixed span is the fault, not a wait for a condition.
        tokio::time::sleep(OUTAGE).await;
    }

    let mut records = running.await.expect("load");
    let seen: Vec<_> = c.stores.iter().map(|s| s.errors()).collect();
    let backend =
        |method: &str| -> u32 { c.stores.iter().map(|s| s.count(method, "backend")).sum() };
    assert!(
        backend("claim") + backend("finish") + backend("insert") > 0,
        "no write hit the read-only files: {seen:?}"
    );
    still_works(&c, 2, 10_000, 20).await;
    records.extend(
        load(&c, 1, 20_000..20_010, Duration::ZERO)
            .await
            .expect("load"),
    );
    let s = settle_and_check(&c, &records, Duration::from_secs(40)).await;
    eprintln!("read-only fault: {s:?}; errors seen by the hubs: {seen:?}");
    assert!(s.ok > 0);
    assert_eq!(
        s.max_executions, 1,
        "an outage shorter than the lease must not cost a second execution"
    );
}
