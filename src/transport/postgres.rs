//! [`PgTransport`]: LISTEN/NOTIFY wake-ups.

/// Placeholder until the Postgres transport lands.
#[derive(Debug)]
pub struct PgTransport;
