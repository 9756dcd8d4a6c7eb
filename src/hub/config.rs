//! [`HubConfig`]: every timing knob of the hub, with documented defaults.

use std::time::Duration;

use crate::error::Error;
use crate::store::MAX_BATCH;

/// What `dispatch` does when no node holds the broker and there is no HTTP route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UndeliverablePolicy {
    /// Write the dispatch with a deadline of the wait window: it runs if the broker connects to
    /// any node before then, and expires otherwise. The default.
    #[default]
    Park,
    /// Fail at once with `FailReason::Undeliverable`; nothing is written.
    FailFast,
}

/// The hub's timing and sizing knobs. Every field has a default suited to a production hub;
/// tests shrink them. [`validate`](HubConfig::validate) (run by
/// [`HubBuilder::start`](super::HubBuilder::start)) refuses inconsistent values.
///
/// ```
/// use std::time::Duration;
/// use broker_dispatch::hub::HubConfig;
///
/// let config = HubConfig {
///     lease: Duration::from_secs(10),           // a dead holder's claims return within 10 s
///     wait_window: Duration::from_secs(60),     // callers wait 60 s past the last progress
///     max_in_flight: 32,                        // per broker, on this node
///     ..HubConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// let bad = HubConfig { lease: Duration::from_micros(10), ..HubConfig::default() };
/// assert!(bad.validate().is_err(), "durations under 1 ms are refused");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// How long a claim holds without renewal (default 30 s). Leases are renewed every
    /// `lease / 3` while the executor runs, so a holder that dies loses its claims within one
    /// lease.
    pub lease: Duration,
    /// How recently the owner must have refreshed a broker's affinity for routing to forward
    /// to it (default 30 s). Owners refresh every `freshness / 3`.
    pub freshness: Duration,
    /// The originator's rolling wait: it gives up this long after the last real progress
    /// (default 30 s). Also the deadline of a forwarded or parked dispatch.
    pub wait_window: Duration,
    /// The originator never waits longer than this in total (default 10 min; `None`: no cap).
    pub wait_hard_cap: Option<Duration>,
    /// The deadline of a [`send`](super::Hub::send) (default 24 h): a broker that never comes
    /// back cannot leave a message pending forever.
    pub send_ttl: Duration,
    /// Executions a dispatch may get (default 3; 1 gives at-most-once).
    pub max_attempts: u32,
    /// How often each hub re-drains the brokers it owns and waiters re-read their rows, as a
    /// fallback for lost notices (default 1 s, jittered ±25 %). With a transport that
    /// delivers nothing across processes (SQLite files shared by processes), this is the
    /// pickup latency.
    pub poll_interval: Duration,
    /// How often the sweeper runs (default 5 s, jittered ±25 %).
    pub sweep_interval: Duration,
    /// How long finished rows are kept before the sweeper purges them (default 24 h).
    pub retention: Duration,
    /// The most rows one claim takes (default 32; at most 1000). A claim never takes more rows
    /// than the broker has free slots.
    pub claim_batch: u32,
    /// How many executions of one broker run at once on this node (default 16; at most 1000;
    /// per broker: [`Hub::set_max_in_flight`](super::Hub::set_max_in_flight)). A drain claims
    /// only as many rows as there are free slots and starts each at once, so no claimed row
    /// waits behind another's execution.
    pub max_in_flight: u32,
    /// The longest one execution may take before it is treated as a retryable failure
    /// (default 5 min).
    pub execute_timeout: Duration,
    /// The longest one store or transport call may take (default 10 s).
    pub store_timeout: Duration,
    /// How long `shutdown` lets in-flight work finish before handing the rest back
    /// (default 30 s).
    pub shutdown_timeout: Duration,
    /// What `dispatch` does with an undeliverable command (default [`UndeliverablePolicy::Park`]).
    pub undeliverable: UndeliverablePolicy,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            lease: Duration::from_secs(30),
            freshness: Duration::from_secs(30),
            wait_window: Duration::from_secs(30),
            wait_hard_cap: Some(Duration::from_secs(600)),
            send_ttl: Duration::from_secs(24 * 3600),
            max_attempts: 3,
            poll_interval: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(5),
            retention: Duration::from_secs(24 * 3600),
            claim_batch: 32,
            max_in_flight: 16,
            execute_timeout: Duration::from_secs(300),
            store_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            undeliverable: UndeliverablePolicy::Park,
        }
    }
}

/// The shortest duration any knob accepts: the stores' own minimum, so a knob the hub accepts
/// is never one the store then refuses.
pub(crate) use crate::store::MIN_DURATION;

/// Checks a count of rows or slots: `1..=MAX_BATCH`.
pub(crate) fn check_slots(name: &str, n: u32) -> Result<(), Error> {
    if n == 0 || n > MAX_BATCH {
        return Err(Error::InvalidInput(format!(
            "HubConfig::{name} must be in 1..={MAX_BATCH}, got {n}"
        )));
    }
    Ok(())
}

impl HubConfig {
    /// Checks every knob.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] naming the first duration under 1 ms, zero `max_attempts`, or a
    /// `claim_batch` or `max_in_flight` outside `1..=1000`.
    pub fn validate(&self) -> Result<(), Error> {
        let durations = [
            ("lease", self.lease),
            ("freshness", self.freshness),
            ("wait_window", self.wait_window),
            ("send_ttl", self.send_ttl),
            ("poll_interval", self.poll_interval),
            ("sweep_interval", self.sweep_interval),
            ("retention", self.retention),
            ("execute_timeout", self.execute_timeout),
            ("store_timeout", self.store_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ];
        for (name, d) in durations {
            if d < MIN_DURATION {
                return Err(Error::InvalidInput(format!(
                    "HubConfig::{name} must be at least {MIN_DURATION:?}, got {d:?}"
                )));
            }
        }
        if self.wait_hard_cap.is_some_and(|d| d < MIN_DURATION) {
            return Err(Error::InvalidInput(format!(
                "HubConfig::wait_hard_cap must be at least {MIN_DURATION:?}"
            )));
        }
        if self.max_attempts == 0 {
            return Err(Error::InvalidInput(
                "HubConfig::max_attempts must be at least 1".into(),
            ));
        }
        check_slots("claim_batch", self.claim_batch)?;
        check_slots("max_in_flight", self.max_in_flight)?;
        Ok(())
    }
}
