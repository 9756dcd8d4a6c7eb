//! Starting the hub's background tasks, and the two small ones that live here: the catch-up
//! drain of owned brokers (the polling fallback for lost notices) and the owner's affinity
//! refresh. The listener and the sweeper have files of their own.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::task::AbortHandle;

use super::{drain, listener, sweeper, Shared};
use crate::fsm::{BrokerId, SessionId};
use crate::store::TouchParams;
use crate::transport::Subscription;

/// Starts the background tasks, each supervised: one that panics (a user transport's stream,
/// say) is logged and started again after a pause, so it never stops the others or the hub.
pub(crate) fn spawn_background(sh: &Arc<Shared>, subscription: Subscription) {
    let first = Mutex::new(Some(subscription));
    let handles = [
        supervise(sh, "listener", move |sh| {
            let sub = first.lock().take();
            async move {
                let sub = match sub {
                    Some(sub) => sub,
                    // A restart: the old subscription went down with the panic.
                    None => match sh.transport.subscribe().await {
                        Ok(sub) => {
                            listener::resync(&sh);
                            sub
                        }
                        Err(e) => {
                            tracing::warn!(node = %sh.node, error = %e, "resubscribe failed");
                            return;
                        }
                    },
                };
                listener::listen(sh, sub).await;
            }
        }),
        supervise(sh, "sweeper", sweeper::sweep),
        supervise(sh, "catch-up", catch_up),
        supervise(sh, "affinity refresh", refresh_affinity),
    ];
    sh.tasks.lock().extend(handles);
}

/// Runs `task` until it returns; if it panics, logs it and runs it again after a second.
fn supervise<F, Fut>(sh: &Arc<Shared>, name: &'static str, task: F) -> AbortHandle
where
    F: Fn(Arc<Shared>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sh = Arc::clone(sh);
    tokio::spawn(async move {
        loop {
            match AssertUnwindSafe(task(Arc::clone(&sh))).catch_unwind().await {
                Ok(()) => return,
                Err(panic) => {
                    metrics::counter!("broker_dispatch_task_panics_total", "task" => name)
                        .increment(1);
                    tracing::error!(node = %sh.node, task = name, panic = %super::panic_message(&*panic), "background task panicked; restarting it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if sh.is_shutting_down() {
                        return;
                    }
                }
            }
        }
    })
    .abort_handle()
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
                Ok(false) => super::conn::lost_by_refresh(&sh, &broker, &session).await,
                Err(e) => {
                    tracing::debug!(node = %sh.node, %broker, error = %e, "affinity refresh failed")
                }
            }
        }
    }
}
