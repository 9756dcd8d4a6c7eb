//! [`SqliteStore`]: the embedded default store.

/// Placeholder until the SQLite store lands.
#[derive(Debug)]
pub struct SqliteStore;
