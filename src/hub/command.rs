//! [`Command`]: what a caller asks of a broker, with its per-command knobs; [`Receipt`]: proof
//! that a [`send`](super::Hub::send) is durable.

use std::time::Duration;

use crate::fsm::{Attempt, BrokerId, Dispatch, DispatchId, NodeId, Route, Timestamp};

/// A command for a broker.
///
/// ```
/// # use std::time::Duration;
/// # use broker_dispatch::{fsm::BrokerId, hub::Command};
/// let cmd = Command::new(BrokerId::new("broker-1")?, "stop", serde_json::json!({"agent": 42}))
///     .key("agent-42")                    // after the agent's `start`, never beside it
///     .timeout(Duration::from_secs(10))   // must start within 10 s, or it fails as expired
///     .max_attempts(1);                   // at most once
/// # Ok::<(), broker_dispatch::fsm::IdError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Command {
    /// The target broker.
    pub broker: BrokerId,
    /// The operation (the executor's switch).
    pub op: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// Executions allowed (`None`: the hub's default).
    pub max_attempts: Option<u32>,
    /// Deduplication key: a second command with the same key is the same dispatch.
    pub idempotency_key: Option<String>,
    /// Ordering key: commands of one broker with the same key run one at a time, in the order
    /// they were written, on whichever node holds the broker.
    pub key: Option<String>,
    /// How long after it is written the command may still start (`None`: the wait window for
    /// [`dispatch`](super::Hub::dispatch), `send_ttl` for [`send`](super::Hub::send)). Measured
    /// on the store's clock.
    pub timeout: Option<Duration>,
    /// The latest instant it may start, on the store's clock (combined with `timeout`: the
    /// earlier wins).
    pub deadline: Option<Timestamp>,
    /// Not before this long after it is written (store clock).
    pub delay: Option<Duration>,
    /// Not before this instant (combined with `delay`: the later wins).
    pub available_at: Option<Timestamp>,
    /// The dispatch id to use (`None`: a fresh one).
    pub id: Option<DispatchId>,
}

impl Command {
    /// A command with the hub's defaults.
    pub fn new(broker: BrokerId, op: impl Into<String>, args: serde_json::Value) -> Self {
        Command {
            broker,
            op: op.into(),
            args,
            max_attempts: None,
            idempotency_key: None,
            key: None,
            timeout: None,
            deadline: None,
            delay: None,
            available_at: None,
            id: None,
        }
    }

    /// Gives the dispatch this id (default: a fresh UUID v7), so the caller knows it before
    /// [`dispatch`](super::Hub::dispatch) returns: to [`cancel`](super::Hub::cancel) it from
    /// another task or node, or to find it later. Ids must be unique: an id that names another
    /// dispatch is a conflict.
    pub fn id(mut self, id: DispatchId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the number of executions allowed (1: at most once).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the deduplication key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the ordering key: one at a time, in insertion order, per broker and key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets how long after it is written the command may still start.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the latest instant the command may start.
    pub fn deadline(mut self, deadline: Timestamp) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Delays the command: not claimable before `delay` after it is written.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Not claimable before this instant.
    pub fn available_at(mut self, at: Timestamp) -> Self {
        self.available_at = Some(at);
        self
    }

    /// Whether it can run on the local fast path: no row, no wait. A keyed command always takes
    /// a row, so that the claim guard orders it against the key's other commands on every node
    /// (an execution without a row would be invisible to a node the broker moves to); a
    /// delayed one takes a row because it cannot start now; one with an absolute `deadline`
    /// takes a row so that the deadline is judged by the store's clock (the database's on
    /// Postgres), the one clock every node agrees on, never by this node's.
    pub(crate) fn takes_fast_path(&self) -> bool {
        self.key.is_none()
            && self.delay.is_none()
            && self.available_at.is_none()
            && self.deadline.is_none()
    }
}

/// Proof that a [`Hub::send`](super::Hub::send) is durable.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Receipt {
    /// The dispatch written.
    pub id: DispatchId,
    /// The row as written.
    pub dispatch: Dispatch,
}

/// How a command was carried out, for callers who want more than its result
/// ([`Hub::dispatch_detailed`](super::Hub::dispatch_detailed)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Dispatched {
    /// The dispatch's id (the command's own [`id`](Command::id) if it set one).
    pub id: DispatchId,
    /// The attempt whose execution completed it (1 on the fast path and over HTTP).
    pub attempt: Attempt,
    /// The node that ran that execution: this node on the fast path, the holder of the row's
    /// claim otherwise, `None` over HTTP (no node ran it).
    pub node: Option<NodeId>,
    /// What routing decided when the command arrived ([`Route::Local`] for the fast path and
    /// for a row written here for a broker held here). The execution may have happened
    /// elsewhere: a fast-path retry or a parked row runs on whichever node holds the broker
    /// by then; `node` says which.
    pub route: Route,
    /// Whether a durable row carried it (everything but a first-time fast-path success and
    /// the HTTP fallback).
    pub durable: bool,
    /// The executor's result.
    pub value: serde_json::Value,
}

impl Dispatched {
    /// From a `done` row.
    pub(crate) fn of_row(d: Dispatch, route: Route) -> Self {
        Dispatched {
            id: d.id,
            attempt: d.attempt,
            node: d.claimed_by,
            route,
            durable: true,
            value: d.result.unwrap_or(serde_json::Value::Null),
        }
    }
}
