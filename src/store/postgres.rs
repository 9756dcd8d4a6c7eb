//! [`PgStore`]: the Postgres store.

/// Placeholder until the Postgres store lands.
#[derive(Debug)]
pub struct PgStore;
