//! The embedding seam, tried from the outside: the executor reaches the application's handle for
//! the live connection, a node hears at once when it loses a broker (and why), and executions
//! on a lost connection are told to stop. Paused time with a hub clock that follows it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, Route, SessionId, Timestamp};
use broker_dispatch::hub::{
    Clock, Command, ExecContext, Executor, Hub, HubConfig, Lost, LostReason,
};
use broker_dispatch::store::{DisconnectParams, MemoryStore, Store};
use broker_dispatch::transport::MemoryTransport;
use broker_dispatch::ExecError;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug)]
struct PausedClock(Instant);

impl Clock for PausedClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000).saturating_add(self.0.elapsed())
    }
}

/// The application's handle for a connection: the writer half of its socket.
type Socket = mpsc::UnboundedSender<String>;

/// Writes `"<op> <session>"` to the connection's socket. `wait` executions then wait until
/// cancelled (and say so on the socket); everything else returns at once.
struct SocketExecutor {
    cancelled: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Executor for SocketExecutor {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let socket = ctx
            .conn::<Socket>()
            .ok_or_else(|| ExecError::fatal("no socket handle"))?;
        let session = ctx
            .session()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        socket
            .send(format!("{} {session}", d.op))
            .map_err(|_| ExecError::fatal("socket closed"))?;
        if d.op == "flaky" && ctx.attempt() == 1 {
            return Err(ExecError::Retryable {
                after: Duration::ZERO,
                message: "first try fails".into(),
            });
        }
        if d.op == "wait" {
            tokio::select! {
                () = ctx.cancelled() => {
                    self.cancelled.lock().push(session.clone());
                    return Err(ExecError::fatal("stopped: connection lost"));
                }
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
        }
        Ok(json!(session))
    }
}

fn config() -> HubConfig {
    HubConfig {
        lease: Duration::from_secs(2),
        // A refresh every 20 s: whatever is learned sooner came from the connect's signal.
        freshness: Duration::from_secs(60),
        wait_window: Duration::from_secs(30),
        poll_interval: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(500),
        ..HubConfig::default()
    }
}

struct Cluster {
    hubs: Vec<Hub>,
    store: Arc<MemoryStore>,
    cancelled: Arc<Mutex<Vec<String>>>,
}

async fn cluster(n: usize) -> Cluster {
    let clock = Arc::new(PausedClock(Instant::now()));
    let store = Arc::new(MemoryStore::new());
    let bus = MemoryTransport::new();
    let cancelled = Arc::new(Mutex::new(Vec::new()));
    let mut hubs = Vec::new();
    for i in 0..n {
        hubs.push(
            Hub::builder(NodeId::new(format!("node-{i}")).unwrap())
                .store(store.clone())
                .transport(Arc::new(bus.clone()))
                .executor(Arc::new(SocketExecutor {
                    cancelled: Arc::clone(&cancelled),
                }))
                .clock(clock.clone())
                .config(config())
                .start()
                .await
                .unwrap(),
        );
    }
    Cluster {
        hubs,
        store,
        cancelled,
    }
}

fn broker(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

fn session(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn socket() -> (Socket, mpsc::UnboundedReceiver<String>) {
    mpsc::unbounded_channel()
}

/// The next loss a stream reports within `within` of (paused) time.
async fn next_loss(lost: &mut broker_dispatch::hub::LostStream, within: Duration) -> Lost {
    tokio::time::timeout(within, lost.next())
        .await
        .expect("no loss reported in time")
        .expect("the stream ended")
}

#[tokio::test(start_paused = true)]
async fn the_executor_writes_to_the_connection_it_was_given() {
    let c = cluster(2).await;
    let b = broker("b");
    let (tx, mut rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();
    // Forwarded from node-1 (a row claimed by node-0) and on node-0's fast path.
    let out = c.hubs[1]
        .dispatch(Command::new(b.clone(), "start", json!({})))
        .await
        .unwrap();
    assert_eq!(out, json!("s1"));
    let out = c.hubs[0]
        .dispatch(Command::new(b.clone(), "stop", json!({})))
        .await
        .unwrap();
    assert_eq!(out, json!("s1"));
    assert_eq!(rx.recv().await.unwrap(), "start s1");
    assert_eq!(rx.recv().await.unwrap(), "stop s1");
}

#[tokio::test(start_paused = true)]
async fn a_node_hears_at_once_that_its_broker_connected_elsewhere() {
    let c = cluster(2).await;
    let b = broker("b");
    let mut lost = c.hubs[0].lost();
    let (old, mut old_rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), old)
        .await
        .unwrap();
    let t0 = Instant::now();
    let (new, mut new_rx) = socket();
    c.hubs[1]
        .connect(b.clone(), session("s2"), new)
        .await
        .unwrap();
    let loss = next_loss(&mut lost, Duration::from_secs(5)).await;
    assert_eq!(
        (loss.broker.clone(), loss.session.clone(), loss.reason),
        (b.clone(), session("s1"), LostReason::Superseded)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "learned after {:?}, not from the connect's signal",
        t0.elapsed()
    );
    assert!(!c.hubs[0].is_connected(&b));
    // Work given to the old node now runs on the new connection only.
    let out = c.hubs[0]
        .dispatch(Command::new(b.clone(), "after", json!({})))
        .await
        .unwrap();
    assert_eq!(out, json!("s2"));
    assert_eq!(new_rx.recv().await.unwrap(), "after s2");
    assert!(old_rx.try_recv().is_err(), "the old socket got work");
}

#[tokio::test(start_paused = true)]
async fn executions_on_a_lost_connection_are_told_to_stop() {
    let c = cluster(2).await;
    let b = broker("b");
    let (old, mut old_rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), old)
        .await
        .unwrap();
    let id = c.hubs[1]
        .send(Command::new(b.clone(), "wait", json!({})))
        .await
        .unwrap()
        .id;
    assert_eq!(old_rx.recv().await.unwrap(), "wait s1");
    let (new, _new_rx) = socket();
    c.hubs[1]
        .connect(b.clone(), session("s2"), new)
        .await
        .unwrap();
    let err = c.hubs[1].wait(id).await.unwrap_err();
    assert!(
        matches!(err, broker_dispatch::Error::Failed { .. }),
        "{err:?}"
    );
    assert_eq!(*c.cancelled.lock(), vec!["s1".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn a_newer_connection_on_the_same_node_replaces_the_older() {
    let c = cluster(1).await;
    let b = broker("b");
    let mut lost = c.hubs[0].lost();
    let (first, _r1) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), first)
        .await
        .unwrap();
    let (second, mut r2) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s2"), second)
        .await
        .unwrap();
    let loss = next_loss(&mut lost, Duration::from_secs(1)).await;
    assert_eq!(
        (loss.session.clone(), loss.reason),
        (session("s1"), LostReason::Superseded)
    );
    let out = c.hubs[0]
        .dispatch(Command::new(b.clone(), "x", json!({})))
        .await
        .unwrap();
    assert_eq!(out, json!("s2"));
    assert_eq!(r2.recv().await.unwrap(), "x s2");
}

#[tokio::test(start_paused = true)]
async fn disconnect_and_shutdown_report_released() {
    let c = cluster(1).await;
    let mut lost = c.hubs[0].lost();
    let (tx, _rx) = socket();
    c.hubs[0]
        .connect(broker("b1"), session("s1"), tx.clone())
        .await
        .unwrap();
    c.hubs[0]
        .connect(broker("b2"), session("s2"), tx)
        .await
        .unwrap();
    assert!(c.hubs[0]
        .disconnect(&broker("b1"), &session("s1"))
        .await
        .unwrap());
    let loss = next_loss(&mut lost, Duration::from_secs(1)).await;
    assert_eq!(
        (loss.broker.clone(), loss.reason),
        (broker("b1"), LostReason::Released)
    );
    c.hubs[0].shutdown().await.unwrap();
    let loss = next_loss(&mut lost, Duration::from_secs(1)).await;
    assert_eq!(
        (loss.broker.clone(), loss.reason),
        (broker("b2"), LostReason::Released)
    );
}

#[tokio::test(start_paused = true)]
async fn an_affinity_cleared_behind_the_nodes_back_is_reported_stale() {
    let c = cluster(1).await;
    let b = broker("b");
    let mut lost = c.hubs[0].lost();
    let (tx, _rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();
    // An operator (or a bug) clears it in the store, not through the hub.
    assert!(c
        .store
        .disconnect(DisconnectParams {
            broker: b.clone(),
            node: NodeId::new("node-0").unwrap(),
            session: session("s1"),
            now: None,
        })
        .await
        .unwrap());
    // The periodic refresh (every freshness / 3 = 20 s) finds it.
    let loss = next_loss(&mut lost, Duration::from_secs(60)).await;
    assert_eq!(
        (loss.session.clone(), loss.reason),
        (session("s1"), LostReason::Stale)
    );
    assert!(!c.hubs[0].is_connected(&b));
}

#[tokio::test(start_paused = true)]
async fn a_pending_dispatch_cancelled_from_another_node_never_runs() {
    use broker_dispatch::hub::CancelOutcome;
    let c = cluster(2).await;
    let b = broker("b");
    let id = c.hubs[1]
        .send(Command::new(b.clone(), "x", json!({})))
        .await
        .unwrap()
        .id;
    let out = c.hubs[0].cancel(id).await.unwrap();
    assert!(matches!(out, CancelOutcome::Cancelled(_)), "{out:?}");
    let (tx, mut rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();
    let err = c.hubs[1].wait(id).await.unwrap_err();
    assert!(
        matches!(
            err,
            broker_dispatch::Error::Failed {
                reason: broker_dispatch::fsm::FailReason::Cancelled,
                ..
            }
        ),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.try_recv().is_err(), "the cancelled dispatch ran");
    // Cancelling it again says it already finished; an unknown id is not found.
    let again = c.hubs[1].cancel(id).await.unwrap();
    assert!(matches!(again, CancelOutcome::Finished(_)), "{again:?}");
    let unknown = c.hubs[1]
        .cancel(broker_dispatch::fsm::DispatchId::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            unknown,
            broker_dispatch::Error::Store(broker_dispatch::StoreError::NotFound(_))
        ),
        "{unknown:?}"
    );
}

/// The originator learns the id before it waits (`Command::id`), another node cancels the
/// running dispatch, and the holder's executor hears it within a notice, well before its next
/// lease renewal; the row ends `Failed(Cancelled)`.
#[tokio::test(start_paused = true)]
async fn a_running_dispatch_cancelled_from_another_node_is_told_to_stop_at_once() {
    use broker_dispatch::hub::CancelOutcome;
    let c = cluster(3).await;
    let b = broker("b");
    let (tx, mut rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();
    let id = broker_dispatch::fsm::DispatchId::new();
    let call = tokio::spawn({
        let hub = c.hubs[1].clone();
        let b = b.clone();
        async move {
            hub.dispatch(Command::new(b, "wait", json!({})).id(id))
                .await
        }
    });
    assert_eq!(rx.recv().await.unwrap(), "wait s1");
    let t0 = Instant::now();
    let out = c.hubs[2].cancel(id).await.unwrap();
    assert!(matches!(out, CancelOutcome::Requested(_)), "{out:?}");
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            broker_dispatch::Error::Failed {
                reason: broker_dispatch::fsm::FailReason::Cancelled,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(*c.cancelled.lock(), vec!["s1".to_owned()]);
    // Renewals come every lease / 3 (667 ms): the notice told the holder first.
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "the holder heard of the cancel after {:?}",
        t0.elapsed()
    );
    let row = c.hubs[1].get(id).await.unwrap().unwrap();
    assert_eq!(
        row.failure,
        Some(broker_dispatch::fsm::FailReason::Cancelled)
    );
}

#[tokio::test(start_paused = true)]
async fn a_fast_path_execution_is_stopped_by_a_cancel_on_its_node() {
    use broker_dispatch::hub::CancelOutcome;
    let c = cluster(1).await;
    let b = broker("b");
    let (tx, mut rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();
    let id = broker_dispatch::fsm::DispatchId::new();
    let call = tokio::spawn({
        let hub = c.hubs[0].clone();
        let b = b.clone();
        async move {
            hub.dispatch(Command::new(b, "wait", json!({})).id(id))
                .await
        }
    });
    assert_eq!(rx.recv().await.unwrap(), "wait s1");
    let out = c.hubs[0].cancel(id).await.unwrap();
    assert_eq!(out, CancelOutcome::Stopping);
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            broker_dispatch::Error::Failed {
                reason: broker_dispatch::fsm::FailReason::Cancelled,
                ..
            }
        ),
        "{err:?}"
    );
    // Nothing was written to retry it.
    assert_eq!(c.hubs[0].get(id).await.unwrap(), None);
    assert_eq!(*c.cancelled.lock(), vec!["s1".to_owned()]);
}

/// `dispatch_detailed` says how a command was carried out: the route routing chose, the node
/// and attempt that completed it, and whether a row carried it.
#[tokio::test(start_paused = true)]
async fn the_detailed_outcome_names_the_route_node_and_attempt() {
    let c = cluster(2).await;
    let b = broker("b");
    let (tx, _rx) = socket();
    c.hubs[0]
        .connect(b.clone(), session("s1"), tx)
        .await
        .unwrap();

    // On the holder: the fast path, no row.
    let out = c.hubs[0]
        .dispatch_detailed(Command::new(b.clone(), "ping", json!({})))
        .await
        .unwrap();
    assert_eq!(out.route, Route::Local);
    assert_eq!(out.node.as_ref(), Some(c.hubs[0].node()));
    assert_eq!((out.attempt, out.durable), (1, false));
    assert_eq!(out.value, json!("s1"));
    assert!(c.store.get(out.id).await.unwrap().is_none(), "no row");

    // From another node: forwarded to the holder, carried by a row.
    let out = c.hubs[1]
        .dispatch_detailed(Command::new(b.clone(), "ping", json!({})))
        .await
        .unwrap();
    assert_eq!(
        out.route,
        Route::Forward {
            owner: c.hubs[0].node().clone()
        }
    );
    assert_eq!(out.node.as_ref(), Some(c.hubs[0].node()));
    assert_eq!((out.attempt, out.durable), (1, true));
    let row = c.store.get(out.id).await.unwrap().unwrap();
    assert_eq!(row.result, Some(out.value.clone()));

    // A fast-path failure retried as a row: the second attempt completed it.
    let out = c.hubs[0]
        .dispatch_detailed(Command::new(b.clone(), "flaky", json!({})))
        .await
        .unwrap();
    assert_eq!(out.route, Route::Local);
    assert_eq!((out.attempt, out.durable), (2, true));
    assert_eq!(out.node.as_ref(), Some(c.hubs[0].node()));
    for hub in &c.hubs {
        hub.shutdown().await.unwrap();
    }
}
