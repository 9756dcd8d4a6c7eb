//! `PgTransport`: the transport conformance suite, plus what only LISTEN/NOTIFY has (payloads
//! from other writers, a server restart, signals from the store's insert transaction).
//!
//! Each case gets its own channel prefix, so cases sharing a server do not hear each other.

#![cfg(all(feature = "postgres", feature = "conformance"))]

#[path = "support/pg.rs"]
mod pg;

use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, DispatchId};
use broker_dispatch::store::{NewDispatch, PgStore, PgStoreOptions, Store};
use broker_dispatch::transport::conformance::{
    expect_all, expect_silence, Capabilities, TransportHarness,
};
use broker_dispatch::transport::{Notice, PgTransport, PgTransportOptions, Transport};
use broker_dispatch::{StoreError, TransportError};

fn options(prefix: &str) -> PgTransportOptions {
    PgTransportOptions {
        channel_prefix: prefix.to_owned(),
        // Reconnect quickly: the cases wait for it.
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
        ..PgTransportOptions::default()
    }
}

/// Terminates the backend of a transport's LISTEN connection, as a network failure or a
/// failover would.
async fn kill_listener(dsn: &str, node: &PgTransport) {
    let pid = node.listener_pid().expect("the transport is listening");
    let admin = pg::client(dsn).await;
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend")
        .get(0);
    assert!(killed, "backend {pid} was not terminated");
}

struct PgHarness {
    db: pg::TestDb,
}

#[async_trait]
impl TransportHarness for PgHarness {
    type Transport = PgTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivers: true,
            can_drop_connection: true,
            namespaces: true,
        }
    }

    async fn node(&self) -> PgTransport {
        PgTransport::connect(&self.db.dsn, options(&self.db.schema))
            .await
            .expect("connect the transport")
    }

    async fn drop_connection(&self, node: &PgTransport) {
        kill_listener(&self.db.dsn, node).await;
    }

    async fn node_in_namespace(&self, namespace: &str) -> PgTransport {
        let prefix = format!("{}_{namespace}", self.db.schema);
        PgTransport::connect(&self.db.dsn, options(&prefix))
            .await
            .expect("connect the transport")
    }
}

async fn harness() -> Option<PgHarness> {
    pg::fresh().map(|db| PgHarness { db })
}

broker_dispatch::transport_conformance!(postgres, harness());

#[tokio::test]
async fn payloads_that_do_not_parse_are_ignored() {
    let Some(db) = pg::fresh() else { return };
    let t = PgTransport::connect(&db.dsn, options(&db.schema))
        .await
        .unwrap();
    let mut sub = t.subscribe().await.unwrap();
    let admin = pg::client(&db.dsn).await;
    let event = format!("{}_event", db.schema);
    let signal = format!("{}_signal", db.schema);
    for (channel, payload) in [(&event, "not-a-uuid"), (&signal, "bad\nbroker")] {
        admin
            .execute("SELECT pg_notify($1, $2)", &[channel, &payload])
            .await
            .unwrap();
    }
    // Notifications from one session arrive in commit order: once this one is here, the bad
    // ones before it were seen and dropped.
    let good = Notice::Signal {
        broker: BrokerId::new("good").unwrap(),
    };
    admin
        .execute("SELECT pg_notify($1, 'good')", &[&signal])
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut sub))
        .await
        .expect("a notice")
        .expect("an open subscription");
    assert_eq!(first, good);
}

#[tokio::test]
async fn a_resync_published_anywhere_reaches_every_node() {
    let Some(db) = pg::fresh() else { return };
    let a = PgTransport::connect(&db.dsn, options(&db.schema))
        .await
        .unwrap();
    let b = PgTransport::connect(&db.dsn, options(&db.schema))
        .await
        .unwrap();
    let mut sub = b.subscribe().await.unwrap();
    a.publish(Notice::Resync).await.unwrap();
    expect_all(&mut sub, [Notice::Resync]).await;
}

#[tokio::test]
async fn a_store_insert_signals_the_broker_only_once_committed() {
    let Some(db) = pg::fresh() else { return };
    let store = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: db.schema.clone(),
            channel_prefix: db.schema.clone(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let t = PgTransport::connect(&db.dsn, options(&db.schema))
        .await
        .unwrap();
    let mut sub = t.subscribe().await.unwrap();

    // Rolled back: no row, no notice.
    let ghost = BrokerId::new("ghost").unwrap();
    let mut client = store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let d = store
        .insert_in(
            &*tx,
            NewDispatch::new(ghost.clone(), "start", serde_json::json!({})),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.get(d.id).await.unwrap(), None);

    // Committed in the caller's transaction: the signal comes with the commit.
    let real = BrokerId::new("real").unwrap();
    let tx = client.transaction().await.unwrap();
    let d = store
        .insert_in(
            &*tx,
            NewDispatch::new(real.clone(), "start", serde_json::json!({})),
        )
        .await
        .unwrap();
    expect_silence(&mut sub).await;
    tx.commit().await.unwrap();
    assert!(store.get(d.id).await.unwrap().is_some());
    // Delivery follows commit order, so had the rolled-back insert signalled, it would come first.
    let first = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut sub))
        .await
        .expect("a notice")
        .expect("an open subscription");
    assert_eq!(first, Notice::Signal { broker: real });

    // The pooled insert signals too.
    let other = BrokerId::new("pooled").unwrap();
    store
        .insert(NewDispatch::new(
            other.clone(),
            "stop",
            serde_json::json!({}),
        ))
        .await
        .unwrap();
    expect_all(&mut sub, [Notice::Signal { broker: other }]).await;
}

#[tokio::test]
async fn a_server_restart_ends_in_resync_and_delivery_resumes() {
    let Some(server) = pg::private() else { return };
    let dsn = server.dsn();
    let node = PgTransport::connect(&dsn, options("restart"))
        .await
        .unwrap();
    let mut sub = node.subscribe().await.unwrap();
    server.restart().expect("restart the private server");
    expect_all(&mut sub, [Notice::Resync]).await;
    let n = Notice::Event {
        id: DispatchId::new(),
    };
    // The pool's connections died with the server; the first publish may find a dead one.
    let mut published = false;
    for _ in 0..3 {
        match node.publish(n.clone()).await {
            Ok(()) => {
                published = true;
                break;
            }
            Err(e) => assert!(e.is_retryable(), "{e:?}"),
        }
    }
    assert!(published);
    expect_all(&mut sub, [n]).await;
}

#[tokio::test]
async fn unreachable_server_and_bad_prefix_are_typed_errors() {
    let Some(server) = pg::private() else { return };
    let dsn = server.dsn();
    let bad = PgTransport::connect(&dsn, options("Bad-Prefix"))
        .await
        .unwrap_err();
    assert!(matches!(bad, TransportError::Payload(_)), "{bad:?}");
    server.stop().unwrap();
    let down = PgTransport::connect(&dsn, options("down"))
        .await
        .unwrap_err();
    assert!(down.is_retryable(), "{down:?}");
}

/// A server that accepts the TCP connection and then never says a word: `connect` gives up
/// within its connect timeout with a retryable error, instead of hanging.
#[tokio::test]
async fn connect_to_a_server_that_never_answers_is_bounded() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let err = PgTransport::connect(
        &format!("postgres://u@127.0.0.1:{port}/db"),
        PgTransportOptions {
            connect_timeout: Duration::from_millis(300),
            ..PgTransportOptions::default()
        },
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(err.is_retryable(), "{err:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    hold.abort();
}

/// `Hub::send_in`: a command written in the caller's transaction exists (and runs) if and only
/// if that transaction commits; the owner on another node runs it and the sender waits for it.
#[tokio::test]
async fn a_command_sent_in_the_callers_transaction_runs_only_if_it_commits() {
    use broker_dispatch::fsm::{Dispatch, NodeId, SessionId};
    use broker_dispatch::hub::{Command, FnExecutor, Hub, HubConfig};
    use std::sync::Arc;

    let Some(db) = pg::fresh() else { return };
    let store = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: db.schema.clone(),
            channel_prefix: db.schema.clone(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let store = Arc::new(store);
    let ran = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut hubs = Vec::new();
    for name in ["owner", "sender"] {
        let t = PgTransport::connect(&db.dsn, options(&db.schema))
            .await
            .unwrap();
        let ran = Arc::clone(&ran);
        hubs.push(
            Hub::builder(NodeId::new(name).unwrap())
                .store(store.clone())
                .transport(Arc::new(t))
                .executor(Arc::new(FnExecutor(move |_ctx, d: Dispatch| {
                    let ran = Arc::clone(&ran);
                    async move {
                        ran.lock().push(d.id);
                        Ok(serde_json::json!({ "ran": d.args }))
                    }
                })))
                .config(HubConfig {
                    // Long enough that a prompt run is the transaction's NOTIFY, not the poll.
                    poll_interval: Duration::from_secs(30),
                    ..HubConfig::default()
                })
                .start()
                .await
                .unwrap(),
        );
    }
    let broker = BrokerId::new("b1").unwrap();
    hubs[0]
        .connect(broker.clone(), SessionId::new("s1").unwrap(), ())
        .await
        .unwrap();
    let sender = &hubs[1];

    // Rolled back: the command never existed.
    let mut client = store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let ghost = sender
        .send_in(
            &*tx,
            Command::new(broker.clone(), "start", serde_json::json!(1)),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.get(ghost.id).await.unwrap(), None);

    // Committed with the caller's own write: runs on the owner; the sender waits for it.
    let tx = client.transaction().await.unwrap();
    tx.execute("CREATE TEMP TABLE caller_write (n int)", &[])
        .await
        .unwrap();
    let receipt = sender
        .send_in(
            &*tx,
            Command::new(broker.clone(), "start", serde_json::json!(2)),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sender.announce(&receipt).await;
    let out = tokio::time::timeout(Duration::from_secs(10), sender.wait(receipt.id))
        .await
        .expect("the committed command ran promptly")
        .unwrap();
    assert_eq!(out, serde_json::json!({ "ran": 2 }));
    assert_eq!(
        *ran.lock(),
        vec![receipt.id],
        "the rolled-back one never ran"
    );

    // A hub on another store has no transaction to join.
    let memory = Hub::builder(NodeId::new("memory").unwrap())
        .store(Arc::new(broker_dispatch::store::MemoryStore::new()))
        .executor(Arc::new(FnExecutor(|_ctx, _d: Dispatch| async {
            Ok(serde_json::Value::Null)
        })))
        .start()
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let err = memory
        .send_in(&*tx, Command::new(broker, "start", serde_json::json!(3)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, broker_dispatch::Error::InvalidInput(_)),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    memory.shutdown().await.unwrap();
    for hub in &hubs {
        hub.shutdown().await.unwrap();
    }
}

/// With only the schema given, a store and a transport agree on their channels, and two
/// deployments in different schemas of one database never hear each other's notices.
#[tokio::test]
async fn store_and_transport_name_their_channels_after_the_schema_by_default() {
    let Some(db) = pg::fresh() else { return };
    let other = pg::unique_name("other");
    let mut subs = Vec::new();
    let mut stores = Vec::new();
    for schema in [db.schema.clone(), other.clone()] {
        let store = PgStore::connect(
            &db.dsn,
            PgStoreOptions {
                schema: schema.clone(),
                ..PgStoreOptions::default()
            },
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let t = PgTransport::connect(
            &db.dsn,
            PgTransportOptions {
                schema,
                ..PgTransportOptions::default()
            },
        )
        .await
        .unwrap();
        subs.push((t.subscribe().await.unwrap(), t));
        stores.push(store);
    }
    let broker = BrokerId::new("b1").unwrap();
    stores[0]
        .insert(NewDispatch::new(
            broker.clone(),
            "start",
            serde_json::json!({}),
        ))
        .await
        .unwrap();
    expect_all(&mut subs[0].0, [Notice::Signal { broker }]).await;
    expect_silence(&mut subs[1].0).await;

    // A hub given a store and a transport of different schemas would never be woken: refused.
    use broker_dispatch::fsm::{Dispatch, NodeId};
    use broker_dispatch::hub::{FnExecutor, Hub};
    use std::sync::Arc;
    let mut stores = stores.into_iter();
    let first = stores.next().unwrap();
    let second = stores.next().unwrap();
    let crossed = Hub::builder(NodeId::new("crossed").unwrap())
        .store(Arc::new(first))
        .transport(Arc::new(subs[1].1.clone()))
        .executor(Arc::new(FnExecutor(|_ctx, _d: Dispatch| async {
            Ok(serde_json::Value::Null)
        })))
        .start()
        .await;
    let Err(err) = crossed else {
        panic!("a hub with crossed channels started")
    };
    assert!(
        matches!(&err, broker_dispatch::Error::InvalidInput(m) if m.contains("same schema")),
        "{err:?}"
    );
    second.drop_schema().await.unwrap();

    // A schema too long to name channels needs an explicit prefix: a typed error, not a
    // silently truncated channel.
    let long = format!("s{}", "x".repeat(50));
    let err = PgStore::connect(
        &db.dsn,
        PgStoreOptions {
            schema: long.clone(),
            ..PgStoreOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    let err = PgTransport::connect(
        &db.dsn,
        PgTransportOptions {
            schema: long,
            ..PgTransportOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Payload(_)), "{err:?}");
}
