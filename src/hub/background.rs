//! Starting the hub's background tasks, and the two small ones that live here: the catch-up
//! drain of owned brokers (the polling fallback for lost notices) and the owner's affinity
//! refresh. The listener and the sweeper have files of their own.

use std::sync::Arc;

use super::{drain, listener, sweeper, Shared};
use crate::fsm::{BrokerId, SessionId};
use crate::store::TouchParams;
use crate::transport::Subscription;

pub(crate) fn spawn_background(sh: &Arc<Shared>, subscription: Subscription) {
    let handles = [
        tokio::spawn(listener::listen(Arc::clone(sh), subscription)).abort_handle(),
        tokio::spawn(sweeper::sweep(Arc::clone(sh))).abort_handle(),
        tokio::spawn(catch_up(Arc::clone(sh))).abort_handle(),
        tokio::spawn(refresh_affinity(Arc::clone(sh))).abort_handle(),
    ];
    sh.tasks.lock().extend(handles);
}

pub(crate) fn local_brokers(sh: &Shared) -> Vec<(BrokerId, SessionId)> {
    sh.conns
        .lock()
        .iter()
        .map(|(b, c)| (b.clone(), c.session.clone()))
        .collect()
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
                    let forgotten = {
                        let mut conns = sh.conns.lock();
                        let ours = conns.get(&broker).is_some_and(|c| c.session == session);
                        ours && conns.remove(&broker).is_some()
                    };
                    if forgotten {
                        drain::poke(&sh, &broker);
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
