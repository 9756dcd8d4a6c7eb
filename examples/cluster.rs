//! The demo: three hubs in one process share one store and one transport; twenty brokers
//! connect and flap between them while random originators send commands through `dispatch` and
//! `send`. A fifth of the commands carry an ordering key per (broker, agent), and one in 250 is
//! slow (200-500 ms, reporting progress). At the end every command is checked: none lost; and
//! from the executors' own records: no (id, attempt) executed twice, no execution started at or
//! after its row's deadline, no dispatch executed more than `max_attempts` times, no two
//! executions of one key overlapping or out of insertion order.
//!
//! ```text
//! cargo run --release --example cluster -- [--commands N] [--seed S] [--store sqlite|memory] [--db PATH]
//! cargo run --release --features postgres --example cluster -- --database-url postgres://… [--round-trip N]
//! ```
//!
//! With `--database-url` the hubs run over Postgres as separate replicas would: each has its own
//! `PgStore` pool and its own `PgTransport` listener, so every wake-up really travels through
//! NOTIFY. The tables live in a fresh schema, `demo_<pid>`, dropped at the end.
//!
//! `--round-trip N` measures the cross-node round trip instead: N sequential `dispatch` calls
//! from `hub-0` to a broker connected to `hub-1` (an executor that answers at once), reported as
//! `round_trip: store=… n=… p50_ms=… p99_ms=…`.
//!
//! The last stdout line of a normal run is machine-readable:
//! `summary: store=… dispatched=… done=… failed=… lost=… duplicate_executions=… late_starts=…
//! key_overlaps=… key_out_of_order=… over_attempts=… p50_ms=… p99_ms=…`; the run exits non-zero
//! if any of `lost` to `over_attempts` is not 0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_dispatch::fsm::{
    Attempt, BrokerId, Dispatch, DispatchId, DispatchState, NodeId, SessionId, Timestamp,
};
use broker_dispatch::hub::{Command, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{list_all, ListFilter, MemoryStore, SqliteStore, Store};
use broker_dispatch::transport::{MemoryTransport, Transport};
use broker_dispatch::{Error, ExecError};
use parking_lot::Mutex;
use serde_json::json;

const HUBS: usize = 3;
const BROKERS: usize = 20;
const ORIGINATORS: usize = 32;
/// Ordering keys per broker.
const AGENTS: usize = 4;

/// The demo: three hubs, twenty flapping brokers, every command checked at the end.
#[derive(Debug, clap::Parser)]
#[command(name = "cluster")]
struct Options {
    /// Commands to send.
    #[arg(long, default_value_t = 10_000)]
    commands: usize,
    /// Seed of the originators' and the flapper's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The store the hubs share (postgres when --database-url is given).
    #[arg(long, value_parser = ["sqlite", "memory", "postgres"], default_value = "sqlite")]
    store: String,
    /// The SQLite file (default: a temporary one).
    #[arg(long, visible_alias = "db", value_name = "PATH")]
    sqlite: Option<std::path::PathBuf>,
    /// Run over Postgres, each hub with its own pool and LISTEN connection.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Measure N sequential cross-node round trips instead.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    round_trip: Option<u64>,
}

fn parse_args() -> Options {
    let mut o = <Options as clap::Parser>::parse();
    if o.database_url.is_some() {
        o.store = "postgres".into();
    }
    o
}

/// One hub's store and transport.
type Backend = (Arc<dyn Store>, Arc<dyn Transport>);

/// What must outlive the run: a temporary database directory, or a Postgres schema to drop.
#[derive(Default)]
struct Cleanup {
    _tempdir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    schema: Option<broker_dispatch::store::PgStore>,
}

impl Cleanup {
    async fn run(self) {
        #[cfg(feature = "postgres")]
        if let Some(store) = self.schema {
            if let Err(e) = store.drop_schema().await {
                eprintln!("could not drop schema {}: {e}", store.schema());
            }
        }
    }
}

/// Opens one (store, transport) per hub: one shared store and in-process transport for
/// memory and SQLite; a pool and a listener of its own per hub for Postgres.
async fn open_backends(o: &Options) -> Result<(Vec<Backend>, Cleanup), String> {
    let mut cleanup = Cleanup::default();
    let shared: Arc<dyn Store> = match o.store.as_str() {
        "memory" => Arc::new(MemoryStore::new()),
        "sqlite" => {
            let path = match &o.sqlite {
                Some(p) => p.clone(),
                None => {
                    let dir =
                        tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
                    let path = dir.path().join("cluster.db");
                    cleanup._tempdir = Some(dir);
                    path
                }
            };
            let store = SqliteStore::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Arc::new(store)
        }
        "postgres" => {
            let url = o
                .database_url
                .as_deref()
                .ok_or("--store postgres needs --database-url")?;
            return open_postgres(url, cleanup).await;
        }
        other => {
            return Err(format!(
                "unknown store {other:?}: expected sqlite or memory (or --database-url)"
            ))
        }
    };
    let bus = MemoryTransport::new();
    let backends = (0..HUBS)
        .map(|_| {
            let t: Arc<dyn Transport> = Arc::new(bus.clone());
            (shared.clone(), t)
        })
        .collect();
    Ok((backends, cleanup))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, mut cleanup: Cleanup) -> Result<(Vec<Backend>, Cleanup), String> {
    use broker_dispatch::store::{PgStore, PgStoreOptions};
    use broker_dispatch::transport::{PgTransport, PgTransportOptions};
    let schema = format!("demo_{}", std::process::id());
    let mut backends: Vec<Backend> = Vec::new();
    for i in 0..HUBS {
        let store = PgStore::connect(
            url,
            PgStoreOptions {
                schema: schema.clone(),
                channel_prefix: schema.clone(),
                pool_size: 8,
                ..PgStoreOptions::default()
            },
        )
        .await
        .map_err(|e| format!("connect to postgres: {e}"))?;
        if i == 0 {
            store
                .migrate()
                .await
                .map_err(|e| format!("migrate schema {schema}: {e}"))?;
            cleanup.schema = Some(store.clone());
        }
        let transport = PgTransport::connect(
            url,
            PgTransportOptions {
                channel_prefix: schema.clone(),
                ..PgTransportOptions::default()
            },
        )
        .await
        .map_err(|e| format!("listen on postgres: {e}"))?;
        backends.push((Arc::new(store), Arc::new(transport)));
    }
    Ok((backends, cleanup))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str, _cleanup: Cleanup) -> Result<(Vec<Backend>, Cleanup), String> {
    Err("this build has no Postgres support: run with --features postgres".into())
}

/// Records every execution, per (id, attempt), across all hubs.
#[derive(Debug, Default)]
struct Ledger {
    runs: HashMap<(DispatchId, Attempt), u32>,
    /// Every execution, as its executor saw it.
    execs: Vec<Execution>,
}

/// One execution, as the executor saw it: the row it was handed and when it ran (wall clock,
/// the clock the memory and SQLite stores stamp rows with).
#[derive(Debug)]
struct Execution {
    id: DispatchId,
    execution: u32,
    max_attempts: u32,
    broker: BrokerId,
    key: Option<String>,
    /// The row's place in its key's order.
    inserted: (Timestamp, DispatchId),
    deadline: Option<Timestamp>,
    start: Timestamp,
    /// `None` until it returns.
    end: Option<Timestamp>,
}

fn wall_now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// What the executors' records say about the model's promises.
#[derive(Debug, Default)]
struct Audit {
    /// Executions that started at or after their row's deadline.
    late_starts: usize,
    /// Pairs of executions of one (broker, key) that ran at the same time.
    key_overlaps: usize,
    /// Executions of one (broker, key) that started before an execution of an older row.
    key_out_of_order: usize,
    /// Dispatches executed more often than their `max_attempts` (or an execution numbered
    /// beyond it).
    over_attempts: usize,
    keyed_executions: usize,
    slow_executions: usize,
}

fn audit(execs: &[Execution]) -> Audit {
    let mut a = Audit::default();
    let mut per_id: HashMap<DispatchId, (u32, u32)> = HashMap::new();
    let mut per_key: HashMap<(&BrokerId, &str), Vec<&Execution>> = HashMap::new();
    for e in execs {
        if e.deadline.is_some_and(|d| e.start >= d) {
            a.late_starts += 1;
        }
        if e.execution > e.max_attempts {
            a.over_attempts += 1;
        }
        let n = per_id.entry(e.id).or_insert((0, e.max_attempts));
        n.0 += 1;
        if let Some(k) = &e.key {
            per_key.entry((&e.broker, k.as_str())).or_default().push(e);
        }
    }
    a.over_attempts += per_id.values().filter(|(n, max)| n > max).count();
    for list in per_key.values_mut() {
        a.keyed_executions += list.len();
        list.sort_by_key(|e| e.start);
        let mut busy_until: Option<Timestamp> = None;
        let mut latest: Option<(Timestamp, DispatchId)> = None;
        for e in list.iter() {
            // An execution that never returned holds its key forever.
            let end = e.end.unwrap_or(Timestamp::from_micros(i64::MAX));
            if busy_until.is_some_and(|b| e.start < b) {
                a.key_overlaps += 1;
            }
            busy_until = Some(busy_until.map_or(end, |b| b.max(end)));
            if latest.is_some_and(|l| e.inserted < l) {
                a.key_out_of_order += 1;
            }
            latest = Some(latest.map_or(e.inserted, |l| l.max(e.inserted)));
        }
    }
    a
}

#[derive(Debug)]
struct BrokerConnection {
    node: NodeId,
    ledger: Arc<Mutex<Ledger>>,
    seed: u64,
    /// Answer at once, never fail (to measure the dispatch path alone).
    instant: bool,
}

#[async_trait]
impl Executor for BrokerConnection {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let record = {
            let start = wall_now();
            let mut ledger = self.ledger.lock();
            *ledger.runs.entry((ctx.id(), ctx.attempt())).or_default() += 1;
            ledger.execs.push(Execution {
                id: ctx.id(),
                execution: ctx.execution(),
                max_attempts: d.max_attempts,
                broker: d.broker.clone(),
                key: d.key.clone(),
                inserted: (d.created_at, d.id),
                deadline: d.deadline,
                start,
                end: None,
            });
            ledger.execs.len() - 1
        };
        let result = self.work(&ctx, d).await;
        self.ledger.lock().execs[record].end = Some(wall_now());
        result
    }
}

impl BrokerConnection {
    async fn work(&self, ctx: &ExecContext, d: &Dispatch) -> Result<serde_json::Value, ExecError> {
        if self.instant {
            return Ok(json!({ "op": d.op, "node": self.node.as_str() }));
        }
        if d.op == "slow" {
            // A long remote operation that tells its originator how far it got.
            let ms = d.args["ms"].as_u64().unwrap_or(300);
            let steps = ms.div_ceil(100);
            for step in 0..steps {
                tokio::time::sleep(Duration::from_millis(ms / steps)).await;
                ctx.report_progress(json!({ "step": step + 1, "of": steps }));
            }
            return Ok(json!({ "op": d.op, "node": self.node.as_str(), "ms": ms }));
        }
        // A remote call: a little latency, and now and then a transient failure.
        let h = ctx.id().as_uuid().as_u128() as u64 ^ self.seed;
        tokio::time::sleep(Duration::from_micros(200 + h % 800)).await;
        if h.is_multiple_of(50) && ctx.execution() == 1 {
            return Err(ExecError::retry_after(
                Duration::from_millis(5),
                "broker busy",
            ));
        }
        Ok(json!({ "op": d.op, "node": self.node.as_str(), "attempt": ctx.attempt() }))
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Debug)]
enum Result_ {
    Done,
    Failed,
    /// The originator stopped waiting; the row decides.
    Open(DispatchId),
}

fn main() {
    let o = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(o)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Options) -> Result<(), Box<dyn std::error::Error>> {
    let (backends, cleanup) = open_backends(&o).await?;
    let store = backends[0].0.clone();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let config = HubConfig {
        lease: Duration::from_secs(2),
        freshness: Duration::from_secs(3),
        wait_window: Duration::from_secs(10),
        poll_interval: Duration::from_millis(50),
        sweep_interval: Duration::from_millis(250),
        ..HubConfig::default()
    };
    let mut hubs = Vec::new();
    for (i, (store, transport)) in backends.into_iter().enumerate() {
        let node = NodeId::new(format!("hub-{i}"))?;
        let exec = BrokerConnection {
            node: node.clone(),
            ledger: ledger.clone(),
            seed: o.seed,
            instant: o.round_trip.is_some(),
        };
        hubs.push(
            Hub::builder(node)
                .store(store)
                .transport(transport)
                .executor(Arc::new(exec))
                .config(config.clone())
                .start()
                .await?,
        );
    }
    if let Some(n) = o.round_trip {
        let r = round_trip(&hubs, usize::try_from(n)?).await;
        for h in &hubs {
            h.shutdown().await?;
        }
        cleanup.run().await;
        return r;
    }
    let brokers: Vec<BrokerId> = (0..BROKERS)
        .map(|i| BrokerId::new(format!("broker-{i:02}")))
        .collect::<Result<_, _>>()?;
    let placement = Arc::new(Mutex::new(Vec::new()));
    for (i, b) in brokers.iter().enumerate() {
        let s = SessionId::new(format!("{b}-0"))?;
        hubs[i % HUBS].connect(b.clone(), s.clone(), ()).await?;
        placement.lock().push((i % HUBS, s));
    }

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flaps = Arc::new(AtomicUsize::new(0));
    let flapper = tokio::spawn(flap(
        hubs.clone(),
        brokers.clone(),
        placement.clone(),
        stop.clone(),
        flaps.clone(),
        o.seed,
    ));

    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(o.commands)));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(o.commands)));
    let mut workers = Vec::new();
    for w in 0..ORIGINATORS {
        let (hubs, brokers, next, finished, outcomes, latencies) = (
            hubs.clone(),
            brokers.clone(),
            next.clone(),
            finished.clone(),
            outcomes.clone(),
            latencies.clone(),
        );
        let total = o.commands;
        let mut rng = Rng(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w as u64 + 1) | 1);
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                let hub = &hubs[rng.below(HUBS)];
                let broker = brokers[rng.below(BROKERS)].clone();
                let cmd = if n % 250 == 3 {
                    let ms = 200 + rng.below(301) as u64;
                    Command::new(broker, "slow", json!({ "n": n, "ms": ms }))
                } else {
                    Command::new(broker, "message", json!({ "n": n }))
                };
                // A fifth of the commands belong to one of a broker's agents: those of one
                // (broker, agent) must run one at a time, in the order they were written.
                let cmd = if n % 5 == 1 {
                    let agent = rng.below(AGENTS);
                    cmd.key(format!("agent-{agent}"))
                } else {
                    cmd
                };
                let t = Instant::now();
                let outcome = if n % 4 == 0 {
                    match hub.send(cmd).await {
                        Ok(r) => Result_::Open(r.id),
                        Err(e) => {
                            eprintln!("send failed: {e}");
                            Result_::Failed
                        }
                    }
                } else {
                    let r = hub.dispatch(cmd).await;
                    latencies.lock().push(t.elapsed());
                    match r {
                        Ok(_) => Result_::Done,
                        Err(Error::TimedOut { id, .. }) => Result_::Open(id),
                        Err(_) => Result_::Failed,
                    }
                };
                outcomes.lock().push(outcome);
                finished.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let bar = tokio::spawn(progress(finished.clone(), o.commands));
    for w in workers {
        w.await?;
    }
    bar.abort();
    stop.store(true, Ordering::Relaxed);
    flapper.await??;

    // Settle: every open command must reach a terminal row.
    let outcomes = std::mem::take(&mut *outcomes.lock());
    let open: Vec<DispatchId> = outcomes
        .iter()
        .filter_map(|r| {
            if let Result_::Open(id) = r {
                Some(*id)
            } else {
                None
            }
        })
        .collect();
    let settle = Instant::now();
    let mut states: HashMap<DispatchId, DispatchState> = HashMap::new();
    loop {
        for id in &open {
            if states.get(id).is_none_or(|s| !s.is_terminal()) {
                if let Some(d) = store.get(*id).await? {
                    states.insert(*id, d.state);
                }
            }
        }
        let all_terminal = open
            .iter()
            .all(|id| states.get(id).is_some_and(|s| s.is_terminal()));
        if all_terminal || settle.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let (mut done, mut failed, mut lost) = (0, 0, 0);
    for r in &outcomes {
        match r {
            Result_::Done => done += 1,
            Result_::Failed => failed += 1,
            Result_::Open(id) => match states.get(id) {
                Some(DispatchState::Done) => done += 1,
                Some(DispatchState::Failed) => failed += 1,
                _ => lost += 1,
            },
        }
    }
    let duplicates = ledger.lock().runs.values().filter(|n| **n > 1).count();
    for h in &hubs {
        h.shutdown().await?;
    }
    let checks = {
        let ledger = ledger.lock();
        let mut a = audit(&ledger.execs);
        a.slow_executions = ledger
            .execs
            .iter()
            .filter(|e| {
                e.end
                    .is_some_and(|end| end.duration_since(e.start) >= Duration::from_millis(200))
            })
            .count();
        a
    };
    let executions: u32 = ledger.lock().runs.values().sum();
    let rows = count_rows(store.as_ref()).await?;
    let mut lat = std::mem::take(&mut *latencies.lock());
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    cleanup.run().await;

    println!(
        "broker-dispatch demo: {HUBS} hubs, {BROKERS} brokers, {ORIGINATORS} originators, seed {}",
        o.seed
    );
    println!("  {:<24} {:>10}", "store", store.name());
    println!("  {:<24} {:>10}", "commands", outcomes.len());
    println!("  {:<24} {:>10}", "  done", done);
    println!("  {:<24} {:>10}", "  failed", failed);
    println!("  {:<24} {:>10}", "  lost", lost);
    println!("  {:<24} {:>10}", "dispatch rows written", rows);
    println!("  {:<24} {:>10}", "executions", executions);
    println!("  {:<24} {:>10}", "duplicate executions", duplicates);
    println!(
        "  {:<24} {:>10}",
        "keyed executions", checks.keyed_executions
    );
    println!("  {:<24} {:>10}", "slow executions", checks.slow_executions);
    println!("  {:<24} {:>10}", "late starts", checks.late_starts);
    println!("  {:<24} {:>10}", "key overlaps", checks.key_overlaps);
    println!(
        "  {:<24} {:>10}",
        "key out of order", checks.key_out_of_order
    );
    println!("  {:<24} {:>10}", "over max_attempts", checks.over_attempts);
    println!(
        "  {:<24} {:>10}",
        "broker moves",
        flaps.load(Ordering::Relaxed)
    );
    println!("  {:<24} {:>10.2}", "dispatch p50 (ms)", p50);
    println!("  {:<24} {:>10.2}", "dispatch p99 (ms)", p99);
    println!("  {:<24} {:>10.2}", "wall time (s)", elapsed.as_secs_f64());
    println!(
        "summary: store={} dispatched={} done={done} failed={failed} lost={lost} duplicate_executions={duplicates} \
         late_starts={} key_overlaps={} key_out_of_order={} over_attempts={} p50_ms={p50:.3} p99_ms={p99:.3}",
        store.name(),
        outcomes.len(),
        checks.late_starts,
        checks.key_overlaps,
        checks.key_out_of_order,
        checks.over_attempts,
    );
    let broken =
        checks.late_starts + checks.key_overlaps + checks.key_out_of_order + checks.over_attempts;
    if lost > 0 || duplicates > 0 || broken > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `n` sequential dispatches from `hub-0` to a broker held by `hub-1`: the cross-node round
/// trip (insert + signal, claim, execute, finish + event, the originator's re-read).
async fn round_trip(hubs: &[Hub], n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let broker = BrokerId::new("rt-broker")?;
    hubs[1]
        .connect(broker.clone(), SessionId::new("rt-session")?, ())
        .await?;
    // Warm up pools and prepared statements on both sides.
    for i in 0..20 {
        hubs[0]
            .dispatch(Command::new(broker.clone(), "ping", json!({ "warmup": i })))
            .await?;
    }
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        hubs[0]
            .dispatch(Command::new(broker.clone(), "ping", json!({ "i": i })))
            .await?;
        lat.push(t.elapsed());
    }
    let wall = started.elapsed();
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "round_trip: store={} n={n} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} mean_ms={:.3}",
        hubs[0].store().name(),
        pct(0.50),
        pct(0.99),
        lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        wall.as_secs_f64() * 1e3 / n.max(1) as f64,
    );
    Ok(())
}

/// Moves a random broker to another hub every few milliseconds: the old connection tears down,
/// a new session connects elsewhere.
async fn flap(
    hubs: Vec<Hub>,
    brokers: Vec<BrokerId>,
    placement: Arc<Mutex<Vec<(usize, SessionId)>>>,
    stop: Arc<AtomicBool>,
    flaps: Arc<AtomicUsize>,
    seed: u64,
) -> Result<(), Error> {
    let mut rng = Rng(seed ^ 0xF1A9 | 1);
    let mut generation = 1;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let i = rng.below(BROKERS);
        let (from, old) = placement.lock()[i].clone();
        let to = (from + 1 + rng.below(HUBS - 1)) % HUBS;
        let new = SessionId::new(format!("{}-{generation}", brokers[i]))?;
        generation += 1;
        hubs[from].disconnect(&brokers[i], &old).await?;
        hubs[to]
            .connect(brokers[i].clone(), new.clone(), ())
            .await?;
        placement.lock()[i] = (to, new);
        flaps.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn progress(finished: Arc<AtomicUsize>, total: usize) {
    // Drawn on stderr, and only on a terminal: the summary on stdout stays machine-readable.
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("[{bar:40}] {pos}/{len} commands ({per_sec})")
            .expect("a valid template")
            .progress_chars("#> "),
    );
    loop {
        bar.set_position(finished.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count_rows(store: &dyn Store) -> Result<usize, broker_dispatch::StoreError> {
    Ok(list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await?
    .len())
}
