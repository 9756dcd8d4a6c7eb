//! [`RollingDeadline`]: the originator's give-up rule.
//!
//! The wait ends `window` after the last real progress (a state change or a new progress sequence
//! number, never a repeated heartbeat), and never later than the optional hard cap. Like
//! quinn-proto's timers, it reads no clock: the shell calls [`RollingDeadline::touch`] with `now`,
//! sleeps until [`RollingDeadline::poll_timeout`], and asks [`RollingDeadline::is_expired`].

use std::time::Duration;

use super::dispatch::Timestamp;

/// A deadline that moves forward on progress, bounded by an optional hard cap.
///
/// ```
/// use std::time::Duration;
/// use broker_dispatch::fsm::{RollingDeadline, Timestamp};
///
/// let t = |s: i64| Timestamp::from_micros(s * 1_000_000);
/// let mut wait = RollingDeadline::new(t(0), Duration::from_secs(30), Some(Duration::from_secs(60)));
/// assert_eq!(wait.poll_timeout(), t(30));
/// wait.touch(t(20)); // real progress at 20 s: 30 s more
/// assert!(!wait.is_expired(t(45)));
/// wait.touch(t(50)); // ... but never past the hard cap
/// assert_eq!(wait.poll_timeout(), t(60));
/// assert!(wait.is_expired(t(60)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingDeadline {
    window: Duration,
    hard_cap: Option<Timestamp>,
    deadline: Timestamp,
}

impl RollingDeadline {
    /// Starts a wait at `now`. `hard_cap`, if any, is measured from `now` too.
    pub fn new(now: Timestamp, window: Duration, hard_cap: Option<Duration>) -> Self {
        let hard_cap = hard_cap.map(|c| now.saturating_add(c));
        let mut d = RollingDeadline {
            window,
            hard_cap,
            deadline: now,
        };
        d.deadline = d.capped(now.saturating_add(window));
        d
    }

    fn capped(&self, t: Timestamp) -> Timestamp {
        match self.hard_cap {
            Some(cap) => t.min(cap),
            None => t,
        }
    }

    /// Records progress at `now`: the deadline becomes `now + window` (capped). It never moves
    /// backwards, so a touch with a stale `now` cannot shorten the wait.
    pub fn touch(&mut self, now: Timestamp) {
        let next = self.capped(now.saturating_add(self.window));
        if next > self.deadline {
            self.deadline = next;
        }
    }

    /// When the wait ends if nothing else happens.
    pub fn poll_timeout(&self) -> Timestamp {
        self.deadline
    }

    /// Whether the wait is over at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.deadline
    }

    /// The hard cap, if one was set.
    pub fn hard_cap(&self) -> Option<Timestamp> {
        self.hard_cap
    }
}
