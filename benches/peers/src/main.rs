//! Throughput of broker-dispatch's Postgres drain beside graphile_worker 0.14 and a raw
//! `SKIP LOCKED` loop, on one throwaway Postgres with fsync on, in one run.
//!
//! ```text
//! cargo run --release -- [--jobs 20000,100000] [--reps 3] [--workers 1,8]
//!                        [--only gw|bd|raw]… [--database-url URL] [--profile]
//! ```
//!
//! Method (the same for every system): N no-op jobs are bulk-inserted untimed, then
//! `VACUUM ANALYZE` and `CHECKPOINT`; the clock runs from the worker's start until every row is
//! terminal (polled every 20 ms once the worker has run all N). Repetitions are interleaved
//! (gw, bd, raw, gw, bd, raw, …) and the median is reported, with the ratios taken within the
//! run. See README.md beside this file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{PgStore, PgStoreOptions};
use broker_dispatch::transport::{PgTransport, PgTransportOptions};
use broker_dispatch::ExecError;
use graphile_worker::{IntoTaskHandlerResult, JobSpec, RawJobSpec, TaskHandler, WorkerContext};
use serde::{Deserialize, Serialize};

#[path = "../../../tests/support/pg.rs"]
#[allow(unreachable_pub, missing_docs)]
mod pg;

mod profile;

/// Rows per claim (broker-dispatch) and per raw statement, as in the crate's own benchmark.
pub const BATCH: u32 = 100;

/// The hub configuration of every broker-dispatch run. Fields added to `HubConfig` later take
/// their defaults; set them here.
fn hub_config() -> HubConfig {
    HubConfig {
        claim_batch: BATCH,
        ..HubConfig::default()
    }
}

#[derive(Debug, Clone)]
struct Options {
    jobs: Vec<u64>,
    reps: usize,
    workers: Vec<usize>,
    only: Vec<System>,
    database_url: Option<String>,
    profile: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    /// graphile_worker as its own benchmark configures it: a local queue of 100 (one fetch
    /// claims up to 100 jobs), 10 ms polling, one completion (DELETE) per job.
    Gw,
    /// The same with batched completions (`complete_job_batch_delay` 1 ms), the shape of
    /// broker-dispatch's drain (which writes a batch's outcomes in one statement).
    GwBatch,
    Bd,
    Raw,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Gw => "graphile_worker",
            System::GwBatch => "graphile_worker (batched completion)",
            System::Bd => "broker-dispatch",
            System::Raw => "raw_skip_locked",
        }
    }
}

fn list<T: std::str::FromStr>(v: &str, flag: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| {
            x.trim()
                .replace('_', "")
                .parse()
                .map_err(|_| format!("{flag}: bad value {x:?}"))
        })
        .collect()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        jobs: vec![20_000],
        reps: 3,
        workers: vec![1, 8],
        only: Vec::new(),
        database_url: None,
        profile: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--jobs" => o.jobs = list(&value()?, "--jobs")?,
            "--reps" => o.reps = value()?.parse().map_err(|_| "--reps: not a number")?,
            "--workers" => o.workers = list(&value()?, "--workers")?,
            "--only" => {
                for s in value()?.split(',') {
                    o.only.push(match s {
                        "gw" => System::Gw,
                        "gwb" => System::GwBatch,
                        "bd" => System::Bd,
                        "raw" => System::Raw,
                        _ => return Err(format!("--only: gw, gwb, bd or raw, not {s:?}")),
                    });
                }
            }
            "--database-url" => o.database_url = Some(value()?),
            "--profile" => o.profile = true,
            "-h" | "--help" => {
                println!(
                    "peers [--jobs N[,N…]] [--reps N] [--workers W[,W…]] [--only gw|gwb|bd|raw]… \
                     [--database-url URL] [--profile]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?} (try --help)")),
        }
    }
    if o.only.is_empty() {
        o.only = vec![System::Gw, System::GwBatch, System::Bd, System::Raw];
    }
    if o.reps == 0 || o.jobs.is_empty() || o.workers.contains(&0) {
        return Err("--reps, --jobs and --workers must be positive".into());
    }
    Ok(o)
}

/// Where the runs happen, and the server if this process started it.
pub struct Env {
    pub dsn: String,
    pub admin: tokio_postgres::Client,
    _server: Option<pg::PgServer>,
}

async fn env(o: &Options) -> Env {
    let url = o
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()));
    let (dsn, server) = match url {
        Some(u) => (u, None),
        None => {
            let server = pg::durable().expect("no Postgres: set DATABASE_URL or install one");
            // pg_stat_statements needs preloading; our own server can be restarted for it.
            let c = pg::client(&server.dsn()).await;
            c.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                .await
                .unwrap();
            drop(c);
            server.restart().expect("restart with pg_stat_statements");
            (server.dsn(), Some(server))
        }
    };
    let admin = pg::client(&dsn).await;
    if let Err(e) = admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
    {
        eprintln!("pg_stat_statements unavailable ({e}); --profile will lack statement stats");
    }
    Env {
        dsn,
        admin,
        _server: server,
    }
}

pub async fn settle(admin: &tokio_postgres::Client, table: &str) {
    admin
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await
        .unwrap();
    admin.batch_execute("CHECKPOINT").await.unwrap();
}

pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `executed` reaches `n` (in-process, no database load), then polls `live_sql`
/// every 20 ms until it reports 0; returns the time since `started`.
async fn wait_terminal(
    c: &tokio_postgres::Client,
    live_sql: &str,
    executed: &AtomicU64,
    n: u64,
    started: Instant,
) -> Duration {
    let deadline = started + Duration::from_secs(1800);
    let mut last_db_check = Instant::now();
    while executed.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "run stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A fallback in case executions are counted short (retries would count twice).
        if last_db_check.elapsed() > Duration::from_secs(2) {
            last_db_check = Instant::now();
            if count(c, live_sql).await == 0 {
                return started.elapsed();
            }
        }
    }
    loop {
        if count(c, live_sql).await == 0 {
            return started.elapsed();
        }
        assert!(Instant::now() < deadline, "run stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// graphile_worker

const GW_SCHEMA: &str = "peers_gw";

#[derive(Clone, Debug)]
struct Done(Arc<AtomicU64>);

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Noop {
    i: u64,
}

impl TaskHandler for Noop {
    const IDENTIFIER: &'static str = "noop";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if let Some(d) = ctx.get_ext::<Done>() {
            d.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<(), String>(())
    }
}

/// graphile_worker with `workers` job slots. Its direct mode (no local queue) fetches one job
/// per slot per wake-up (poll tick or notification), so a pre-filled queue drains at about
/// `workers / poll_interval`; the local queue is what makes it drain a backlog, and its own
/// benchmark (benches/common in the crate) configures it this way.
async fn gw_run(env: &Env, n: u64, workers: usize, batched_completion: bool) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let mut options = graphile_worker::WorkerOptions::default()
        .database_url(&env.dsn)
        .max_pg_conn(workers as u32 + 4)
        .schema(GW_SCHEMA)
        .concurrency(workers)
        .poll_interval(Duration::from_millis(10))
        .local_queue(graphile_worker::LocalQueueConfig::default().with_size(BATCH as usize))
        .listen_os_shutdown_signals(false)
        .add_extension(Done(Arc::clone(&done)))
        .define_job::<Noop>();
    if batched_completion {
        options = options.complete_job_batch_delay(Duration::from_millis(1));
    }
    let worker = options.init().await.expect("graphile_worker init");
    let jobs = format!("{GW_SCHEMA}._private_jobs");
    env.admin
        .batch_execute(&format!("DELETE FROM {jobs}"))
        .await
        .unwrap();
    // Untimed bulk insert through the library's own batch path.
    let utils = worker.create_utils();
    let mut i = 0;
    while i < n {
        let chunk: Vec<RawJobSpec> = (i..n.min(i + 5_000))
            .map(|i| RawJobSpec {
                identifier: Noop::IDENTIFIER.to_owned(),
                payload: serde_json::to_value(Noop { i }).unwrap(),
                spec: JobSpec::default(),
            })
            .collect();
        i += chunk.len() as u64;
        utils.add_raw_jobs(&chunk).await.expect("add_raw_jobs");
    }
    assert_eq!(
        count(&env.admin, &format!("SELECT count(*) FROM {jobs}")).await as u64,
        n
    );
    settle(&env.admin, &jobs).await;

    let worker = Arc::new(worker);
    let started = Instant::now();
    let handle = {
        let w = Arc::clone(&worker);
        tokio::spawn(async move { w.run().await })
    };
    // graphile_worker deletes a job when it completes; a permanently failed job keeps its row
    // (none here: the task cannot fail), so "terminal" is "gone".
    let took = wait_terminal(
        &env.admin,
        &format!("SELECT count(*) FROM {jobs}"),
        &done,
        n,
        started,
    )
    .await;
    worker.request_shutdown();
    handle.await.unwrap().expect("graphile_worker run");
    n as f64 / took.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// broker-dispatch

#[derive(Debug, Default)]
struct Counting(AtomicU64);

#[async_trait]
impl Executor for Counting {
    async fn execute(
        &self,
        _ctx: ExecContext,
        _d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(serde_json::Value::Null)
    }
}

pub fn broker(i: usize) -> String {
    format!("b{i}")
}

/// A freshly migrated broker-dispatch schema.
pub async fn bd_schema(env: &Env) -> String {
    let schema = pg::unique_name("peers_bd");
    bd_store(env, &schema).await.migrate().await.unwrap();
    schema
}

pub async fn bd_store(env: &Env, schema: &str) -> PgStore {
    PgStore::connect(
        &env.dsn,
        PgStoreOptions {
            schema: schema.to_owned(),
            channel_prefix: schema.to_owned(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Bulk-loads `n` pending rows spread round-robin over `brokers` brokers, with one
/// `INSERT … SELECT generate_series` (the columns of src/store/migrations/postgres/0001_init.sql;
/// the ones left out are NULL, as `PgStore::insert` leaves them for a plain command), then
/// `VACUUM ANALYZE` + `CHECKPOINT`.
pub async fn bd_load(env: &Env, schema: &str, table: &str, n: u64, brokers: usize) {
    env.admin
        .execute(
            &format!(
                "INSERT INTO {schema}.{table} (id, broker, op, args, state, attempt, max_attempts, \
                   available_at, created_at, updated_at) \
                 SELECT gen_random_uuid(), 'b' || (i % $3::bigint), 'noop', \
                   json_build_object('i', i), 'pending', 0, 3, $1::bigint, $1::bigint + i, \
                   $1::bigint + i \
                 FROM generate_series(0, $2::bigint - 1) AS i"
            ),
            &[&(now_micros() - 60_000_000), &(n as i64), &(brokers as i64)],
        )
        .await
        .unwrap();
    settle(&env.admin, &format!("{schema}.{table}")).await;
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

pub fn bd_live_sql(schema: &str) -> String {
    format!("SELECT count(*) FROM {schema}.dispatch WHERE state NOT IN ('done', 'failed')")
}

/// One hub (its own pool and listener) with `brokers` brokers connected to it drains `n`
/// pre-inserted rows. Returns rows/s.
pub async fn bd_drain(env: &Env, schema: &str, n: u64, brokers: usize) -> f64 {
    let exec = Arc::new(Counting::default());
    let transport = PgTransport::connect(
        &env.dsn,
        PgTransportOptions {
            channel_prefix: schema.to_owned(),
            ..PgTransportOptions::default()
        },
    )
    .await
    .unwrap();
    let hub = Hub::builder(NodeId::new("peers-hub").unwrap())
        .store(Arc::new(bd_store(env, schema).await))
        .transport(Arc::new(transport))
        .executor(exec.clone())
        .config(hub_config())
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    for b in 0..brokers {
        hub.connect(
            BrokerId::new(broker(b)).unwrap(),
            SessionId::new(format!("s{b}")).unwrap(),
            (),
        )
        .await
        .unwrap();
    }
    let took = wait_terminal(&env.admin, &bd_live_sql(schema), &exec.0, n, started).await;
    hub.shutdown().await.unwrap();
    n as f64 / took.as_secs_f64()
}

async fn bd_run(env: &Env, n: u64, brokers: usize) -> f64 {
    let schema = bd_schema(env).await;
    bd_load(env, &schema, "dispatch", n, brokers).await;
    let rate = bd_drain(env, &schema, n, brokers).await;
    drop_schema(env, &schema).await;
    rate
}

pub async fn drop_schema(env: &Env, schema: &str) {
    let _ = env
        .admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
}

// ---------------------------------------------------------------------------------------------
// The raw baseline

/// The crate's own raw batch statement (examples/bench.rs `PgSchema::raw`), per broker: flips up
/// to `$1` rows straight from pending to done in one statement and transaction.
pub fn raw_sql(schema: &str, table: &str) -> String {
    format!(
        "WITH picked AS MATERIALIZED ( \
           SELECT c.id FROM {schema}.{table} AS c \
           WHERE c.broker = $3::text AND c.state IN ('pending', 'in_progress') \
             AND c.state = 'pending' AND c.available_at <= $2::bigint \
           ORDER BY c.created_at, c.id LIMIT $1::bigint FOR UPDATE OF c SKIP LOCKED) \
         UPDATE {schema}.{table} AS d SET state = 'done', attempt = d.attempt + 1, \
           claimed_by = 'raw', result = 'null'::json, lease_until = NULL, \
           updated_at = $2::bigint \
         FROM picked WHERE d.id = picked.id RETURNING d.id"
    )
}

/// `loops` connections, one per broker, each flipping its broker's rows 100 per statement until
/// none is left. Returns rows/s.
pub async fn raw_drain(env: &Env, schema: &str, table: &str, n: u64, loops: usize) -> f64 {
    let mut clients = Vec::new();
    for _ in 0..loops {
        let c = pg::client(&env.dsn).await;
        let stmt = c.prepare(&raw_sql(schema, table)).await.unwrap();
        clients.push((c, stmt));
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(b, (c, stmt))| {
            tokio::spawn(async move {
                let name = broker(b);
                let mut done = 0u64;
                loop {
                    let rows = c
                        .query(&stmt, &[&i64::from(BATCH), &now_micros(), &name])
                        .await
                        .unwrap();
                    if rows.is_empty() {
                        return done;
                    }
                    done += rows.len() as u64;
                }
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    let took = started.elapsed();
    assert_eq!(done, n, "the raw loops flipped every row");
    n as f64 / took.as_secs_f64()
}

async fn raw_run(env: &Env, n: u64, loops: usize) -> f64 {
    let schema = bd_schema(env).await;
    bd_load(env, &schema, "dispatch", n, loops).await;
    let rate = raw_drain(env, &schema, "dispatch", n, loops).await;
    drop_schema(env, &schema).await;
    rate
}

// ---------------------------------------------------------------------------------------------

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn facts(env: &Env) -> String {
    let v: String = env
        .admin
        .query_one("SELECT version()", &[])
        .await
        .unwrap()
        .get(0);
    let mut s = v.split(" on ").next().unwrap_or(&v).to_owned();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
    ] {
        let r = env
            .admin
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap();
        s.push_str(&format!(" {name}={}", r.get::<_, String>(0)));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{s}; nproc={cpus}")
}

#[tokio::main]
async fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let env = env(&o).await;
    println!("# {}", facts(&env).await);
    if o.profile {
        profile::run(&env, &o.jobs).await;
        return;
    }
    println!("# reps={} (interleaved), median reported; rows/s", o.reps);
    println!("| jobs | workers/brokers | system | rows/s (median) | reps | load (1/5/15 min) |");
    println!("|---:|---:|---|---:|---|---|");
    let mut summary = Vec::new();
    for &n in &o.jobs {
        for &w in &o.workers {
            let mut rates: Vec<(System, Vec<f64>)> =
                o.only.iter().map(|&s| (s, Vec::new())).collect();
            let load_before = load_avg();
            for _ in 0..o.reps {
                for (s, v) in rates.iter_mut() {
                    let r = match s {
                        System::Gw => gw_run(&env, n, w, false).await,
                        System::GwBatch => gw_run(&env, n, w, true).await,
                        System::Bd => bd_run(&env, n, w).await,
                        System::Raw => raw_run(&env, n, w).await,
                    };
                    v.push(r);
                }
            }
            let load_after = load_avg();
            let mut medians = Vec::new();
            for (s, v) in &rates {
                let m = median(v.clone());
                let reps: Vec<String> = v.iter().map(|r| format!("{r:.0}")).collect();
                println!(
                    "| {n} | {w}/{w} | {} | {m:.0} | {} | {load_before} → {load_after} |",
                    s.name(),
                    reps.join(", ")
                );
                medians.push((*s, m));
            }
            let get = |s| medians.iter().find(|(x, _)| *x == s).map(|(_, m)| *m);
            let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
            let (bd, gw, gwb, raw) = (
                get(System::Bd),
                get(System::Gw),
                get(System::GwBatch),
                get(System::Raw),
            );
            summary.push((
                n,
                w,
                [
                    ratio(bd, gw),
                    ratio(bd, gwb),
                    ratio(bd, raw),
                    ratio(gw, raw),
                    ratio(gwb, raw),
                ],
            ));
        }
    }
    println!();
    println!("| jobs | workers/brokers | bd / gw | bd / gw batched | bd / raw | gw / raw | gw batched / raw |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let f = |x: &Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.3}"));
    for (n, w, r) in summary {
        let cells: Vec<String> = r.iter().map(f).collect();
        println!("| {n} | {w}/{w} | {} |", cells.join(" | "));
    }
    println!("# load at the end: {}", load_avg());
}
