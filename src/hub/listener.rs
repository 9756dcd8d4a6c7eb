//! The notice listener: signals schedule drains of brokers held here, events wake waiters, and
//! a resync (notices may have been lost) re-drains every owned broker and wakes every waiter.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::background::local_brokers;
use super::{drain, Shared};
use crate::transport::{Notice, Subscription};

/// Drains every owned broker and wakes every waiter: the answer to "notices may be lost".
pub(crate) fn resync(sh: &Arc<Shared>) {
    for (b, _) in local_brokers(sh) {
        drain::schedule(sh, &b);
    }
    sh.notify_all_waiters();
}

pub(crate) async fn listen(sh: Arc<Shared>, mut sub: Subscription) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match sub.next().await {
            Some(Notice::Signal { broker }) => {
                if sh.conns.lock().contains_key(&broker) {
                    drain::schedule(&sh, &broker);
                }
            }
            Some(Notice::Event { id }) => sh.notify_waiter(&id),
            Some(Notice::Resync) => {
                metrics::counter!("broker_dispatch_resyncs_total").increment(1);
                resync(&sh);
            }
            None => {
                if sh.is_shutting_down() {
                    return;
                }
                tracing::warn!(node = %sh.node, "transport subscription ended; resubscribing");
                metrics::counter!("broker_dispatch_transport_reconnects_total").increment(1);
                tokio::time::sleep(sh.jitter(backoff, 1)).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match sh.transport.subscribe().await {
                    Ok(s) => {
                        sub = s;
                        backoff = Duration::from_millis(250);
                        resync(&sh);
                    }
                    Err(e) => tracing::warn!(node = %sh.node, error = %e, "resubscribe failed"),
                }
            }
        }
    }
}
