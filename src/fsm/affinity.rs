//! Affinity: which node holds a broker's control connection, and the rules that keep it right.
//!
//! - **Newest connection wins**, ordered by `(connected_at, session)`, not by write order: a delayed
//!   claim from an older session is [`ConnectDecision::Superseded`].
//! - **Release is compare-and-clear**: only the current session releases; the release keeps the
//!   `connected_at` high-water mark, so an older claim arriving after it is still refused.
//! - **Freshness**: the owner node refreshes `last_seen`; an affinity not refreshed within the
//!   freshness window is ignored by routing, so a dead node's brokers stop attracting forwards.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dispatch::{BrokerId, NodeId, SessionId, Timestamp};

/// The affinity row of one broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    /// The broker.
    pub broker: BrokerId,
    /// The owner node, or `None` once the newest session released it.
    pub node: Option<NodeId>,
    /// The newest session that claimed it (kept after a release, as a high-water mark).
    pub session: SessionId,
    /// When that session connected (the ordering key).
    pub connected_at: Timestamp,
    /// When the owner node last confirmed it still holds the connection.
    pub last_seen: Timestamp,
}

/// How far ahead of the store's clock a connect's `connected_at` may lie: enough for a caller
/// that stamped the connection a moment before the store read its clock (or whose clock runs
/// slightly ahead), far too little to pin a broker (a newer connection always wins, so a
/// `connected_at` far in the future would refuse every later one).
pub const MAX_CONNECT_LEAD: Duration = Duration::from_secs(1);

/// The verdict on a connect claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectDecision {
    /// The claim wins; write this row.
    Claim(Affinity),
    /// A newer (or equally new, higher-ordered) session already holds or held the broker.
    Superseded,
}

impl Affinity {
    /// Whether the owner refreshed the row within `freshness` of `now`, and still holds it.
    pub fn is_fresh(&self, now: Timestamp, freshness: Duration) -> bool {
        self.node.is_some() && now.duration_since(self.last_seen) < freshness
    }

    /// Decides a connect claim against the current row.
    ///
    /// The claim wins when there is no row, or when `(connected_at, session)` is not older than
    /// the row's. The same session claiming again is idempotent (it wins and refreshes).
    pub fn decide_connect(
        current: Option<&Affinity>,
        broker: &BrokerId,
        node: &NodeId,
        session: &SessionId,
        connected_at: Timestamp,
        now: Timestamp,
    ) -> ConnectDecision {
        if let Some(cur) = current {
            if (connected_at, session) < (cur.connected_at, &cur.session) {
                return ConnectDecision::Superseded;
            }
            if cur.session == *session && cur.connected_at == connected_at && cur.node.is_none() {
                // This very session already released it: a late duplicate claim must not revive it.
                return ConnectDecision::Superseded;
            }
        }
        ConnectDecision::Claim(Affinity {
            broker: broker.clone(),
            node: Some(node.clone()),
            session: session.clone(),
            connected_at,
            last_seen: now,
        })
    }

    /// Whether a connect stamped `connected_at` is in the future at the store's `now`, beyond
    /// [`MAX_CONNECT_LEAD`]: such a claim is refused (invalid input), never decided.
    pub fn connected_in_future(connected_at: Timestamp, now: Timestamp) -> bool {
        connected_at > now.saturating_add(MAX_CONNECT_LEAD)
    }

    /// Whether `node`/`session` is the current holder (the guard of release and touch).
    pub fn is_held_by(&self, node: &NodeId, session: &SessionId) -> bool {
        self.node.as_ref() == Some(node) && self.session == *session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connected_at_beyond_the_lead_is_in_the_future() {
        let now = Timestamp::from_micros(1_700_000_000_000_000);
        let lead = now.saturating_add(MAX_CONNECT_LEAD);
        assert!(!Affinity::connected_in_future(now, now));
        assert!(!Affinity::connected_in_future(lead, now));
        assert!(Affinity::connected_in_future(
            Timestamp::from_micros(lead.as_micros() + 1),
            now
        ));
        assert!(Affinity::connected_in_future(Timestamp::MAX, now));
        assert!(!Affinity::connected_in_future(
            Timestamp::MAX,
            Timestamp::MAX
        ));
        assert!(!Affinity::connected_in_future(
            Timestamp::from_micros(i64::MIN),
            now
        ));
    }
}
