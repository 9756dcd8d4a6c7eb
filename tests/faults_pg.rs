//! Faults injected under running hubs that share one Postgres database (each hub with its own
//! `PgStore` pool and `PgTransport` listener, as separate processes would have): backends
//! terminated mid-claim and mid-finish, statements timing out behind a foreign table lock, a
//! server restart during drains, and the LISTEN connections killed with dispatches in flight.
//!
//! Every case asserts: no row lost, no (id, attempt) executed twice, each originator told the
//! truth (a result, a receipt, or a typed error), and the same hubs keep working once the fault
//! is gone (no restart). Only this binary's own connections are ever terminated (they carry a
//! per-test `application_name`), and the restart uses a private server.

#![cfg(feature = "postgres")]

mod support;

#[path = "support/fault_cluster.rs"]
mod fault_cluster;

#[path = "support/pg.rs"]
mod pg;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_dispatch::hub::HubConfig;
use broker_dispatch::store::{PgStore, PgStoreOptions, Store};
use broker_dispatch::transport::{PgTransport, PgTransportOptions, Transport};
use fault_cluster::{fault_config, load, settle_and_check, start, still_works, Cluster, Got};
use support::eventually;

/// `dsn` with an `application_name`, so the test can find (and terminate) exactly the hubs'
/// connections.
fn with_app(dsn: &str, app: &str) -> String {
    let sep = if dsn.contains('?') { '&' } else { '?' };
    format!("{dsn}{sep}application_name={app}")
}

/// `n` (store, transport) pairs on `dsn`, in `schema` (migrated), each with its own pool and
/// listener. Also returns the transports, to find their listeners.
async fn nodes(
    dsn: &str,
    schema: &str,
    n: usize,
    statement_timeout: Option<Duration>,
) -> (Vec<(Arc<dyn Store>, Arc<dyn Transport>)>, Vec<PgTransport>) {
    let mut out = Vec::new();
    let mut transports = Vec::new();
    for _ in 0..n {
        let store = PgStore::connect(
            dsn,
            PgStoreOptions {
                schema: schema.to_owned(),
                channel_prefix: schema.to_owned(),
                // Room for every hub task's statements at once (claims, finishes, renewals,
                // sweeps, inserts), so that each kind can be caught queued on the lock.
                pool_size: 12,
                connect_timeout: Duration::from_secs(2),
                statement_timeout,
                ..PgStoreOptions::default()
            },
        )
        .await
        .expect("connect a store");
        store.migrate().await.expect("migrate");
        let transport = PgTransport::connect(
            dsn,
            PgTransportOptions {
                channel_prefix: schema.to_owned(),
                pool_size: 2,
                connect_timeout: Duration::from_secs(2),
                min_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(500),
                ..PgTransportOptions::default()
            },
        )
        .await
        .expect("connect a transport");
        transports.push(transport.clone());
        out.push((
            Arc::new(store) as Arc<dyn Store>,
            Arc::new(transport) as Arc<dyn Transport>,
        ));
    }
    (out, transports)
}

async fn under_way(c: &Cluster, executions: usize) {
    let ledger = Arc::clone(&c.ledger);
    eventually(Duration::from_secs(20), "the load is under way", || {
        let n = ledger.lock().runs.len();
        async move { n >= executions }
    })
    .await;
}

fn unavailable(c: &Cluster, method: &str) -> u32 {
    c.stores
        .iter()
        .map(|s| s.count(method, "unavailable"))
        .sum()
}

/// What kind of store statement a backend is running, from its text.
fn kind_of(query: &str) -> &'static str {
    // `pg_stat_activity` keeps only the first `track_activity_query_size` bytes (1 kB by
    // default), so the claim is known by the tag at its head.
    if query.starts_with("/* claim */") {
        "claim"
    } else if query.starts_with("/* finish */") || query.contains("state = 'done'") {
        "complete"
    } else if query.contains("INSERT INTO") {
        "insert"
    } else if query.contains("lease_until = ") && query.contains("progress") {
        "heartbeat"
    } else {
        "other"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_mid_claim_and_mid_finish_lose_nothing() {
    let Some(db) = pg::fresh() else { return };
    let app = db.schema.clone();
    let dsn = with_app(&db.dsn, &app);
    let (nodes, _transports) = nodes(&dsn, &db.schema, 3, None).await;
    let c = start(nodes, 2, 2, fault_config(), Duration::from_millis(150)).await;
    let admin = pg::client(&db.dsn).await;
    let running = load(&c, 2, 0..200, Duration::from_millis(30));
    under_way(&c, 10).await;

    // Phase 1: terminate every backend of the hubs (pools and listeners), over and over,
    // whatever it is doing, while the burst runs.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut terminated = 0i64;
    while Instant::now() < until {
        let n: i64 = admin
            .query_one(
                "SELECT COALESCE(sum(CASE WHEN pg_terminate_backend(pid) THEN 1 ELSE 0 END), 0)::bigint \
                 FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&app],
            )
            .await
            .expect("terminate the hubs' backends")
            .get(0);
        terminated += n;
        // Pacing the fault, not waiting for a condition.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(terminated > 0, "no backend of the hubs was terminated");

    // Phase 2: make sure a claim and a finish die mid-statement: hold a lock that queues every
    // write on the table, and terminate the hubs' backends while they wait on it.
    // The lock is held on its own connection: inside a transaction, pg_stat_activity is a
    // snapshot taken at its first read, so the observer must not be the lock holder.
    let locker = pg::client(&db.dsn).await;
    locker.batch_execute("BEGIN").await.expect("begin");
    locker
        .batch_execute(&format!(
            "LOCK TABLE \"{}\".dispatch IN EXCLUSIVE MODE",
            db.schema
        ))
        .await
        .expect("lock the dispatch table");
    let mut killed: BTreeMap<&'static str, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // A claim, and a holder's write (a finish, or the renewal of a running execution: which of
    // them is queued on the lock when it is taken depends on timing), must die mid-statement.
    // Finishes killed at random are asserted below (phase 1 kills them too).
    while !(killed.contains_key("claim")
        && (killed.contains_key("complete") || killed.contains_key("heartbeat")))
    {
        assert!(
            Instant::now() < deadline,
            "no claim and finish queued on the lock: {killed:?}; errors {:?}",
            c.stores.iter().map(|s| s.errors()).collect::<Vec<_>>()
        );
        let waiting = admin
            .query(
                "SELECT pid, query FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&app],
            )
            .await
            .expect("waiting backends");
        for row in waiting {
            let pid: i32 = row.get(0);
            let query: String = row.get(1);
            let ok: bool = admin
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .expect("terminate")
                .get(0);
            if ok {
                *killed.entry(kind_of(&query)).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    locker.batch_execute("ROLLBACK").await.expect("release");
    assert!(unavailable(&c, "claim") > 0, "{:?}", c.stores[0].errors());
    assert!(
        unavailable(&c, "finish") > 0,
        "{:?}",
        c.stores.iter().map(|s| s.errors()).collect::<Vec<_>>()
    );

    let mut records = running.await.expect("load");
    still_works(&c, 2, 10_000, 20).await;
    records.extend(
        load(&c, 1, 20_000..20_010, Duration::ZERO)
            .await
            .expect("load"),
    );
    let s = settle_and_check(&c, &records, Duration::from_secs(60)).await;
    eprintln!("terminated {terminated} backends, then mid-statement: {killed:?}; {s:?}");
    assert!(s.ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_timing_out_behind_a_foreign_lock_stall_the_hubs_then_everything_completes() {
    let Some(db) = pg::fresh() else { return };
    let dsn = with_app(&db.dsn, &db.schema);
    let (nodes, _transports) = nodes(&dsn, &db.schema, 3, Some(Duration::from_millis(200))).await;
    let c = start(nodes, 2, 2, fault_config(), Duration::from_millis(100)).await;
    let admin = pg::client(&db.dsn).await;
    let running = load(&c, 2, 0..120, Duration::from_millis(40));
    under_way(&c, 10).await;

    admin.batch_execute("BEGIN").await.expect("begin");
    admin
        .batch_execute(&format!(
            "LOCK TABLE \"{}\".dispatch IN EXCLUSIVE MODE",
            db.schema
        ))
        .await
        .expect("lock the dispatch table");
    // Holding a fault for a fixed span is the fault, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    admin.batch_execute("ROLLBACK").await.expect("release");

    let mut records = running.await.expect("load");
    let seen: Vec<_> = c.stores.iter().map(|s| s.errors()).collect();
    assert!(
        unavailable(&c, "claim") + unavailable(&c, "finish") > 0,
        "no claim or finish timed out: {seen:?}"
    );
    for s in &c.stores {
        for ((method, variant), _) in s.errors() {
            assert!(
                variant == "unavailable",
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
    let s = settle_and_check(&c, &records, Duration::from_secs(60)).await;
    eprintln!("statement timeouts: {s:?}; errors seen by the hubs: {seen:?}");
    assert!(s.ok > 0);
    assert_eq!(
        s.max_executions, 1,
        "an outage shorter than the lease must not cost a second execution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_during_drains_loses_nothing() {
    let Some(server) = pg::private() else { return };
    let dsn = with_app(&server.dsn(), "faults_restart");
    let (nodes, transports) = nodes(&dsn, "faults", 3, None).await;
    let c = start(nodes, 2, 2, fault_config(), Duration::from_millis(100)).await;
    let listeners_before: Vec<_> = transports.iter().map(PgTransport::listener_pid).collect();
    let running = load(&c, 2, 0..120, Duration::from_millis(40));
    under_way(&c, 10).await;

    let server = Arc::new(server);
    let restarting = Arc::clone(&server);
    let started = Instant::now();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .expect("restart task")
        .expect("restart the server");
    let outage = started.elapsed();

    let mut records = running.await.expect("load");
    let seen: Vec<_> = c.stores.iter().map(|s| s.errors()).collect();
    still_works(&c, 2, 10_000, 20).await;
    records.extend(
        load(&c, 1, 20_000..20_010, Duration::ZERO)
            .await
            .expect("load"),
    );
    let s = settle_and_check(&c, &records, Duration::from_secs(60)).await;
    eprintln!("restart took {outage:?}: {s:?}; errors seen by the hubs: {seen:?}");
    for (t, before) in transports.iter().zip(listeners_before) {
        let after = t.listener_pid();
        assert!(
            after.is_some() && after != before,
            "the listener is back on a new backend"
        );
    }
    assert!(s.ok > 0);
    if outage < fault_config().lease / 2 {
        assert_eq!(
            s.max_executions, 1,
            "a restart shorter than the lease must not cost a second execution"
        );
    }
}

/// Only notices carry the work here: polling, catch-up drains and sweeps are slower than the
/// test's bound, so dispatches complete in time only if the hubs' `Resync` (after the
/// listeners come back) drains the owned brokers and wakes every waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listeners_resync_and_in_flight_dispatches_complete() {
    let Some(db) = pg::fresh() else { return };
    let dsn = with_app(&db.dsn, &db.schema);
    let (nodes, transports) = nodes(&dsn, &db.schema, 2, None).await;
    let config = HubConfig {
        poll_interval: Duration::from_secs(120),
        sweep_interval: Duration::from_secs(120),
        wait_window: Duration::from_secs(60),
        ..fault_config()
    };
    let c = start(nodes, 1, 2, config, Duration::from_millis(200)).await;
    let admin = pg::client(&db.dsn).await;
    let started = Instant::now();
    let first = load(&c, 1, 0..30, Duration::from_millis(5));
    under_way(&c, 2).await;

    let before: Vec<i32> = transports
        .iter()
        .map(|t| t.listener_pid().expect("listening"))
        .collect();
    for pid in &before {
        let ok: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .expect("terminate a listener")
            .get(0);
        assert!(ok, "listener {pid} terminated");
    }
    // Written while the listeners are down or coming back: their signals may be lost.
    let second = load(&c, 1, 100..130, Duration::ZERO);

    let mut records = first.await.expect("load");
    records.extend(second.await.expect("load"));
    for r in &records {
        match &r.got {
            Got::Dispatched(Ok(v)) => assert_eq!(v["args"]["tag"], r.tag),
            Got::Sent(Ok(_)) => {}
            other => panic!("command {} got {other:?}", r.tag),
        }
    }
    for (t, old) in transports.iter().zip(&before) {
        let now = t.listener_pid();
        assert!(
            now.is_some() && now != Some(*old),
            "the listener reconnected"
        );
    }
    let s = settle_and_check(&c, &records, Duration::from_secs(30)).await;
    let took = started.elapsed();
    eprintln!("listeners killed: {s:?} in {took:?}");
    assert!(
        took < Duration::from_secs(60),
        "completion came from polling, not from the resync: {took:?}"
    );
    still_works(&c, 1, 10_000, 10).await;
}
