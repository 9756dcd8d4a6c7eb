//! Dispatch states and failure reasons.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a dispatch is in its life.
///
/// ```text
///            claim                 complete
/// pending ───────────▶ in_progress ─────────▶ done
///    ▲  │               │   │  ▲
///    │  │ cancel/expire │   │  │ re-claim after the lease
///    │  ▼               │   │  │ (attempt + 1; old holder fenced)
///    │ failed ◀─────────┘   └──┘
///    │  ▲  fail / expire / exhaust
///    └──┼── retry / release (back to pending, same attempt)
/// ```
///
/// `Done` and `Failed` are terminal: nothing leaves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchState {
    /// Written, waiting for the broker's owner to claim it.
    Pending,
    /// Claimed by a node holding a lease; `attempt` identifies the holder.
    InProgress,
    /// Executed; the result is stored. Terminal.
    Done,
    /// Gave up; the [`FailReason`] says why. Terminal.
    Failed,
}

impl DispatchState {
    /// Every state, in life-cycle order.
    pub const ALL: [DispatchState; 4] = [
        DispatchState::Pending,
        DispatchState::InProgress,
        DispatchState::Done,
        DispatchState::Failed,
    ];

    /// Whether nothing can leave this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, DispatchState::Done | DispatchState::Failed)
    }

    /// The stable lowercase name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchState::Pending => "pending",
            DispatchState::InProgress => "in_progress",
            DispatchState::Done => "done",
            DispatchState::Failed => "failed",
        }
    }
}

impl fmt::Display for DispatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no state or failure reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}: {value:?}")]
pub struct ParseStateError {
    what: &'static str,
    value: String,
}

impl FromStr for DispatchState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DispatchState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseStateError {
                what: "dispatch state",
                value: s.to_owned(),
            })
    }
}

/// Why a dispatch ended in [`DispatchState::Failed`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum FailReason {
    /// The executor reported a fatal error (the message is the executor's).
    Error(String),
    /// The holder's lease ran out with no attempts left.
    AttemptsExhausted,
    /// The deadline passed before the work could run (or be re-run).
    Expired,
    /// The originator gave up, or a caller cancelled it, while it was pending.
    Cancelled,
    /// The hub refused it at the door: no route to the broker and the policy says fail fast.
    Undeliverable,
    /// The store could not read the row back when it was claimed (an `ArgsCodec` that cannot
    /// decode its args, a value written by another program): the claim quarantined it rather
    /// than hold up the broker's other rows. The message says what could not be read (never
    /// the row's args).
    Corrupt(String),
}

impl FailReason {
    /// The stable lowercase name of the reason, without its message.
    pub fn kind(&self) -> &'static str {
        match self {
            FailReason::Error(_) => "error",
            FailReason::AttemptsExhausted => "attempts_exhausted",
            FailReason::Expired => "expired",
            FailReason::Cancelled => "cancelled",
            FailReason::Undeliverable => "undeliverable",
            FailReason::Corrupt(_) => "corrupt",
        }
    }

    /// Rebuilds a reason from its [`kind`](Self::kind) and, for `error`, its message.
    ///
    /// # Errors
    ///
    /// [`ParseStateError`] for an unknown kind.
    pub fn from_parts(kind: &str, message: Option<String>) -> Result<Self, ParseStateError> {
        Ok(match kind {
            "error" => FailReason::Error(message.unwrap_or_default()),
            "attempts_exhausted" => FailReason::AttemptsExhausted,
            "expired" => FailReason::Expired,
            "cancelled" => FailReason::Cancelled,
            "undeliverable" => FailReason::Undeliverable,
            "corrupt" => FailReason::Corrupt(message.unwrap_or_default()),
            other => {
                return Err(ParseStateError {
                    what: "fail reason",
                    value: other.to_owned(),
                })
            }
        })
    }

    /// The message of an [`Error`](FailReason::Error) or a [`Corrupt`](FailReason::Corrupt)
    /// row, if any.
    pub fn message(&self) -> Option<&str> {
        match self {
            FailReason::Error(m) | FailReason::Corrupt(m) => Some(m),
            _ => None,
        }
    }
}

/// Parses the [`Display`](fmt::Display) form: `error: <message>`, or a bare kind for the others.
impl FromStr for FailReason {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(message) = s.strip_prefix("error: ") {
            return Ok(FailReason::Error(message.to_owned()));
        }
        if let Some(message) = s.strip_prefix("corrupt: ") {
            return Ok(FailReason::Corrupt(message.to_owned()));
        }
        match s {
            // A bare `error` or `corrupt` is not a Display form; refuse it rather than invent an
            // empty message.
            "error" | "corrupt" => Err(ParseStateError {
                what: "fail reason",
                value: s.to_owned(),
            }),
            kind => FailReason::from_parts(kind, None),
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Error(m) => write!(f, "error: {m}"),
            FailReason::Corrupt(m) => write!(f, "corrupt: {m}"),
            other => f.write_str(other.kind()),
        }
    }
}
