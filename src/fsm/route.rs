//! The route decision: where a command for a broker should go.
//!
//! | # | condition (first match wins) | route |
//! |---|---|---|
//! | 1 | the broker is connected to this node | [`Route::Local`] |
//! | 2 | the affinity owner is another node and `now - last_seen < freshness` | [`Route::Forward`] |
//! | 3 | the broker has an HTTP endpoint | [`Route::Http`] |
//! | 4 | otherwise (no affinity, stale or released affinity, or affinity naming this node without a connection) | [`Route::Undeliverable`] |

use std::time::Duration;

use super::affinity::Affinity;
use super::dispatch::{NodeId, Timestamp};

/// Everything [`route`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// The deciding node.
    pub this_node: &'a NodeId,
    /// Whether the broker's control connection is on this node right now.
    pub connected_here: bool,
    /// The broker's affinity row, if it has one.
    pub affinity: Option<&'a Affinity>,
    /// The current time.
    pub now: Timestamp,
    /// How recently the owner must have refreshed the affinity for it to count.
    pub freshness: Duration,
    /// Whether the broker can be reached over HTTP instead.
    pub has_http_endpoint: bool,
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Execute here, directly: no row, no signal, no wait.
    Local,
    /// Write a dispatch and signal the owner.
    Forward {
        /// The node holding the broker's connection.
        owner: NodeId,
    },
    /// Call the broker over HTTP.
    Http,
    /// No known way to reach the broker now.
    Undeliverable,
}

/// Decides the route (the module's table, in order).
///
/// ```
/// use std::time::Duration;
/// use broker_dispatch::fsm::{route, Affinity, BrokerId, NodeId, Route, RouteInput, SessionId, Timestamp};
///
/// let me = NodeId::new("a").unwrap();
/// let owner = Affinity {
///     broker: BrokerId::new("b1").unwrap(),
///     node: Some(NodeId::new("b").unwrap()),
///     session: SessionId::new("ws-1").unwrap(),
///     connected_at: Timestamp::from_micros(0),
///     last_seen: Timestamp::from_micros(0),
/// };
/// let input = |now_s: i64| RouteInput {
///     this_node: &me,
///     connected_here: false,
///     affinity: Some(&owner),
///     now: Timestamp::from_micros(now_s * 1_000_000),
///     freshness: Duration::from_secs(30),
///     has_http_endpoint: false,
/// };
/// // Node b refreshed its claim 10 s ago: forward to it.
/// assert_eq!(route(&input(10)), Route::Forward { owner: NodeId::new("b").unwrap() });
/// // 60 s without a refresh: b may be dead, and nothing else reaches the broker.
/// assert_eq!(route(&input(60)), Route::Undeliverable);
/// ```
pub fn route(input: &RouteInput<'_>) -> Route {
    if input.connected_here {
        return Route::Local;
    }
    match input.affinity {
        Some(a)
            if a.node.as_ref() != Some(input.this_node)
                && a.is_fresh(input.now, input.freshness) =>
        {
            match &a.node {
                Some(owner) => Route::Forward {
                    owner: owner.clone(),
                },
                None => unreachable_route(input),
            }
        }
        _ => unreachable_route(input),
    }
}

fn unreachable_route(input: &RouteInput<'_>) -> Route {
    if input.has_http_endpoint {
        Route::Http
    } else {
        Route::Undeliverable
    }
}
