//! The crate's metrics, exported to Prometheus: two hubs on one SQLite file run a steady mix
//! of commands (forwarded, local, failing, slow with progress), and `/metrics` serves what they
//! record (`metrics-exporter-prometheus`). Point a Prometheus server at it and import
//! `docs/grafana-dashboard.json` into Grafana to see the dashboard built on these names.
//!
//! ```text
//! cargo run --example prometheus -- [--listen 127.0.0.1:9464]   # runs until Ctrl-C
//! cargo run --example prometheus -- --self-test                 # scrape once, check, exit
//! ```
//!
//! Any `metrics` recorder works the same way: the crate records through the `metrics` facade
//! and never installs one itself. The metric names, kinds and labels are listed in the crate
//! docs ("Metrics").
//!
//! `--self-test` runs a fixed workload, scrapes `/metrics` over HTTP like a Prometheus server,
//! checks that the series a dashboard needs are there, and prints one line:
//! `prometheus self-test: ok series=… families=…` (exit 1 and the missing names otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, SessionId};
use broker_dispatch::hub::{Command, ExecContext, FnExecutor, Hub, HubConfig};
use broker_dispatch::store::SqliteStore;
use broker_dispatch::transport::SqliteTransport;
use broker_dispatch::transport::SqliteTransportOptions;
use broker_dispatch::ExecError;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The series the dashboard in `docs/grafana-dashboard.json` is built on, with a label
/// each must carry where it has one: the self-test fails if the exporter does not serve them.
const EXPECTED: &[&str] = &[
    "broker_dispatch_routed_total{route=\"local\"}",
    "broker_dispatch_routed_total{route=\"forward\"}",
    "broker_dispatch_published_total",
    "broker_dispatch_claimed_total",
    "broker_dispatch_claim_seconds_bucket",
    "broker_dispatch_started_total",
    "broker_dispatch_done_total",
    "broker_dispatch_failed_total{reason=\"error\"}",
    "broker_dispatch_intent_to_done_seconds_bucket",
    "broker_dispatch_waiting",
    "broker_dispatch_pending",
    "broker_dispatch_oldest_pending_seconds",
];

/// Two hubs running a steady mix of commands, their metrics served to Prometheus.
#[derive(Debug, clap::Parser)]
#[command(name = "prometheus")]
struct Options {
    /// Where to serve `/metrics`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Run a fixed workload, scrape `/metrics` once, check it and exit.
    #[arg(long)]
    self_test: bool,
}

fn main() {
    let Options {
        mut listen,
        self_test,
    } = <Options as clap::Parser>::parse();
    if self_test {
        // Any free port: the self-test scrapes itself.
        listen.set_port(0);
        listen = std::net::TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| fail(&format!("no free port: {e}")));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(listen, self_test)) {
        fail(&e.to_string());
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("prometheus: {msg}");
    std::process::exit(1);
}

async fn run(listen: SocketAddr, self_test: bool) -> Result<(), Box<dyn std::error::Error>> {
    // Histograms as buckets (not summaries), so Grafana can aggregate quantiles across nodes.
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ],
        )?
        .install()?;
    println!("serving metrics on http://{listen}/metrics");

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("hub.db");
    let config = HubConfig {
        sweep_interval: Duration::from_millis(200),
        ..HubConfig::default()
    };
    let mut hubs = Vec::new();
    for name in ["node-a", "node-b"] {
        let store = Arc::new(SqliteStore::open(&db)?);
        let transport = SqliteTransport::open(&db, SqliteTransportOptions::default()).await?;
        hubs.push(
            Hub::builder(NodeId::new(name)?)
                .store(store)
                .transport(Arc::new(transport))
                .executor(Arc::new(FnExecutor(work)))
                .config(config.clone())
                .start()
                .await?,
        );
    }
    let brokers: Vec<BrokerId> = (0..4)
        .map(|i| BrokerId::new(format!("broker-{i}")))
        .collect::<Result<_, _>>()?;
    for (i, b) in brokers.iter().enumerate() {
        hubs[i % 2]
            .connect(b.clone(), SessionId::new(format!("ws-{i}"))?, ())
            .await?;
    }

    let rounds = if self_test { 40 } else { usize::MAX };
    for round in 0..rounds {
        let mut calls = Vec::new();
        for (i, b) in brokers.iter().enumerate() {
            // Each hub sends to every broker: half of them are local to it, half forwarded.
            for hub in &hubs {
                let op = match (round + i) % 10 {
                    0 => "fail",
                    1 if round % 4 == 0 => "slow",
                    _ => "ok",
                };
                calls.push(hub.dispatch(Command::new(b.clone(), op, serde_json::json!({}))));
            }
        }
        let _ = futures::future::join_all(calls).await;
        if !self_test {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One sweep after the workload sets the backlog gauges.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let scraped = scrape(listen).await?;
    for hub in &hubs {
        hub.shutdown().await?;
    }
    let missing: Vec<&str> = EXPECTED
        .iter()
        .copied()
        .filter(|name| !scraped.lines().any(|l| l.starts_with(name)))
        .collect();
    if !missing.is_empty() {
        return Err(format!("series missing from /metrics: {missing:?}").into());
    }
    let series = scraped
        .lines()
        .filter(|l| l.starts_with("broker_dispatch_"))
        .count();
    let families = scraped
        .lines()
        .filter(|l| l.starts_with("# TYPE broker_dispatch_"))
        .count();
    println!("prometheus self-test: ok series={series} families={families}");
    Ok(())
}

/// The brokers' side: `ok` answers at once, `fail` fails, `slow` reports progress twice.
async fn work(ctx: ExecContext, d: Dispatch) -> Result<serde_json::Value, ExecError> {
    match d.op.as_str() {
        "fail" => Err(ExecError::fatal("the broker refused")),
        "slow" => {
            for step in 1..=2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                ctx.report_progress(serde_json::json!({ "step": step }));
            }
            Ok(serde_json::json!("slow done"))
        }
        _ => Ok(serde_json::json!("ok")),
    }
}

/// `GET /metrics`, as a Prometheus server scrapes it (HTTP/1.0: the body ends with the
/// connection).
async fn scrape(addr: SocketAddr) -> Result<String, Box<dyn std::error::Error>> {
    let mut conn =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await??;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut response)).await??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("a response without a body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("scrape answered {:?}", head.lines().next()).into());
    }
    Ok(body.to_owned())
}
