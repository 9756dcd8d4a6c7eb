//! Shared test support: a recording executor, a small deterministic RNG, and condition waits.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::{Attempt, Dispatch, DispatchId, NodeId};
use broker_dispatch::hub::{ExecContext, Executor};
use broker_dispatch::ExecError;
use parking_lot::Mutex;

/// What each execution did, across every hub of a test.
#[derive(Debug, Default)]
pub struct Ledger {
    /// (id, attempt) → how many times it ran (must be 1).
    pub runs: HashMap<(DispatchId, Attempt), u32>,
    /// id → executions.
    pub per_id: HashMap<DispatchId, u32>,
    /// id → the node that ran it last.
    pub ran_on: HashMap<DispatchId, NodeId>,
}

impl Ledger {
    pub fn duplicates(&self) -> usize {
        self.runs.values().filter(|n| **n > 1).count()
    }
}

/// How the recording executor behaves for an op.
pub type Behaviour =
    Arc<dyn Fn(&ExecContext, &Dispatch) -> Result<serde_json::Value, ExecError> + Send + Sync>;

/// An executor that records every execution in a shared ledger, then sleeps `delay` and answers
/// per `behaviour` (default: echo args).
#[derive(Clone)]
pub struct Recorder {
    pub node: NodeId,
    pub ledger: Arc<Mutex<Ledger>>,
    pub delay: Duration,
    pub behaviour: Option<Behaviour>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("node", &self.node)
            .finish()
    }
}

impl Recorder {
    pub fn new(node: &NodeId, ledger: &Arc<Mutex<Ledger>>) -> Self {
        Recorder {
            node: node.clone(),
            ledger: Arc::clone(ledger),
            delay: Duration::ZERO,
            behaviour: None,
        }
    }
}

#[async_trait]
impl Executor for Recorder {
    async fn execute(
        &self,
        ctx: ExecContext,
        d: &Dispatch,
    ) -> Result<serde_json::Value, ExecError> {
        {
            let mut l = self.ledger.lock();
            *l.runs.entry((ctx.id(), ctx.attempt())).or_default() += 1;
            *l.per_id.entry(ctx.id()).or_default() += 1;
            l.ran_on.insert(ctx.id(), self.node.clone());
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match &self.behaviour {
            Some(b) => b(&ctx, d),
            None => {
                Ok(serde_json::json!({ "op": d.op, "args": d.args, "node": self.node.as_str() }))
            }
        }
    }
}

/// xorshift64*: deterministic, dependency-free.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Waits until `cond` holds, polling every few milliseconds, or panics after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A hub clock that follows tokio's (pausable) clock, so scenario tests run on paused time:
/// leases, deadlines and freshness advance exactly as far as the test's timers do.
#[derive(Debug)]
#[allow(dead_code)] // not every test file that includes this module uses it
pub struct PausedClock(tokio::time::Instant);

#[allow(dead_code)]
impl PausedClock {
    /// A clock reading 2023-11-14 now.
    pub fn new() -> Arc<Self> {
        Arc::new(PausedClock(tokio::time::Instant::now()))
    }
}

impl broker_dispatch::hub::Clock for PausedClock {
    fn now(&self) -> broker_dispatch::fsm::Timestamp {
        broker_dispatch::fsm::Timestamp::from_micros(1_700_000_000_000_000)
            .saturating_add(self.0.elapsed())
    }
}
