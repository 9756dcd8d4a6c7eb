//! # broker-dispatch
//!
//! Durable, attempt-fenced dispatch of commands to remote brokers across the replicas of a hub.
//!
//! (Crate docs are completed with the hub runtime.)

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod error;
pub mod fsm;
pub mod hub;
pub mod store;
mod sync;
pub mod transport;

pub use error::{BoxError, Error, ExecError, StoreError, TransportError};

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
