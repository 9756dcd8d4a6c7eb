//! Error types: one per seam. Variants are what a caller acts on; driver errors are boxed sources.

use std::time::Duration;

use crate::fsm::{
    Attempt, DispatchId, DispatchState, EventKind, FailReason, IdError, TransitionError,
};

/// A boxed driver error, kept as a `source` so driver types never appear in signatures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a [`Store`](crate::store::Store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No dispatch has this id.
    #[error("dispatch {0} not found")]
    NotFound(DispatchId),
    /// The writer's attempt is stale: another node claimed the dispatch since.
    #[error("fenced: attempt {presented} is stale, the dispatch is at attempt {current}")]
    Fenced {
        /// The attempt the writer presented.
        presented: Attempt,
        /// The dispatch's current attempt.
        current: Attempt,
    },
    /// The transition is not legal in the dispatch's state (see [`crate::fsm::apply`]).
    #[error("illegal transition: {event} in state {from}")]
    Illegal {
        /// The dispatch's state.
        from: DispatchState,
        /// The refused event.
        event: EventKind,
    },
    /// An insert reused an id or idempotency key with a different payload.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request is malformed (empty ids, a zero lease, a limit out of range, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The database was written by a newer version of this crate.
    #[error("schema version {found} is newer than the {supported} this build understands")]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The backend is temporarily unreachable or busy (connection lost, lock timeout); retry later.
    #[error("store unavailable: {0}")]
    Unavailable(BoxError),
    /// Any other backend failure (corrupt file, read-only database, full disk, bad SQL).
    #[error("store backend error: {0}")]
    Backend(BoxError),
}

impl StoreError {
    /// Whether the same call may succeed later without any change by the caller.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Whether this is a fencing rejection: the caller no longer holds the dispatch.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        StoreError::InvalidInput(msg.into())
    }
}

impl From<TransitionError> for StoreError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::Fenced { presented, current } => {
                StoreError::Fenced { presented, current }
            }
            TransitionError::Illegal { from, event } => StoreError::Illegal { from, event },
        }
    }
}

impl From<IdError> for StoreError {
    fn from(e: IdError) -> Self {
        StoreError::InvalidInput(e.to_string())
    }
}

/// An error from a [`Transport`](crate::transport::Transport).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The transport was shut down.
    #[error("transport closed")]
    Closed,
    /// The medium is temporarily unreachable; retry later.
    #[error("transport unavailable: {0}")]
    Unavailable(BoxError),
    /// A payload could not be encoded or decoded.
    #[error("bad notice payload: {0}")]
    Payload(String),
    /// Any other failure of the medium.
    #[error("transport backend error: {0}")]
    Backend(BoxError),
}

impl TransportError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransportError::Unavailable(_))
    }
}

/// What an [`Executor`](crate::hub::Executor) reports when it could not do the work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// Try again after `after` (if attempts remain; otherwise the dispatch fails).
    #[error("retryable after {after:?}: {message}")]
    Retryable {
        /// How long to wait before the next attempt.
        after: Duration,
        /// What went wrong.
        message: String,
    },
    /// Give up: the dispatch fails with this message.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl ExecError {
    /// A retryable error.
    pub fn retry_after(after: Duration, message: impl Into<String>) -> Self {
        ExecError::Retryable {
            after,
            message: message.into(),
        }
    }

    /// A fatal error.
    pub fn fatal(message: impl Into<String>) -> Self {
        ExecError::Fatal(message.into())
    }
}

/// An error from the [`Hub`](crate::hub::Hub).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed: nothing was written.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The dispatch ended in `Failed`.
    #[error("dispatch {id} failed: {reason}")]
    Failed {
        /// The dispatch.
        id: DispatchId,
        /// Why.
        reason: FailReason,
    },
    /// The originator's rolling wait ran out. If `last_state` is `Failed(Cancelled)` the dispatch
    /// will never run; if `InProgress`, it may still complete (look it up by id).
    #[error("dispatch {id} timed out waiting; last state {last_state}")]
    TimedOut {
        /// The dispatch.
        id: DispatchId,
        /// Its state when the wait gave up.
        last_state: DispatchState,
    },
    /// A connect claim lost to a newer session of the same broker.
    #[error("connection superseded by a newer session")]
    Superseded,
    /// The hub is shutting down and accepts no more work.
    #[error("hub is shutting down")]
    ShuttingDown,
    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A transport call failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        Error::InvalidInput(e.to_string())
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Each error says its cause once: in its message, not again as a `source()` that an
    /// error reporter walking the chain would print a second time. (The cause stays reachable
    /// as the variant's field, e.g. to downcast it.)
    #[test]
    fn causes_are_told_once() {
        let cause = || -> BoxError { "connection refused".into() };
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(StoreError::Unavailable(cause())),
            Box::new(StoreError::Backend(cause())),
            Box::new(TransportError::Unavailable(cause())),
            Box::new(TransportError::Backend(cause())),
            Box::new(Error::Store(StoreError::Backend(cause()))),
            Box::new(Error::Transport(TransportError::Unavailable(cause()))),
        ];
        for e in errors {
            let mut told = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                told.push_str(&format!(": {s}"));
                source = s.source();
            }
            assert_eq!(told.matches("connection refused").count(), 1, "{told}");
        }
    }
}
