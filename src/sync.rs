//! The synchronisation shim: `parking_lot` normally, `loom` under `--cfg broker_dispatch_loom` (a crate-specific name, so tokio is not built in its own loom mode), so the loom suite
//! model-checks the very code the crate ships.

#[cfg(not(broker_dispatch_loom))]
pub(crate) use parking_lot::Mutex;

#[cfg(not(broker_dispatch_loom))]
pub(crate) use std::sync::Arc;

#[cfg(broker_dispatch_loom)]
pub(crate) use loom::sync::Arc;

/// A mutex with `parking_lot`'s API (no poisoning) over loom's.
#[cfg(broker_dispatch_loom)]
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(broker_dispatch_loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

#[cfg(broker_dispatch_loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(t: T) -> Self {
        Mutex(loom::sync::Mutex::new(t))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // A loom mutex is poisoned only if a modelled thread panicked, which fails the model anyway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
