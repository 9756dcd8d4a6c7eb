//! `NatsTransport`: the transport conformance suite, plus what only a NATS server shows (a
//! server killed and restarted on the same port, a server that accepts TCP and never speaks,
//! payloads from other publishers, the cross-hub round trip).
//!
//! The server is `NATS_URL` if set, else a throwaway `nats-server` this binary starts; each case
//! gets its own subject prefix. Tests that kill the server always start their own.

#![cfg(all(feature = "nats", feature = "conformance"))]

#[path = "support/round_trip.rs"]
mod round_trip;
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, DispatchId};
use broker_dispatch::store::MemoryStore;
use broker_dispatch::transport::conformance::{expect_all, Capabilities, TransportHarness};
use broker_dispatch::transport::{NatsTransport, NatsTransportOptions, Notice, Transport};
use broker_dispatch::TransportError;
use futures::StreamExt;
use servers::Kind;

fn options(prefix: &str) -> NatsTransportOptions {
    NatsTransportOptions {
        subject_prefix: prefix.to_owned(),
        // Reconnect quickly: the cases wait for it.
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        ..NatsTransportOptions::default()
    }
}

struct NatsHarness {
    url: String,
    prefix: String,
}

#[async_trait]
impl TransportHarness for NatsHarness {
    type Transport = NatsTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivers: true,
            can_drop_connection: true,
            namespaces: true,
        }
    }

    async fn node(&self) -> NatsTransport {
        NatsTransport::connect(&self.url, options(&self.prefix))
            .await
            .expect("connect the transport")
    }

    async fn drop_connection(&self, node: &NatsTransport) {
        node.client()
            .force_reconnect()
            .await
            .expect("force a reconnect");
    }

    async fn node_in_namespace(&self, namespace: &str) -> NatsTransport {
        let prefix = format!("{}.{namespace}", self.prefix);
        NatsTransport::connect(&self.url, options(&prefix))
            .await
            .expect("connect the transport")
    }
}

async fn harness() -> Option<NatsHarness> {
    servers::shared_url(Kind::Nats).map(|url| NatsHarness {
        url,
        prefix: servers::unique_name("bdt"),
    })
}

broker_dispatch::transport_conformance!(nats, harness());

#[tokio::test]
async fn a_server_killed_and_restarted_ends_in_resync_and_delivery_resumes() {
    let Some(server) = servers::private(Kind::Nats) else {
        return;
    };
    let a = NatsTransport::connect(&server.url(), options("restart"))
        .await
        .unwrap();
    let b = NatsTransport::connect(&server.url(), options("restart"))
        .await
        .unwrap();
    let mut sub = a.subscribe().await.unwrap();
    server.restart().expect("restart the private server");
    expect_all(&mut sub, [Notice::Resync]).await;
    // b reconnects on its own schedule; what it publishes before then waits in its client.
    let n = Notice::Event {
        id: DispatchId::new(),
    };
    b.publish(n.clone()).await.unwrap();
    expect_all(&mut sub, [n]).await;
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_bounded_typed_error() {
    // Accepts TCP, never sends INFO.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let err = NatsTransport::connect(
        &url,
        NatsTransportOptions {
            connect_timeout: Duration::from_millis(500),
            ..options("silent")
        },
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn bad_prefixes_are_typed_errors() {
    for bad in ["", "a.*", "a b", "a..b", "x.>"] {
        let err = NatsTransport::connect("nats://127.0.0.1:1", options(bad))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Payload(_)),
            "{bad:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn several_urls_are_accepted_and_a_malformed_one_is_a_typed_error() {
    let Some(url) = servers::shared_url(Kind::Nats) else {
        return;
    };
    // The first address refuses connections; the client moves on to the second.
    let both = format!("nats://127.0.0.1:1, {url}");
    let prefix = servers::unique_name("bdt");
    let a = NatsTransport::connect(&both, options(&prefix))
        .await
        .unwrap();
    let b = NatsTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let mut sub = a.subscribe().await.unwrap();
    let n = Notice::Event {
        id: DispatchId::new(),
    };
    b.publish(n.clone()).await.unwrap();
    expect_all(&mut sub, [n]).await;
    let err = NatsTransport::connect("nats://a:b:c:d", options("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Backend(_)), "{err:?}");
}

#[tokio::test]
async fn payloads_that_do_not_parse_are_ignored() {
    let Some(url) = servers::shared_url(Kind::Nats) else {
        return;
    };
    let prefix = servers::unique_name("bdt");
    let t = NatsTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let mut sub = t.subscribe().await.unwrap();
    let raw = async_nats::connect(url.as_str()).await.unwrap();
    for (subject, payload) in [
        (format!("{prefix}.event"), &b"not-a-uuid"[..]),
        (format!("{prefix}.signal"), &b"bad\nbroker"[..]),
        (format!("{prefix}.signal"), &b"\xff\xfe"[..]),
        (format!("{prefix}.other"), &b"x"[..]),
    ] {
        raw.publish(subject, payload.to_vec().into()).await.unwrap();
    }
    // Messages from one publisher arrive in order: once this one is here, the bad ones before
    // it were seen and dropped.
    raw.publish(format!("{prefix}.signal"), "good".into())
        .await
        .unwrap();
    raw.flush().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a notice")
        .expect("an open subscription");
    assert_eq!(
        first,
        Notice::Signal {
            broker: BrokerId::new("good").unwrap()
        }
    );
}

#[tokio::test]
async fn a_thousand_dispatches_cross_two_hubs() {
    let Some(url) = servers::shared_url(Kind::Nats) else {
        return;
    };
    let prefix = servers::unique_name("bdt");
    let store = Arc::new(MemoryStore::new());
    let a = NatsTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let b = NatsTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let r = round_trip::run((store.clone(), Arc::new(a)), (store, Arc::new(b)), 1_000).await;
    eprintln!(
        "nats: 1,000 cross-hub dispatches in {:?} (p50 {:?}, p99 {:?})",
        r.total, r.p50, r.p99
    );
}

#[tokio::test]
async fn a_client_that_gives_up_ends_every_subscription() {
    let Some(server) = servers::private(Kind::Nats) else {
        return;
    };
    let node = NatsTransport::connect_with(
        &server.url(),
        async_nats::ConnectOptions::new().max_reconnects(2),
        options("gives-up"),
    )
    .await
    .unwrap();
    let mut sub = node.subscribe().await.unwrap();
    server.kill();
    // Resyncs may come first; then the stream ends instead of hanging silently.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while sub.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the subscription did not end");
    let again = node.subscribe().await.unwrap_err();
    assert!(matches!(again, TransportError::Closed), "{again:?}");
}

#[path = "support/pg.rs"]
mod pg;

/// Postgres holds the rows, NATS carries every wake-up: with `notify: false` the store sends no
/// NOTIFY and the hubs publish signals and events themselves. Polling is effectively off, so the
/// 300 round trips finish in time only if the wake-ups arrive over NATS.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_with_nats_wake_ups_and_no_notify() {
    use broker_dispatch::store::{PgStore, PgStoreOptions, Store};
    let Some(url) = servers::shared_url(Kind::Nats) else {
        return;
    };
    let Some(db) = pg::fresh() else { return };
    let prefix = servers::unique_name("bdt");
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let store = PgStore::connect(
            &db.dsn,
            PgStoreOptions {
                schema: db.schema.clone(),
                notify: false,
                pool_size: 4,
                ..PgStoreOptions::default()
            },
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        assert!(!store.signals_on_insert() && !store.announces_finishes());
        let transport = NatsTransport::connect(&url, options(&prefix))
            .await
            .unwrap();
        pairs.push((
            Arc::new(store) as Arc<dyn Store>,
            Arc::new(transport) as Arc<dyn Transport>,
        ));
    }
    let b = pairs.pop().unwrap();
    let a = pairs.pop().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), round_trip::run(a, b, 300))
        .await
        .expect("300 round trips over NATS with rows in Postgres");
    eprintln!("postgres + nats: {r:?}");
}
