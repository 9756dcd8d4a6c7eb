//! The notice listener: signals schedule drains of brokers held here, events wake waiters, and
//! a resync (notices may have been lost) re-drains every owned broker and wakes every waiter.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::background::local_brokers;
use super::{conn, drain, instant_after, Shared};
use crate::transport::{Notice, Subscription};

/// Drains every owned broker and wakes every waiter: the answer to "notices may be lost".
pub(crate) fn resync(sh: &Arc<Shared>) {
    for (b, _) in local_brokers(sh) {
        drain::schedule(sh, &b);
    }
    sh.notify_all_waiters();
}

/// Listens until the hub shuts down. Resyncs are coalesced: at most one per `poll_interval`
/// (a later one is deferred to the end of that interval), so a burst of them (a flapping
/// listener, forged empty notifications) costs one re-drain per broker per interval, not one per
/// notice.
pub(crate) async fn listen(sh: Arc<Shared>, mut sub: Subscription) {
    let mut backoff = Duration::from_millis(250);
    let mut last_resync: Option<Instant> = None;
    let mut resync_due: Option<Instant> = None;
    loop {
        let next = match resync_due {
            Some(due) => {
                tokio::select! {
                    biased;
                    n = sub.next() => n,
                    () = tokio::time::sleep_until(due) => {
                        resync_due = None;
                        last_resync = Some(Instant::now());
                        resync(&sh);
                        continue;
                    }
                }
            }
            None => sub.next().await,
        };
        match next {
            Some(Notice::Signal { broker }) => {
                if sh.conns.lock().contains_key(&broker) {
                    drain::schedule(&sh, &broker);
                    // It may also say a newer connection of the broker was accepted elsewhere.
                    conn::check_ownership(&sh, &broker);
                }
            }
            Some(Notice::Event { id }) => {
                sh.notify_waiter(&id);
                if sh.running.contains(&id) {
                    conn::check_cancel(&sh, id);
                }
            }
            Some(Notice::Resync) => {
                metrics::counter!("broker_dispatch_resyncs_total").increment(1);
                let now = Instant::now();
                match last_resync {
                    Some(last) if now < instant_after(last, sh.config.poll_interval) => {
                        resync_due.get_or_insert(instant_after(last, sh.config.poll_interval));
                    }
                    _ => {
                        last_resync = Some(now);
                        resync(&sh);
                    }
                }
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
                        last_resync = Some(Instant::now());
                        resync(&sh);
                    }
                    Err(e) => tracing::warn!(node = %sh.node, error = %e, "resubscribe failed"),
                }
            }
        }
    }
}
