//! # broker-dispatch
//!
//! Durable, attempt-fenced dispatch of commands to remote brokers across the replicas of a hub.
//!
//! A hub server runs as several replicas (**nodes**) sharing one database. Each remote runtime
//! host (**broker**) holds one live control connection to exactly one node. A request for a
//! broker can land on any node; only the one holding the connection (the **owner**) can execute
//! it. This crate gets the request there:
//!
//! 1. **Route** ([`fsm::route`], pure): connected here → run it here, no row, no wait; owned by a
//!    live node elsewhere → forward; HTTP endpoint → call it; otherwise park (or fail fast).
//! 2. **Durable intent**: forwarding writes a row, a [`fsm::Dispatch`]. The row is the truth.
//! 3. **Signal**: a [`transport::Notice`] tells the owner "broker B has work". A hint: losing one
//!    costs latency, never data.
//! 4. **Claim**: the owner moves the row `pending → in_progress` by compare-and-set, bumping its
//!    `attempt` (the fencing token) and taking a lease.
//! 5. **Execute** via your [`hub::Executor`], then **finish** `in_progress → done | failed`,
//!    guarded by the same attempt: a stale holder is fenced out.
//! 6. **Wait**: the originator registered its waiter before writing, and waits with a rolling
//!    deadline that extends on real progress; when it gives up on a row nobody claimed, it cancels
//!    it, so no zombie runs later.
//!
//! ## The life of a dispatch
//!
//! ```text
//!            claim (attempt+1, lease)           complete
//! pending ─────────────────────────▶ in_progress ─────────▶ done
//!   │  ▲                               │  │  ▲
//!   │  │ retry / release (same attempt)│  │  │ re-claim after the lease ran out
//!   │  └───────────────────────────────┘  │  │ (attempt+1; the old holder is fenced)
//!   │                                     │  └──┘
//!   │ cancel / expire                     │ fail / expire / exhaust
//!   ▼                                     ▼
//! failed ◀────────────────────────────────┘
//! ```
//!
//! [`fsm::apply`] is the specification of every arrow; every store agrees with it (the
//! conformance suite and a differential property test check this).
//!
//! ## Guarantees
//!
//! - **Exactly-once claim**: for each (dispatch, attempt) at most one node ever holds the claim,
//!   and every write by the holder of an older attempt is rejected with
//!   [`StoreError::Fenced`].
//! - **At-least-once execution, at most `max_attempts` times**: an owner that dies mid-execution
//!   loses its lease and another node re-claims the dispatch; `max_attempts = 1` gives
//!   at-most-once. The executor gets the dispatch id and attempt so the broker can deduplicate.
//! - **Nothing is lost**: every row reaches a terminal state, by execution or by the sweeper, even
//!   if every notice is lost (hubs poll as a fallback).
//! - **No zombies**: no execution starts at or after its row's deadline, and an originator that
//!   gives up cancels the row if nobody claimed it yet.
//! - **The execution model**: a broker runs up to `max_in_flight` executions at once and a drain
//!   claims only what it can start now; commands with the same ordering key
//!   ([`hub::Command::key`]) run one at a time in insertion order across nodes; `max_attempts`
//!   counts executions begun, not claims handed back unexecuted. See [`hub`].
//! - **Newest connection wins**: broker affinity is ordered by `connected_at`, so a delayed claim
//!   from an old connection cannot steal a broker from its newer owner; the node holding the
//!   older connection hears of the newer one at once and says so on [`hub::Hub::lost`].
//! - **Cancel from anywhere**: [`hub::Hub::cancel`] on any node ends a pending dispatch before it
//!   runs, and asks the holder of a running one to stop ([`hub::ExecContext::cancelled`]).
//! - **One bad row never poisons the others**: a row a claim cannot read back is quarantined as
//!   `Failed(Corrupt)` and the broker's other rows run.
//!
//! ## Quick start
//!
//! ```
//! use std::sync::Arc;
//! use broker_dispatch::fsm::{BrokerId, NodeId, SessionId};
//! use broker_dispatch::hub::{Command, FnExecutor, Hub};
//! use broker_dispatch::store::MemoryStore;
//! use broker_dispatch::transport::MemoryTransport;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(MemoryStore::new());
//! let bus = MemoryTransport::new();
//! let executor = Arc::new(FnExecutor(|_ctx, d: broker_dispatch::fsm::Dispatch| async move {
//!     Ok(serde_json::json!({ "ran": d.op }))
//! }));
//! let a = Hub::builder(NodeId::new("a")?).store(store.clone()).transport(Arc::new(bus.clone()))
//!     .executor(executor.clone()).start().await?;
//! let b = Hub::builder(NodeId::new("b")?).store(store.clone()).transport(Arc::new(bus.clone()))
//!     .executor(executor).start().await?;
//!
//! let broker = BrokerId::new("broker-1")?;
//! a.connect(broker.clone(), SessionId::new("ws-1")?, ()).await?;   // its connection is on `a`
//! let out = b.dispatch(Command::new(broker, "start", serde_json::json!({}))).await?; // lands on `b`
//! assert_eq!(out["ran"], "start");
//! # a.shutdown().await?; b.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//!
//! - [`fsm`]: the pure core (no I/O, no clock reads).
//! - [`store`]: [`store::Store`] and its backends: memory (always), SQLite (`sqlite`, default),
//!   Postgres (`postgres`).
//! - [`transport`]: [`transport::Transport`] and its wake-up media: memory, no-op, Postgres
//!   LISTEN/NOTIFY, NATS, Redis pub/sub, and a SQLite outbox shared by several processes.
//! - [`hub`]: the async runtime.
//! - `migrate` (`sqlite` + `postgres` features): copies a SQLite deployment into Postgres,
//!   exactly and idempotently.
//!
//! See `docs/guarantees.md` in the repository for each guarantee, the behaviour under each fault,
//! and the test that proves it.
//!
//! ## Metrics
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics) facade: install any recorder
//! (e.g. a Prometheus exporter) and they appear; without one they cost nothing.
//! `examples/prometheus.rs` exports them with `metrics-exporter-prometheus` (histograms as
//! buckets), and `docs/grafana-dashboard.json` is a Grafana dashboard built on them.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `broker_dispatch_routed_total` | counter | `route`: `local`, `forward`, `http`, `undeliverable` | commands routed by `dispatch` |
//! | `broker_dispatch_published_total` | counter | | dispatch rows written by this node |
//! | `broker_dispatch_claimed_total` | counter | | rows this node claimed |
//! | `broker_dispatch_claim_seconds` | histogram | | one claim call's duration |
//! | `broker_dispatch_started_total` | counter | | executions begun (rows and fast path) |
//! | `broker_dispatch_done_total` | counter | | rows this node completed |
//! | `broker_dispatch_failed_total` | counter | `reason`: the [`fsm::FailReason`] kind (`error`, `expired`, `cancelled`, `attempts_exhausted`, `undeliverable`, `corrupt`) | rows that ended failed |
//! | `broker_dispatch_intent_to_done_seconds` | histogram | | from a row's creation to its completion |
//! | `broker_dispatch_late_total` | counter | | claims handed back unstarted because their deadline passed first |
//! | `broker_dispatch_abandoned_total` | counter | | executions stopped before their outcome (lease about to lapse, shutdown timeout) |
//! | `broker_dispatch_fenced_total` | counter | | writes refused because a newer attempt holds the row |
//! | `broker_dispatch_cancel_requested_total` | counter | | running dispatches asked to stop by [`hub::Hub::cancel`] |
//! | `broker_dispatch_corrupt_rows_total` | counter | | claimed rows that could not be read back, quarantined |
//! | `broker_dispatch_lost_total` | counter | `reason`: `superseded`, `released`, `stale` | brokers this node lost ([`hub::Hub::lost`]) |
//! | `broker_dispatch_waiting` | gauge | | originators waiting on this node |
//! | `broker_dispatch_pending` | gauge | | pending rows, as of the last sweep |
//! | `broker_dispatch_oldest_pending_seconds` | gauge | | age of the oldest pending row, as of the last sweep |
//! | `broker_dispatch_purged_total` | counter | | finished rows deleted after their retention |
//! | `broker_dispatch_resyncs_total` | counter | | resyncs (re-drain every owned broker) |
//! | `broker_dispatch_task_panics_total` | counter | `task`: `listener`, `sweeper`, `catch-up`, `affinity refresh` | background task panics (each task is restarted) |
//! | `broker_dispatch_transport_reconnects_total` | counter | `transport`: `postgres`, `nats`, `redis` (none for the hub's own re-subscribe) | transport reconnects |
//! | `broker_dispatch_transport_errors_total` | counter | `transport`: `sqlite` | transport read errors |
//! | `broker_dispatch_transport_gaps_total` | counter | `transport`: `sqlite` | notices skipped by an outbox reader that fell behind |

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod fsm;
pub mod hub;
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "sqlite", feature = "postgres"))))]
pub mod migrate;
#[cfg(feature = "postgres")]
mod pg;
pub mod store;
mod sync;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod transport;

pub use error::{BoxError, Error, ExecError, StoreError, TransportError};

/// The Postgres driver, re-exported: its types appear in this crate's public signatures
/// ([`store::PgStore::insert_in`], [`hub::Hub::send_in`]), so code using them needs the same
/// version.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use tokio_postgres;

/// The connection pool [`store::PgStore`] and [`transport::PgTransport`] use, re-exported
/// ([`store::PgStore::from_pool`] takes one built by the caller, e.g. with TLS).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;

/// The README's Rust examples, compiled and run as doctests so the quick start stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
