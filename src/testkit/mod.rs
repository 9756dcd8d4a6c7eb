//! What you need to test your own use of this crate (feature `testkit`):
//!
//! - [`FaultStore`]: any [`Store`](crate::store::Store) with faults injected on chosen calls
//!   (an error, a lost answer, a panic, a delay, a call that never returns), and a count of
//!   every call, to drive a [`Hub`](crate::hub::Hub) through the failures production will bring.
//! - [`strategies`]: [proptest](https://docs.rs/proptest) strategies for ids, timestamps, JSON
//!   values, commands, rows and events, so your properties range over every value the crate
//!   accepts.
//! - The reference model is [`fsm::apply`](crate::fsm::apply) (every store agrees with it) and
//!   the reference store [`MemoryStore`](crate::store::MemoryStore); a row to start from is
//!   [`NewDispatch::into_dispatch`](crate::store::NewDispatch::into_dispatch).
//!
//! A property a user might check about their own handling of outcomes: whatever a holder's
//! events are, a finished row stays finished and its result is the one first written.
//!
//! ```
//! use std::time::Duration;
//! use broker_dispatch::fsm::{apply, Event, NodeId, Timestamp};
//! use broker_dispatch::testkit::strategies;
//! use proptest::prelude::*;
//!
//! proptest!(|(new in strategies::new_dispatch(), result in strategies::json_value(),
//!             late in strategies::json_value())| {
//!     let t = |s: i64| Timestamp::from_micros(s * 1_000_000);
//!     let d = new.into_dispatch(t(0));
//!     let node = NodeId::new("a").unwrap();
//!     let lease = Duration::from_secs(10);
//!     let Ok(held) = apply(&d, Event::Claim { node, now: t(0), lease }) else {
//!         return Ok(()); // e.g. delayed: not claimable at t(0)
//!     };
//!     let done = apply(&held, Event::Complete { attempt: held.attempt, now: t(1), result: result.clone() })?;
//!     // A second outcome for the same attempt is refused, and the row is unchanged.
//!     let again = apply(&done, Event::Complete { attempt: held.attempt, now: t(2), result: late });
//!     prop_assert!(again.is_err());
//!     prop_assert_eq!(done.result, Some(result));
//! });
//! ```

mod fault_store;
pub mod strategies;

pub use fault_store::{Fault, FaultStore, StoreOp};
