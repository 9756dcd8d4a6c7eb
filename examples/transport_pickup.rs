//! Pickup latency over each transport, beside that transport's own raw round trip measured in
//! the same run.
//!
//! ```text
//! cargo run --release --all-features --example transport_pickup
//! ```
//!
//! Pickup: `send` on hub B → the executor starts on hub A (the broker is connected to A), 500
//! sends at ~100/s, polling effectively off (`poll_interval` 60 s), so every pickup rides the
//! transport's wake-up. Raw: a NATS publish → a subscriber's receipt (raw `async-nats`
//! clients), a Redis PUBLISH → a subscriber, a NOTIFY committed → a LISTEN connection, and for
//! SQLite an outbox row → a poller polling at the transport's interval.
//!
//! Stores: Postgres (`notify: false`) for NATS and Redis, as deployed across machines;
//! Postgres (`notify: true`) for LISTEN/NOTIFY; one SQLite file for the SQLite outbox.
//!
//! Servers: `NATS_URL` (else `nats://127.0.0.1:4222`), `REDIS_URL` (else
//! `redis://127.0.0.1:6379/`), `DATABASE_URL` (else a throwaway Postgres from the system's
//! binaries). A transport whose server cannot be reached is skipped with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{Command, ExecContext, Executor, Hub, HubConfig};
use broker_dispatch::store::{PgStore, PgStoreOptions, SqliteStore, Store};
use broker_dispatch::transport::{
    NatsTransport, NatsTransportOptions, PgTransport, PgTransportOptions, RedisTransport,
    RedisTransportOptions, SqliteTransport, SqliteTransportOptions, Transport,
};
use broker_dispatch::ExecError;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

#[path = "../tests/support/pg.rs"]
#[allow(unreachable_pub, missing_docs)]
mod pg;

const SAMPLES: usize = 500;
const WARMUP: usize = 10;
const GAP: Duration = Duration::from_millis(10);
/// The SQLite outbox's poll interval, for the transport and its raw baseline alike.
const SQLITE_POLL: Duration = Duration::from_millis(10);

type Starts = mpsc::UnboundedSender<(u64, Instant)>;

/// Reports when each execution starts.
struct Probe(Starts);

#[async_trait]
impl Executor for Probe {
    async fn execute(
        &self,
        _ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        let at = Instant::now();
        if let Some(seq) = d.args.get("seq").and_then(serde_json::Value::as_u64) {
            let _ = self.0.send((seq, at));
        }
        Ok(serde_json::Value::Null)
    }
}

/// p50 and p99 in µs.
fn percentiles(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    (at(0.50), at(0.99))
}

/// Sends `WARMUP + SAMPLES` numbered messages `GAP` apart with `send`, collects their receipt
/// times from `rx`, and returns the latencies after the warm-up.
async fn measure<F, Fut>(mut send: F, mut rx: mpsc::UnboundedReceiver<(u64, Instant)>) -> (f64, f64)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let total = WARMUP + SAMPLES;
    let mut sent = Vec::with_capacity(total);
    for seq in 0..total as u64 {
        sent.push(Instant::now());
        send(seq).await;
        tokio::time::sleep(GAP).await;
    }
    let mut lat = Vec::with_capacity(SAMPLES);
    let mut seen = 0;
    while seen < total {
        let (seq, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a receipt within 30 s")
            .expect("the receiver is alive");
        seen += 1;
        if seq as usize >= WARMUP {
            lat.push(at.duration_since(sent[seq as usize]).as_secs_f64() * 1e6);
        }
    }
    percentiles(lat)
}

/// Pickup: `send` on hub B → the executor starts on hub A.
async fn pickup(
    (store_a, transport_a): (Arc<dyn Store>, Arc<dyn Transport>),
    (store_b, transport_b): (Arc<dyn Store>, Arc<dyn Transport>),
) -> (f64, f64) {
    let config = HubConfig {
        poll_interval: Duration::from_secs(60),
        ..HubConfig::default()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let a = Hub::builder(NodeId::new("a").unwrap())
        .store(store_a)
        .transport(transport_a)
        .executor(Arc::new(Probe(tx.clone())))
        .config(config.clone())
        .start()
        .await
        .expect("start hub a");
    let b = Hub::builder(NodeId::new("b").unwrap())
        .store(store_b)
        .transport(transport_b)
        .executor(Arc::new(Probe(tx)))
        .config(config)
        .start()
        .await
        .expect("start hub b");
    let broker = BrokerId::new("pickup").unwrap();
    a.connect(broker.clone(), SessionId::new("s").unwrap(), ())
        .await
        .expect("connect the broker to hub a");
    // Let hub B see the affinity before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = measure(
        |seq| {
            let (b, broker) = (b.clone(), broker.clone());
            async move {
                b.send(Command::new(broker, "op", json!({ "seq": seq })))
                    .await
                    .expect("send");
            }
        },
        rx,
    )
    .await;
    b.shutdown().await.expect("shut hub b down");
    a.shutdown().await.expect("shut hub a down");
    r
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

async fn pg_store(dsn: &str, schema: &str, notify: bool) -> Arc<dyn Store> {
    let store = PgStore::connect(
        dsn,
        PgStoreOptions {
            schema: schema.to_owned(),
            channel_prefix: schema.to_owned(),
            notify,
            pool_size: 4,
            ..PgStoreOptions::default()
        },
    )
    .await
    .expect("connect the store");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

// ---------------------------------------------------------------------------------------------
// NATS

async fn nats_raw(url: &str) -> Result<(f64, f64), String> {
    let sub_client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let pub_client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let subject = pg::unique_name("rawpickup");
    let mut sub = sub_client
        .subscribe(subject.clone())
        .await
        .map_err(|e| e.to_string())?;
    sub_client.flush().await.map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let at = Instant::now();
            if let Ok(seq) = std::str::from_utf8(&m.payload).unwrap_or("").parse() {
                let _ = tx.send((seq, at));
            }
        }
    });
    let r = measure(
        |seq| {
            let (c, subject) = (pub_client.clone(), subject.clone());
            async move {
                c.publish(subject, seq.to_string().into()).await.unwrap();
                c.flush().await.unwrap();
            }
        },
        rx,
    )
    .await;
    reader.abort();
    Ok(r)
}

async fn nats_pickup(url: &str, dsn: &str) -> Result<(f64, f64), String> {
    let schema = pg::unique_name("pickup_nats");
    let prefix = schema.clone();
    let mut pair = Vec::new();
    for _ in 0..2 {
        let t = NatsTransport::connect(
            url,
            NatsTransportOptions {
                subject_prefix: prefix.clone(),
                ..NatsTransportOptions::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        pair.push((
            pg_store(dsn, &schema, false).await,
            Arc::new(t) as Arc<dyn Transport>,
        ));
    }
    let b = pair.pop().unwrap();
    let a = pair.pop().unwrap();
    Ok(pickup(a, b).await)
}

// ---------------------------------------------------------------------------------------------
// Redis

async fn redis_raw(url: &str) -> Result<(f64, f64), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    let channel = pg::unique_name("rawpickup");
    pubsub
        .subscribe(&channel)
        .await
        .map_err(|e| e.to_string())?;
    let publisher = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            let at = Instant::now();
            if let Ok(seq) = m.get_payload::<String>().unwrap_or_default().parse() {
                let _ = tx.send((seq, at));
            }
        }
    });
    let r = measure(
        |seq| {
            let (mut c, channel) = (publisher.clone(), channel.clone());
            async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(seq.to_string())
                    .query_async::<i64>(&mut c)
                    .await
                    .unwrap();
            }
        },
        rx,
    )
    .await;
    reader.abort();
    Ok(r)
}

async fn redis_pickup(url: &str, dsn: &str) -> Result<(f64, f64), String> {
    let schema = pg::unique_name("pickup_redis");
    let mut pair = Vec::new();
    for _ in 0..2 {
        let t = RedisTransport::connect(
            url,
            RedisTransportOptions {
                channel_prefix: schema.clone(),
                ..RedisTransportOptions::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        pair.push((
            pg_store(dsn, &schema, false).await,
            Arc::new(t) as Arc<dyn Transport>,
        ));
    }
    let b = pair.pop().unwrap();
    let a = pair.pop().unwrap();
    Ok(pickup(a, b).await)
}

// ---------------------------------------------------------------------------------------------
// Postgres LISTEN/NOTIFY

async fn notify_raw(dsn: &str) -> (f64, f64) {
    let channel = pg::unique_name("rawpickup");
    let (listener, mut connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect the listener");
    let (tx, rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let at = Instant::now();
                if let Ok(seq) = n.payload().parse() {
                    let _ = tx.send((seq, at));
                }
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    let sender = Arc::new(pg::client(dsn).await);
    let stmt = sender
        .prepare("SELECT pg_notify($1::text, $2::text)")
        .await
        .unwrap();
    let r = measure(
        |seq| {
            let (sender, stmt, channel) = (sender.clone(), stmt.clone(), channel.clone());
            async move {
                sender
                    .execute(&stmt, &[&channel, &seq.to_string()])
                    .await
                    .unwrap();
            }
        },
        rx,
    )
    .await;
    drop(listener);
    driver.abort();
    r
}

async fn notify_pickup(dsn: &str) -> (f64, f64) {
    let schema = pg::unique_name("pickup_pg");
    let mut pair = Vec::new();
    for _ in 0..2 {
        let t = PgTransport::connect(
            dsn,
            PgTransportOptions {
                channel_prefix: schema.clone(),
                ..PgTransportOptions::default()
            },
        )
        .await
        .expect("connect the transport");
        pair.push((
            pg_store(dsn, &schema, true).await,
            Arc::new(t) as Arc<dyn Transport>,
        ));
    }
    let b = pair.pop().unwrap();
    let a = pair.pop().unwrap();
    pickup(a, b).await
}

// ---------------------------------------------------------------------------------------------
// SQLite outbox

/// A row inserted into an outbox table → a poller thread reading new rows every
/// `SQLITE_POLL` sees it.
async fn sqlite_raw(dir: &std::path::Path) -> (f64, f64) {
    let path = dir.join("raw.db");
    let writer = rusqlite::Connection::open(&path).unwrap();
    writer
        .execute_batch(
            "PRAGMA journal_mode = WAL; \
             CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL);",
        )
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let reader = rusqlite::Connection::open(&path).unwrap();
            let mut last = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut stmt = reader
                    .prepare_cached("SELECT id, seq FROM outbox WHERE id > ?1 ORDER BY id")
                    .unwrap();
                let rows: Vec<(i64, i64)> = stmt
                    .query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let at = Instant::now();
                for (id, seq) in rows {
                    last = id;
                    let _ = tx.send((seq as u64, at));
                }
                std::thread::sleep(SQLITE_POLL);
            }
        })
    };
    let writer = Arc::new(std::sync::Mutex::new(writer));
    let r = measure(
        |seq| {
            let writer = writer.clone();
            async move {
                writer
                    .lock()
                    .unwrap()
                    .execute("INSERT INTO outbox (seq) VALUES (?1)", [seq as i64])
                    .unwrap();
            }
        },
        rx,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    r
}

async fn sqlite_pickup(dir: &std::path::Path) -> (f64, f64) {
    let path = dir.join("hub.db");
    let mut pair = Vec::new();
    for _ in 0..2 {
        let store = SqliteStore::open(&path).expect("open the store");
        let t = SqliteTransport::open(
            &path,
            SqliteTransportOptions {
                poll_interval: SQLITE_POLL,
                ..SqliteTransportOptions::default()
            },
        )
        .await
        .expect("open the transport");
        pair.push((
            Arc::new(store) as Arc<dyn Store>,
            Arc::new(t) as Arc<dyn Transport>,
        ));
    }
    let b = pair.pop().unwrap();
    let a = pair.pop().unwrap();
    pickup(a, b).await
}

// ---------------------------------------------------------------------------------------------

struct Line {
    transport: &'static str,
    raw_name: &'static str,
    raw: (f64, f64),
    pickup: (f64, f64),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nats = env_or("NATS_URL", "nats://127.0.0.1:4222");
    let redis = env_or("REDIS_URL", "redis://127.0.0.1:6379/");
    let pg_server;
    let dsn = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            pg_server = pg::private();
            pg_server.as_ref().map(pg::PgServer::dsn)
        }
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut lines = Vec::new();
    let mut skipped = Vec::new();

    match &dsn {
        Some(dsn) => {
            match (nats_raw(&nats).await, nats_pickup(&nats, dsn).await) {
                (Ok(raw), Ok(pickup)) => lines.push(Line {
                    transport: "NATS (PgStore notify: false)",
                    raw_name: "publish → subscriber",
                    raw,
                    pickup,
                }),
                (Err(e), _) | (_, Err(e)) => skipped.push(format!("NATS at {nats}: {e}")),
            }
            match (redis_raw(&redis).await, redis_pickup(&redis, dsn).await) {
                (Ok(raw), Ok(pickup)) => lines.push(Line {
                    transport: "Redis (PgStore notify: false)",
                    raw_name: "PUBLISH → subscriber",
                    raw,
                    pickup,
                }),
                (Err(e), _) | (_, Err(e)) => skipped.push(format!("Redis at {redis}: {e}")),
            }
            lines.push(Line {
                transport: "Postgres LISTEN/NOTIFY",
                raw_name: "NOTIFY → LISTEN",
                raw: notify_raw(dsn).await,
                pickup: notify_pickup(dsn).await,
            });
        }
        None => skipped.push("NATS, Redis, Postgres: no Postgres (DATABASE_URL unset)".into()),
    }
    lines.push(Line {
        transport: "SQLite outbox (10 ms poll)",
        raw_name: "outbox row → poller",
        raw: sqlite_raw(dir.path()).await,
        pickup: sqlite_pickup(dir.path()).await,
    });

    println!(
        "pickup latency, {SAMPLES} sends at ~{}/s, polling off; µs",
        1000 / GAP.as_millis()
    );
    println!(
        "{:<30} {:<22} {:>9} {:>9} {:>10} {:>10} {:>7}",
        "transport", "raw", "raw p50", "raw p99", "pickup p50", "pickup p99", "ratio"
    );
    for l in &lines {
        println!(
            "{:<30} {:<22} {:>9.0} {:>9.0} {:>10.0} {:>10.0} {:>6.2}x",
            l.transport,
            l.raw_name,
            l.raw.0,
            l.raw.1,
            l.pickup.0,
            l.pickup.1,
            l.pickup.0 / l.raw.0
        );
    }
    println!("ratio = pickup p50 / raw p50; target ≤ 3x");
    for s in skipped {
        println!("skipped: {s}");
    }
}
