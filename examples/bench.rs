//! The benchmark harness. Every figure is reported beside a baseline measured in the same run on
//! the same machine, as a ratio: the machines are shared and noisy, absolute times mean little.
//!
//! ```text
//! cargo run --release --example bench -- [--quick] [--json FILE] [--only NAME…]
//! ```
//!
//! Postgres workloads use `DATABASE_URL` if it is set, else a throwaway server started from the
//! system's binaries (as the tests do, but with fsync on, so commit costs are the real ones).
//! Without either, they are skipped with a printed reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{Command, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{
    ClaimParams, FinishParams, MemoryStore, NewDispatch, Outcome, PgStore, PgStoreOptions,
    SqliteStore,
};
use broker_dispatch::transport::{PgTransport, PgTransportOptions};
use broker_dispatch::ExecError;
use serde_json::json;
use tokio::sync::mpsc;

#[path = "../tests/support/pg.rs"]
#[allow(unreachable_pub, missing_docs)]
mod pg;

/// The benchmark harness: each workload against a baseline measured in the same run.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "bench")]
struct Options {
    /// Smaller workloads (checks that the harness runs; the figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Also write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Run only the workloads whose names start with these.
    #[arg(long, value_name = "NAME", num_args = 1..)]
    only: Vec<String>,
    /// Passed by `cargo bench`-style runners; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One reported figure.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    baseline: String,
    baseline_value: f64,
    ratio: f64,
    higher_is_better: bool,
}

impl Row {
    fn new(
        name: &str,
        value: f64,
        unit: &'static str,
        baseline: &str,
        baseline_value: f64,
        higher_is_better: bool,
    ) -> Self {
        let ratio = if baseline_value == 0.0 {
            0.0
        } else {
            value / baseline_value
        };
        Row {
            name: name.into(),
            value,
            unit,
            baseline: baseline.into(),
            baseline_value,
            ratio,
            higher_is_better,
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

#[derive(Debug)]
struct Noop;

#[async_trait]
impl Executor for Noop {
    async fn execute(
        &self,
        _ctx: ExecContext,
        _d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        Ok(serde_json::Value::Null)
    }
}

/// `Hub::dispatch` on a locally connected broker vs calling the executor directly.
async fn local_fast_path(o: &Options) -> Vec<Row> {
    let n = if o.quick { 200_000 } else { 2_000_000 };
    let store = Arc::new(MemoryStore::new());
    let hub = Hub::builder(NodeId::new("bench").unwrap())
        .store(store)
        .executor(Arc::new(Noop))
        .start()
        .await
        .unwrap();
    let broker = BrokerId::new("b").unwrap();
    hub.connect(broker.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    let exec = Noop;
    let mut direct = Vec::new();
    let mut via_hub = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            let d = template(&broker);
            let ctx = broker_dispatch::hub::ExecContext::detached(d.id, 1);
            std::hint::black_box(exec.execute(ctx, &d).await.unwrap());
        }
        direct.push(t.elapsed().as_nanos() as f64 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            let cmd = Command::new(broker.clone(), "op", serde_json::Value::Null);
            std::hint::black_box(hub.dispatch(cmd).await.unwrap());
        }
        via_hub.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    hub.shutdown().await.unwrap();
    let (d, h) = (median(direct), median(via_hub));
    vec![
        Row::new(
            "local_fast_path",
            h,
            "ns/dispatch",
            "direct_executor_call",
            d,
            false,
        ),
        Row::new(
            "local_fast_path_overhead",
            h - d,
            "ns/dispatch",
            "target_1000ns",
            1000.0,
            false,
        ),
    ]
}

fn template(broker: &BrokerId) -> Dispatch {
    NewDispatch::new(broker.clone(), "op", serde_json::Value::Null)
        .into_dispatch(broker_dispatch::fsm::Timestamp::EPOCH)
}

/// Claim + complete per second on `MemoryStore` vs a plain `Mutex<HashMap>` doing the same state
/// change.
fn memory_claim_complete(o: &Options) -> Vec<Row> {
    let n: usize = if o.quick { 100_000 } else { 1_000_000 };
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let mut store_rates = Vec::new();
        let mut base_rates = Vec::new();
        for _ in 0..3 {
            store_rates.push(memory_store_run(n, threads));
            base_rates.push(plain_map_run(n, threads));
        }
        rows.push(Row::new(
            &format!("memory_claim_complete_{threads}t"),
            median(store_rates),
            "ops/s",
            &format!("mutex_hashmap_{threads}t"),
            median(base_rates),
            true,
        ));
    }
    rows
}

fn memory_store_run(n: usize, threads: usize) -> f64 {
    let store = Arc::new(MemoryStore::new());
    let node = NodeId::new("n").unwrap();
    let per = n / threads;
    for t in 0..threads {
        let b = BrokerId::new(format!("b{t}")).unwrap();
        for _ in 0..per {
            store
                .insert_sync(NewDispatch::new(b.clone(), "op", serde_json::Value::Null))
                .unwrap();
        }
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = &store;
            let node = node.clone();
            s.spawn(move || {
                let b = BrokerId::new(format!("b{t}")).unwrap();
                let p = ClaimParams {
                    broker: b,
                    node,
                    limit: 1,
                    lease: Duration::from_secs(30),
                    now: None,
                };
                for _ in 0..per {
                    let c = store.claim_sync(p.clone()).unwrap().pop().unwrap();
                    store
                        .finish_sync(
                            c,
                            FinishParams::new(Outcome::Complete(serde_json::Value::Null)),
                        )
                        .unwrap();
                }
            });
        }
    });
    (per * threads) as f64 / start.elapsed().as_secs_f64()
}

fn plain_map_run(n: usize, threads: usize) -> f64 {
    #[derive(Clone)]
    struct Row {
        state: u8,
        attempt: u32,
        owner: Option<String>,
    }
    let map: parking_lot::Mutex<HashMap<u64, Row>> = parking_lot::Mutex::new(HashMap::new());
    let per = n / threads;
    {
        let mut m = map.lock();
        for i in 0..(per * threads) as u64 {
            m.insert(
                i,
                Row {
                    state: 0,
                    attempt: 0,
                    owner: None,
                },
            );
        }
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let map = &map;
            s.spawn(move || {
                for i in 0..per as u64 {
                    let key = t as u64 * per as u64 + i;
                    let attempt = {
                        let mut m = map.lock();
                        let r = m.get_mut(&key).unwrap();
                        r.state = 1;
                        r.attempt += 1;
                        r.owner = Some("n".to_owned());
                        r.attempt
                    };
                    let mut m = map.lock();
                    let r = m.get_mut(&key).unwrap();
                    if r.attempt == attempt {
                        r.state = 2;
                    }
                }
            });
        }
    });
    (per * threads) as f64 / start.elapsed().as_secs_f64()
}

/// Resident memory per 100,000 pending dispatches in `MemoryStore`.
fn memory_footprint(_o: &Options) -> Vec<Row> {
    let n = 100_000;
    let before = rss_bytes();
    let store = MemoryStore::new();
    let b = BrokerId::new("b").unwrap();
    for i in 0..n {
        store
            .insert_sync(NewDispatch::new(b.clone(), "message", json!({ "n": i })))
            .unwrap();
    }
    let after = rss_bytes();
    let raw = std::mem::size_of::<Dispatch>() as f64 * n as f64;
    let used = after.saturating_sub(before) as f64;
    std::hint::black_box(&store);
    vec![Row::new(
        "memory_footprint_100k",
        used / 1e6,
        "MB",
        "size_of_dispatch_x100k",
        raw / 1e6,
        false,
    )]
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// How big each workload is: `--quick` keeps every workload and shrinks it.
#[derive(Debug, Clone)]
struct Sizes {
    drain_rows: u64,
    single_rows: u64,
    pickup_samples: usize,
    cross: Vec<(usize, usize)>,
    scale_pending: u64,
    scale_terminal: [u64; 2],
}

fn sizes(o: &Options) -> Sizes {
    if o.quick {
        Sizes {
            drain_rows: 10_000,
            single_rows: 1_000,
            pickup_samples: 150,
            cross: vec![(1, 100), (8, 400), (64, 1_000)],
            scale_pending: 5_000,
            scale_terminal: [10_000, 100_000],
        }
    } else {
        Sizes {
            drain_rows: 100_000,
            single_rows: 5_000,
            pickup_samples: 1_000,
            cross: vec![(1, 500), (8, 2_000), (64, 6_400)],
            scale_pending: 20_000,
            scale_terminal: [10_000, 1_000_000],
        }
    }
}

/// Rows per raw batch statement, and per hub claim in the drain workloads.
const RAW_BATCH: u32 = 100;

/// An executor that does nothing but count, and optionally report when each execution started
/// (keyed by the `seq` in its args).
#[derive(Debug, Default)]
struct Probe {
    executed: AtomicU64,
    starts: Option<mpsc::UnboundedSender<(u64, Instant)>>,
}

#[async_trait]
impl Executor for Probe {
    async fn execute(
        &self,
        _ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        if let Some(tx) = &self.starts {
            let at = Instant::now();
            if let Some(seq) = d.args.get("seq").and_then(serde_json::Value::as_u64) {
                let _ = tx.send((seq, at));
            }
        }
        self.executed.fetch_add(1, Ordering::Relaxed);
        Ok(serde_json::Value::Null)
    }
}

fn broker_id(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

fn node_id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// The drain workloads' config: claims of `RAW_BATCH` rows, like the raw loops. A claim takes
/// no more rows than the broker has free slots, so `max_in_flight` is raised to the batch too
/// (with the default 16 slots these workloads would claim 16 rows at a time and measure
/// something else than the figures before the execution model).
fn drain_config() -> HubConfig {
    HubConfig {
        claim_batch: RAW_BATCH,
        max_in_flight: RAW_BATCH,
        ..HubConfig::default()
    }
}

/// Starts a hub, connects broker `b` (which schedules its drain) and returns the rows per second
/// from the connect until `live()` reports no claimable rows left.
async fn timed_drain<F, Fut>(hub_for: impl FnOnce(Arc<Probe>) -> Fut, n: u64, live: F) -> f64
where
    Fut: std::future::Future<Output = Hub>,
    F: Fn() -> u64,
{
    let probe = Arc::new(Probe::default());
    let hub = hub_for(Arc::clone(&probe)).await;
    let started = Instant::now();
    hub.connect(
        broker_id("b"),
        SessionId::new(format!("s{}", now_micros())).unwrap(),
        (),
    )
    .await
    .unwrap();
    let deadline = started + Duration::from_secs(600);
    while probe.executed.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "drain stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Executed is not yet finished: wait for the last completions to be durable.
    while live() > 0 {
        assert!(Instant::now() < deadline, "drain stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    hub.shutdown().await.unwrap();
    rate
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// Bulk-loads `n` rows of broker `b` straight into the table (not through the store).
fn sqlite_load(conn: &rusqlite::Connection, broker: &str, n: u64, terminal: bool) {
    let sql = if terminal {
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         INSERT INTO dispatch (id, broker, op, args, state, attempt, max_attempts, claimed_by, \
           available_at, result, created_at, updated_at) \
         SELECT randomblob(16), ?2, 'op', 'null', 'done', 1, 3, 'old', ?3, 'null', ?3 + i, \
           ?3 + i FROM s"
    } else {
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         INSERT INTO dispatch (id, broker, op, args, state, attempt, max_attempts, \
           available_at, created_at, updated_at) \
         SELECT randomblob(16), ?2, 'op', 'null', 'pending', 0, 3, ?3, ?3 + i, ?3 + i FROM s"
    };
    conn.execute(
        sql,
        rusqlite::params![n as i64, broker, now_micros() - 60_000_000],
    )
    .unwrap();
}

/// A raw connection with the store's settings (WAL, synchronous=NORMAL).
fn sqlite_raw_conn(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn
}

fn sqlite_live(conn: &rusqlite::Connection) -> u64 {
    conn.query_row(
        "SELECT count(*) FROM dispatch WHERE broker = 'b' AND state IN ('pending', 'in_progress')",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

/// The hub draining `n` pending rows loaded into `path` (already migrated by the store).
async fn sqlite_hub_drain(path: &std::path::Path, n: u64) -> f64 {
    let conn = sqlite_raw_conn(path);
    sqlite_load(&conn, "b", n, false);
    let store = Arc::new(SqliteStore::open(path).unwrap());
    let rate = timed_drain(
        |probe| async move {
            Hub::builder(node_id("bench"))
                .store(store)
                .executor(probe)
                .config(drain_config())
                .start()
                .await
                .unwrap()
        },
        n,
        || sqlite_live(&conn),
    )
    .await;
    conn.execute("DELETE FROM dispatch WHERE claimed_by = 'bench'", [])
        .unwrap();
    rate
}

/// A raw rusqlite loop claiming-and-finishing `per` rows per statement (pending → done, the
/// least work a queue can do per row on this table), one immediate transaction each.
fn sqlite_raw(path: &std::path::Path, n: u64, per: u32) -> f64 {
    let mut conn = sqlite_raw_conn(path);
    sqlite_load(&conn, "b", n, false);
    let started = Instant::now();
    let mut done = 0u64;
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        let now = now_micros();
        let flipped = tx
            .prepare_cached(
                "UPDATE dispatch SET state = 'done', attempt = attempt + 1, claimed_by = 'raw', \
                 result = 'null', lease_until = NULL, updated_at = ?2 \
                 WHERE id IN (SELECT id FROM dispatch WHERE broker = 'b' \
                   AND state IN ('pending', 'in_progress') AND state = 'pending' \
                   AND available_at <= ?2 ORDER BY created_at, id LIMIT ?1) RETURNING id",
            )
            .unwrap()
            .query_map(rusqlite::params![per, now], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .count() as u64;
        tx.commit().unwrap();
        if flipped == 0 {
            break;
        }
        done += flipped;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    conn.execute("DELETE FROM dispatch WHERE claimed_by = 'raw'", [])
        .unwrap();
    rate
}

/// A fresh, migrated database file in `dir`.
fn sqlite_fresh(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    let path = dir.path().join(format!("{name}.db"));
    drop(SqliteStore::open(&path).unwrap());
    path
}

async fn sqlite_drain(o: &Options) -> Vec<Row> {
    let sz = sizes(o);
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, mut batch, mut single) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..3 {
        let path = sqlite_fresh(&dir, &format!("drain{rep}"));
        hub.push(sqlite_hub_drain(&path, sz.drain_rows).await);
        let path = sqlite_fresh(&dir, &format!("batch{rep}"));
        batch.push(sqlite_raw(&path, sz.drain_rows, RAW_BATCH));
        let path = sqlite_fresh(&dir, &format!("single{rep}"));
        single.push(sqlite_raw(&path, sz.single_rows, 1));
    }
    let (h, b, s) = (median(hub), median(batch), median(single));
    vec![
        Row::new("sqlite_drain", h, "rows/s", "sqlite_raw_batch", b, true),
        Row::new(
            "sqlite_drain_vs_single",
            h,
            "rows/s",
            "sqlite_raw_single",
            s,
            true,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The execution model: slots per broker, no head-of-line blocking

/// What the execution-model workloads need from one executor: it sleeps `args.ms` milliseconds
/// (remote work), counting starts and finishes per op.
#[derive(Debug, Default)]
struct Sleeper {
    finished: AtomicU64,
    slow_running: AtomicU64,
    slow_started: AtomicU64,
}

#[async_trait]
impl Executor for Sleeper {
    async fn execute(
        &self,
        _ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let ms = d
            .args
            .get("ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let slow = d.op == "slow";
        if slow {
            self.slow_running.fetch_add(1, Ordering::AcqRel);
            self.slow_started.fetch_add(1, Ordering::AcqRel);
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if slow {
            self.slow_running.fetch_sub(1, Ordering::AcqRel);
        }
        self.finished.fetch_add(1, Ordering::AcqRel);
        Ok(serde_json::Value::Null)
    }
}

/// The work of one execution in the execution-model workloads.
const EXEC_MS: u64 = 10;

/// Whether `store` still has a pending or in-progress row.
async fn any_live(store: &dyn broker_dispatch::store::Store) -> bool {
    for state in [
        broker_dispatch::fsm::DispatchState::Pending,
        broker_dispatch::fsm::DispatchState::InProgress,
    ] {
        let page = store
            .list(broker_dispatch::store::ListFilter {
                state: Some(state),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        if !page.is_empty() {
            return true;
        }
    }
    false
}

/// One broker, `n` pending 10 ms commands written with `send_many` before it connects, default
/// `max_in_flight` (16): rows per second from the connect until every row is terminal.
async fn exec_throughput_run(store: Arc<dyn broker_dispatch::store::Store>, n: u64) -> f64 {
    let sleeper = Arc::new(Sleeper::default());
    let hub = Hub::builder(node_id("bench"))
        .store(Arc::clone(&store))
        .executor(Arc::clone(&sleeper) as Arc<dyn Executor>)
        .start()
        .await
        .unwrap();
    let b = broker_id("b");
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1_000);
        let cmds = (0..chunk)
            .map(|_| Command::new(b.clone(), "op", json!({ "ms": EXEC_MS })))
            .collect();
        hub.send_many(cmds).await.unwrap();
        left -= chunk;
    }
    let started = Instant::now();
    hub.connect(b, SessionId::new(format!("s{}", now_micros())).unwrap(), ())
        .await
        .unwrap();
    let deadline = started + Duration::from_secs(600);
    while sleeper.finished.load(Ordering::Acquire) < n {
        assert!(
            Instant::now() < deadline,
            "execution throughput run stalled"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while any_live(store.as_ref()).await {
        assert!(
            Instant::now() < deadline,
            "execution throughput run stalled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    hub.shutdown().await.unwrap();
    rate
}

/// The mean wall time of a 10 ms tokio sleep here, in seconds: what one execution of the
/// throughput workloads really costs, the executor alone.
async fn measured_sleep() -> f64 {
    let reps = 50;
    let t = Instant::now();
    for _ in 0..reps {
        tokio::time::sleep(Duration::from_millis(EXEC_MS)).await;
    }
    t.elapsed().as_secs_f64() / f64::from(reps)
}

/// (a) Throughput of one broker's slots with 10 ms executions, memory and SQLite stores, against
/// `max_in_flight / 10 ms` (the most the slots allow) and against `max_in_flight /` the measured
/// 10 ms sleep. (b) The p99 latency of a 10 ms dispatch while the same broker executes a slow
/// command, against the same dispatch's p99 on an idle broker and against the 50 ms target.
async fn exec_model(o: &Options) -> Vec<Row> {
    let n: u64 = if o.quick { 1_000 } else { 10_000 };
    let slots = f64::from(HubConfig::default().max_in_flight);
    let ideal = slots / (EXEC_MS as f64 / 1e3);
    let sleep = measured_sleep().await;
    let mut rows = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    for kind in ["memory", "sqlite"] {
        let mut rates = Vec::new();
        for rep in 0..3 {
            let store: Arc<dyn broker_dispatch::store::Store> = match kind {
                "memory" => Arc::new(MemoryStore::new()),
                _ => {
                    Arc::new(SqliteStore::open(sqlite_fresh(&dir, &format!("exec{rep}"))).unwrap())
                }
            };
            rates.push(exec_throughput_run(store, n).await);
        }
        let rate = median(rates);
        rows.push(Row::new(
            &format!("exec_10ms_{kind}"),
            rate,
            "ops/s",
            "slots_per_10ms",
            ideal,
            true,
        ));
        rows.push(Row::new(
            &format!("exec_10ms_{kind}_vs_sleep"),
            rate,
            "ops/s",
            "slots_per_measured_sleep",
            slots / sleep,
            true,
        ));
    }
    let (samples, slow_ms) = if o.quick { (50, 1_000) } else { (300, 3_000) };
    let idle = behind_slow_p99(samples, None).await;
    let behind = behind_slow_p99(samples, Some(slow_ms)).await;
    rows.push(Row::new(
        "exec_behind_slow_p99",
        behind,
        "ms",
        "exec_idle_broker_p99",
        idle,
        false,
    ));
    rows.push(Row::new(
        "exec_behind_slow_p99_target",
        behind,
        "ms",
        "target_50ms",
        50.0,
        false,
    ));
    rows
}

/// The p99 (ms) of `samples` sequential 10 ms dispatches from one hub to a broker held by
/// another (memory store and transport: every dispatch is a row, claimed by the owner's drain),
/// while — with `slow_ms` — the broker is always executing a slow command sent before each
/// sample (a new one is sent, and seen to start, whenever the previous one ended).
async fn behind_slow_p99(samples: usize, slow_ms: Option<u64>) -> f64 {
    let store = Arc::new(MemoryStore::new());
    let bus = broker_dispatch::transport::MemoryTransport::new();
    let sleeper = Arc::new(Sleeper::default());
    let owner = Hub::builder(node_id("owner"))
        .store(store.clone())
        .transport(Arc::new(bus.clone()))
        .executor(Arc::clone(&sleeper) as Arc<dyn Executor>)
        .start()
        .await
        .unwrap();
    let origin = Hub::builder(node_id("origin"))
        .store(store)
        .transport(Arc::new(bus))
        .executor(Arc::new(Noop))
        .start()
        .await
        .unwrap();
    let b = broker_id("b");
    owner
        .connect(b.clone(), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    let fast = || Command::new(b.clone(), "op", json!({ "ms": EXEC_MS }));
    for _ in 0..5 {
        origin.dispatch(fast()).await.unwrap();
    }
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        if let Some(ms) = slow_ms {
            if sleeper.slow_running.load(Ordering::Acquire) == 0 {
                let seen = sleeper.slow_started.load(Ordering::Acquire);
                origin
                    .send(Command::new(b.clone(), "slow", json!({ "ms": ms })))
                    .await
                    .unwrap();
                let give_up = Instant::now() + Duration::from_secs(60);
                while sleeper.slow_started.load(Ordering::Acquire) == seen {
                    assert!(Instant::now() < give_up, "the slow command never started");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let t = Instant::now();
        origin.dispatch(fast()).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    origin.shutdown().await.unwrap();
    owner.shutdown().await.unwrap();
    percentiles(lat).1
}

// ---------------------------------------------------------------------------------------------
// Postgres

/// Where the Postgres workloads run.
#[derive(Debug)]
struct PgEnv {
    dsn: String,
    /// Held so the throwaway server lives as long as the run.
    _server: Option<pg::PgServer>,
}

fn pg_env() -> Option<&'static PgEnv> {
    static ENV: std::sync::OnceLock<Option<PgEnv>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.is_empty() {
                return Some(PgEnv {
                    dsn: url,
                    _server: None,
                });
            }
        }
        let server = pg::durable()?;
        Some(PgEnv {
            dsn: server.dsn(),
            _server: Some(server),
        })
    })
    .as_ref()
}

/// One migrated schema of its own, with a plain client for loading and checking it.
struct PgSchema {
    dsn: String,
    schema: String,
    client: tokio_postgres::Client,
}

impl PgSchema {
    async fn new(env: &PgEnv) -> PgSchema {
        let schema = pg::unique_name("bench");
        let store = Self::store_for(&env.dsn, &schema).await;
        store.migrate().await.unwrap();
        PgSchema {
            dsn: env.dsn.clone(),
            client: pg::client(&env.dsn).await,
            schema,
        }
    }

    async fn store_for(dsn: &str, schema: &str) -> PgStore {
        PgStore::connect(
            dsn,
            PgStoreOptions {
                schema: schema.to_owned(),
                channel_prefix: schema.to_owned(),
                ..PgStoreOptions::default()
            },
        )
        .await
        .unwrap()
    }

    async fn store(&self) -> PgStore {
        Self::store_for(&self.dsn, &self.schema).await
    }

    async fn transport(&self) -> PgTransport {
        PgTransport::connect(
            &self.dsn,
            PgTransportOptions {
                channel_prefix: self.schema.clone(),
                ..PgTransportOptions::default()
            },
        )
        .await
        .unwrap()
    }

    /// Bulk-loads `n` rows of broker `b` with one `INSERT … SELECT generate_series`.
    async fn load(&self, n: u64, terminal: bool) {
        let s = &self.schema;
        let (state, attempt, result) = if terminal {
            ("done", 1, "'null'::json")
        } else {
            ("pending", 0, "NULL")
        };
        self.client
            .execute(
                &format!(
                    "INSERT INTO {s}.dispatch (id, broker, op, args, state, attempt, max_attempts, \
                       claimed_by, available_at, result, created_at, updated_at) \
                     SELECT gen_random_uuid(), 'b', 'op', 'null'::json, '{state}', {attempt}, 3, \
                       {claimed}, $1::bigint, {result}, $1::bigint + i, $1::bigint + i \
                     FROM generate_series(1, $2::bigint) AS i",
                    claimed = if terminal { "'old'" } else { "NULL" },
                ),
                &[&(now_micros() - 60_000_000), &(n as i64)],
            )
            .await
            .unwrap();
        self.vacuum().await;
    }

    async fn vacuum(&self) {
        self.client
            .batch_execute(&format!("VACUUM ANALYZE {}.dispatch", self.schema))
            .await
            .unwrap();
    }

    async fn live(&self) -> u64 {
        self.client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.dispatch \
                     WHERE broker = 'b' AND state IN ('pending', 'in_progress')",
                    self.schema
                ),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0) as u64
    }

    /// Removes the rows a drain finished (the loaded terminal rows stay).
    async fn forget_drained(&self) {
        self.client
            .execute(
                &format!(
                    "DELETE FROM {}.dispatch WHERE claimed_by IS DISTINCT FROM 'old'",
                    self.schema
                ),
                &[],
            )
            .await
            .unwrap();
        self.vacuum().await;
    }

    async fn drop_schema(self) {
        let _ = self
            .client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .await;
    }

    /// A hub with its own pool and listener.
    async fn hub(&self, node: &str, executor: Arc<dyn Executor>) -> Hub {
        Hub::builder(node_id(node))
            .store(Arc::new(self.store().await))
            .transport(Arc::new(self.transport().await))
            .executor(executor)
            .config(drain_config())
            .start()
            .await
            .unwrap()
    }

    /// The hub draining `n` freshly loaded pending rows.
    async fn hub_drain(&self, n: u64) -> f64 {
        self.load(n, false).await;
        let live = Arc::new(AtomicU64::new(n));
        let watcher = {
            let live = Arc::clone(&live);
            let env = PgSchema {
                dsn: self.dsn.clone(),
                schema: self.schema.clone(),
                client: pg::client(&self.dsn).await,
            };
            tokio::spawn(async move {
                loop {
                    let l = env.live().await;
                    live.store(l, Ordering::Relaxed);
                    if l == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        let rate = timed_drain(
            |probe| async move { self.hub("bench", probe).await },
            n,
            || live.load(Ordering::Relaxed),
        )
        .await;
        watcher.abort();
        self.forget_drained().await;
        rate
    }

    /// A raw tokio-postgres loop claiming-and-finishing `per` rows per `SKIP LOCKED`
    /// statement (pending → done: the least work a queue can do per row on this table).
    async fn raw(&self, n: u64, per: u32) -> f64 {
        self.load(n, false).await;
        let s = &self.schema;
        let stmt = self
            .client
            .prepare(&format!(
                "WITH picked AS MATERIALIZED ( \
                   SELECT c.id FROM {s}.dispatch AS c \
                   WHERE c.broker = 'b' AND c.state IN ('pending', 'in_progress') \
                     AND c.state = 'pending' AND c.available_at <= $2::bigint \
                   ORDER BY c.created_at, c.id LIMIT $1::bigint FOR UPDATE OF c SKIP LOCKED) \
                 UPDATE {s}.dispatch AS d SET state = 'done', attempt = d.attempt + 1, \
                   claimed_by = 'raw', result = 'null'::json, lease_until = NULL, \
                   updated_at = $2::bigint \
                 FROM picked WHERE d.id = picked.id RETURNING d.id"
            ))
            .await
            .unwrap();
        let started = Instant::now();
        let mut done = 0u64;
        loop {
            let rows = self
                .client
                .query(&stmt, &[&i64::from(per), &now_micros()])
                .await
                .unwrap();
            if rows.is_empty() {
                break;
            }
            done += rows.len() as u64;
        }
        let rate = done as f64 / started.elapsed().as_secs_f64();
        self.forget_drained().await;
        rate
    }
}

async fn pg_drain(o: &Options, env: &PgEnv, cache: &mut PgCache) -> Vec<Row> {
    let sz = sizes(o);
    let (mut hub, mut batch, mut single) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let db = PgSchema::new(env).await;
        hub.push(db.hub_drain(sz.drain_rows).await);
        batch.push(db.raw(sz.drain_rows, RAW_BATCH).await);
        single.push(db.raw(sz.single_rows, 1).await);
        db.drop_schema().await;
    }
    let (h, b, s) = (median(hub), median(batch), median(single));
    cache.raw_single = Some(s);
    vec![
        Row::new("pg_drain", h, "rows/s", "pg_raw_batch", b, true),
        Row::new("pg_drain_vs_single", h, "rows/s", "pg_raw_single", s, true),
    ]
}

/// Figures several Postgres workloads share as baselines, measured once per run.
#[derive(Debug, Default)]
struct PgCache {
    raw_single: Option<f64>,
    notify: Option<(f64, f64)>,
}

impl PgCache {
    async fn raw_single(&mut self, o: &Options, env: &PgEnv) -> f64 {
        if self.raw_single.is_none() {
            let mut rates = Vec::new();
            for _ in 0..3 {
                let db = PgSchema::new(env).await;
                rates.push(db.raw(sizes(o).single_rows, 1).await);
                db.drop_schema().await;
            }
            self.raw_single = Some(median(rates));
        }
        self.raw_single.unwrap_or_default()
    }

    async fn notify(&mut self, o: &Options, env: &PgEnv) -> (f64, f64) {
        if self.notify.is_none() {
            self.notify = Some(notify_round_trip(&env.dsn, sizes(o).pickup_samples).await);
        }
        self.notify.unwrap_or_default()
    }
}

/// p50 and p99 of `xs`, in the same unit.
fn percentiles(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    (at(0.50), at(0.99))
}

/// BEGIN; pg_notify; COMMIT on one connection → a LISTEN connection receives it: p50, p99 in
/// µs, one every 10 ms.
async fn notify_round_trip(dsn: &str, samples: usize) -> (f64, f64) {
    use futures::StreamExt;
    let channel = pg::unique_name("rtt");
    let (listener, mut connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                if tx.send(n).is_err() {
                    return;
                }
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    let mut sender = pg::client(dsn).await;
    let stmt = sender
        .prepare("SELECT pg_notify($1::text, $2::text)")
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples + 10 {
        let t0 = Instant::now();
        let tx = sender.transaction().await.unwrap();
        tx.execute(&stmt, &[&channel, &i.to_string()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        rx.recv().await.unwrap();
        if i >= 10 {
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(listener);
    driver.abort();
    percentiles(lat)
}

/// One hub inserts (`send`) at ~100/s for a broker another hub owns; the owner is otherwise
/// idle. Latency from the insert call to the executor starting on the owner.
async fn pg_pickup(o: &Options, env: &PgEnv, cache: &mut PgCache) -> Vec<Row> {
    let samples = sizes(o).pickup_samples;
    let (base50, base99) = cache.notify(o, env).await;
    let db = PgSchema::new(env).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let owner = db
        .hub(
            "owner",
            Arc::new(Probe {
                executed: AtomicU64::new(0),
                starts: Some(tx),
            }),
        )
        .await;
    owner
        .connect(broker_id("b"), SessionId::new("s").unwrap(), ())
        .await
        .unwrap();
    let origin = db.hub("origin", Arc::new(Noop)).await;
    let warmup = 10;
    let mut sent = Vec::with_capacity(samples + warmup);
    for seq in 0..samples + warmup {
        sent.push(Instant::now());
        origin
            .send(Command::new(broker_id("b"), "op", json!({ "seq": seq })))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples + warmup {
        let (seq, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("pickup stalled")
            .unwrap();
        if seq as usize >= warmup {
            lat.push(at.duration_since(sent[seq as usize]).as_secs_f64() * 1e6);
        }
    }
    origin.shutdown().await.unwrap();
    owner.shutdown().await.unwrap();
    db.drop_schema().await;
    let (p50, p99) = percentiles(lat);
    vec![
        Row::new(
            "pg_pickup_p50",
            p50,
            "us",
            "notify_round_trip_p50",
            base50,
            false,
        ),
        Row::new(
            "pg_pickup_p99",
            p99,
            "us",
            "notify_round_trip_p99",
            base99,
            false,
        ),
    ]
}

/// The full round trip: the originator's `dispatch` → the owner executes → the originator has
/// the result, with `c` originators at once.
async fn pg_cross_node(o: &Options, env: &PgEnv, cache: &mut PgCache) -> Vec<Row> {
    let (base50, base99) = cache.notify(o, env).await;
    let single = cache.raw_single(o, env).await;
    let mut rows = Vec::new();
    for (c, total) in sizes(o).cross {
        let db = PgSchema::new(env).await;
        let owner = db.hub("owner", Arc::new(Probe::default())).await;
        owner
            .connect(broker_id("b"), SessionId::new("s").unwrap(), ())
            .await
            .unwrap();
        let origin = db.hub("origin", Arc::new(Noop)).await;
        for _ in 0..5 {
            origin
                .dispatch(Command::new(broker_id("b"), "op", json!(null)))
                .await
                .unwrap();
        }
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|_| {
                let origin = origin.clone();
                let next = Arc::clone(&next);
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < total as u64 {
                        let t0 = Instant::now();
                        origin
                            .dispatch(Command::new(broker_id("b"), "op", json!(null)))
                            .await
                            .unwrap();
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let rate = total as f64 / started.elapsed().as_secs_f64();
        origin.shutdown().await.unwrap();
        owner.shutdown().await.unwrap();
        db.drop_schema().await;
        let (p50, p99) = percentiles(lat);
        rows.push(Row::new(
            &format!("pg_cross_node_{c}c_throughput"),
            rate,
            "ops/s",
            "pg_raw_single",
            single,
            true,
        ));
        rows.push(Row::new(
            &format!("pg_cross_node_{c}c_p50"),
            p50,
            "us",
            "notify_round_trip_p50",
            base50,
            false,
        ));
        rows.push(Row::new(
            &format!("pg_cross_node_{c}c_p99"),
            p99,
            "us",
            "notify_round_trip_p99",
            base99,
            false,
        ));
    }
    rows
}

fn sci(n: u64) -> String {
    format!("1e{}", (n as f64).log10().round() as u32)
}

/// Drain throughput with many terminal rows already in the table vs with few.
async fn scale(o: &Options, pg_env: Option<&PgEnv>) -> Vec<Row> {
    let sz = sizes(o);
    let [small, large] = sz.scale_terminal;
    let mut rows = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite_rates = Vec::new();
    for terminal in [small, large] {
        let path = sqlite_fresh(&dir, &format!("scale{terminal}"));
        sqlite_load(&sqlite_raw_conn(&path), "b", terminal, true);
        let mut rates = Vec::new();
        for _ in 0..3 {
            rates.push(sqlite_hub_drain(&path, sz.scale_pending).await);
        }
        sqlite_rates.push(median(rates));
    }
    rows.push(Row::new(
        &format!("scale_sqlite_drain_{}", sci(large)),
        sqlite_rates[1],
        "rows/s",
        &format!("scale_sqlite_drain_{}", sci(small)),
        sqlite_rates[0],
        true,
    ));
    if let Some(env) = pg_env {
        let mut pg_rates = Vec::new();
        for terminal in [small, large] {
            let db = PgSchema::new(env).await;
            db.load(terminal, true).await;
            let mut rates = Vec::new();
            for _ in 0..3 {
                rates.push(db.hub_drain(sz.scale_pending).await);
            }
            pg_rates.push(median(rates));
            db.drop_schema().await;
        }
        rows.push(Row::new(
            &format!("scale_pg_drain_{}", sci(large)),
            pg_rates[1],
            "rows/s",
            &format!("scale_pg_drain_{}", sci(small)),
            pg_rates[0],
            true,
        ));
    }
    rows
}

/// The server's version and durability settings, for the report.
async fn pg_settings(env: &PgEnv) -> String {
    let c = pg::client(&env.dsn).await;
    let mut out = Vec::new();
    for q in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
    ] {
        let v: String = c
            .query_one(&format!("SHOW {q}"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or_else(|e| e.to_string());
        out.push(format!("{q}={v}"));
    }
    out.join(" ")
}

fn main() {
    let o = <Options as clap::Parser>::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let wants =
        |name: &str| o.only.is_empty() || o.only.iter().any(|w| name.starts_with(w.as_str()));
    let mut rows = Vec::new();
    let started = Instant::now();
    // First: memory freed by the other workloads would be reused and hide the growth.
    if wants("memory_footprint") {
        rows.extend(memory_footprint(&o));
    }
    if wants("local_fast_path") {
        rows.extend(rt.block_on(local_fast_path(&o)));
    }
    if wants("memory_claim_complete") {
        rows.extend(memory_claim_complete(&o));
    }
    if wants("sqlite_drain") {
        rows.extend(rt.block_on(sqlite_drain(&o)));
    }
    if wants("exec") {
        rows.extend(rt.block_on(exec_model(&o)));
    }
    let pg_wanted = ["pg_drain", "pg_pickup", "pg_cross_node", "scale"]
        .iter()
        .any(|w| wants(w));
    let env = if pg_wanted { pg_env() } else { None };
    if let Some(env) = env {
        println!("postgres: {}", rt.block_on(pg_settings(env)));
        let mut cache = PgCache::default();
        if wants("pg_drain") {
            rows.extend(rt.block_on(pg_drain(&o, env, &mut cache)));
        }
        if wants("pg_pickup") {
            rows.extend(rt.block_on(pg_pickup(&o, env, &mut cache)));
        }
        if wants("pg_cross_node") {
            rows.extend(rt.block_on(pg_cross_node(&o, env, &mut cache)));
        }
    } else if pg_wanted {
        println!("postgres workloads skipped: no DATABASE_URL and no server binaries");
    }
    if wants("scale") {
        rows.extend(rt.block_on(scale(&o, env)));
    }
    println!(
        "{:<32} {:>14} {:<12} {:<28} {:>14} {:>8}",
        "workload", "value", "unit", "baseline", "baseline", "ratio"
    );
    for r in &rows {
        println!(
            "{:<32} {:>14.1} {:<12} {:<28} {:>14.1} {:>8.3}",
            r.name, r.value, r.unit, r.baseline, r.baseline_value, r.ratio
        );
    }
    println!(
        "bench: {} figures in {:.1}s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
