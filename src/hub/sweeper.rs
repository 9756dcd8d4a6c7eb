//! The sweeper: expires deadlines, exhausts abandoned last attempts, purges old terminal rows,
//! updates the gauges, and signals the owners of brokers with claimable work. On Postgres one
//! sweeper per schema runs at a time (an advisory lock); elsewhere every hub sweeps.

use std::sync::Arc;

use super::{drain, Shared};
use crate::store::{SweepParams, MAX_BATCH};
use crate::transport::Notice;

pub(crate) async fn sweep(sh: Arc<Shared>) {
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
