//! Hubs in separate processes over one database.
//!
//! The test binary re-executes itself as a hub node (the `node_process_entry` test, active only
//! when `BD_NODE_DB` is set in its environment), so no extra binary has to be built. The
//! database URL picks the node's backend: a `postgres://` URL means `PgStore` plus `PgTransport`
//! (LISTEN/NOTIFY) in the schema `BD_NODE_SCHEMA`; anything else is a SQLite file with
//! `NoopTransport` (polling). Each node appends lines to its own log, one `write` per line:
//!
//! - `exec <id> <attempt> <node>`: the executor ran (logged before it does the work);
//! - `sent <id>` / `dispatched <id> ok|failed:<reason>|timedout:<state>`: a command this node
//!   originated and the outcome its caller saw (`<id> = -` with `error:<message>` when the call
//!   failed for good);
//! - `resync`: its transport reported that notices may have been lost;
//! - `unavailable` / `recovered`: its store probe saw the database go away and come back;
//! - `originated-all`: every command it was asked to originate has an outcome.
//!
//! The parent checks the logs against the rows.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchId, NodeId, SessionId};
use broker_dispatch::hub::{Command, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{list_all, ListFilter, NewDispatch, SqliteStore, Store};
use broker_dispatch::transport::{NoopTransport, Notice, Transport};
use broker_dispatch::{Error, ExecError};
use futures::StreamExt;
use parking_lot::Mutex;
use support::eventually;

/// A node's log file: whole lines, each in one `write`, so a process killed mid-run leaves at
/// most one torn last line.
#[derive(Debug)]
struct NodeLog(Mutex<std::fs::File>);

impl NodeLog {
    fn open(path: &str) -> NodeLog {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the node log");
        NodeLog(Mutex::new(file))
    }

    fn line(&self, line: &str) -> std::io::Result<()> {
        self.0.lock().write_all(format!("{line}\n").as_bytes())
    }
}

/// Logs each execution, then pretends to do remote work for `delay` (for the op `slow`,
/// [`SLOW_OP_DELAY`]: a window in which the parent can kill the node mid-execution).
#[derive(Debug)]
struct LoggingExecutor {
    node: String,
    log: Arc<NodeLog>,
    delay: Duration,
}

#[async_trait]
impl Executor for LoggingExecutor {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        self.log
            .line(&format!(
                "exec {} {} {}",
                ctx.id(),
                ctx.attempt(),
                self.node
            ))
            .map_err(|e| ExecError::fatal(format!("log: {e}")))?;
        let delay = if d.op == "slow" {
            SLOW_OP_DELAY
        } else {
            self.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(serde_json::json!({ "id": ctx.id().to_string(), "op": d.op, "node": self.node }))
    }
}

/// How long the op `slow` takes to execute.
const SLOW_OP_DELAY: Duration = Duration::from_millis(300);

fn open_store(db: &str) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(db).expect("open the shared database"))
}

fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn broker_list(var: &str) -> Vec<BrokerId> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|b| BrokerId::new(b).unwrap())
        .collect()
}

/// The store and transport a node process uses, chosen by the database URL.
async fn node_backend(db: &str) -> (Arc<dyn Store>, Arc<dyn Transport>) {
    if !is_postgres(db) {
        return (open_store(db), Arc::new(NoopTransport));
    }
    #[cfg(feature = "postgres")]
    {
        use broker_dispatch::store::{PgStore, PgStoreOptions};
        use broker_dispatch::transport::{PgTransport, PgTransportOptions};
        let schema = std::env::var("BD_NODE_SCHEMA").expect("BD_NODE_SCHEMA");
        let store = PgStore::connect(
            db,
            PgStoreOptions {
                schema: schema.clone(),
                channel_prefix: schema.clone(),
                pool_size: 8,
                connect_timeout: Duration::from_secs(2),
                ..PgStoreOptions::default()
            },
        )
        .await
        .expect("connect the store");
        let transport = PgTransport::connect(
            db,
            PgTransportOptions {
                channel_prefix: schema,
                connect_timeout: Duration::from_secs(2),
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                ..PgTransportOptions::default()
            },
        )
        .await
        .expect("connect the transport");
        (Arc::new(store), Arc::new(transport))
    }
    #[cfg(not(feature = "postgres"))]
    panic!("a postgres node needs the postgres feature")
}

/// The child side: one hub node. Configured through the environment.
#[test]
fn node_process_entry() {
    let Ok(db) = std::env::var("BD_NODE_DB") else {
        return; // not a child: nothing to do
    };
    let node = std::env::var("BD_NODE_ID").expect("BD_NODE_ID");
    let log = Arc::new(NodeLog::open(
        &std::env::var("BD_NODE_LOG").expect("BD_NODE_LOG"),
    ));
    let delay = Duration::from_millis(env_or("BD_NODE_DELAY_MS", 0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (store, transport) = node_backend(&db).await;
        let config = if is_postgres(&db) {
            // Notices do the work; polling is only the fallback. A short freshness lets the
            // killed node's brokers go stale quickly.
            HubConfig {
                lease: Duration::from_secs(2),
                freshness: Duration::from_secs(3),
                wait_window: Duration::from_secs(20),
                poll_interval: Duration::from_millis(250),
                sweep_interval: Duration::from_millis(500),
                store_timeout: Duration::from_secs(3),
                claim_batch: 16,
                ..HubConfig::default()
            }
        } else {
            HubConfig {
                lease: Duration::from_secs(2),
                freshness: Duration::from_secs(120),
                poll_interval: Duration::from_millis(20),
                sweep_interval: Duration::from_millis(200),
                claim_batch: 64,
                ..HubConfig::default()
            }
        };
        let mut notices = transport.subscribe().await.expect("subscribe");
        let exec = LoggingExecutor {
            node: node.clone(),
            log: log.clone(),
            delay,
        };
        let hub = Hub::builder(NodeId::new(node.clone()).unwrap())
            .store(store.clone())
            .transport(transport)
            .executor(Arc::new(exec))
            .config(config)
            .start()
            .await
            .unwrap();
        let resync_log = log.clone();
        tokio::spawn(async move {
            while let Some(n) = notices.next().await {
                if n == Notice::Resync {
                    let _ = resync_log.line("resync");
                }
            }
        });
        tokio::spawn(probe(store, log.clone()));
        for b in broker_list("BD_NODE_BROKERS") {
            let session = SessionId::new(format!("{node}-{b}")).unwrap();
            // In the SQLite test both nodes claim every broker; the loser keeps draining
            // until its affinity refresh notices, which makes claims contend across processes.
            let _ = hub.connect(b, session).await;
        }
        let targets = broker_list("BD_NODE_TARGETS");
        let count: usize = env_or("BD_NODE_ORIGINATE", 0);
        if count > 0 {
            originate(
                hub.clone(),
                log.clone(),
                &node,
                targets,
                count,
                env_or("BD_NODE_CONCURRENCY", 4),
            )
            .await;
            log.line("originated-all").unwrap();
        }
        std::future::pending::<()>().await;
    });
}

/// Polls the store every few milliseconds and logs when it stops and starts answering.
async fn probe(store: Arc<dyn Store>, log: Arc<NodeLog>) {
    let broker = BrokerId::new("probe").unwrap();
    let mut down = false;
    loop {
        match store.affinity(&broker).await {
            Err(e) if e.is_retryable() && !down => {
                down = true;
                let _ = log.line("unavailable");
            }
            Ok(_) if down => {
                down = false;
                let _ = log.line("recovered");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Originates `count` commands to random `targets`, `concurrency` at a time: every third a
/// `send`, the rest `dispatch`; one in fifty is the op `slow`. Each carries an idempotency key, so a call that failed because
/// the database was unreachable is retried without risking a second row.
async fn originate(
    hub: Hub,
    log: Arc<NodeLog>,
    node: &str,
    targets: Vec<BrokerId>,
    count: usize,
    concurrency: usize,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let targets = Arc::new(targets);
    let seed = node
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (hub, log, next, targets) =
                (hub.clone(), log.clone(), next.clone(), targets.clone());
            let node = node.to_owned();
            tokio::spawn(async move {
                let mut rng = support::Rng::new(seed ^ (w as u64 + 1));
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return;
                    }
                    let broker = targets[rng.below(targets.len() as u64) as usize].clone();
                    let op = if n % 50 == 7 { "slow" } else { "op" };
                    let cmd = Command::new(broker, op, serde_json::json!({ "n": n }))
                        .idempotency_key(format!("{node}-{n}"));
                    let line = outcome_line(&hub, cmd, n % 3 == 0).await;
                    log.line(&line).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

async fn outcome_line(hub: &Hub, cmd: Command, send: bool) -> String {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let line = if send {
            match hub.send(cmd.clone()).await {
                Ok(r) => format!("sent {}", r.id),
                Err(e) => match retry(e, give_up) {
                    Some(e) => format!("sent - error:{e}"),
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            }
        } else {
            match hub.dispatch(cmd.clone()).await {
                Ok(v) => format!("dispatched {} ok", v["id"].as_str().unwrap_or("-")),
                Err(Error::Failed { id, reason }) => {
                    format!("dispatched {id} failed:{}", reason.kind())
                }
                Err(Error::TimedOut { id, last_state }) => {
                    format!("dispatched {id} timedout:{last_state}")
                }
                Err(e) => match retry(e, give_up) {
                    Some(e) => format!("dispatched - error:{e}"),
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            }
        };
        return line;
    }
}

/// `None` when the error is worth another try (the database is away); the error otherwise.
fn retry(e: Error, give_up: tokio::time::Instant) -> Option<Error> {
    let retryable = matches!(&e, Error::Store(s) if s.is_retryable());
    if retryable && tokio::time::Instant::now() < give_up {
        None
    } else {
        Some(e)
    }
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

fn spawn_node(
    db: &str,
    node: &str,
    brokers: &[String],
    log: &Path,
    delay_ms: u64,
    extra_env: &[(&str, String)],
) -> Node {
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
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a node process");
    Node { child }
}

async fn all_rows(store: &dyn Store) -> Vec<Dispatch> {
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
    let _a = spawn_node(&db, "node-a", &brokers, &logs[0], 0, &[]);
    let _b = spawn_node(&db, "node-b", &brokers, &logs[1], 0, &[]);
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
    let runs = Logs::read(&logs).runs;
    let twice: Vec<_> = runs.iter().filter(|(_, (n, _))| *n > 1).collect();
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
    for ((id, _), (n, _)) in &runs {
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

#[cfg(feature = "postgres")]
#[path = "support/pg.rs"]
mod pg;

/// Every line of every log, parsed.
#[derive(Debug, Default)]
struct Logs {
    /// (id, attempt) → (executions, the nodes that ran it).
    runs: HashMap<(DispatchId, u32), (u32, Vec<String>)>,
    /// Ids of `send`s that returned a receipt.
    sent: Vec<DispatchId>,
    /// (id, outcome) of `dispatch`es: `ok`, `failed:<reason>`, `timedout:<state>`.
    dispatched: Vec<(DispatchId, String)>,
    /// Calls that failed for good.
    errors: Vec<String>,
    resyncs: usize,
    unavailable: usize,
    recovered: usize,
    originated_all: usize,
}

impl Logs {
    fn read(paths: &[PathBuf]) -> Logs {
        let mut logs = Logs::default();
        for path in paths {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines() {
                logs.parse(line);
            }
        }
        logs
    }

    /// A torn last line (a killed process) parses as nothing.
    fn parse(&mut self, line: &str) {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["exec", id, attempt, node] => {
                if let (Ok(id), Ok(attempt)) = (DispatchId::parse(id), attempt.parse()) {
                    let e = self.runs.entry((id, attempt)).or_default();
                    e.0 += 1;
                    e.1.push((*node).to_owned());
                }
            }
            ["sent", "-", ..] | ["dispatched", "-", ..] => self.errors.push(line.to_owned()),
            ["sent", id] => self.sent.extend(DispatchId::parse(id).ok()),
            ["dispatched", id, outcome] => {
                if let Ok(id) = DispatchId::parse(id) {
                    self.dispatched.push((id, (*outcome).to_owned()));
                }
            }
            ["resync"] => self.resyncs += 1,
            ["unavailable"] => self.unavailable += 1,
            ["recovered"] => self.recovered += 1,
            ["originated-all"] => self.originated_all += 1,
            _ => {}
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn originated(&self) -> usize {
        self.sent.len() + self.dispatched.len() + self.errors.len()
    }
}

/// Three hub processes over one Postgres (`PgStore` + `PgTransport`, separate pools and
/// listeners), 20 brokers spread over them, 10,000 commands originated by the nodes
/// themselves. Mid-run one node is killed (SIGKILL) while it holds claims mid-execution and a
/// replacement process takes over its brokers; later the database itself restarts. Afterwards:
/// every row terminal, nothing lost, no (id, attempt) executed twice, no dispatch executed more
/// than `max_attempts` times, the dead node's claims finished by its replacement, and every
/// originator's reported outcome matches the rows.
///
/// The replacement gets a new node id (`node-3`), as a restarted pod would: node ids must be
/// unique per running process, and a fresh id also makes "re-claimed by someone else" visible
/// in `claimed_by`.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_over_postgres_survive_a_node_kill_and_a_database_restart() {
    use broker_dispatch::fsm::DispatchState;
    use broker_dispatch::store::{PgStore, PgStoreOptions};

    // A private server: this test restarts it.
    let Some(server) = pg::private() else { return };
    let server = Arc::new(server);
    let dsn = server.dsn();
    let schema = "multiprocess";
    let store = PgStore::connect(
        &dsn,
        PgStoreOptions {
            schema: schema.into(),
            channel_prefix: schema.into(),
            pool_size: 2,
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let started = std::time::Instant::now();

    const TOTAL: usize = 10_000;
    const NODES: usize = 3;
    let brokers: Vec<String> = (0..20).map(|i| format!("broker-{i:02}")).collect();
    let owned = |i: usize| -> Vec<String> {
        brokers
            .iter()
            .enumerate()
            .filter(|(j, _)| j % NODES == i)
            .map(|(_, b)| b.clone())
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let log_of = |node: &str| dir.path().join(format!("{node}.log"));
    let share = |i: usize| TOTAL / NODES + usize::from(i < TOTAL % NODES);
    let targets = brokers.join(",");
    let spawn = |node: &str, connect: &[String], originate: usize| {
        spawn_node(
            &dsn,
            node,
            connect,
            &log_of(node),
            5,
            &[
                ("BD_NODE_SCHEMA", schema.to_owned()),
                ("BD_NODE_TARGETS", targets.clone()),
                ("BD_NODE_ORIGINATE", originate.to_string()),
                ("BD_NODE_CONCURRENCY", "6".to_owned()),
            ],
        )
    };
    let mut nodes: HashMap<String, Node> = HashMap::new();
    for i in 0..NODES {
        let name = format!("node-{i}");
        nodes.insert(name.clone(), spawn(&name, &owned(i), share(i)));
    }
    let mut log_paths: Vec<PathBuf> = (0..NODES).map(|i| log_of(&format!("node-{i}"))).collect();
    let within = Duration::from_secs(240);

    // Kill node-2 once the run is well under way, while it is executing a slow command: its
    // log shows the execution started, and the row shows that attempt still held by it.
    eventually(within, "2,000 commands originated", || async {
        Logs::read(&log_paths).originated() >= 2_000
    })
    .await;
    let victim = "node-2";
    let executing_on_victim = || async {
        let started = Logs::read(&[log_of(victim)]);
        in_progress(&store)
            .await
            .into_iter()
            .filter(|d| d.claimed_by.as_ref().map(NodeId::as_str) == Some(victim))
            .filter(|d| started.runs.contains_key(&(d.id, d.attempt)))
            .collect::<Vec<_>>()
    };
    eventually(within, "node-2 executing a slow command", || async {
        executing_on_victim().await.iter().any(|d| d.op == "slow")
    })
    .await;
    drop(nodes.remove(victim)); // SIGKILL, then reap
    let orphaned = executing_on_victim().await;
    assert!(
        !orphaned.is_empty(),
        "the killed node was executing nothing: the kill proves nothing"
    );
    let killed_at = started.elapsed();
    let done_by_victim = Logs::read(&[log_of(victim)]).originated();
    let heir = "node-3";
    nodes.insert(
        heir.into(),
        spawn(heir, &owned(2), share(2).saturating_sub(done_by_victim)),
    );
    log_paths.push(log_of(heir));
    let survivors: Vec<PathBuf> = ["node-0", "node-1", heir]
        .iter()
        .map(|n| log_of(n))
        .collect();

    // Restart the database mid-run: the hubs must recover on their own.
    eventually(within, "6,000 commands originated", || async {
        Logs::read(&log_paths).originated() >= 6_000
    })
    .await;
    let before: Vec<Logs> = survivors
        .iter()
        .map(|p| Logs::read(std::slice::from_ref(p)))
        .collect();
    let restarted_at = started.elapsed();
    let srv = server.clone();
    tokio::task::spawn_blocking(move || srv.restart())
        .await
        .unwrap()
        .expect("restart the database");

    eventually(within, "every surviving node done originating", || async {
        Logs::read(&survivors).originated_all == 3
    })
    .await;
    eventually(within, "every dispatch terminal", || async {
        match all_rows_pg(&store).await {
            Some(rows) => rows.iter().all(|d| d.state.is_terminal()),
            None => false,
        }
    })
    .await;
    let elapsed = started.elapsed();
    drop(nodes);

    // Each surviving hub saw the database go and come back, and its listener resynced.
    for (path, before) in survivors.iter().zip(&before) {
        let after = Logs::read(std::slice::from_ref(path));
        assert!(
            after.unavailable > before.unavailable && after.recovered > before.recovered,
            "{}: the store probe did not see the restart ({before:?} → {after:?})",
            path.display()
        );
        assert!(
            after.resyncs > before.resyncs,
            "{}: no Resync after the restart",
            path.display()
        );
    }

    let logs = Logs::read(&log_paths);
    let rows = all_rows_pg(&store).await.unwrap();
    let by_id: HashMap<DispatchId, &Dispatch> = rows.iter().map(|d| (d.id, d)).collect();
    let originated = logs.originated();
    assert!(
        logs.errors.is_empty(),
        "calls failed for good: {:?}",
        logs.errors
    );
    // The heir originated what the victim had not finished (its in-flight calls at the kill
    // have rows but no log line: the rows are checked like any other).
    assert_eq!(originated, TOTAL, "commands with a logged outcome");

    // No (id, attempt) twice; at most max_attempts executions; every done row executed.
    let twice: Vec<_> = logs.runs.iter().filter(|(_, (n, _))| *n > 1).collect();
    assert!(twice.is_empty(), "(id, attempt) executed twice: {twice:?}");
    let mut execs_per_id: HashMap<DispatchId, u32> = HashMap::new();
    for ((id, _), (n, _)) in &logs.runs {
        *execs_per_id.entry(*id).or_default() += n;
    }
    for d in &rows {
        let execs = execs_per_id.get(&d.id).copied().unwrap_or(0);
        assert!(execs <= d.max_attempts, "{} executed {execs} times", d.id);
        assert!(d.state.is_terminal(), "{d:?}");
        if d.state == DispatchState::Done {
            assert!(execs >= 1, "{} done without an execution", d.id);
        }
    }

    // Nothing lost: every originator's outcome matches its row (or its local execution).
    let local = |id: &DispatchId| logs.runs.contains_key(&(*id, 1)) && !by_id.contains_key(id);
    for id in &logs.sent {
        assert!(by_id.contains_key(id), "sent {id} has no row");
    }
    let mut local_runs = 0;
    for (id, outcome) in &logs.dispatched {
        if local(id) {
            local_runs += 1;
            assert_eq!(outcome, "ok", "local fast path {id}");
            continue;
        }
        let d = by_id
            .get(id)
            .unwrap_or_else(|| panic!("dispatched {id} ({outcome}) has no row"));
        match outcome.split_once(':') {
            None => assert_eq!(
                (outcome.as_str(), d.state),
                ("ok", DispatchState::Done),
                "{d:?}"
            ),
            Some(("failed", reason)) => {
                assert_eq!(d.state, DispatchState::Failed, "{d:?}");
                assert_eq!(d.failure.as_ref().map(|f| f.kind()), Some(reason), "{d:?}");
            }
            Some(("timedout", "failed")) => assert_eq!(d.state, DispatchState::Failed),
            Some(("timedout", _)) => {} // in progress when the wait gave up: terminal now
            Some(_) => panic!("unknown outcome {outcome}"),
        }
    }

    // Targets are random over all brokers, so about a third of the dispatches run on the
    // originator itself and the rest cross nodes through rows.
    assert!(
        local_runs * 2 < logs.dispatched.len(),
        "{local_runs} of {} dispatches ran locally: the run barely crossed nodes",
        logs.dispatched.len()
    );

    // The killed node's executions were re-claimed and finished by the living.
    let mut finished_by_heirs = 0;
    for held in &orphaned {
        let d = by_id[&held.id];
        assert!(
            d.attempt > held.attempt || d.state == DispatchState::Failed,
            "{d:?}"
        );
        if d.state == DispatchState::Done
            && d.attempt >= 2
            && d.claimed_by.as_ref().map(NodeId::as_str) != Some(victim)
        {
            finished_by_heirs += 1;
        }
    }
    assert!(
        finished_by_heirs >= 1,
        "none of the killed node's {} executions was finished by another node",
        orphaned.len()
    );
    let reclaimed = rows.iter().filter(|d| d.attempt >= 2).count();
    let executions: u32 = execs_per_id.values().sum();
    let done = rows
        .iter()
        .filter(|d| d.state == DispatchState::Done)
        .count();
    eprintln!(
        "multiprocess postgres: commands={originated} (sent={} dispatched={} of which local={local_runs}) \
         rows={} done={done} failed={} executions={executions} rows_with_attempt>=2={reclaimed} \
         killed_mid_execution={} finished_by_heirs={finished_by_heirs} killed_at={killed_at:?} \
         db_restarted_at={restarted_at:?} total={elapsed:?}",
        logs.sent.len(),
        logs.dispatched.len(),
        rows.len(),
        rows.len() - done,
        orphaned.len(),
    );
}

#[cfg(feature = "postgres")]
async fn in_progress(store: &broker_dispatch::store::PgStore) -> Vec<Dispatch> {
    store
        .list(ListFilter {
            state: Some(broker_dispatch::fsm::DispatchState::InProgress),
            limit: 1000,
            ..ListFilter::default()
        })
        .await
        .unwrap_or_default()
}

/// Every row, or `None` if the database did not answer (it may be restarting).
#[cfg(feature = "postgres")]
async fn all_rows_pg(store: &broker_dispatch::store::PgStore) -> Option<Vec<Dispatch>> {
    list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await
    .ok()
}
