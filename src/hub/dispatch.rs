//! `Hub::dispatch`: route a command, run it here or write it and wait for it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;

use super::local::{run_http, run_local};
use super::{config, drain, local, wait, Command, Dispatched, Hub, UndeliverablePolicy};
use crate::error::{Error, StoreError};
use crate::fsm::{self, BrokerId, Dispatch, DispatchId, FailReason, Route, RouteInput};
use crate::store::NewDispatch;
use crate::transport::Notice;

impl Hub {
    /// Routes a command and returns its result.
    ///
    /// - Connected here (and neither keyed nor delayed): the executor runs at once, in this
    ///   task, bounded by `execute_timeout`; no row is written. If it fails retryably or times
    ///   out, the retry is written as a durable row and this call waits for it like a forward.
    /// - Owned by another live node (or parked, or keyed, or delayed): a dispatch is written
    ///   (after this hub's subscription is live), the owner is signalled, and this call waits
    ///   with a rolling deadline that extends on real progress. If it gives up on a row nobody
    ///   claimed, it cancels it, so it never runs later.
    /// - Over HTTP, when the broker has an endpoint and a fallback is configured.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] (with the row's reason, or `Undeliverable` under
    /// [`UndeliverablePolicy::FailFast`]), [`Error::TimedOut`], [`Error::InvalidInput`],
    /// [`Error::ShuttingDown`], store errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the row was written leaves it pending until its deadline (the
    /// wait window): it may still run, or it expires. Use the id from the error or
    /// [`send`](Hub::send) plus [`wait`](Hub::wait) to keep a handle.
    pub async fn dispatch(&self, cmd: Command) -> Result<serde_json::Value, Error> {
        self.dispatch_detailed(cmd).await.map(|d| d.value)
    }

    /// [`dispatch`](Hub::dispatch), reporting how the command was carried out: its id, the
    /// attempt and node that completed it, the route it took and whether a row carried it.
    /// To know the id before the result, set the command's [`id`](Command::id) (or use
    /// [`send`](Hub::send) and [`wait`](Hub::wait)).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use broker_dispatch::fsm::{BrokerId, Dispatch, NodeId, Route, SessionId};
    /// use broker_dispatch::hub::{Command, FnExecutor, Hub};
    /// use broker_dispatch::store::MemoryStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let hub = Hub::builder(NodeId::new("node-a")?)
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .executor(Arc::new(FnExecutor(|_ctx, d: Dispatch| async move { Ok(d.args) })))
    ///     .start()
    ///     .await?;
    /// let broker = BrokerId::new("broker-1")?;
    /// hub.connect(broker.clone(), SessionId::new("ws-1")?, ()).await?;
    /// let out = hub
    ///     .dispatch_detailed(Command::new(broker, "echo", serde_json::json!({ "n": 1 })))
    ///     .await?;
    /// assert_eq!(out.value, serde_json::json!({ "n": 1 }));
    /// assert_eq!(out.route, Route::Local);
    /// assert_eq!(out.node.as_ref(), Some(hub.node()));
    /// assert!(!out.durable, "the fast path writes no row");
    /// hub.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`dispatch`](Hub::dispatch).
    pub async fn dispatch_detailed(&self, cmd: Command) -> Result<Dispatched, Error> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let max_attempts = self.validate(&cmd)?;
        if cmd.takes_fast_path() && sh.conns.lock().contains_key(&cmd.broker) {
            metrics::counter!("broker_dispatch_routed_total", "route" => "local").increment(1);
            return run_local(self, cmd, max_attempts).await;
        }
        let (affinity, store_now) = sh.bounded(sh.store.affinity_at(&cmd.broker)).await?;
        let has_http = match &sh.http {
            Some(http) => local::has_endpoint(sh, http.as_ref(), &cmd.broker).await,
            None => false,
        };
        // Freshness by the store's clock (the database's on Postgres) unless the hub runs on an
        // explicit clock of its own; `last_seen` was written by that same clock.
        let now = sh.store_now().or(store_now).unwrap_or_else(|| sh.now());
        let connected_here = sh.conns.lock().contains_key(&cmd.broker);
        let route = fsm::route(&RouteInput {
            this_node: &sh.node,
            connected_here,
            affinity: affinity.as_ref(),
            now,
            freshness: sh.config.freshness,
            has_http_endpoint: has_http,
        });
        metrics::counter!("broker_dispatch_routed_total", "route" => route_name(&route))
            .increment(1);
        match route {
            Route::Local if cmd.takes_fast_path() => run_local(self, cmd, max_attempts).await,
            Route::Local | Route::Forward { .. } => {
                let id = sh.id_for(&cmd);
                self.write_and_wait(cmd, id, max_attempts, 0, route).await
            }
            Route::Http => match &sh.http {
                Some(http) => run_http(sh, http.as_ref(), cmd, max_attempts, now).await,
                None => self.park_or_fail(cmd, max_attempts, Route::Http).await,
            },
            Route::Undeliverable => {
                self.park_or_fail(cmd, max_attempts, Route::Undeliverable)
                    .await
            }
        }
    }

    async fn park_or_fail(
        &self,
        cmd: Command,
        max_attempts: u32,
        route: Route,
    ) -> Result<Dispatched, Error> {
        match self.shared.config.undeliverable {
            UndeliverablePolicy::Park => {
                let id = self.shared.id_for(&cmd);
                self.write_and_wait(cmd, id, max_attempts, 0, route).await
            }
            UndeliverablePolicy::FailFast => Err(Error::Failed {
                id: self.shared.id_for(&cmd),
                reason: FailReason::Undeliverable,
            }),
        }
    }

    /// Writes the command as dispatch `id` (whose first `executions` executions already began
    /// elsewhere: the fast path's) and waits for it; `route` is what routing decided.
    pub(crate) async fn write_and_wait(
        &self,
        cmd: Command,
        id: DispatchId,
        max_attempts: u32,
        executions: u32,
        route: Route,
    ) -> Result<Dispatched, Error> {
        let sh = &self.shared;
        let span = tracing::debug_span!("dispatch", node = %sh.node, broker = %cmd.broker, op = %cmd.op, %id);
        async move {
            // Subscribe before write: the transport subscription is live since `start`, and the
            // waiter is registered before the row exists, so no event about it can be missed.
            let waiter = wait::Registration::new(sh, id);
            let new = self.new_dispatch(cmd, id, max_attempts, executions, sh.config.wait_window);
            let d = self.write(new).await?;
            if d.id != id {
                // The idempotency key named an existing dispatch: wait for that one instead.
                drop(waiter);
                let done = wait::Registration::new(sh, d.id).wait(d).await?;
                return Ok(Dispatched::of_row(done, route));
            }
            let done = waiter.wait(d).await?;
            Ok(Dispatched::of_row(done, route))
        }
        .instrument(span)
        .await
    }

    /// The row for `cmd`: its deadline is the command's own (`timeout`, `deadline`) or else
    /// `default_ttl` from the store's now.
    pub(crate) fn new_dispatch(
        &self,
        cmd: Command,
        id: DispatchId,
        max_attempts: u32,
        executions: u32,
        default_ttl: Duration,
    ) -> NewDispatch {
        let sh = &self.shared;
        let ttl = match (cmd.timeout, cmd.deadline) {
            (None, None) => Some(default_ttl),
            (t, _) => t,
        };
        NewDispatch {
            id,
            broker: cmd.broker,
            op: cmd.op,
            args: cmd.args,
            max_attempts,
            available_at: cmd.available_at,
            deadline: cmd.deadline,
            idempotency_key: cmd.idempotency_key,
            key: cmd.key,
            delay: cmd.delay,
            ttl,
            executions,
            now: sh.store_now(),
        }
    }

    pub(crate) async fn write(&self, new: NewDispatch) -> Result<Dispatch, Error> {
        let sh = &self.shared;
        let broker = new.broker.clone();
        let d = sh.bounded(sh.store.insert(new)).await?;
        metrics::counter!("broker_dispatch_published_total").increment(1);
        self.announce_broker(&broker).await;
        Ok(d)
    }

    /// Tells `broker`'s owner there is work: a drain here, or a signal (unless the store's
    /// insert already signalled).
    pub(crate) async fn announce_broker(&self, broker: &BrokerId) {
        let sh = &self.shared;
        if sh.conns.lock().contains_key(broker) {
            drain::schedule(sh, broker);
        } else if !sh.store.signals_on_insert() {
            sh.publish(Notice::Signal {
                broker: broker.clone(),
            })
            .await;
        }
    }

    pub(crate) fn validate(&self, cmd: &Command) -> Result<u32, Error> {
        fsm::check_op(&cmd.op)?;
        let max_attempts = cmd.max_attempts.unwrap_or(self.shared.config.max_attempts);
        if max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        if let Some(k) = &cmd.idempotency_key {
            fsm::check_idempotency_key(k)?;
        }
        if let Some(k) = &cmd.key {
            fsm::check_key(k)?;
        }
        // The rule every store applies to a row's args, applied at the door whatever the route,
        // so a command is accepted or refused the same way on the fast path and forwarded.
        crate::store::check_json("args", &cmd.args, crate::store::MAX_ARGS_BYTES).map_err(|e| {
            match e {
                StoreError::InvalidInput(m) => Error::InvalidInput(m),
                other => Error::Store(other),
            }
        })?;
        for (what, d) in [("timeout", cmd.timeout), ("delay", cmd.delay)] {
            if d.is_some_and(|d| d < config::MIN_DURATION) {
                return Err(Error::InvalidInput(format!(
                    "Command::{what} must be at least {:?}",
                    config::MIN_DURATION
                )));
            }
        }
        Ok(max_attempts)
    }
}

fn route_name(r: &Route) -> &'static str {
    match r {
        Route::Local => "local",
        Route::Forward { .. } => "forward",
        Route::Http => "http",
        Route::Undeliverable => "undeliverable",
    }
}
