//! The dispatch record, its identifiers, and the timestamp type.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::state::{DispatchState, FailReason};

/// The longest broker, node, session id or op accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Microseconds since the Unix epoch, UTC.
///
/// The one time type of the crate. Arithmetic saturates instead of overflowing, so a huge lease or
/// window can never wrap a deadline into the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Timestamp = Timestamp(0);
    /// The latest representable instant.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// A timestamp `micros` microseconds after the epoch (negative: before it).
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Converts a wall-clock reading. Instants before the epoch map to negative values; ones beyond
    /// the range saturate.
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Self {
        Self::saturate(i128::from(self.0).saturating_add(Self::micros_of(d)))
    }

    /// `self - d`, saturating at `i64::MIN` microseconds.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Self::saturate(i128::from(self.0).saturating_sub(Self::micros_of(d)))
    }

    // In i128, so a duration beyond i64's range still saturates (clamping it to i64::MAX first
    // would make `MIN + Duration::MAX` land at -1 and `0 - Duration::MAX` one short of MIN).
    fn micros_of(d: Duration) -> i128 {
        i128::try_from(d.as_micros()).unwrap_or(i128::MAX)
    }

    fn saturate(micros: i128) -> Self {
        Timestamp(i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX }))
    }

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        // In i128: spans beyond i64::MAX µs must not clamp, or a very old `last_seen` would look
        // younger than a huge freshness window.
        let micros = i128::from(self.0) - i128::from(earlier.0);
        Duration::from_micros(u64::try_from(micros).unwrap_or(if micros < 0 {
            0
        } else {
            u64::MAX
        }))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µs", self.0)
    }
}

/// The fencing token: how many times a dispatch has been claimed. `0` means never claimed.
pub type Attempt = u32;

/// A bad identifier: empty, too long, or containing a control character.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier is empty.
    #[error("{what} is empty")]
    Empty {
        /// Which kind of identifier.
        what: &'static str,
    },
    /// The identifier is longer than [`MAX_ID_LEN`] bytes.
    #[error("{what} is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong {
        /// Which kind of identifier.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The identifier contains a control character (newlines, NUL, …).
    #[error("{what} contains a control character")]
    ControlChar {
        /// Which kind of identifier.
        what: &'static str,
    },
    /// A dispatch id that is not a UUID.
    #[error("dispatch id is not a uuid: {0}")]
    NotUuid(String),
}

/// Checks a user-supplied name (id or op): non-empty, at most [`MAX_ID_LEN`] bytes, no control
/// characters.
pub(crate) fn check_name(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        Err(IdError::Empty { what })
    } else if s.len() > MAX_ID_LEN {
        Err(IdError::TooLong { what, len: s.len() })
    } else if s.chars().any(char::is_control) {
        Err(IdError::ControlChar { what })
    } else {
        Ok(())
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            ///
            /// # Errors
            ///
            /// [`IdError`] if it is empty, longer than [`MAX_ID_LEN`] bytes, or holds a control
            /// character.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_name($what, &s)?;
                Ok($name(s))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A broker: a remote runtime host with one control connection to one node at a time.
    BrokerId,
    "broker id"
);
string_id!(
    /// A hub replica. Must be unique per running process (e.g. pod name plus a UUID).
    NodeId,
    "node id"
);
string_id!(
    /// One control connection of a broker; a reconnect gets a new session.
    SessionId,
    "session id"
);

/// A dispatch's id: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DispatchId(Uuid);

impl DispatchId {
    /// A fresh time-ordered id from the system's clock and randomness.
    ///
    /// This is the one impure constructor of the core (it exists so callers can mint an id
    /// before writing, to subscribe first); use [`DispatchId::from_uuid`] for deterministic ids.
    pub fn new() -> Self {
        DispatchId(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(u: Uuid) -> Self {
        DispatchId(u)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// Parses the hyphenated text form.
    ///
    /// # Errors
    ///
    /// [`IdError::NotUuid`] if `s` is not a UUID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Uuid::parse_str(s)
            .map(DispatchId)
            .map_err(|_| IdError::NotUuid(s.chars().take(64).collect()))
    }
}

impl Default for DispatchId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DispatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The latest progress an executor reported. A new `seq` is what extends an originator's wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Monotone sequence number, per dispatch.
    pub seq: u64,
    /// Free-form detail for humans and dashboards.
    pub detail: serde_json::Value,
}

/// One dispatch: a command for a broker, and everything known about its execution.
///
/// A `Dispatch` is a snapshot read from a store; changing it locally changes nothing. Stores move
/// it only through [`apply`](super::apply)'s transitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Its id (UUID v7).
    pub id: DispatchId,
    /// The broker that must execute it.
    pub broker: BrokerId,
    /// What to do (`"start"`, `"message"`, …): the executor's switch.
    pub op: String,
    /// The command's arguments, as given. Stored as is: never put secrets here unless the store
    /// is configured with an [`ArgsCodec`](crate::store::ArgsCodec) that protects them.
    pub args: serde_json::Value,
    /// Where it is in its life.
    pub state: DispatchState,
    /// The fencing token: incremented by every claim.
    pub attempt: Attempt,
    /// The most executions it may get (at least 1).
    pub max_attempts: u32,
    /// The node holding (or that last held) the claim.
    pub claimed_by: Option<NodeId>,
    /// Until when the holder's claim is guaranteed; after it, another node may re-claim.
    pub lease_until: Option<Timestamp>,
    /// Not claimable before this instant (set by retries).
    pub available_at: Timestamp,
    /// Never claimed at or after this instant; the sweeper then fails it as `Expired`.
    pub deadline: Option<Timestamp>,
    /// The executor's result, once `Done`.
    ///
    /// In JSON, no result is an absent field and a `null` result is `null`: an executor may
    /// legitimately return `null`, and reading the row back must not turn that into "no result".
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_json"
    )]
    pub result: Option<serde_json::Value>,
    /// Why it failed, once `Failed`; while `InProgress`, `Cancelled` records a cancel request
    /// ([`cancel_requested`](Self::cancel_requested)).
    pub failure: Option<FailReason>,
    /// The latest progress the holder reported.
    pub progress: Option<Progress>,
    /// The caller's deduplication key: a second insert with the same key returns this row.
    pub idempotency_key: Option<String>,
    /// The ordering key: dispatches of one broker with the same key run one at a time, in
    /// insertion order ([`claim_order`](super::claim_order)). `None`: no order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How many claims were handed back unexecuted ([`Event::Release`](super::Event::Release)).
    /// They used up a fencing token but not an execution: see [`executions`](Self::executions).
    #[serde(default)]
    pub released: u32,
    /// When it was written.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl Dispatch {
    /// How many executions have begun: every claim, less the claims handed back unexecuted.
    /// `max_attempts` bounds this, not the fencing token `attempt`.
    pub fn executions(&self) -> u32 {
        self.attempt.saturating_sub(self.released)
    }

    /// Whether another execution may begin (`executions < max_attempts`).
    pub fn has_attempts_left(&self) -> bool {
        self.executions() < self.max_attempts
    }

    /// Whether someone asked to cancel this running dispatch
    /// ([`Event::RequestCancel`](super::Event::RequestCancel)): in progress with `failure` =
    /// `Cancelled`, the failure it ends with unless its holder completes it. Such a row is never
    /// claimed again.
    pub fn cancel_requested(&self) -> bool {
        self.state == DispatchState::InProgress && self.failure == Some(FailReason::Cancelled)
    }

    /// Whether this row, on its own, may be claimed at `now` ([`apply`](super::apply)'s claim
    /// guard, shared by every store's claim query). A keyed row must also be first in line for
    /// its key: see [`claim_order`](super::claim_order).
    pub fn is_claimable(&self, now: Timestamp) -> bool {
        let before_deadline = self.deadline.is_none_or(|d| now < d);
        // The fencing token must not wrap: at `Attempt::MAX` a claim could not bump it.
        let token_left = self.attempt < Attempt::MAX;
        match self.state {
            DispatchState::Pending => {
                self.available_at <= now
                    && before_deadline
                    && token_left
                    && self.has_attempts_left()
            }
            DispatchState::InProgress => {
                self.lease_until.is_some_and(|l| l <= now)
                    && self.has_attempts_left()
                    && before_deadline
                    && token_left
                    && !self.cancel_requested()
            }
            DispatchState::Done | DispatchState::Failed => false,
        }
    }

    /// Whether this row can never run again, though not yet terminal: past its deadline and not
    /// held (pending, or its lease ran out), or its lease ran out with no executions left or a
    /// cancel requested. The sweeper will fail it; meanwhile it does not hold up later rows of
    /// its key.
    pub fn is_dead(&self, now: Timestamp) -> bool {
        let unheld = self.state == DispatchState::Pending || self.lease_expired(now);
        (self.past_deadline(now) && unheld)
            || (self.lease_expired(now) && (!self.has_attempts_left() || self.cancel_requested()))
    }

    /// Whether a holder's lease is live at `now` (in progress and `lease_until > now`).
    pub fn is_held(&self, now: Timestamp) -> bool {
        self.state == DispatchState::InProgress && self.lease_until.is_some_and(|l| l > now)
    }

    /// Whether the lease of an in-progress dispatch has run out at `now`.
    pub fn lease_expired(&self, now: Timestamp) -> bool {
        self.state == DispatchState::InProgress && self.lease_until.is_some_and(|l| l <= now)
    }

    /// Whether the deadline has passed at `now`.
    pub fn past_deadline(&self, now: Timestamp) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

/// Reads a field that is present as `Some`, even when it is `null` (absent fields take the
/// `default`, `None`).
fn present_json<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Checks an op name: non-empty, at most [`MAX_ID_LEN`] bytes, no control characters.
///
/// # Errors
///
/// [`IdError`] naming the op.
pub fn check_op(op: &str) -> Result<(), IdError> {
    check_name("op", op)
}

/// Checks an idempotency key, by the rule of every other name: non-empty, at most
/// [`MAX_ID_LEN`] bytes, no control characters (NUL included, which Postgres cannot store).
///
/// # Errors
///
/// [`IdError`] naming the idempotency key.
pub fn check_idempotency_key(key: &str) -> Result<(), IdError> {
    check_name("idempotency key", key)
}

/// Checks an ordering key: non-empty, at most [`MAX_ID_LEN`] bytes, no control characters.
///
/// # Errors
///
/// [`IdError`] naming the ordering key.
pub fn check_key(key: &str) -> Result<(), IdError> {
    check_name("ordering key", key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(attempt: Attempt) -> Dispatch {
        let t = Timestamp::from_micros(10);
        Dispatch {
            id: DispatchId::from_uuid(Uuid::nil()),
            broker: BrokerId::new("b").unwrap(),
            op: "op".into(),
            args: serde_json::Value::Null,
            state: DispatchState::Pending,
            attempt,
            max_attempts: 1,
            claimed_by: None,
            lease_until: None,
            available_at: t,
            deadline: None,
            result: None,
            failure: None,
            progress: None,
            idempotency_key: None,
            key: None,
            released: 0,
            created_at: t,
            updated_at: t,
        }
    }

    #[test]
    fn claim_guard_refuses_a_fencing_token_that_would_wrap() {
        let now = Timestamp::from_micros(20);
        let mut d = pending(Attempt::MAX - 1);
        d.released = Attempt::MAX - 1;
        assert!(d.is_claimable(now));
        d.attempt = Attempt::MAX;
        d.released = Attempt::MAX;
        assert!(!d.is_claimable(now));
    }

    #[test]
    fn hand_backs_do_not_count_as_executions() {
        let now = Timestamp::from_micros(20);
        let mut d = pending(3);
        assert!(!d.is_claimable(now), "three executions of one allowed");
        d.released = 3;
        assert_eq!(d.executions(), 0);
        assert!(d.is_claimable(now));
    }
}
