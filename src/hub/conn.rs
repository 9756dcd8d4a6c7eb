//! The connection seam: the broker connections this node holds (with the application's handle
//! for each), how the application hears that it lost one ([`Hub::lost`](super::Hub::lost)),
//! and the cancellation signal every execution carries ([`ExecContext::cancelled`]).
//!
//! A node loses a broker when the application disconnects it (`Released`), when a newer
//! connection of the broker was accepted anywhere (`Superseded`), or when the store no longer
//! names this node and no newer session took it either (`Stale`). A newer connection elsewhere
//! is learned two ways: the connecting node publishes a signal for the broker, and a node that
//! holds that broker answers such a signal by reading its affinity (at most one read in flight
//! per broker); and the periodic affinity refresh, as a backstop when the signal is lost.
//! Either way the node forgets the connection at once, starts nothing new on it, fires the
//! cancellation signal of every execution running on it, and tells the application.
//!
//! [`ExecContext::cancelled`]: super::ExecContext::cancelled

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::{broadcast, Notify};

use super::{drain, Hub, Shared};
use crate::error::Error;
use crate::fsm::{BrokerId, DispatchId, SessionId, Timestamp};
use crate::store::{ConnectOutcome, ConnectParams, DisconnectParams};
use crate::transport::Notice;

/// The application's handle for one broker connection (a channel to its socket, say), as given
/// to [`Hub::connect`](super::Hub::connect).
pub(crate) type ConnHandle = Arc<dyn Any + Send + Sync>;

/// A broker connection held by this node.
#[derive(Clone)]
pub(crate) struct LocalConn {
    pub(crate) session: SessionId,
    pub(crate) connected_at: Timestamp,
    pub(crate) handle: ConnHandle,
}

impl fmt::Debug for LocalConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConn")
            .field("session", &self.session)
            .field("connected_at", &self.connected_at)
            .finish_non_exhaustive()
    }
}

/// Why this node no longer holds a broker's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// A newer connection of the broker was accepted (on another node, or on this one).
    Superseded,
    /// This node let it go: [`Hub::disconnect`](super::Hub::disconnect) or shutdown.
    Released,
    /// The store no longer names this node as the broker's owner, and no newer session holds it
    /// either (its affinity was cleared behind this node's back).
    Stale,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Superseded => "superseded",
            LostReason::Released => "released",
            LostReason::Stale => "stale",
        })
    }
}

/// A broker connection this node no longer holds: close its socket. Nothing new starts on it
/// here, and every execution still running on it has had its
/// [`cancelled`](super::ExecContext::cancelled) signal fired.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lost {
    /// The broker.
    pub broker: BrokerId,
    /// The session of the connection lost.
    pub session: SessionId,
    /// Why.
    pub reason: LostReason,
}

/// The stream [`Hub::lost`](super::Hub::lost) returns. It ends when the hub stops. It holds the
/// last [`LOST_BUFFER`] losses a slow reader has not taken yet; older ones are dropped with a
/// warning (a reader can always check [`Hub::is_connected`](super::Hub::is_connected)).
pub struct LostStream {
    inner: Pin<Box<dyn Stream<Item = Lost> + Send>>,
}

impl fmt::Debug for LostStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostStream").finish_non_exhaustive()
    }
}

impl Stream for LostStream {
    type Item = Lost;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Lost>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// How many losses a [`LostStream`] holds for a reader that has not taken them yet.
pub const LOST_BUFFER: usize = 1024;

pub(crate) fn lost_channel() -> broadcast::Sender<Lost> {
    broadcast::channel(LOST_BUFFER).0
}

impl LostStream {
    pub(crate) fn new(rx: broadcast::Receiver<Lost>) -> Self {
        let inner = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(lost) => return Some((lost, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "a Hub::lost reader fell behind; older losses were dropped"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        LostStream {
            inner: Box::pin(inner),
        }
    }
}

/// A one-shot cancellation signal: fired once, seen by every clone.
#[derive(Clone, Default)]
pub(crate) struct Cancel(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    fired: AtomicBool,
    notify: Notify,
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_fired()).finish()
    }
}

impl Cancel {
    pub(crate) fn fire(&self) {
        if !self.0.fired.swap(true, Ordering::AcqRel) {
            self.0.notify.notify_waiters();
        }
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Resolves once fired (at once if it already was).
    pub(crate) async fn fired(&self) {
        loop {
            // Registered before the check, so a fire in between is not missed.
            let notified = self.0.notify.notified();
            if self.is_fired() {
                return;
            }
            notified.await;
        }
    }
}

/// One execution running on this node, for cancellation.
#[derive(Debug)]
pub(crate) struct Running {
    broker: BrokerId,
    session: SessionId,
    cancel: Cancel,
    /// The dispatch itself was cancelled ([`Hub::cancel`](super::Hub::cancel)), not only its
    /// connection or the hub.
    requested: Arc<AtomicBool>,
}

/// The executions running on this node, by dispatch (an id runs at most once at a time here).
#[derive(Debug, Default)]
pub(crate) struct RunningSet(Mutex<HashMap<DispatchId, Running>>);

impl RunningSet {
    /// Registers an execution about to start; the guard unregisters it when dropped.
    pub(crate) fn register(
        self: &Arc<Self>,
        id: DispatchId,
        broker: BrokerId,
        session: SessionId,
    ) -> RunningGuard {
        let cancel = Cancel::default();
        let requested = Arc::new(AtomicBool::new(false));
        self.0.lock().insert(
            id,
            Running {
                broker,
                session,
                cancel: cancel.clone(),
                requested: Arc::clone(&requested),
            },
        );
        RunningGuard {
            set: Arc::clone(self),
            id,
            cancel,
            requested,
        }
    }

    /// Fires the cancellation of dispatch `id`'s execution here, if one runs. Returns whether
    /// one did.
    pub(crate) fn cancel(&self, id: &DispatchId) -> bool {
        match self.0.lock().get(id) {
            Some(r) => {
                r.requested.store(true, Ordering::Release);
                r.cancel.fire();
                true
            }
            None => false,
        }
    }

    /// Whether dispatch `id` is executing here.
    pub(crate) fn contains(&self, id: &DispatchId) -> bool {
        self.0.lock().contains_key(id)
    }

    /// Fires the cancellation of every execution running on `broker`'s `session`.
    pub(crate) fn cancel_session(&self, broker: &BrokerId, session: &SessionId) {
        for r in self.0.lock().values() {
            if r.broker == *broker && r.session == *session {
                r.cancel.fire();
            }
        }
    }

    /// Fires every cancellation (shutdown).
    pub(crate) fn cancel_all(&self) {
        for r in self.0.lock().values() {
            r.cancel.fire();
        }
    }
}

/// Keeps an execution registered in its [`RunningSet`] while it runs.
#[derive(Debug)]
pub(crate) struct RunningGuard {
    set: Arc<RunningSet>,
    id: DispatchId,
    cancel: Cancel,
    requested: Arc<AtomicBool>,
}

impl RunningGuard {
    pub(crate) fn cancel(&self) -> Cancel {
        self.cancel.clone()
    }

    /// Whether the dispatch itself was cancelled while it ran here.
    pub(crate) fn was_cancelled(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut set = self.set.0.lock();
        // Only this execution's own entry (an id is never run twice here at once).
        if set
            .get(&self.id)
            .is_some_and(|r| Arc::ptr_eq(&r.cancel.0, &self.cancel.0))
        {
            set.remove(&self.id);
        }
    }
}

/// Forgets `broker`'s connection here if it is still `session`, and then: wakes its runner (so
/// it stops claiming), cancels its running executions, and tells the application. Returns
/// whether it forgot anything.
pub(crate) fn forget(
    sh: &Arc<Shared>,
    broker: &BrokerId,
    session: &SessionId,
    reason: LostReason,
) -> bool {
    let removed = {
        let mut conns = sh.conns.lock();
        match conns.get(broker) {
            Some(c) if c.session == *session => conns.remove(broker).is_some(),
            _ => false,
        }
    };
    if removed {
        announce_loss(sh, broker, session, reason);
    }
    removed
}

/// What follows a connection leaving the map (however it left).
pub(crate) fn announce_loss(
    sh: &Arc<Shared>,
    broker: &BrokerId,
    session: &SessionId,
    reason: LostReason,
) {
    drain::poke(sh, broker);
    sh.running.cancel_session(broker, session);
    metrics::counter!("broker_dispatch_lost_total", "reason" => reason.to_string()).increment(1);
    tracing::info!(node = %sh.node, %broker, %session, %reason, "broker connection lost");
    // Nobody listening is fine: the application did not ask.
    let _ = sh.lost.send(Lost {
        broker: broker.clone(),
        session: session.clone(),
        reason,
    });
}

/// Ownership checks in flight, by broker, and whether another signal came in meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Checks(Mutex<HashMap<BrokerId, bool>>);

/// A signal for a broker held here may mean a newer connection was accepted elsewhere: read its
/// affinity and forget the connection if it was superseded. One check runs per broker at a
/// time, and checks of one broker are at least `poll_interval / 10` apart; a signal during a
/// check or its gap asks for one more check after it, so the connect signal is never left
/// unanswered and a busy broker costs at most one read per gap.
pub(crate) fn check_ownership(sh: &Arc<Shared>, broker: &BrokerId) {
    if sh.local_session(broker).is_none() {
        return;
    }
    {
        let mut checks = sh.checks.0.lock();
        if let Some(again) = checks.get_mut(broker) {
            *again = true;
            return;
        }
        checks.insert(broker.clone(), false);
    }
    let sh = Arc::clone(sh);
    let broker = broker.clone();
    tokio::spawn(async move {
        let gap = (sh.config.poll_interval / 10).max(std::time::Duration::from_millis(1));
        loop {
            if let Some(session) = sh.local_session(&broker) {
                check_once(&sh, &broker, &session).await;
            }
            tokio::time::sleep(gap).await;
            let mut checks = sh.checks.0.lock();
            match checks.get_mut(&broker) {
                Some(again) if *again => *again = false,
                _ => {
                    checks.remove(&broker);
                    return;
                }
            }
        }
    });
}

async fn check_once(sh: &Arc<Shared>, broker: &BrokerId, session: &SessionId) {
    match sh.bounded(sh.store.affinity(broker)).await {
        Ok(Some(a)) if a.is_held_by(&sh.node, session) => {}
        // Newest connection wins: any other session in the row is a newer one.
        Ok(Some(a)) if a.session != *session => {
            forget(sh, broker, session, LostReason::Superseded);
        }
        // Cleared: the periodic refresh tells a lost write from a real loss, and decides.
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(node = %sh.node, %broker, error = %e, "ownership check failed; the refresh will tell");
        }
    }
}

/// The periodic refresh found `broker`'s affinity no longer held by `session` here: superseded
/// if a newer session holds or held it, stale otherwise.
pub(crate) async fn lost_by_refresh(sh: &Arc<Shared>, broker: &BrokerId, session: &SessionId) {
    let reason = match sh.bounded(sh.store.affinity(broker)).await {
        Ok(Some(a)) if a.session != *session => LostReason::Superseded,
        _ => LostReason::Stale,
    };
    forget(sh, broker, session, reason);
}

/// An event about dispatch `id`, which is executing here: it may be a cancel request from
/// another node. Reads the row and fires the execution's cancellation if so. (The execution's
/// next lease renewal would tell it too; this tells it within one notice.)
pub(crate) fn check_cancel(sh: &Arc<Shared>, id: DispatchId) {
    let sh = Arc::clone(sh);
    tokio::spawn(async move {
        match sh.bounded(sh.store.get(id)).await {
            Ok(Some(row)) if row.cancel_requested() => {
                sh.running.cancel(&id);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(node = %sh.node, %id, error = %e, "cancel check failed; the next renewal will tell");
            }
        }
    });
}

// The hub's connection API: connect, disconnect, hear of losses, size a broker's slots.
impl Hub {
    /// Whether `broker` is connected to this node.
    pub fn is_connected(&self, broker: &BrokerId) -> bool {
        self.shared.conns.lock().contains_key(broker)
    }

    /// The broker connections this node loses from now on, and why: close their sockets.
    /// Each reader gets every loss (a slow one keeps the last [`LOST_BUFFER`]); the stream ends
    /// when the hub is dropped.
    pub fn lost(&self) -> LostStream {
        LostStream::new(self.shared.lost.subscribe())
    }

    /// A broker's control connection arrived at this node: claim its affinity (newest
    /// connection wins, by `connected_at`) and drain its pending work.
    ///
    /// `conn` is the application's handle for this connection (a channel to its socket, say;
    /// `()` when the executor needs none): every execution for the broker on this node gets it
    /// from [`ExecContext::conn`](super::ExecContext::conn), with the session it belongs to. When the node loses the
    /// connection, [`lost`](Hub::lost) says so. A newer connection replaces an older one of the
    /// same broker on this node, and the node holding an older one elsewhere is told at once
    /// (a signal, which makes it read the broker's affinity).
    ///
    /// # Errors
    ///
    /// [`Error::Superseded`] if a newer session of the broker already holds it (this
    /// connection is stale and should be closed); store errors.
    ///
    /// # Cancel safety
    ///
    /// If dropped after the store accepted the claim, the affinity names this node but the hub
    /// does not know the connection; it goes stale after `freshness` and routing ignores it.
    pub async fn connect<C: Send + Sync + 'static>(
        &self,
        broker: BrokerId,
        session: SessionId,
        conn: C,
    ) -> Result<(), Error> {
        // Stamped by the store's clock (the database's on Postgres) unless the hub runs on a
        // clock of its own: a node whose clock is off cannot order connections wrongly.
        let connected_at = self.shared.store_now();
        self.connect_with(broker, session, Arc::new(conn), connected_at)
            .await
    }

    /// [`connect`](Hub::connect) with an explicit `connected_at` (when the connection was
    /// accepted, if that was earlier than now).
    ///
    /// # Errors
    ///
    /// As [`connect`](Hub::connect).
    pub async fn connect_at<C: Send + Sync + 'static>(
        &self,
        broker: BrokerId,
        session: SessionId,
        conn: C,
        connected_at: Timestamp,
    ) -> Result<(), Error> {
        self.connect_with(broker, session, Arc::new(conn), Some(connected_at))
            .await
    }

    async fn connect_with(
        &self,
        broker: BrokerId,
        session: SessionId,
        handle: ConnHandle,
        connected_at: Option<Timestamp>,
    ) -> Result<(), Error> {
        let sh = &self.shared;
        if sh.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let outcome = sh
            .bounded(sh.store.connect(ConnectParams {
                broker: broker.clone(),
                node: sh.node.clone(),
                session: session.clone(),
                connected_at,
                now: sh.store_now(),
            }))
            .await?;
        match outcome {
            ConnectOutcome::Claimed(affinity) => {
                let connected_at = affinity.connected_at;
                let replaced = {
                    let mut conns = sh.conns.lock();
                    let newer = conns
                        .get(&broker)
                        .is_none_or(|c| (connected_at, &session) >= (c.connected_at, &c.session));
                    if !newer {
                        return Err(Error::Superseded);
                    }
                    conns
                        .insert(
                            broker.clone(),
                            LocalConn {
                                session: session.clone(),
                                connected_at,
                                handle,
                            },
                        )
                        .filter(|old| old.session != session)
                };
                if let Some(old) = replaced {
                    announce_loss(sh, &broker, &old.session, LostReason::Superseded);
                }
                tracing::debug!(node = %sh.node, %broker, "broker connected");
                drain::schedule(sh, &broker);
                // Whichever node held an older connection reads the affinity on this signal
                // and lets it go now, not at its next refresh.
                sh.publish(Notice::Signal {
                    broker: broker.clone(),
                })
                .await;
                Ok(())
            }
            ConnectOutcome::Superseded(_) => Err(Error::Superseded),
        }
    }

    /// A broker's control connection went away: forget it locally and release its affinity,
    /// both only if `session` is still the current one (a teardown of an old session after a
    /// newer connect changes nothing). Returns whether it released anything. Executions already
    /// running for it finish and record their outcomes; nothing new starts on that session.
    ///
    /// # Errors
    ///
    /// Store errors (the local map is updated first regardless).
    pub async fn disconnect(&self, broker: &BrokerId, session: &SessionId) -> Result<bool, Error> {
        let sh = &self.shared;
        let removed = forget(sh, broker, session, LostReason::Released);
        let released = sh
            .bounded(sh.store.disconnect(DisconnectParams {
                broker: broker.clone(),
                node: sh.node.clone(),
                session: session.clone(),
                now: sh.store_now(),
            }))
            .await?;
        if removed || released {
            tracing::debug!(node = %sh.node, %broker, "broker disconnected");
        }
        Ok(removed || released)
    }

    /// Sets how many executions of `broker` may run at once on this node (`None`: back to
    /// [`HubConfig::max_in_flight`](super::HubConfig::max_in_flight)). Takes effect at the broker's next claim; running
    /// executions are not interrupted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for 0 or more than [`MAX_BATCH`](crate::store::MAX_BATCH).
    pub fn set_max_in_flight(&self, broker: &BrokerId, n: Option<u32>) -> Result<(), Error> {
        let sh = &self.shared;
        match n {
            Some(n) => {
                super::config::check_slots("max_in_flight", n)?;
                sh.slots.lock().insert(broker.clone(), n);
            }
            None => {
                sh.slots.lock().remove(broker);
            }
        }
        if sh.conns.lock().contains_key(broker) {
            drain::schedule(sh, broker);
        }
        Ok(())
    }
}
