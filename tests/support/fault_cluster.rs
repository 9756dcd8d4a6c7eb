//! Several hubs over one real database, for fault-injection tests: a store wrapper that counts
//! the errors the hubs saw, a paced load of dispatches and sends with unique tags, and the checks
//! every fault test makes once the fault is gone.
//!
//! Include it beside `support/mod.rs` with `#[path = "support/fault_cluster.rs"] mod fault_cluster;`.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{Affinity, BrokerId, Dispatch, DispatchId, NodeId, SessionId};
use broker_dispatch::hub::{Command, Hub, HubConfig, Receipt};
use broker_dispatch::store::{
    list_all, CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams, DisconnectParams,
    FinishParams, HeartbeatParams, ListFilter, NewDispatch, Store, SweepParams, SweepReport,
    TouchParams,
};
use broker_dispatch::transport::Transport;
use broker_dispatch::{Error, StoreError};
use parking_lot::Mutex;
use serde_json::json;

use crate::support::{eventually, Ledger, Recorder};

/// The variant of a store error, for counting.
pub fn variant(e: &StoreError) -> &'static str {
    match e {
        StoreError::NotFound(_) => "not_found",
        StoreError::Fenced { .. } => "fenced",
        StoreError::Illegal { .. } => "illegal",
        StoreError::Conflict(_) => "conflict",
        StoreError::InvalidInput(_) => "invalid_input",
        StoreError::SchemaTooNew { .. } => "schema_too_new",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Backend(_) => "backend",
        _ => "other",
    }
}

/// A store that forwards every call and counts the errors by (method, variant): proof that a
/// fault reached the hub's calls, and of how it was typed.
#[derive(Debug)]
pub struct Watched {
    pub inner: Arc<dyn Store>,
    errors: Mutex<BTreeMap<(&'static str, &'static str), u32>>,
}

impl Watched {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Watched {
            inner,
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    fn note<T>(&self, method: &'static str, r: &Result<T, StoreError>) {
        if let Err(e) = r {
            *self.errors.lock().entry((method, variant(e))).or_default() += 1;
        }
    }

    /// How many calls of `method` failed with `variant`.
    pub fn count(&self, method: &str, variant: &str) -> u32 {
        self.errors
            .lock()
            .iter()
            .filter(|((m, v), _)| *m == method && *v == variant)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Every (method, variant) seen.
    pub fn errors(&self) -> BTreeMap<(&'static str, &'static str), u32> {
        self.errors.lock().clone()
    }
}

#[async_trait]
impl Store for Watched {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn signals_on_insert(&self) -> bool {
        self.inner.signals_on_insert()
    }
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        let r = self.inner.insert(new).await;
        self.note("insert", &r);
        r
    }
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        let r = self.inner.claim(p).await;
        self.note("claim", &r);
        r
    }
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        let r = self.inner.heartbeat(c, p).await;
        self.note("heartbeat", &r);
        r
    }
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        let r = self.inner.finish(c, p).await;
        self.note("finish", &r);
        r
    }
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let r = self.inner.cancel(p).await;
        self.note("cancel", &r);
        r
    }
    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let r = self.inner.request_cancel(p).await;
        self.note("cancel", &r);
        r
    }
    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        let r = self.inner.get(id).await;
        self.note("get", &r);
        r
    }
    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        let r = self.inner.list(f).await;
        self.note("list", &r);
        r
    }
    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        let r = self.inner.sweep(p).await;
        self.note("sweep", &r);
        r
    }
    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        let r = self.inner.connect(p).await;
        self.note("connect", &r);
        r
    }
    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        let r = self.inner.disconnect(p).await;
        self.note("disconnect", &r);
        r
    }
    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        let r = self.inner.touch(p).await;
        self.note("touch", &r);
        r
    }
    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        let r = self.inner.affinity(broker).await;
        self.note("affinity", &r);
        r
    }
}

/// Timing for fault tests: a lease (5 s) longer than any fault a test injects, so an outage
/// shorter than a lease must not cost a second execution; fast polling and sweeping.
pub fn fault_config() -> HubConfig {
    HubConfig {
        lease: Duration::from_secs(5),
        freshness: Duration::from_secs(10),
        wait_window: Duration::from_secs(15),
        poll_interval: Duration::from_millis(100),
        sweep_interval: Duration::from_millis(300),
        store_timeout: Duration::from_secs(3),
        shutdown_timeout: Duration::from_secs(5),
        ..HubConfig::default()
    }
}

/// The hubs, one store handle and one transport each, over one database.
pub struct Cluster {
    pub hubs: Vec<Hub>,
    pub stores: Vec<Arc<Watched>>,
    pub ledger: Arc<Mutex<Ledger>>,
    /// Broker → the index of the hub it is connected to.
    pub brokers: Vec<(BrokerId, usize)>,
}

/// Starts one hub per `(store, transport)`; the first `owners` hubs each get
/// `brokers_per_owner` brokers connected; the executor records, sleeps `delay`, and echoes.
pub async fn start(
    nodes: Vec<(Arc<dyn Store>, Arc<dyn Transport>)>,
    owners: usize,
    brokers_per_owner: usize,
    config: HubConfig,
    delay: Duration,
) -> Cluster {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut hubs = Vec::new();
    let mut stores = Vec::new();
    for (i, (store, transport)) in nodes.into_iter().enumerate() {
        let id = NodeId::new(format!("node-{i}")).unwrap();
        let mut exec = Recorder::new(&id, &ledger);
        exec.delay = delay;
        let watched = Arc::new(Watched::new(store));
        let hub = Hub::builder(id)
            .store(watched.clone())
            .transport(transport)
            .executor(Arc::new(exec))
            .config(config.clone())
            .start()
            .await
            .expect("start a hub");
        hubs.push(hub);
        stores.push(watched);
    }
    let mut brokers = Vec::new();
    for (h, hub) in hubs.iter().enumerate().take(owners) {
        for k in 0..brokers_per_owner {
            let b = BrokerId::new(format!("broker-{h}-{k}")).unwrap();
            hub.connect(b.clone(), SessionId::new(format!("s-{h}-{k}")).unwrap(), ())
                .await
                .expect("connect a broker");
            brokers.push((b, h));
        }
    }
    Cluster {
        hubs,
        stores,
        ledger,
        brokers,
    }
}

/// What an originator got for one command.
#[derive(Debug)]
pub enum Got {
    Dispatched(Result<serde_json::Value, Error>),
    Sent(Result<Box<Receipt>, Error>),
}

/// One command of a load: its tag (also in its args), its broker, what the originator got.
#[derive(Debug)]
pub struct Record {
    pub tag: u64,
    /// The originator's node id.
    pub from: String,
    pub broker: BrokerId,
    pub got: Got,
}

/// Issues commands `tags` from hub `from`, one every `pace`, each in its own task (concurrent
/// originators); every third is a `send`, the rest `dispatch`. Resolves to every outcome.
pub fn load(
    c: &Cluster,
    from: usize,
    tags: std::ops::Range<u64>,
    pace: Duration,
) -> tokio::task::JoinHandle<Vec<Record>> {
    let hub = c.hubs[from].clone();
    let origin = hub.node().as_str().to_owned();
    let brokers: Vec<BrokerId> = c.brokers.iter().map(|(b, _)| b.clone()).collect();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for tag in tags {
            let hub = hub.clone();
            let from = origin.clone();
            let broker = brokers[(tag as usize) % brokers.len()].clone();
            tasks.push(tokio::spawn(async move {
                let cmd = Command::new(broker.clone(), "op", json!({ "tag": tag }));
                let got = if tag % 3 == 0 {
                    Got::Sent(hub.send(cmd).await.map(Box::new))
                } else {
                    Got::Dispatched(hub.dispatch(cmd).await)
                };
                Record {
                    tag,
                    from,
                    broker,
                    got,
                }
            }));
            tokio::time::sleep(pace).await;
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("an originator task panicked"));
        }
        out
    })
}

/// Every row of the database, by pages.
pub async fn all_rows(store: &dyn Store) -> Vec<Dispatch> {
    list_all(
        store,
        ListFilter {
            limit: 1000,
            ..ListFilter::default()
        },
    )
    .await
    .expect("list rows")
}

/// What a load amounted to once every row settled.
#[derive(Debug, Default)]
pub struct Summary {
    /// Originators that got the executor's result (dispatch) or a receipt (send).
    pub ok: usize,
    /// Originators that got a typed store error (nothing or something written; either way
    /// the row, if any, settled).
    pub store_errors: usize,
    /// Originators that got `TimedOut` or `Failed`.
    pub gave_up: usize,
    /// The most executions any one dispatch got.
    pub max_executions: u32,
}

fn tag_of(d: &Dispatch) -> Option<u64> {
    d.args.get("tag").and_then(serde_json::Value::as_u64)
}

/// Waits (up to `within`) until every row is terminal, then checks the load against the rows
/// and the ledger: no row lost, no duplicate row per command, no (id, attempt) executed twice,
/// every done row executed at its final attempt, and every originator told the truth.
pub async fn settle_and_check(c: &Cluster, records: &[Record], within: Duration) -> Summary {
    let store = Arc::clone(&c.stores[0].inner);
    eventually(within, "every row reaches a terminal state", || {
        let store = Arc::clone(&store);
        async move {
            match store
                .list(ListFilter {
                    limit: 1000,
                    state: Some(broker_dispatch::fsm::DispatchState::Pending),
                    ..ListFilter::default()
                })
                .await
            {
                Ok(p) if p.is_empty() => {}
                _ => return false,
            }
            matches!(
                store
                    .list(ListFilter {
                        limit: 1000,
                        state: Some(broker_dispatch::fsm::DispatchState::InProgress),
                        ..ListFilter::default()
                    })
                    .await,
                Ok(p) if p.is_empty()
            )
        }
    })
    .await;
    let rows = all_rows(&*store).await;
    let mut by_tag: HashMap<u64, Vec<&Dispatch>> = HashMap::new();
    for d in &rows {
        by_tag
            .entry(tag_of(d).expect("every row is tagged"))
            .or_default()
            .push(d);
    }
    for (tag, ds) in &by_tag {
        assert_eq!(ds.len(), 1, "command {tag} has {} rows", ds.len());
    }
    let by_id: HashMap<DispatchId, &Dispatch> = rows.iter().map(|d| (d.id, d)).collect();
    let mut s = Summary::default();
    for r in records {
        let row = by_tag.get(&r.tag).map(|v| v[0]);
        match &r.got {
            Got::Dispatched(Ok(v)) if row.is_none() => {
                assert_eq!(
                    v["node"], r.from,
                    "command {}: a result without a row must come from the local fast path",
                    r.tag
                );
                s.ok += 1;
            }
            Got::Dispatched(Ok(v)) => {
                let row = row.expect("matched above");
                assert_eq!(
                    row.state,
                    broker_dispatch::fsm::DispatchState::Done,
                    "{row:?}"
                );
                assert_eq!(row.result.as_ref(), Some(v), "command {}", r.tag);
                s.ok += 1;
            }
            Got::Sent(Ok(receipt)) => {
                let row = by_id
                    .get(&receipt.id)
                    .unwrap_or_else(|| panic!("command {}: receipt but row lost", r.tag));
                assert_eq!(
                    row.state,
                    broker_dispatch::fsm::DispatchState::Done,
                    "a sent command for a connected broker must run: {row:?}"
                );
                s.ok += 1;
            }
            Got::Dispatched(Err(Error::TimedOut { id, .. }))
            | Got::Dispatched(Err(Error::Failed { id, .. })) => {
                assert!(by_id.contains_key(id), "command {}: {id} lost", r.tag);
                if let Got::Dispatched(Err(Error::Failed { reason, .. })) = &r.got {
                    assert_eq!(
                        by_id[id].failure.as_ref(),
                        Some(reason),
                        "command {}",
                        r.tag
                    );
                }
                s.gave_up += 1;
            }
            Got::Dispatched(Err(Error::Store(
                StoreError::Unavailable(_) | StoreError::Backend(_),
            )))
            | Got::Sent(Err(Error::Store(StoreError::Unavailable(_) | StoreError::Backend(_)))) => {
                s.store_errors += 1;
            }
            other => panic!("command {}: unexpected outcome {other:?}", r.tag),
        }
    }
    let ledger = c.ledger.lock();
    assert_eq!(
        ledger.duplicates(),
        0,
        "an (id, attempt) ran twice: {:?}",
        ledger
            .runs
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    for d in &rows {
        if d.state == broker_dispatch::fsm::DispatchState::Done {
            assert!(
                ledger.runs.contains_key(&(d.id, d.attempt)),
                "{} is done at attempt {} that never ran",
                d.id,
                d.attempt
            );
        }
        let runs = ledger.per_id.get(&d.id).copied().unwrap_or(0);
        assert!(runs <= d.max_attempts, "{} ran {runs} times", d.id);
        s.max_executions = s.max_executions.max(runs);
    }
    s
}

/// The hub keeps working without a restart: `n` fresh dispatches from `from` all return their
/// results.
pub async fn still_works(c: &Cluster, from: usize, first_tag: u64, n: u64) {
    let records = load(c, from, first_tag..first_tag + n, Duration::from_millis(5))
        .await
        .expect("load");
    for r in &records {
        match &r.got {
            Got::Dispatched(Ok(v)) => assert_eq!(v["args"]["tag"], r.tag),
            Got::Sent(Ok(_)) => {}
            other => panic!("after the fault, command {} got {other:?}", r.tag),
        }
    }
}
