//! The benchmark harness. Every figure is reported beside a baseline measured in the same run on
//! the same machine, as a ratio: the machines are shared and noisy, absolute times mean little.
//!
//! ```text
//! cargo run --release --example bench -- [--quick] [--json FILE] [--only NAME…]
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{Command, ExecContext, Executor, Hub};
use broker_dispatch::store::{ClaimParams, FinishParams, MemoryStore, NewDispatch, Outcome};
use broker_dispatch::ExecError;
use serde_json::json;

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    json: Option<String>,
    only: Vec<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        json: None,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => o.json = Some(args.next().ok_or("--json needs a file")?),
            "--only" => o.only.push(args.next().ok_or("--only needs a name")?),
            "--bench" => {} // passed by `cargo bench`-style runners
            "-h" | "--help" => {
                return Err("usage: bench [--quick] [--json FILE] [--only NAME]...".into())
            }
            other if !other.starts_with('-') && !o.only.is_empty() => o.only.push(other.to_owned()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
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
    hub.connect(broker.clone(), SessionId::new("s").unwrap())
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

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let wants =
        |name: &str| o.only.is_empty() || o.only.iter().any(|w| name.starts_with(w.as_str()));
    let mut rows = Vec::new();
    let started = Instant::now();
    if wants("local_fast_path") {
        rows.extend(rt.block_on(local_fast_path(&o)));
    }
    if wants("memory_claim_complete") {
        rows.extend(memory_claim_complete(&o));
    }
    if wants("memory_footprint") {
        rows.extend(memory_footprint(&o));
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
