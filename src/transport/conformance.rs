//! The transport conformance suite: what every [`Transport`] must do, as plain async functions
//! over a [`TransportHarness`], plus [`transport_conformance!`](crate::transport_conformance),
//! which expands to one `#[tokio::test]` per case.
//!
//! A harness hands out transport instances ("nodes") that share one medium, and says what the
//! medium can do through [`Capabilities`] rather than by name: a transport that delivers nothing
//! (like [`NoopTransport`]) is held to silence instead of delivery, and
//! the reconnect cases run only where the harness can drop a node's connection, and the isolation
//! case only where the medium has namespaces (channel or subject prefixes).
//!
//! A harness that needs a server it cannot reach returns `None` after printing why, so the case
//! passes as a visible skip on a developer's machine; under `CI=true` it must panic instead, so a
//! CI run can never pass by skipping (the harnesses in `tests/` do both).
//!
//! Third-party transports run it with the `conformance` feature:
//!
//! ```ignore
//! broker_dispatch::transport_conformance!(my_transport, async { Some(MyHarness::new().await) });
//! ```
//!
//! The harness expression is evaluated once per case and yields `Option<H>`: `None` skips the
//! case (print why before returning it). The generated tests use `#[tokio::test]`, so the
//! calling crate needs `tokio` with the `macros` and `rt` features.
//!
//! Waits are bounded waits on a condition ([`WAIT`]); silence is checked over [`QUIET`].

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{MemoryTransport, NoopTransport, Notice, Subscription, Transport};
use crate::fsm::{BrokerId, DispatchId, MAX_ID_LEN};

/// How long a case waits for a notice that must arrive.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a case listens to conclude that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// What the medium behind a harness can do.
///
/// `Capabilities::default()` is a medium that can do none of these; set what yours can with
/// `Capabilities { delivers: true, ..Capabilities::default() }`, so fields added later default
/// to "cannot".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Notices published on one node reach subscribers on every node. `false` for a transport
    /// that delivers nothing: the suite then checks it stays silent.
    pub delivers: bool,
    /// [`TransportHarness::drop_connection`] can cut a node off its medium, after which the node
    /// must reconnect and emit [`Notice::Resync`].
    pub can_drop_connection: bool,
    /// [`TransportHarness::node_in_namespace`] yields nodes on separate namespaces of the same
    /// medium (a channel or subject prefix), which must not hear one another.
    pub namespaces: bool,
}

/// Builds the transports a case exercises.
#[async_trait]
pub trait TransportHarness: Send + Sync + 'static {
    /// The transport under test.
    type Transport: Transport;

    /// What the medium can do.
    fn capabilities(&self) -> Capabilities;

    /// A new transport instance (one node) on the harness's shared medium.
    async fn node(&self) -> Self::Transport;

    /// Cuts `node` off its medium as a network failure would (only called when
    /// [`Capabilities::can_drop_connection`] is set).
    async fn drop_connection(&self, node: &Self::Transport);

    /// A new node on the same medium as [`node`](Self::node), but in the namespace named by
    /// `namespace` (a short lowercase word), different from the one `node` uses. Only called
    /// when [`Capabilities::namespaces`] is set; the default panics.
    async fn node_in_namespace(&self, namespace: &str) -> Self::Transport {
        panic!("node_in_namespace({namespace:?}) called on a harness without namespaces")
    }
}

/// Expands to one `#[tokio::test]` per conformance case, in a module named `$module`.
///
/// `$harness` is an expression of type `impl Future<Output = Option<H>>` where
/// `H: TransportHarness`; it is evaluated afresh for every case, in the scope enclosing the
/// macro call.
#[macro_export]
macro_rules! transport_conformance {
    ($module:ident, $harness:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            $crate::transport_conformance!(@case $harness, notices_reach_every_node);
            $crate::transport_conformance!(@case $harness, fans_out_to_every_subscription);
            $crate::transport_conformance!(@case $harness, notice_published_before_polling_is_kept);
            $crate::transport_conformance!(@case $harness, dropped_subscription_leaves_others_served);
            $crate::transport_conformance!(@case $harness, resync_after_dropped_connection);
            $crate::transport_conformance!(@case $harness, reconnect_while_notices_are_published);
            $crate::transport_conformance!(@case $harness, maximum_length_ids_round_trip);
            $crate::transport_conformance!(@case $harness, every_new_node_is_live_on_return);
            $crate::transport_conformance!(@case $harness, namespaces_stay_isolated);
        }
    };
    (@case $harness:expr, $case:ident) => {
        #[::tokio::test]
        async fn $case() {
            let Some(harness) = $harness.await else {
                return;
            };
            $crate::transport::conformance::$case(&harness).await;
        }
    };
}

fn signal(name: &str) -> Notice {
    Notice::Signal {
        broker: BrokerId::new(name).expect("a valid broker id"),
    }
}

/// Waits (at most [`WAIT`]) until every notice of `expected` arrived on `sub`; other notices
/// (duplicates, resyncs, other tests' traffic) are skipped.
///
/// # Panics
///
/// If the deadline passes first, or the stream ends.
pub async fn expect_all(sub: &mut Subscription, expected: impl IntoIterator<Item = Notice>) {
    let mut missing: HashSet<Notice> = expected.into_iter().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(n)) => {
                missing.remove(&n);
            }
            Ok(None) => panic!("the subscription ended while waiting for {missing:?}"),
            Err(_) => panic!("no delivery within {WAIT:?} of {missing:?}"),
        }
    }
}

/// Asserts that `sub` yields nothing for [`QUIET`].
///
/// # Panics
///
/// If a notice arrives (or the stream ends).
pub async fn expect_silence(sub: &mut Subscription) {
    if let Ok(n) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!("expected silence, got {n:?}");
    }
}

/// A signal and an event published on one node reach subscribers on it and on another node.
pub async fn notices_reach_every_node<H: TransportHarness>(h: &H) {
    let a = h.node().await;
    let b = h.node().await;
    let mut on_a = a.subscribe().await.expect("subscribe on a");
    let mut on_b = b.subscribe().await.expect("subscribe on b");
    let notices = vec![
        signal("conformance-broker"),
        Notice::Event {
            id: DispatchId::new(),
        },
    ];
    for n in &notices {
        a.publish(n.clone()).await.expect("publish");
    }
    if h.capabilities().delivers {
        expect_all(&mut on_a, notices.clone()).await;
        expect_all(&mut on_b, notices).await;
    } else {
        expect_silence(&mut on_a).await;
        expect_silence(&mut on_b).await;
    }
}

/// Every subscription of one instance gets its own copy of every notice.
pub async fn fans_out_to_every_subscription<H: TransportHarness>(h: &H) {
    let node = h.node().await;
    let publisher = h.node().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(node.subscribe().await.expect("subscribe"));
    }
    let n = signal("fan-out");
    publisher.publish(n.clone()).await.expect("publish");
    for sub in &mut subs {
        if h.capabilities().delivers {
            expect_all(sub, [n.clone()]).await;
        } else {
            expect_silence(sub).await;
        }
    }
}

/// Notices published after `subscribe` returned, but before the subscriber first polls, are
/// kept (subscribe-before-write holds even for a subscriber that is busy).
pub async fn notice_published_before_polling_is_kept<H: TransportHarness>(h: &H) {
    let node = h.node().await;
    let publisher = h.node().await;
    let mut sub = node.subscribe().await.expect("subscribe");
    let notices: Vec<Notice> = (0..20).map(|i| signal(&format!("early-{i}"))).collect();
    for n in &notices {
        publisher.publish(n.clone()).await.expect("publish");
    }
    if h.capabilities().delivers {
        expect_all(&mut sub, notices).await;
    } else {
        expect_silence(&mut sub).await;
    }
}

/// Dropping one subscription does not disturb the others of the same instance.
pub async fn dropped_subscription_leaves_others_served<H: TransportHarness>(h: &H) {
    let node = h.node().await;
    let dropped = node.subscribe().await.expect("subscribe");
    let mut kept = node.subscribe().await.expect("subscribe");
    drop(dropped);
    let n = signal("after-drop");
    node.publish(n.clone()).await.expect("publish");
    if h.capabilities().delivers {
        expect_all(&mut kept, [n]).await;
    } else {
        expect_silence(&mut kept).await;
    }
}

/// After a node loses its connection to the medium, its subscribers get [`Notice::Resync`]
/// (they may have missed notices), and delivery resumes.
pub async fn resync_after_dropped_connection<H: TransportHarness>(h: &H) {
    if !h.capabilities().can_drop_connection {
        eprintln!("skipping resync_after_dropped_connection: the harness cannot drop connections");
        return;
    }
    let node = h.node().await;
    let publisher = h.node().await;
    let mut sub = node.subscribe().await.expect("subscribe");
    h.drop_connection(&node).await;
    expect_all(&mut sub, [Notice::Resync]).await;
    if h.capabilities().delivers {
        let n = signal("after-reconnect");
        publisher.publish(n.clone()).await.expect("publish");
        expect_all(&mut sub, [n]).await;
    }
}

/// A node that loses its connection while another node keeps publishing gets
/// [`Notice::Resync`], and every notice published after that resync reaches it.
pub async fn reconnect_while_notices_are_published<H: TransportHarness>(h: &H) {
    let caps = h.capabilities();
    if !(caps.can_drop_connection && caps.delivers) {
        eprintln!(
            "skipping reconnect_while_notices_are_published: the harness cannot drop \
             connections, or its transport delivers nothing"
        );
        return;
    }
    let node = h.node().await;
    let publisher = std::sync::Arc::new(h.node().await);
    let mut sub = node.subscribe().await.expect("subscribe");
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let background = std::sync::Arc::clone(&publisher);
    let load = tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            // Failures are allowed here: only what follows the resync is held to delivery.
            let _ = background.publish(signal(&format!("during-{sent}"))).await;
            sent += 1;
            tokio::select! {
                _ = &mut stop_rx => return sent,
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
    });
    h.drop_connection(&node).await;
    expect_all(&mut sub, [Notice::Resync]).await;
    let _ = stop_tx.send(());
    let sent = load.await.expect("the publishing task");
    assert!(sent > 0, "the background publisher sent nothing");
    let after: Vec<Notice> = (0..5).map(|i| signal(&format!("after-{i}"))).collect();
    for n in &after {
        publisher.publish(n.clone()).await.expect("publish");
    }
    expect_all(&mut sub, after).await;
}

/// Ids at the length limit ([`MAX_ID_LEN`] bytes), with characters that mean something to
/// some media (`.`, `*`, `>`, `:`, spaces, non-ASCII), arrive intact.
pub async fn maximum_length_ids_round_trip<H: TransportHarness>(h: &H) {
    let a = h.node().await;
    let b = h.node().await;
    let mut sub = b.subscribe().await.expect("subscribe");
    let mut name = String::from("broker.*.> : é/");
    while name.len() < MAX_ID_LEN {
        name.push('x');
    }
    assert_eq!(name.len(), MAX_ID_LEN);
    let notices = vec![
        signal(&name),
        Notice::Event {
            id: DispatchId::new(),
        },
    ];
    for n in &notices {
        a.publish(n.clone()).await.expect("publish");
    }
    if h.capabilities().delivers {
        expect_all(&mut sub, notices).await;
    } else {
        expect_silence(&mut sub).await;
    }
}

/// A node is live as soon as `subscribe` returns, every time: a notice published from
/// another node right after it returns arrives. (A transport that only flushes its own buffer
/// before returning passes a single try most of the time; 20 fresh nodes catch it.)
pub async fn every_new_node_is_live_on_return<H: TransportHarness>(h: &H) {
    if !h.capabilities().delivers {
        eprintln!("skipping every_new_node_is_live_on_return: the transport delivers nothing");
        return;
    }
    let publisher = h.node().await;
    for round in 0..20 {
        let node = h.node().await;
        let mut sub = node.subscribe().await.expect("subscribe");
        let n = signal(&format!("live-{round}"));
        publisher.publish(n.clone()).await.expect("publish");
        expect_all(&mut sub, [n]).await;
    }
}

/// Nodes in different namespaces of one medium (two clusters sharing a server) hear only their
/// own namespace's notices.
pub async fn namespaces_stay_isolated<H: TransportHarness>(h: &H) {
    let caps = h.capabilities();
    if !(caps.namespaces && caps.delivers) {
        eprintln!("skipping namespaces_stay_isolated: the harness has no namespaces");
        return;
    }
    let one = h.node_in_namespace("one").await;
    let two = h.node_in_namespace("two").await;
    let default = h.node().await;
    let mut on_one = one.subscribe().await.expect("subscribe");
    let mut on_two = two.subscribe().await.expect("subscribe");
    let mut on_default = default.subscribe().await.expect("subscribe");
    let (n1, n2, n0) = (signal("ns-one"), signal("ns-two"), signal("ns-default"));
    one.publish(n1.clone()).await.expect("publish");
    two.publish(n2.clone()).await.expect("publish");
    default.publish(n0.clone()).await.expect("publish");
    expect_all(&mut on_one, [n1.clone()]).await;
    expect_all(&mut on_two, [n2.clone()]).await;
    expect_all(&mut on_default, [n0.clone()]).await;
    // Each published after the others' were sent, so a crossing notice would be here by now;
    // still, listen a while longer.
    for (sub, foreign) in [
        (&mut on_one, [&n2, &n0]),
        (&mut on_two, [&n1, &n0]),
        (&mut on_default, [&n1, &n2]),
    ] {
        expect_none_of(sub, &foreign).await;
    }
}

/// Listens for [`QUIET`] and panics if one of `foreign` arrives (other notices are allowed).
async fn expect_none_of(sub: &mut Subscription, foreign: &[&Notice]) {
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(n) = tokio::time::timeout_at(deadline, sub.next()).await {
        match n {
            Some(n) if foreign.contains(&&n) => panic!("{n:?} crossed into another namespace"),
            Some(_) => {}
            None => panic!("the subscription ended"),
        }
    }
}

/// The in-process bus: every node is a clone of one [`MemoryTransport`]; a dropped connection
/// is simulated with [`MemoryTransport::inject_resync`].
#[derive(Debug, Default)]
pub struct MemoryHarness {
    bus: MemoryTransport,
}

impl MemoryHarness {
    /// A harness over a fresh bus.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl TransportHarness for MemoryHarness {
    type Transport = MemoryTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivers: true,
            can_drop_connection: true,
            namespaces: false,
        }
    }

    async fn node(&self) -> MemoryTransport {
        self.bus.clone()
    }

    async fn drop_connection(&self, node: &MemoryTransport) {
        node.inject_resync();
    }
}

/// [`NoopTransport`]: nothing to connect, nothing delivered.
#[derive(Debug, Default)]
pub struct NoopHarness;

#[async_trait]
impl TransportHarness for NoopHarness {
    type Transport = NoopTransport;

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn node(&self) -> NoopTransport {
        NoopTransport::new()
    }

    async fn drop_connection(&self, _node: &NoopTransport) {}
}

#[cfg(test)]
mod tests {
    use super::{MemoryHarness, NoopHarness};

    crate::transport_conformance!(memory, async { Some(MemoryHarness::new()) });
    crate::transport_conformance!(noop, async { Some(NoopHarness) });
}
