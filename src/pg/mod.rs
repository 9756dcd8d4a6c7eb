//! The Postgres glue the store and the transport share: identifier and channel rules, error
//! classification, pool building. Neither `store::postgres` nor `transport::postgres` imports
//! the other; both import this.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// The longest schema name accepted, in bytes (Postgres identifiers are at most 63).
pub(crate) const MAX_SCHEMA_LEN: usize = 63;

/// The longest channel prefix accepted, in bytes (channel names are identifiers of at most 63,
/// and the longest suffix is `_signal`).
pub(crate) const MAX_PREFIX_LEN: usize = 40;

/// Whether `s` is a plain lowercase identifier of at most `max` bytes: `[a-z_][a-z0-9_]*`, so
/// it never needs quoting and never changes case.
pub(crate) fn is_plain_ident(s: &str, max: usize) -> bool {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    first_ok && rest_ok && s.len() <= max
}

/// Checks a schema name.
pub(crate) fn check_schema(schema: &str) -> Result<(), String> {
    if is_plain_ident(schema, MAX_SCHEMA_LEN) {
        Ok(())
    } else {
        Err(format!(
            "schema name must match [a-z_][a-z0-9_]* and be at most {MAX_SCHEMA_LEN} bytes, \
             got {schema:?}"
        ))
    }
}

/// Checks a channel prefix.
pub(crate) fn check_channel_prefix(prefix: &str) -> Result<(), String> {
    if is_plain_ident(prefix, MAX_PREFIX_LEN) {
        Ok(())
    } else {
        Err(format!(
            "channel prefix must match [a-z_][a-z0-9_]* and be at most {MAX_PREFIX_LEN} bytes, \
             got {prefix:?}"
        ))
    }
}

/// The channel prefix a store or transport uses: `prefix` if set, else the schema's name, so
/// a store and a transport built for the same schema agree without being told, and two
/// deployments in different schemas of one database never hear each other.
pub(crate) fn resolve_channel_prefix(prefix: &str, schema: &str) -> Result<String, String> {
    if prefix.is_empty() {
        if !is_plain_ident(schema, MAX_PREFIX_LEN) {
            return Err(format!(
                "the channel prefix defaults to the schema's name, and {schema:?} is not a \
                 valid one (at most {MAX_PREFIX_LEN} bytes of [a-z_][a-z0-9_]*): set \
                 channel_prefix explicitly"
            ));
        }
        return Ok(schema.to_owned());
    }
    check_channel_prefix(prefix)?;
    Ok(prefix.to_owned())
}

/// The channel carrying signals (payload: broker id; empty payload: resync).
pub(crate) fn signal_channel(prefix: &str) -> String {
    format!("{prefix}_signal")
}

/// The channel carrying events (payload: dispatch id).
pub(crate) fn event_channel(prefix: &str) -> String {
    format!("{prefix}_event")
}

/// Whether a driver error is one a retry may fix.
///
/// Retryable: connection failures and losses, timeouts, server shutdown (`57P01`..`57P03`),
/// cancelled statements including `statement_timeout` (`57014`), lock timeouts (`55P03`),
/// serialization failures and deadlocks (`40001`, `40P01`), too many connections (`53300`),
/// and SQLSTATE class `08`. Everything else (bad SQL, constraint violations, permissions,
/// authentication, encoding) is not.
pub(crate) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || matches!(
                    c,
                    "57P01" | "57P02" | "57P03" | "57014" | "55P03" | "40001" | "40P01" | "53300"
                )
        }
        None => {
            // Without a SQLSTATE the driver failed on the wire: closed, I/O, connect, timeout.
            // The driver's error kinds are private; their messages are stable within 0.7.
            let text = e.to_string();
            e.is_closed()
                || text.starts_with("error communicating")
                || text.starts_with("error connecting")
                || text.starts_with("timeout")
        }
    }
}

/// A pool of at most `size` connections made from `config` (without TLS), each wait for a
/// connection (new or pooled) bounded by `timeout`.
pub(crate) fn build_pool(
    config: tokio_postgres::Config,
    size: usize,
    timeout: Duration,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_prefixes() {
        assert!(check_channel_prefix("broker_dispatch").is_ok());
        for bad in ["", "Bad", "1x", "a-b", "a b", "a\"b", &"x".repeat(41)] {
            assert!(check_channel_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_schema(&"x".repeat(63)).is_ok());
        assert!(check_schema(&"x".repeat(64)).is_err());
        assert_eq!(resolve_channel_prefix("", "tenant_a").unwrap(), "tenant_a");
        assert_eq!(resolve_channel_prefix("p", "tenant_a").unwrap(), "p");
        assert!(resolve_channel_prefix("", &"x".repeat(41)).is_err());
        assert!(resolve_channel_prefix("Bad", "tenant_a").is_err());
    }
}
