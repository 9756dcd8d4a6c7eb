//! Hubs in separate processes over one database.
//!
//! The test binary re-executes itself as a hub node (the `node_process_entry` test, active only
//! when `BD_NODE_DB` is set in its environment), so no extra binary has to be built. Each node
//! appends one line per execution (`exec <id> <attempt> <node>`) to its own log; the parent
//! checks the logs against the store.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchId, NodeId, SessionId};
use broker_dispatch::hub::{ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{ListFilter, NewDispatch, SqliteStore, Store};
use broker_dispatch::transport::NoopTransport;
use broker_dispatch::ExecError;
use parking_lot::Mutex;
use support::eventually;

/// Appends one line per execution to a log file.
#[derive(Debug)]
struct LoggingExecutor {
    node: String,
    log: Mutex<std::fs::File>,
    delay: Duration,
}

#[async_trait]
impl Executor for LoggingExecutor {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        {
            let mut f = self.log.lock();
            writeln!(f, "exec {} {} {}", ctx.id(), ctx.attempt(), self.node)
                .map_err(|e| ExecError::fatal(format!("log: {e}")))?;
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(serde_json::json!({ "op": d.op, "node": self.node }))
    }
}

fn open_store(db: &str) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(db).expect("open the shared database"))
}

/// The child side: one hub node. Configured through the environment.
#[test]
fn node_process_entry() {
    let Ok(db) = std::env::var("BD_NODE_DB") else {
        return; // not a child: nothing to do
    };
    let node = std::env::var("BD_NODE_ID").expect("BD_NODE_ID");
    let brokers = std::env::var("BD_NODE_BROKERS").expect("BD_NODE_BROKERS");
    let log = std::env::var("BD_NODE_LOG").expect("BD_NODE_LOG");
    let delay_ms: u64 = std::env::var("BD_NODE_DELAY_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = open_store(&db);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let exec = LoggingExecutor {
            node: node.clone(),
            log: Mutex::new(file),
            delay: Duration::from_millis(delay_ms),
        };
        let hub = Hub::builder(NodeId::new(node.clone()).unwrap())
            .store(store)
            .transport(Arc::new(NoopTransport))
            .executor(Arc::new(exec))
            .config(HubConfig {
                lease: Duration::from_secs(2),
                freshness: Duration::from_secs(120),
                poll_interval: Duration::from_millis(20),
                sweep_interval: Duration::from_millis(200),
                claim_batch: 64,
                ..HubConfig::default()
            })
            .start()
            .await
            .unwrap();
        for b in brokers.split(',').filter(|s| !s.is_empty()) {
            let session = SessionId::new(format!("{node}-{b}")).unwrap();
            // Both nodes claim every broker; the loser keeps draining until its affinity
            // refresh notices, which is what makes the claims contend across processes.
            let _ = hub.connect(BrokerId::new(b).unwrap(), session).await;
        }
        println!("node {node} ready");
        std::future::pending::<()>().await;
    });
}

struct Node {
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(db: &str, node: &str, brokers: &[String], log: &Path, delay_ms: u64) -> Node {
    let exe = std::env::current_exe().unwrap();
    let child = std::process::Command::new(exe)
        .args([
            "node_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BD_NODE_DB", db)
        .env("BD_NODE_ID", node)
        .env("BD_NODE_BROKERS", brokers.join(","))
        .env("BD_NODE_LOG", log)
        .env("BD_NODE_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a node process");
    Node { child }
}

/// (id, attempt) → how many times it was executed, across every log.
fn read_logs(logs: &[PathBuf]) -> HashMap<(DispatchId, u32), u32> {
    let mut runs = HashMap::new();
    for log in logs {
        let Ok(text) = std::fs::read_to_string(log) else {
            continue;
        };
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            // A process killed mid-write leaves at most one torn last line.
            if parts.len() != 4 || parts[0] != "exec" {
                continue;
            }
            let (Ok(id), Ok(attempt)) = (DispatchId::parse(parts[1]), parts[2].parse::<u32>())
            else {
                continue;
            };
            *runs.entry((id, attempt)).or_default() += 1;
        }
    }
    runs
}

async fn all_rows(store: &dyn Store) -> Vec<Dispatch> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(ListFilter {
                after,
                limit: 1000,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { return out };
        after = Some(last.id);
        out.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_drain_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let db = db.to_str().unwrap().to_owned();
    let store = open_store(&db);
    let brokers: Vec<String> = (0..10).map(|i| format!("broker-{i}")).collect();
    let total = 10_000;
    let mut ids = HashSet::new();
    for n in 0..total {
        let b = BrokerId::new(brokers[n % brokers.len()].clone()).unwrap();
        let mut new = NewDispatch::new(b, "op", serde_json::json!({ "n": n }));
        new.max_attempts = 3;
        ids.insert(store.insert(new).await.unwrap().id);
    }
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let _a = spawn_node(&db, "node-a", &brokers, &logs[0], 0);
    let _b = spawn_node(&db, "node-b", &brokers, &logs[1], 0);
    eventually(
        Duration::from_secs(240),
        "every dispatch terminal",
        || async {
            all_rows(store.as_ref())
                .await
                .iter()
                .all(|d| d.state.is_terminal())
        },
    )
    .await;
    let rows = all_rows(store.as_ref()).await;
    assert_eq!(rows.len(), total, "no row lost or added");
    let runs = read_logs(&logs);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "(id, attempt) executed more than once: {twice:?}"
    );
    let mut per_node = HashMap::new();
    for log in &logs {
        per_node.insert(
            log.clone(),
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .count(),
        );
    }
    let mut execs_per_id: HashMap<DispatchId, u32> = HashMap::new();
    for ((id, _), n) in &runs {
        *execs_per_id.entry(*id).or_default() += n;
    }
    for d in &rows {
        assert!(ids.contains(&d.id));
        assert_eq!(d.state, broker_dispatch::fsm::DispatchState::Done, "{d:?}");
        let execs = execs_per_id.get(&d.id).copied().unwrap_or(0);
        assert!(
            execs >= 1 && execs <= d.max_attempts,
            "{} executed {execs} times",
            d.id
        );
    }
    eprintln!("executions per node: {per_node:?}");
}
