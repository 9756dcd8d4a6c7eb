//! The pure core: the dispatch state machine, the route decision table, affinity rules and the
//! rolling deadline.
//!
//! Nothing in this module awaits, reads a clock, or touches a socket: `now` is always an argument
//! and every decision comes back as a value. The async shell ([`crate::hub`]) and the stores
//! ([`crate::store`]) feed it inputs; [`apply`] is the specification every store must agree with.

mod affinity;
mod dispatch;
mod order;
mod route;
mod state;
mod transition;
mod waiter;

pub use affinity::{Affinity, ConnectDecision, MAX_CONNECT_LEAD};
pub use dispatch::{
    check_idempotency_key, check_key, check_op, Attempt, BrokerId, Dispatch, DispatchId, IdError,
    NodeId, Progress, SessionId, Timestamp, MAX_ID_LEN,
};
pub use order::{blocks, claim_order};
pub use route::{route, Route, RouteInput};
pub use state::{DispatchState, FailReason, ParseStateError};
pub use transition::{apply, Event, EventKind, TransitionError};
pub use waiter::RollingDeadline;
