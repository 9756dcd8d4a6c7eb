//! How the store's statements reach the server: prepared once per connection and cached (the
//! default), or sent **unnamed**, with their parameter types, in the same round trip as their
//! execution ([`PgStoreOptions::prepared_statements`](super::PgStoreOptions) `= false`).
//!
//! An unnamed statement lives only until the next one on its connection, so nothing outlives
//! a transaction: that is what PgBouncer's transaction pooling needs, whatever its version (a
//! named statement prepared on one server connection is unknown on the next one the pooler
//! hands out, and its name can collide with another client's there).
//!
//! The parameter types come from the casts every parameter carries in the store's SQL
//! (`$1::bigint`); [`param_types`] reads them, and a unit test checks that every statement the
//! store renders has one for each parameter.

use async_trait::async_trait;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row};

/// Runs statements on one connection or transaction.
#[async_trait]
pub(super) trait Statements: Sync {
    /// The rows `sql` returns.
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error>;

    /// The first row `sql` returns, if any.
    async fn row(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, Error> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }

    /// How many rows `sql` touched.
    async fn count(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error>;
}

/// A pooled connection or one of its transactions, and whether statements are named.
pub(super) enum Db<'a> {
    Client(&'a deadpool_postgres::ClientWrapper, bool),
    Tx(&'a deadpool_postgres::Transaction<'a>, bool),
}

#[async_trait]
impl Statements for Db<'_> {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        match *self {
            Db::Client(c, true) => c.query(&c.prepare_cached(sql).await?, params).await,
            Db::Tx(t, true) => t.query(&t.prepare_cached(sql).await?, params).await,
            Db::Client(c, false) => c.query_typed(sql, &typed(sql, params)).await,
            Db::Tx(t, false) => t.query_typed(sql, &typed(sql, params)).await,
        }
    }

    async fn count(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        match *self {
            Db::Client(c, true) => c.execute(&c.prepare_cached(sql).await?, params).await,
            Db::Tx(t, true) => t.execute(&t.prepare_cached(sql).await?, params).await,
            Db::Client(c, false) => c.execute_typed(sql, &typed(sql, params)).await,
            Db::Tx(t, false) => t.execute_typed(sql, &typed(sql, params)).await,
        }
    }
}

/// The caller's own client (`PgStore::insert_in`): each statement is prepared for the call, as
/// the driver does for a query given as text.
pub(super) struct Caller<'a, C>(pub(super) &'a C);

#[async_trait]
impl<C: GenericClient + Sync> Statements for Caller<'_, C> {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        self.0.query(sql, params).await
    }

    async fn count(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        self.0.execute(sql, params).await
    }
}

/// `params` paired with the types `sql` casts them to.
fn typed<'p>(
    sql: &str,
    params: &'p [&'p (dyn ToSql + Sync)],
) -> Vec<(&'p (dyn ToSql + Sync), Type)> {
    // A statement the store renders always has a cast per parameter (a unit test checks it);
    // a missing one leaves the type to the server, which then refuses the binary value.
    let types = param_types(sql).unwrap_or_default();
    params
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, types.get(i).cloned().unwrap_or(Type::UNKNOWN)))
        .collect()
}

/// The type of each parameter `$1 … $n` of `sql`, from the first cast (`$n::type`) each
/// carries.
///
/// # Errors
///
/// The first parameter that has no cast, or a cast to a type the store does not use.
pub(super) fn param_types(sql: &str) -> Result<Vec<Type>, String> {
    let mut found: Vec<Option<Type>> = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let digits = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            i += 1;
            continue;
        }
        let n: usize = sql[i + 1..i + 1 + digits]
            .parse()
            .map_err(|e| format!("${}: {e}", &sql[i + 1..i + 1 + digits]))?;
        i += 1 + digits;
        if n == 0 {
            return Err("$0 is not a parameter".into());
        }
        if found.len() < n {
            found.resize(n, None);
        }
        if !sql[i..].starts_with("::") {
            continue;
        }
        let name_len = sql[i + 2..]
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || *b == b'_' || *b == b'[' || *b == b']')
            .count();
        let name = &sql[i + 2..i + 2 + name_len];
        i += 2 + name_len;
        let ty = match name {
            "bigint" => Type::INT8,
            "bigint[]" => Type::INT8_ARRAY,
            "integer" => Type::INT4,
            "text" => Type::TEXT,
            "text[]" => Type::TEXT_ARRAY,
            "uuid" => Type::UUID,
            "uuid[]" => Type::UUID_ARRAY,
            "json" => Type::JSON,
            "json[]" => Type::JSON_ARRAY,
            "jsonb" => Type::JSONB,
            "boolean" => Type::BOOL,
            other => return Err(format!("${n}::{other}: a type the store does not use")),
        };
        if found[n - 1].is_none() {
            found[n - 1] = Some(ty);
        }
    }
    found
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| format!("${} has no cast", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_give_the_types_in_parameter_order() {
        let sql = "SELECT $2::text, $1::bigint, $1, $3::uuid[], $4::json[]";
        assert_eq!(
            param_types(sql).unwrap(),
            vec![Type::INT8, Type::TEXT, Type::UUID_ARRAY, Type::JSON_ARRAY]
        );
    }

    #[test]
    fn a_parameter_without_a_cast_or_with_an_unknown_type_is_an_error() {
        assert!(param_types("SELECT $1::bigint, $2").is_err());
        assert!(param_types("SELECT $1::money").is_err());
        assert!(param_types("SELECT $0::bigint").is_err());
        assert_eq!(param_types("SELECT 1").unwrap(), vec![]);
        // Dollar signs that are not parameters.
        assert_eq!(
            param_types("SELECT '$' || $1::text").unwrap(),
            vec![Type::TEXT]
        );
    }
}
