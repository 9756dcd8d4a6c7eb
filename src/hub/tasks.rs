//! The hub's background tasks: the notice listener, the sweeper, the catch-up drain of owned
//! brokers, and the affinity refresher.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{drain, Shared};
use crate::fsm::{BrokerId, SessionId};
use crate::store::{SweepParams, TouchParams, MAX_BATCH};
use crate::transport::{Notice, Subscription};

pub(crate) fn spawn_background(sh: &Arc<Shared>, subscription: Subscription) {
    let handles = [
        tokio::spawn(listen(Arc::clone(sh), subscription)).abort_handle(),
        tokio::spawn(sweep(Arc::clone(sh))).abort_handle(),
        tokio::spawn(catch_up(Arc::clone(sh))).abort_handle(),
        tokio::spawn(refresh_affinity(Arc::clone(sh))).abort_handle(),
    ];
    sh.tasks.lock().extend(handles);
}

fn local_brokers(sh: &Shared) -> Vec<(BrokerId, SessionId)> {
    sh.conns
        .lock()
        .iter()
        .map(|(b, c)| (b.clone(), c.session.clone()))
        .collect()
}

/// Drains every owned broker and wakes every waiter: the answer to "notices may be lost".
fn resync(sh: &Arc<Shared>) {
    for (b, _) in local_brokers(sh) {
        drain::schedule(sh, &b);
    }
    sh.notify_all_waiters();
}

async fn listen(sh: Arc<Shared>, mut sub: Subscription) {
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

async fn sweep(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(sh.jitter(sh.config.sweep_interval, 2)).await;
        let res = sh
            .bounded(sh.store.sweep(SweepParams {
                retention: sh.config.retention,
                limit: MAX_BATCH / 2,
                now: sh.store_now(),
            }))
            .await;
        let report = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(node = %sh.node, error = %e, "sweep failed");
                continue;
            }
        };
        if !report.swept {
            continue;
        }
        if !report.expired.is_empty() {
            metrics::counter!("broker_dispatch_failed_total", "reason" => "expired")
                .increment(report.expired.len() as u64);
        }
        if !report.exhausted.is_empty() {
            metrics::counter!("broker_dispatch_failed_total", "reason" => "attempts_exhausted")
                .increment(report.exhausted.len() as u64);
        }
        metrics::counter!("broker_dispatch_purged_total").increment(report.purged);
        metrics::gauge!("broker_dispatch_pending").set(report.pending as f64);
        let oldest_age = report
            .oldest_pending
            .map_or(0.0, |t| sh.now().duration_since(t).as_secs_f64());
        metrics::gauge!("broker_dispatch_oldest_pending_seconds").set(oldest_age);
        for id in report.expired.iter().chain(&report.exhausted) {
            sh.notify_waiter(id);
            sh.publish(Notice::Event { id: *id }).await;
        }
        for broker in report.claimable {
            if sh.conns.lock().contains_key(&broker) {
                drain::schedule(&sh, &broker);
            } else {
                sh.publish(Notice::Signal { broker }).await;
            }
        }
    }
}

/// Re-drains owned brokers on a slow jittered timer: work whose signal was lost, retries that
/// became available, and leases that ran out are picked up without any notice.
async fn catch_up(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(sh.jitter(sh.config.poll_interval, 3)).await;
        for (b, _) in local_brokers(&sh) {
            drain::schedule(&sh, &b);
        }
    }
}

/// The owner's liveness refresh of each broker's affinity, every `freshness / 3`. A broker
/// whose affinity a newer session took elsewhere is forgotten here.
async fn refresh_affinity(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(sh.jitter(sh.config.freshness / 3, 4)).await;
        for (broker, session) in local_brokers(&sh) {
            let res = sh
                .bounded(sh.store.touch(TouchParams {
                    broker: broker.clone(),
                    node: sh.node.clone(),
                    session: session.clone(),
                    now: sh.store_now(),
                }))
                .await;
            match res {
                Ok(true) => {}
                Ok(false) => {
                    let mut conns = sh.conns.lock();
                    if conns.get(&broker).is_some_and(|c| c.session == session) {
                        conns.remove(&broker);
                        tracing::info!(node = %sh.node, %broker, "a newer session holds the broker elsewhere; forgetting it here");
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %sh.node, %broker, error = %e, "affinity refresh failed")
                }
            }
        }
    }
}
