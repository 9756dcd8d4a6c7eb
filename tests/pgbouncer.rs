//! `PgStore` through PgBouncer, with the NATS transport carrying every wake-up.
//!
//! Three hub processes reach Postgres only through PgBouncer, with `notify: false` (no NOTIFY
//! is sent and nothing LISTENs: a LISTEN cannot outlive a transaction-pooled server
//! connection). One node is killed with SIGKILL mid-execution and a replacement takes over its
//! brokers. Afterwards, read over a direct connection to Postgres: every row terminal, every
//! `send` receipt has its row; from the executors' own logs: no (id, attempt) executed twice.
//!
//! PgBouncer's pool mode: `transaction`, on any PgBouncer version: the nodes set
//! `PgStoreOptions::prepared_statements = false`, so every statement goes out unnamed with its
//! parameter types and nothing outlives a transaction on a server connection.
//! `transaction_pooling_needs_unnamed_statements` shows why: with cached named statements
//! (tokio-postgres prepares `s0`, `s1`, … per process and caches them per connection) a
//! transaction-pooled client soon binds one on a server connection that never saw it
//! (`prepared statement "s6" does not exist`, SQLSTATE 26000), unless PgBouncer (1.21+) tracks
//! them itself (`max_prepared_statements`).
//!
//! `PGBOUNCER_URL`, when set, is used instead of a throwaway PgBouncer; it must lead to the
//! database of `DATABASE_URL` (the direct connection the rows are read over).
//!
//! The test binary re-executes itself as a hub node (`node_process_entry`, active only when
//! `BD_NODE_DSN` is set). Each node appends `exec <id> <attempt> <node>` before each execution
//! and `sent <id>` after each receipt, one `write` per line; `originated-all` at the end.

mod support;

#[cfg(feature = "nats")]
#[path = "support/pg.rs"]
mod pg;
#[cfg(feature = "nats")]
#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[cfg(feature = "nats")]
#[path = "support/servers.rs"]
mod servers;

#[cfg(feature = "nats")]
mod cases {
    use std::collections::{HashMap, HashSet};
    use std::io::Write;
    use std::path::PathBuf;
    use std::process::{Child, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use broker_dispatch::fsm::{BrokerId, Dispatch, DispatchId, DispatchState, NodeId, SessionId};
    use broker_dispatch::hub::{Command, ExecContext, Executor, Hub, HubConfig};
    use broker_dispatch::store::{list_all, ListFilter, PgStore, PgStoreOptions, Store};
    use broker_dispatch::transport::{NatsTransport, NatsTransportOptions};
    use broker_dispatch::ExecError;
    use parking_lot::Mutex;

    use super::support::{eventually, Rng};
    use super::{pg, pgbouncer, servers};

    /// How long the op `slow` takes: a window in which the parent kills a node mid-execution.
    const SLOW: Duration = Duration::from_millis(400);

    struct NodeLog(Mutex<std::fs::File>);

    impl NodeLog {
        fn line(&self, line: &str) -> std::io::Result<()> {
            self.0.lock().write_all(format!("{line}\n").as_bytes())
        }
    }

    struct LoggingExecutor {
        node: String,
        log: Arc<NodeLog>,
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
                SLOW
            } else {
                Duration::from_millis(5)
            };
            tokio::time::sleep(delay).await;
            Ok(serde_json::json!({ "node": self.node }))
        }
    }

    fn env(name: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| panic!("{name}"))
    }

    fn brokers_of(var: &str) -> Vec<BrokerId> {
        env(var)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|b| BrokerId::new(b).unwrap())
            .collect()
    }

    /// The child side: one hub node over PgBouncer and NATS.
    #[test]
    fn node_process_entry() {
        let Ok(dsn) = std::env::var("BD_NODE_DSN") else {
            return; // not a child
        };
        let node = env("BD_NODE_ID");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env("BD_NODE_LOG"))
            .unwrap();
        let log = Arc::new(NodeLog(Mutex::new(file)));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = PgStore::connect(
                &dsn,
                PgStoreOptions {
                    schema: env("BD_NODE_SCHEMA"),
                    notify: false,
                    pool_size: 4,
                    connect_timeout: Duration::from_secs(5),
                    // Transaction pooling: nothing may outlive a transaction on the server.
                    prepared_statements: false,
                    ..PgStoreOptions::default()
                },
            )
            .await
            .expect("connect the store through pgbouncer");
            let transport = NatsTransport::connect(
                &env("BD_NODE_NATS"),
                NatsTransportOptions {
                    subject_prefix: env("BD_NODE_PREFIX"),
                    min_backoff: Duration::from_millis(20),
                    max_backoff: Duration::from_millis(200),
                    connect_timeout: Duration::from_secs(2),
                    ..NatsTransportOptions::default()
                },
            )
            .await
            .expect("connect nats");
            // Wake-ups come over NATS; polling is a slow fallback. A short lease and freshness
            // let the killed node's claims and brokers go stale quickly.
            let config = HubConfig {
                lease: Duration::from_secs(2),
                freshness: Duration::from_secs(3),
                poll_interval: Duration::from_secs(2),
                sweep_interval: Duration::from_millis(500),
                store_timeout: Duration::from_secs(3),
                claim_batch: 16,
                ..HubConfig::default()
            };
            let hub = Hub::builder(NodeId::new(node.clone()).unwrap())
                .store(Arc::new(store))
                .transport(Arc::new(transport))
                .executor(Arc::new(LoggingExecutor {
                    node: node.clone(),
                    log: log.clone(),
                }))
                .config(config)
                .start()
                .await
                .unwrap();
            for b in brokers_of("BD_NODE_BROKERS") {
                let session = SessionId::new(format!("{node}-{b}")).unwrap();
                hub.connect(b, session, ()).await.unwrap();
            }
            let targets = brokers_of("BD_NODE_TARGETS");
            let count: usize = env("BD_NODE_ORIGINATE").parse().unwrap();
            let seed = node
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
            let mut rng = Rng::new(seed);
            for n in 0..count {
                let broker = targets[rng.below(targets.len() as u64) as usize].clone();
                let op = if n % 25 == 3 { "slow" } else { "op" };
                let cmd = Command::new(broker, op, serde_json::json!({ "n": n }))
                    .idempotency_key(format!("{node}-{n}"));
                let give_up = Instant::now() + Duration::from_secs(30);
                let receipt = loop {
                    match hub.send(cmd.clone()).await {
                        Ok(r) => break r,
                        Err(e) if Instant::now() < give_up => {
                            eprintln!("{node}: send failed, retrying: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("{node}: send failed for good: {e}"),
                    }
                };
                log.line(&format!("sent {}", receipt.id)).unwrap();
                // About 150 commands a second per node.
                if n % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            log.line("originated-all").unwrap();
            std::future::pending::<()>().await;
        });
    }

    struct Node(Child);

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill(); // SIGKILL
            let _ = self.0.wait();
        }
    }

    #[derive(Debug, Default)]
    struct Logs {
        runs: HashMap<(DispatchId, u32), Vec<String>>,
        sent: Vec<DispatchId>,
        originated_all: usize,
    }

    impl Logs {
        /// A torn last line (a killed process) parses as nothing.
        fn read(paths: &[PathBuf]) -> Logs {
            let mut logs = Logs::default();
            for path in paths {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                for line in text.lines() {
                    match line.split(' ').collect::<Vec<_>>().as_slice() {
                        ["exec", id, attempt, node] => {
                            if let (Ok(id), Ok(a)) = (DispatchId::parse(id), attempt.parse()) {
                                logs.runs.entry((id, a)).or_default().push((*node).into());
                            }
                        }
                        ["sent", id] => logs.sent.extend(DispatchId::parse(id).ok()),
                        ["originated-all"] => logs.originated_all += 1,
                        _ => {}
                    }
                }
            }
            logs
        }
    }

    async fn rows(store: &PgStore) -> Vec<Dispatch> {
        list_all(
            store,
            ListFilter {
                limit: 1000,
                ..ListFilter::default()
            },
        )
        .await
        .unwrap_or_default()
    }

    fn port_of(dsn: &str) -> u16 {
        let config: tokio_postgres::Config = dsn.parse().expect("a postgres dsn");
        config.get_ports().first().copied().unwrap_or(5432)
    }

    /// The PgBouncer settings `PgStore` works with, for this binary: transaction pooling when
    /// PgBouncer tracks prepared statements itself (1.21+), else session pooling.
    /// Transaction pooling, whatever the version: the nodes send unnamed statements
    /// (`prepared_statements: false`), which need no statement tracking in PgBouncer.
    fn working_settings(_version: (u32, u32)) -> (&'static str, Vec<(&'static str, &'static str)>) {
        ("transaction", vec![("default_pool_size", "4")])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_hubs_through_pgbouncer_survive_a_node_kill() {
        let Some(nats) = servers::shared_url(servers::Kind::Nats) else {
            return;
        };
        let Some(db) = pg::fresh() else { return };
        let (bouncer_dsn, _bouncer, mode) = match std::env::var("PGBOUNCER_URL") {
            Ok(url) if !url.is_empty() => (url, None, "as configured".to_owned()),
            _ => {
                let bin = match pgbouncer::find_binary() {
                    Ok(bin) => bin,
                    Err(reason) if std::env::var_os("CI").is_none() => {
                        eprintln!("skipping the PgBouncer test: {reason}");
                        return;
                    }
                    Err(reason) => panic!("no pgbouncer, and CI is set: {reason}"),
                };
                let version = pgbouncer::version(&bin).unwrap();
                let (mode, extra) = working_settings(version);
                let b = pgbouncer::PgBouncer::start(port_of(&db.dsn), mode, &extra)
                    .expect("start pgbouncer");
                let dsn = b.dsn();
                (
                    dsn,
                    Some(b),
                    format!("pgbouncer {version:?}, pool_mode = {mode} {extra:?}"),
                )
            }
        };
        let started = Instant::now();
        // The parent's own view of the rows: a direct connection, not through PgBouncer.
        let direct = PgStore::connect(
            &db.dsn,
            PgStoreOptions {
                schema: db.schema.clone(),
                notify: false,
                pool_size: 2,
                ..PgStoreOptions::default()
            },
        )
        .await
        .unwrap();
        direct.migrate().await.unwrap();
        // No LISTEN anywhere: nothing in this database waits on a notification.
        let raw = pg::client(&db.dsn).await;

        const NODES: usize = 3;
        const PER_NODE: usize = 500;
        let brokers: Vec<String> = (0..12).map(|i| format!("broker-{i:02}")).collect();
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
        let prefix = servers::unique_name("bdt");
        let spawn = |node: &str, connect: &[String], originate: usize| -> Node {
            let exe = std::env::current_exe().unwrap();
            let child = std::process::Command::new(exe)
                .args([
                    "cases::node_process_entry",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("BD_NODE_DSN", &bouncer_dsn)
                .env("BD_NODE_SCHEMA", &db.schema)
                .env("BD_NODE_NATS", &nats)
                .env("BD_NODE_PREFIX", &prefix)
                .env("BD_NODE_ID", node)
                .env("BD_NODE_BROKERS", connect.join(","))
                .env("BD_NODE_TARGETS", brokers.join(","))
                .env("BD_NODE_ORIGINATE", originate.to_string())
                .env("BD_NODE_LOG", log_of(node))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn a node process");
            Node(child)
        };
        let mut nodes: HashMap<String, Node> = HashMap::new();
        for i in 0..NODES {
            let name = format!("node-{i}");
            nodes.insert(name.clone(), spawn(&name, &owned(i), PER_NODE));
        }
        let mut log_paths: Vec<PathBuf> =
            (0..NODES).map(|i| log_of(&format!("node-{i}"))).collect();
        let within = Duration::from_secs(50);

        // Kill node-2 while it executes a slow command: its log shows the attempt started and
        // the row shows that attempt still held by it.
        let victim = "node-2";
        let executing_on_victim = || async {
            let started = Logs::read(&[log_of(victim)]);
            rows(&direct)
                .await
                .into_iter()
                .filter(|d| d.state == DispatchState::InProgress)
                .filter(|d| d.claimed_by.as_ref().map(NodeId::as_str) == Some(victim))
                .filter(|d| started.runs.contains_key(&(d.id, d.attempt)))
                .collect::<Vec<_>>()
        };
        eventually(within, "300 commands sent", || async {
            Logs::read(&log_paths).sent.len() >= 300
        })
        .await;
        eventually(within, "node-2 executing a slow command", || async {
            executing_on_victim().await.iter().any(|d| d.op == "slow")
        })
        .await;
        drop(nodes.remove(victim));
        let orphaned = executing_on_victim().await;
        assert!(
            !orphaned.is_empty(),
            "the killed node was executing nothing"
        );
        let killed_at = started.elapsed();
        let sent_by_victim = Logs::read(&[log_of(victim)]).sent.len();
        let heir = "node-3";
        nodes.insert(
            heir.into(),
            spawn(heir, &owned(2), PER_NODE.saturating_sub(sent_by_victim)),
        );
        log_paths.push(log_of(heir));

        eventually(within, "every surviving node done sending", || async {
            Logs::read(&log_paths).originated_all == 3
        })
        .await;
        eventually(within, "every row terminal", || async {
            let all = rows(&direct).await;
            !all.is_empty() && all.iter().all(|d| d.state.is_terminal())
        })
        .await;
        let elapsed = started.elapsed();
        drop(nodes);

        let listens: i64 = raw
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(listens, 0, "a connection LISTENs");

        let logs = Logs::read(&log_paths);
        let all = rows(&direct).await;
        let by_id: HashMap<DispatchId, &Dispatch> = all.iter().map(|d| (d.id, d)).collect();
        let twice: Vec<_> = logs.runs.iter().filter(|(_, n)| n.len() > 1).collect();
        assert!(twice.is_empty(), "(id, attempt) executed twice: {twice:?}");
        let sent: HashSet<DispatchId> = logs.sent.iter().copied().collect();
        for id in &sent {
            assert!(by_id.contains_key(id), "sent {id} has no row");
        }
        // The victim's in-flight send at the kill may have a row but no receipt; the heir
        // re-sends only what the victim had not logged, with its own keys.
        assert!(
            all.len() >= NODES * PER_NODE && all.len() <= NODES * PER_NODE + 1,
            "{} rows for {} commands",
            all.len(),
            NODES * PER_NODE
        );
        let mut execs: HashMap<DispatchId, u32> = HashMap::new();
        for (id, _) in logs.runs.keys() {
            *execs.entry(*id).or_default() += 1;
        }
        for d in &all {
            assert!(d.state.is_terminal(), "{d:?}");
            let n = execs.get(&d.id).copied().unwrap_or(0);
            assert!(n <= d.max_attempts, "{} executed {n} times", d.id);
            if d.state == DispatchState::Done {
                assert!(n >= 1, "{} done without an execution", d.id);
            }
        }
        let mut finished_by_others = 0;
        for held in &orphaned {
            let d = by_id[&held.id];
            // Re-claimed and finished by another node, or failed; or the victim's own finish,
            // already on its way to the server when the process died, landed after the kill.
            let landed_in_flight = d.state == DispatchState::Done
                && d.attempt == held.attempt
                && d.claimed_by.as_ref().map(NodeId::as_str) == Some(victim);
            assert!(
                d.attempt > held.attempt || d.state == DispatchState::Failed || landed_in_flight,
                "{d:?}"
            );
            if d.state == DispatchState::Done
                && d.claimed_by.as_ref().map(NodeId::as_str) != Some(victim)
            {
                finished_by_others += 1;
            }
        }
        assert!(
            finished_by_others >= 1,
            "none of the killed node's executions was finished by another node"
        );
        let done = all
            .iter()
            .filter(|d| d.state == DispatchState::Done)
            .count();
        eprintln!(
            "pgbouncer ({mode}): rows={} done={done} executions={} killed_mid_execution={} \
             finished_by_others={finished_by_others} killed_at={killed_at:?} total={elapsed:?}",
            all.len(),
            logs.runs.len(),
            orphaned.len(),
        );
    }

    /// Why transaction pooling needs `prepared_statements: false` (or PgBouncer 1.21+ with
    /// `max_prepared_statements`): with cached named statements, pooled clients sharing
    /// PgBouncer's server connections soon bind a statement on a server connection that never
    /// prepared it (and across processes, whose names repeat, prepare a name another already
    /// holds there). The same workload with unnamed statements has no failure. The first half
    /// runs only against a throwaway PgBouncer older than 1.21.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transaction_pooling_needs_unnamed_statements() {
        let Ok(bin) = pgbouncer::find_binary() else {
            return; // the test above says why
        };
        let version = pgbouncer::version(&bin).unwrap();
        if std::env::var("PGBOUNCER_URL").is_ok_and(|u| !u.is_empty()) {
            return;
        }
        let Some(db) = pg::fresh() else { return };
        let b = pgbouncer::PgBouncer::start(
            port_of(&db.dsn),
            "transaction",
            &[("default_pool_size", "2")],
        )
        .expect("start pgbouncer");
        let options = PgStoreOptions {
            schema: db.schema.clone(),
            notify: false,
            pool_size: 4,
            ..PgStoreOptions::default()
        };
        let direct = PgStore::connect(&db.dsn, options.clone()).await.unwrap();
        direct.migrate().await.unwrap();
        if version < (1, 21) {
            let failures = workload(&b.dsn(), options.clone()).await;
            eprintln!(
                "named statements through transaction pooling on pgbouncer {version:?}: {} of \
                 160 calls failed, e.g. {:?}",
                failures.len(),
                failures.first()
            );
            assert!(
                !failures.is_empty(),
                "cached named statements worked through transaction pooling without statement \
                 tracking: the docs of PgStoreOptions::prepared_statements are wrong"
            );
        }
        let unnamed = PgStoreOptions {
            prepared_statements: false,
            ..options
        };
        let failures = workload(&b.dsn(), unnamed).await;
        assert!(
            failures.is_empty(),
            "unnamed statements through transaction pooling: {} of 160 calls failed, e.g. {:?}",
            failures.len(),
            failures.first()
        );
    }

    /// Eight clients of two stores at once over two server connections, each making 20 calls
    /// (inserts and affinity reads); the errors they got.
    async fn workload(dsn: &str, options: PgStoreOptions) -> Vec<String> {
        let stores: Vec<Arc<PgStore>> = vec![
            Arc::new(PgStore::connect(dsn, options.clone()).await.unwrap()),
            Arc::new(PgStore::connect(dsn, options).await.unwrap()),
        ];
        // Eight clients at once over two server connections: each call's statements are
        // prepared on whichever server connection its transaction got.
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = stores[t % 2].clone();
                tokio::spawn(async move {
                    let broker = BrokerId::new(format!("b{t}")).unwrap();
                    let mut failures = Vec::new();
                    for n in 0..20 {
                        let r = if n % 3 == 0 {
                            store.affinity(&broker).await.map(|_| ())
                        } else {
                            store
                                .insert(broker_dispatch::store::NewDispatch::new(
                                    broker.clone(),
                                    "op",
                                    serde_json::json!({ "n": n }),
                                ))
                                .await
                                .map(|_| ())
                        };
                        if let Err(e) = r {
                            failures.push(format!("{e:?}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        failures
    }
}
