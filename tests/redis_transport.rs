//! `RedisTransport`: the transport conformance suite, plus what only a Redis server shows (a
//! server killed and restarted on the same port, a server that accepts TCP and never answers,
//! payloads from other publishers, the cross-hub round trip).
//!
//! The server is `REDIS_URL` if set, else a throwaway `redis-server` this binary starts; each
//! case gets its own channel prefix. Every node of the conformance harness reaches the server
//! through its own cuttable proxy, so dropping one node's connection leaves the others alone.
//! Tests that kill the server always start their own.

#![cfg(all(feature = "redis", feature = "conformance"))]

#[path = "support/round_trip.rs"]
mod round_trip;
#[path = "support/servers.rs"]
mod servers;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, DispatchId};
use broker_dispatch::store::MemoryStore;
use broker_dispatch::transport::conformance::{expect_all, Capabilities, TransportHarness};
use broker_dispatch::transport::{Notice, RedisTransport, RedisTransportOptions, Transport};
use broker_dispatch::TransportError;
use futures::StreamExt;
use servers::{Kind, Proxy};

fn options(prefix: &str) -> RedisTransportOptions {
    RedisTransportOptions {
        channel_prefix: prefix.to_owned(),
        // Reconnect quickly: the cases wait for it.
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        ..RedisTransportOptions::default()
    }
}

/// `host:port` of a `redis://host:port/…` URL.
fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

struct RedisHarness {
    url: String,
    prefix: String,
    /// Each node's own proxy.
    proxies: Mutex<Vec<Proxy>>,
}

impl RedisHarness {
    async fn node_with_prefix(&self, prefix: &str) -> RedisTransport {
        let proxy = Proxy::start(host_port(&self.url)).await;
        let url = self.url.replacen(
            &host_port(&self.url),
            &format!("127.0.0.1:{}", proxy.port()),
            1,
        );
        let node = RedisTransport::connect(&url, options(prefix))
            .await
            .expect("connect the transport");
        self.proxies.lock().unwrap().push(proxy);
        node
    }
}

#[async_trait]
impl TransportHarness for RedisHarness {
    type Transport = RedisTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivers: true,
            can_drop_connection: true,
            namespaces: true,
        }
    }

    async fn node(&self) -> RedisTransport {
        self.node_with_prefix(&self.prefix).await
    }

    async fn drop_connection(&self, node: &RedisTransport) {
        let port = format!(":{}", node.server().rsplit(':').next().unwrap());
        let proxies = self.proxies.lock().unwrap();
        let proxy = proxies
            .iter()
            .find(|p| port == format!(":{}", p.port()))
            .expect("the node's proxy");
        proxy.cut();
    }

    async fn node_in_namespace(&self, namespace: &str) -> RedisTransport {
        self.node_with_prefix(&format!("{}:{namespace}", self.prefix))
            .await
    }
}

async fn harness() -> Option<RedisHarness> {
    servers::shared_url(Kind::Redis).map(|url| RedisHarness {
        url,
        prefix: servers::unique_name("bdt"),
        proxies: Mutex::new(Vec::new()),
    })
}

broker_dispatch::transport_conformance!(redis, harness());

#[tokio::test]
async fn a_server_killed_and_restarted_ends_in_resync_and_delivery_resumes() {
    let Some(server) = servers::private(Kind::Redis) else {
        return;
    };
    let node = RedisTransport::connect(&server.url(), options("restart"))
        .await
        .unwrap();
    let mut sub = node.subscribe().await.unwrap();
    server.restart().expect("restart the private server");
    expect_all(&mut sub, [Notice::Resync]).await;
    let n = Notice::Event {
        id: DispatchId::new(),
    };
    // The publishing connection died with the server; the first publish may find it dead.
    let mut published = false;
    for _ in 0..20 {
        match node.publish(n.clone()).await {
            Ok(()) => {
                published = true;
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(published);
    expect_all(&mut sub, [n]).await;
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_bounded_typed_error() {
    // Accepts TCP, never replies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let err = RedisTransport::connect(
        &url,
        RedisTransportOptions {
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
async fn bad_prefixes_and_urls_are_typed_errors() {
    for bad in ["", "a b", "a*b", "é"] {
        let err = RedisTransport::connect("redis://127.0.0.1:1/", options(bad))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Payload(_)),
            "{bad:?}: {err:?}"
        );
    }
    let err = RedisTransport::connect("not a url", options("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Backend(_)), "{err:?}");
}

#[tokio::test]
async fn payloads_that_do_not_parse_are_ignored() {
    let Some(url) = servers::shared_url(Kind::Redis) else {
        return;
    };
    let prefix = servers::unique_name("bdt");
    let t = RedisTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let mut sub = t.subscribe().await.unwrap();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    for (channel, payload) in [
        (format!("{prefix}:event"), &b"not-a-uuid"[..]),
        (format!("{prefix}:signal"), &b"bad\nbroker"[..]),
        (format!("{prefix}:signal"), &b"\xff\xfe"[..]),
    ] {
        ::redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut raw)
            .await
            .unwrap();
    }
    // Messages from one connection arrive in order: once this one is here, the bad ones before
    // it were seen and dropped.
    ::redis::cmd("PUBLISH")
        .arg(format!("{prefix}:signal"))
        .arg("good")
        .query_async::<i64>(&mut raw)
        .await
        .unwrap();
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
    let Some(url) = servers::shared_url(Kind::Redis) else {
        return;
    };
    let prefix = servers::unique_name("bdt");
    let store = Arc::new(MemoryStore::new());
    let a = RedisTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let b = RedisTransport::connect(&url, options(&prefix))
        .await
        .unwrap();
    let r = round_trip::run((store.clone(), Arc::new(a)), (store, Arc::new(b)), 1_000).await;
    eprintln!(
        "redis: 1,000 cross-hub dispatches in {:?} (p50 {:?}, p99 {:?})",
        r.total, r.p50, r.p99
    );
}
