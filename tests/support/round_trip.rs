//! The cross-hub round trip every transport is held to: two hubs, each with its own transport
//! instance, one broker connected to hub A, and 1,000 sequential dispatches from hub B that
//! must all complete. Hubs poll only once a minute here, so the run finishes in time only if
//! the transport carries the wake-ups.
//!
//! Include it with `#[path = "support/round_trip.rs"] mod round_trip;`.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{Command, FnExecutor, Hub, HubConfig};
use broker_dispatch::store::Store;
use broker_dispatch::transport::Transport;
use serde_json::json;

/// What a run measured.
#[derive(Debug)]
pub struct RoundTrips {
    /// Wall time for all dispatches.
    pub total: Duration,
    /// The median single round trip.
    pub p50: Duration,
    /// The 99th percentile round trip.
    pub p99: Duration,
}

/// Runs `count` sequential dispatches from hub B to a broker on hub A, asserting each result.
pub async fn run(
    (store_a, transport_a): (Arc<dyn Store>, Arc<dyn Transport>),
    (store_b, transport_b): (Arc<dyn Store>, Arc<dyn Transport>),
    count: usize,
) -> RoundTrips {
    let config = HubConfig {
        poll_interval: Duration::from_secs(60),
        ..HubConfig::default()
    };
    let executor = Arc::new(FnExecutor(|_ctx, d: Dispatch| async move {
        Ok(json!({ "echo": d.args }))
    }));
    let a = Hub::builder(NodeId::new("a").unwrap())
        .store(store_a)
        .transport(transport_a)
        .executor(executor.clone())
        .config(config.clone())
        .start()
        .await
        .expect("start hub a");
    let b = Hub::builder(NodeId::new("b").unwrap())
        .store(store_b)
        .transport(transport_b)
        .executor(executor)
        .config(config)
        .start()
        .await
        .expect("start hub b");
    let broker = BrokerId::new("round-trip-broker").unwrap();
    a.connect(broker.clone(), SessionId::new("s").unwrap(), ())
        .await
        .expect("connect the broker to hub a");
    let mut times = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            b.dispatch(Command::new(broker.clone(), "op", json!(i))),
        )
        .await
        .unwrap_or_else(|_| panic!("dispatch {i} did not complete within 10 s"))
        .unwrap_or_else(|e| panic!("dispatch {i} failed: {e:?}"));
        assert_eq!(out, json!({ "echo": i }), "dispatch {i}");
        times.push(t.elapsed());
    }
    let total = started.elapsed();
    b.shutdown().await.expect("shut hub b down");
    a.shutdown().await.expect("shut hub a down");
    times.sort();
    RoundTrips {
        total,
        p50: times[times.len() / 2],
        p99: times[times.len() * 99 / 100],
    }
}
