//! Moving a deployment from SQLite to Postgres: [`sqlite_to_postgres`] copies every dispatch and
//! every affinity row, field for field, from a SQLite file into a Postgres schema
//! (`sqlite` and `postgres` features; `examples/migrate.rs` is the command-line front end).
//!
//! - **Exact**: ids, attempts, states, leases, timestamps, args (decoded with
//!   [`MigrateOptions::source_args_codec`], encoded with
//!   [`MigrateOptions::destination_args_codec`]), results, failure reasons, progress,
//!   idempotency keys and affinity high-water marks arrive unchanged; no transition is applied,
//!   no signal sent. The one exception: a row whose args the source's codec cannot decode is
//!   copied with its args as stored and, if it could still run, as `failed: corrupt`
//!   ([`MigrateReport::dispatches_quarantined`] names them); the copy does not abort on it. Rows in flight (claimed, with a lease) stay claimed: after the cut-over the
//!   new cluster re-claims them once their leases run out, as after any crash.
//! - **Idempotent**: a row the destination already holds with the same content is skipped, so
//!   a rerun copies nothing new.
//! - **All or nothing**: the copy is one destination transaction. If the destination holds a
//!   row with the same key and different content, [`MigrateError::Conflict`] is returned and
//!   nothing is written.
//! - **Counted**: the rows read, copied and skipped must add up, and the destination's counts
//!   must have grown by exactly the rows copied (its tables are locked against writers during
//!   the copy), or [`MigrateError::CountMismatch`] rolls it back.
//!
//! Stop the hubs writing to the SQLite file first: the source is read page by page, so rows
//! written meanwhile may be missed (a rerun picks them up).
//!
//! The DSN forms are parsed by pure functions ([`parse_source`], [`parse_destination`]) so
//! they can be checked without a database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::StoreError;
use crate::fsm::{BrokerId, Dispatch, DispatchId, DispatchState, FailReason};
use crate::store::{ArgsCodec, ListFilter, PgStore, PgStoreOptions, SqliteOptions, Store};

/// A DSN that cannot name a migration's source or destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DsnError {
    /// The DSN is empty (or only whitespace).
    #[error("empty dsn")]
    Empty,
    /// A scheme this side of the migration does not take.
    #[error("unsupported scheme {0:?} (expected sqlite:, file: or a path)")]
    UnknownScheme(String),
    /// A `sqlite:` or `file:` DSN without a path.
    #[error("{0:?} names no file")]
    MissingPath(String),
    /// A `file://` URI with a host other than `localhost`.
    #[error("file uri host {0:?} is not supported (use file:///path or file://localhost/path)")]
    RemoteHost(String),
    /// A malformed or unsupported query parameter.
    #[error("bad query: {0}")]
    BadQuery(String),
    /// A malformed percent escape in a URI path.
    #[error("bad percent escape in {0:?}")]
    BadEscape(String),
    /// The source names an in-memory database, which no other process can read.
    #[error("an in-memory database cannot be migrated")]
    InMemory,
    /// The destination is not a `postgres://` or `postgresql://` URL.
    #[error("destination must be a postgres:// or postgresql:// url, got scheme {0:?}")]
    NotPostgres(String),
    /// The destination URL does not parse as a Postgres connection string.
    #[error("bad postgres url: {0}")]
    BadDestination(String),
}

/// The scheme of `s` (`sqlite` in `sqlite://x`), if it has one. A single letter before the
/// colon is a Windows drive (`C:\hub.db`), not a scheme.
fn scheme_of(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (valid && scheme.len() > 1).then_some((scheme, rest))
}

fn percent_decode(s: &str) -> Result<String, DsnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Exactly two hex digits: `from_str_radix` alone would also take a sign (`%+1`).
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DsnError::BadEscape(s.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DsnError::BadEscape(s.to_owned()))
}

/// Checks SQLite URI query parameters: `mode` (`ro`, `rw`, `rwc`; the source is opened
/// read-only whatever it says), `cache` (`shared`, `private`), `immutable` (`0`, `1`).
fn check_query(query: &str) -> Result<(), DsnError> {
    if query.is_empty() {
        return Err(DsnError::BadQuery("empty query after '?'".into()));
    }
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(DsnError::BadQuery(format!("{pair:?} is not key=value")));
        };
        let ok = match key {
            "mode" if value == "memory" => return Err(DsnError::InMemory),
            "mode" => matches!(value, "ro" | "rw" | "rwc"),
            "cache" => matches!(value, "shared" | "private"),
            "immutable" => matches!(value, "0" | "1"),
            _ => return Err(DsnError::BadQuery(format!("unknown parameter {key:?}"))),
        };
        if !ok {
            return Err(DsnError::BadQuery(format!(
                "{key}={value:?} is not allowed"
            )));
        }
    }
    Ok(())
}

/// Parses a migration source into the SQLite file's path.
///
/// Accepted: `sqlite:///abs/path`, `sqlite://rel/path`, `sqlite:path`, `file:///abs/path`,
/// `file://localhost/abs/path`, `file:rel/path`, and a bare path. `sqlite:` and `file:` forms
/// may carry a SQLite URI query (`?mode=ro`, see [`DsnError::BadQuery`]); `file:` paths are
/// percent-decoded.
///
/// # Errors
///
/// A [`DsnError`] naming what is wrong.
pub fn parse_source(dsn: &str) -> Result<PathBuf, DsnError> {
    let dsn = dsn.trim();
    if dsn.is_empty() {
        return Err(DsnError::Empty);
    }
    let Some((scheme, rest)) = scheme_of(dsn) else {
        return Ok(PathBuf::from(dsn));
    };
    let scheme = scheme.to_ascii_lowercase();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query {
        check_query(q)?;
    }
    let path = match scheme.as_str() {
        // `sqlite://rel` is relative and `sqlite:///abs` absolute: the part after `//` is the
        // path itself (there is no host).
        "sqlite" => rest.strip_prefix("//").unwrap_or(rest).to_owned(),
        "file" => match rest.strip_prefix("//") {
            Some(after) => {
                let (host, path) = match after.find('/') {
                    Some(i) => after.split_at(i),
                    None => (after, ""),
                };
                if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
                    return Err(DsnError::RemoteHost(host.to_owned()));
                }
                percent_decode(path)?
            }
            None => percent_decode(rest)?,
        },
        _ => return Err(DsnError::UnknownScheme(scheme)),
    };
    if path.is_empty() {
        return Err(DsnError::MissingPath(dsn.to_owned()));
    }
    if path == ":memory:" {
        return Err(DsnError::InMemory);
    }
    Ok(PathBuf::from(path))
}

/// Checks a migration destination: a `postgres://` or `postgresql://` URL that parses as a
/// connection string. Returns it unchanged.
///
/// # Errors
///
/// [`DsnError::Empty`], [`DsnError::NotPostgres`], [`DsnError::BadDestination`].
pub fn parse_destination(dsn: &str) -> Result<String, DsnError> {
    let dsn = dsn.trim();
    if dsn.is_empty() {
        return Err(DsnError::Empty);
    }
    // Case-sensitive, like libpq and the driver.
    let scheme = scheme_of(dsn)
        .map(|(s, _)| s.to_owned())
        .unwrap_or_default();
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(DsnError::NotPostgres(scheme));
    }
    dsn.parse::<tokio_postgres::Config>()
        .map_err(|e| DsnError::BadDestination(e.to_string()))?;
    Ok(dsn.to_owned())
}

/// How [`sqlite_to_postgres`] runs.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The destination schema (created and migrated if missing). Default `broker_dispatch`.
    pub schema: String,
    /// Rows read and written per step (1..=[`MAX_BATCH`](crate::store::MAX_BATCH)).
    /// Default 500.
    pub batch: u32,
    /// After a successful copy, close the source and delete it with its `-wal`, `-shm` and
    /// `-journal` files. Default `false`.
    pub drop_source: bool,
    /// The codec the source's hubs wrote args with ([`SqliteOptions::args_codec`]); args are
    /// decoded with it as they are read. Default none (args are read as stored).
    ///
    /// Both sides take their own codec because the copy goes through plain args: without the
    /// source's codec, args still encoded for the source would be encoded a second time by the
    /// destination's (or copied as opaque values the destination's hubs cannot decode); without
    /// the destination's, plain args would land where its hubs expect encoded ones. Giving the
    /// same codec to both keeps the encoding; giving different ones re-encodes (a new key, or
    /// encryption added or removed). Only args are covered (see [`ArgsCodec`]).
    pub source_args_codec: Option<Arc<dyn ArgsCodec>>,
    /// The codec the destination's hubs will read args with
    /// ([`PgStoreOptions::args_codec`]); args are encoded with it as they are written.
    /// Default none (args are written plain). See `source_args_codec` for why both.
    pub destination_args_codec: Option<Arc<dyn ArgsCodec>>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            schema: PgStoreOptions::default().schema,
            batch: 500,
            drop_source: false,
            source_args_codec: None,
            destination_args_codec: None,
        }
    }
}

/// What [`sqlite_to_postgres`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// The source file.
    pub source: PathBuf,
    /// Dispatches read from the source.
    pub dispatches_read: u64,
    /// Dispatches written to the destination.
    pub dispatches_copied: u64,
    /// Dispatches the destination already held, identical (skipped).
    pub dispatches_present: u64,
    /// Affinity rows read from the source.
    pub affinity_read: u64,
    /// Affinity rows written.
    pub affinity_copied: u64,
    /// Affinity rows already present, identical (skipped).
    pub affinity_present: u64,
    /// Whether the source files were deleted.
    pub source_removed: bool,
    /// Rows whose args the source's codec could not decode. Each is copied with its args as
    /// stored; one that was still pending or in progress arrives `failed: corrupt` (what the
    /// source's own hubs do when they claim such a row), so no hub executes undecodable args.
    pub dispatches_quarantined: Vec<DispatchId>,
}

/// Why a migration failed. Except for [`MigrateError::RemoveSource`], nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The source or destination DSN is malformed.
    #[error(transparent)]
    Dsn(#[from] DsnError),
    /// The source file does not exist.
    #[error("source {0:?} does not exist")]
    SourceMissing(PathBuf),
    /// The destination holds a row with the same key and different content.
    #[error("destination {table} row {key} exists with different content; nothing was written")]
    Conflict {
        /// `dispatch` or `affinity`.
        table: &'static str,
        /// The row's key (a dispatch id, or a broker id).
        key: String,
    },
    /// The counts after the copy do not add up; nothing was written.
    #[error("{table}: expected {expected} rows, found {found}; nothing was written")]
    CountMismatch {
        /// `dispatch` or `affinity`.
        table: &'static str,
        /// What the copy accounted for.
        expected: u64,
        /// What the database holds.
        found: u64,
    },
    /// Reading the source or writing the destination failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The copy was committed, but deleting the source failed.
    #[error("copied, but could not remove {path:?}")]
    RemoveSource {
        /// The file that could not be removed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Copies every dispatch and affinity row from the SQLite database `from` into the Postgres
/// schema `opts.schema` at `to`, in one destination transaction. See the [module](self) docs.
///
/// The source is opened read-only and must be at this build's schema version; the destination
/// schema is created or migrated first (that part is committed even if the copy then fails,
/// as it is idempotent and holds no rows).
///
/// # Errors
///
/// [`MigrateError`]; every variant but `RemoveSource` means nothing was copied.
///
/// # Cancel safety
///
/// Dropping the future before it returns rolls the copy back (the source is only deleted
/// after the commit).
pub async fn sqlite_to_postgres(
    from: &str,
    to: &str,
    opts: &MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    let path = parse_source(from)?;
    let dsn = parse_destination(to)?;
    crate::store::check_limit(opts.batch)?;
    if !path.is_file() {
        return Err(MigrateError::SourceMissing(path));
    }
    // Opened without the codec: args are decoded here, row by row, so one the codec cannot
    // decode is quarantined (see `decode_source_args`) instead of being copied as if plain.
    let source = SqliteOptions::new().read_only(true).open(&path)?;
    let dest = PgStore::connect(
        &dsn,
        PgStoreOptions {
            schema: opts.schema.clone(),
            pool_size: 2,
            args_codec: opts.destination_args_codec.clone(),
            ..PgStoreOptions::default()
        },
    )
    .await?;
    dest.migrate().await?;
    let mut report = MigrateReport {
        source: path.clone(),
        ..MigrateReport::default()
    };
    let mut import = dest.begin_import().await?;
    let (dispatches_before, affinity_before) = import.counts_before();

    let mut after = None;
    loop {
        let page = source
            .list(ListFilter {
                after,
                limit: opts.batch,
                ..ListFilter::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        report.dispatches_read += page.len() as u64;
        let page = decode_source_args(page, opts.source_args_codec.as_deref(), &mut report);
        let out = import.dispatches(&page).await?;
        if let Some(key) = out.conflicts.into_iter().next() {
            return Err(MigrateError::Conflict {
                table: "dispatch",
                key,
            });
        }
        report.dispatches_copied += out.inserted;
        report.dispatches_present += out.present;
    }
    let mut after: Option<BrokerId> = None;
    loop {
        let page = source.list_affinity(after.clone(), opts.batch).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.broker.clone());
        report.affinity_read += page.len() as u64;
        let out = import.affinity(&page).await?;
        if let Some(key) = out.conflicts.into_iter().next() {
            return Err(MigrateError::Conflict {
                table: "affinity",
                key,
            });
        }
        report.affinity_copied += out.inserted;
        report.affinity_present += out.present;
    }

    let (dispatches_after, affinity_after) = import.counts().await?;
    let checks = [
        (
            "dispatch",
            report.dispatches_read,
            report.dispatches_copied + report.dispatches_present,
        ),
        (
            "dispatch",
            dispatches_before + report.dispatches_copied,
            dispatches_after,
        ),
        (
            "affinity",
            report.affinity_read,
            report.affinity_copied + report.affinity_present,
        ),
        (
            "affinity",
            affinity_before + report.affinity_copied,
            affinity_after,
        ),
    ];
    for (table, expected, found) in checks {
        if expected != found {
            return Err(MigrateError::CountMismatch {
                table,
                expected,
                found,
            });
        }
    }
    import.commit().await?;

    if opts.drop_source {
        // Close the source before deleting it: its connection must not outlive the files.
        source.close().await;
        remove_sqlite_files(&path)?;
        report.source_removed = true;
    }
    Ok(report)
}

/// Decodes each row's args with the source's codec. A row it cannot decode keeps its args as
/// stored and, if it could still run, becomes `failed: corrupt`, as a claim on the source would
/// have left it; terminal rows keep their outcome. Either way the row is named in the report.
fn decode_source_args(
    page: Vec<Dispatch>,
    codec: Option<&dyn ArgsCodec>,
    report: &mut MigrateReport,
) -> Vec<Dispatch> {
    let Some(codec) = codec else { return page };
    page.into_iter()
        .map(|mut d| {
            match codec.decode(d.args.clone()) {
                Ok(args) => d.args = args,
                Err(e) => {
                    tracing::error!(id = %d.id, error = %e, "source args cannot be decoded; copied as stored");
                    report.dispatches_quarantined.push(d.id);
                    if !d.state.is_terminal() {
                        d.state = DispatchState::Failed;
                        d.failure = Some(FailReason::Corrupt(format!(
                            "args cannot be decoded with the source codec: {e}"
                        )));
                        d.lease_until = None;
                    }
                }
            }
            d
        })
        .collect()
}

/// Deletes a SQLite database and its companion files; missing companions are fine.
fn remove_sqlite_files(path: &Path) -> Result<(), MigrateError> {
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    for file in files {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(MigrateError::RemoveSource { path: file, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Result<PathBuf, DsnError> {
        parse_source(s)
    }

    #[test]
    fn every_source_form_names_its_file() {
        for (dsn, expected) in [
            ("sqlite:///abs/path/hub.db", "/abs/path/hub.db"),
            ("sqlite://rel/path/hub.db", "rel/path/hub.db"),
            ("sqlite:rel/hub.db", "rel/hub.db"),
            ("SQLITE:///abs/hub.db", "/abs/hub.db"),
            ("sqlite:///abs/hub.db?mode=ro", "/abs/hub.db"),
            ("file:///abs/path/hub.db", "/abs/path/hub.db"),
            ("file://localhost/abs/hub.db", "/abs/hub.db"),
            ("file:rel/path/hub.db?mode=ro", "rel/path/hub.db"),
            ("file:hub.db?mode=ro&cache=shared&immutable=1", "hub.db"),
            ("file:///abs/my%20hub.db", "/abs/my hub.db"),
            ("/abs/path/hub.db", "/abs/path/hub.db"),
            ("rel/hub.db", "rel/hub.db"),
            ("hub.db", "hub.db"),
            ("  hub.db  ", "hub.db"),
            ("C:\\data\\hub.db", "C:\\data\\hub.db"),
        ] {
            assert_eq!(path(dsn), Ok(PathBuf::from(expected)), "{dsn}");
        }
    }

    #[test]
    fn every_bad_source_is_a_typed_error() {
        assert_eq!(path(""), Err(DsnError::Empty));
        assert_eq!(path("   "), Err(DsnError::Empty));
        assert!(matches!(
            path("mysql://host/db"),
            Err(DsnError::UnknownScheme(s)) if s == "mysql"
        ));
        assert!(matches!(
            path("postgres://host/db"),
            Err(DsnError::UnknownScheme(_))
        ));
        for empty in [
            "sqlite://",
            "sqlite:",
            "file:",
            "file://",
            "sqlite://?mode=ro",
        ] {
            assert!(
                matches!(path(empty), Err(DsnError::MissingPath(_))),
                "{empty}"
            );
        }
        assert!(matches!(
            path("file://server/share/hub.db"),
            Err(DsnError::RemoteHost(h)) if h == "server"
        ));
        for bad in [
            "file:hub.db?",
            "file:hub.db?mode",
            "file:hub.db?mode=rx",
            "file:hub.db?colour=blue",
            "sqlite://hub.db?mode=ro&",
            "file:hub.db?immutable=yes",
        ] {
            assert!(matches!(path(bad), Err(DsnError::BadQuery(_))), "{bad}");
        }
        assert_eq!(path("file:hub.db?mode=memory"), Err(DsnError::InMemory));
        assert_eq!(path("sqlite::memory:"), Err(DsnError::InMemory));
        for bad in [
            "file:///abs/%zz.db",
            "file:///abs/%4",
            "file:///abs/%ff.db",
            "file:///abs/%+1.db",
            "file:///abs/%-1.db",
            "file:%+f",
        ] {
            assert!(matches!(path(bad), Err(DsnError::BadEscape(_))), "{bad}");
        }
    }

    #[test]
    fn destinations_must_be_postgres_urls() {
        for ok in [
            "postgres://user:pw@127.0.0.1:5432/db",
            "postgresql://localhost/db",
        ] {
            assert_eq!(parse_destination(ok).as_deref(), Ok(ok), "{ok}");
        }
        assert_eq!(parse_destination(""), Err(DsnError::Empty));
        assert!(matches!(
            parse_destination("sqlite:///x.db"),
            Err(DsnError::NotPostgres(s)) if s == "sqlite"
        ));
        assert!(matches!(
            parse_destination("host=localhost dbname=x"),
            Err(DsnError::NotPostgres(s)) if s.is_empty()
        ));
        assert!(matches!(
            parse_destination("POSTGRES://localhost/db"),
            Err(DsnError::NotPostgres(s)) if s == "POSTGRES"
        ));
        assert!(matches!(
            parse_destination("mysql://h/db"),
            Err(DsnError::NotPostgres(_))
        ));
        assert!(matches!(
            parse_destination("postgres://host:notaport/db"),
            Err(DsnError::BadDestination(_))
        ));
    }
}
