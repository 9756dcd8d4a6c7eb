//! [`PgStore`]: the Postgres store, for hubs whose replicas share one database.
//!
//! Every mutation is one SQL statement whose `WHERE` clause encodes the guard of the matching
//! [`fsm::apply`] transition, so a row moves atomically or not at all. When a guarded update
//! touches no row, the store reads the row and asks [`fsm::apply`] why, so its errors are exactly
//! the memory store's. The claim is a single `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
//! LOCKED LIMIT n) RETURNING …` that also re-claims expired leases. An insert and the `pg_notify`
//! that signals the broker's owner are one statement, hence one transaction.
//!
//! Time: a `now` of `None` is read from the database clock inside the statement that uses it, so
//! clock skew between nodes cannot shorten a lease. Timestamps are `BIGINT` microseconds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use super::{
    check_limit, ArgsCodec, CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams,
    DisconnectParams, FinishParams, HeartbeatParams, ListFilter, NewDispatch, Outcome, Store,
    SweepParams, SweepReport, TouchParams,
};
use crate::error::StoreError;
use crate::fsm::{
    self, Affinity, Attempt, BrokerId, Dispatch, DispatchId, DispatchState, Event, FailReason,
    NodeId, SessionId, Timestamp,
};
use crate::pg::{self, event_channel, resolve_channel_prefix, signal_channel};

mod statements;

use statements::{Caller, Db, Statements};

/// The migrations, in order: `(version, SQL)`. `{schema}` stands for the quoted schema name.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_narrow_lease_index.sql"),
    ),
    (
        3,
        include_str!("../migrations/postgres/0003_partial_idempotency_key.sql"),
    ),
    (
        4,
        include_str!("../migrations/postgres/0004_keys_and_hand_backs.sql"),
    ),
    (
        5,
        include_str!("../migrations/postgres/0005_cancel_requests.sql"),
    ),
];

/// The newest schema version this build understands.
pub const PG_SCHEMA_VERSION: i64 = 5;

/// The dispatch columns, in the order [`PgStore::decode`] reads them.
const COLS: &str = "d.id, d.broker, d.op, d.args, d.state, d.attempt, d.max_attempts, \
    d.claimed_by, d.lease_until, d.available_at, d.deadline, d.result, d.failure, d.progress, \
    d.idempotency_key, d.created_at, d.updated_at, d.key, d.released";
const NCOLS: usize = 19;

/// How [`PgStore`] connects and where it keeps its tables.
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// The schema holding the tables (created by [`PgStore::migrate`]). Lowercase ASCII letters,
    /// digits and `_`, starting with a letter or `_`, at most 63 bytes.
    pub schema: String,
    /// The most pooled connections ([`PgStore::connect`] only).
    pub pool_size: usize,
    /// The prefix of the notification channels (`{prefix}_signal`, `{prefix}_event`); empty
    /// (the default) means the schema's name, so two deployments in different schemas of one
    /// database never hear each other. It must match the
    /// [`PgTransport`](crate::transport::PgTransport)'s, which defaults the same way from its
    /// own `schema`. Same alphabet as `schema`, at most 40 bytes.
    pub channel_prefix: String,
    /// Encodes args at rest (encryption, redaction); `None` stores them as given.
    pub args_codec: Option<Arc<dyn ArgsCodec>>,
    /// Whether the store sends its own wake-ups with `pg_notify`, in the same transaction as the
    /// rows: a signal per insert on `{prefix}_signal`, an event per finished row on
    /// `{prefix}_event` (default `true`, for [`PgTransport`](crate::transport::PgTransport)).
    /// Set it to `false` when the hubs' transport is not LISTEN/NOTIFY (NATS, Redis, or Postgres
    /// behind PgBouncer in transaction pooling mode): the hub then publishes every signal and
    /// event on its transport itself, and no NOTIFY is sent that nobody would hear.
    pub notify: bool,
    /// How long to wait for a connection, new or pooled ([`PgStore::connect`] only; at least
    /// 1 ms).
    pub connect_timeout: Duration,
    /// The server-side `statement_timeout` of every pooled connection, if any
    /// ([`PgStore::connect`] only). A statement that runs out is reported as
    /// [`StoreError::Unavailable`]: the same call may well succeed later. Sent as a startup
    /// parameter, which PgBouncer does not pass on: behind it, set `statement_timeout` on the
    /// role or database instead (`ALTER ROLE … SET statement_timeout = …`). At least 1 ms
    /// (the server counts whole milliseconds).
    pub statement_timeout: Option<Duration>,
    /// Whether statements are prepared once per connection and cached (default `true`, the
    /// fastest). Set it to `false` behind PgBouncer in **transaction pooling** mode (any
    /// version): every statement then goes out unnamed, with its parameter types, in the same
    /// round trip as its execution, so nothing outlives a transaction on the server connection
    /// the pooler lent. Also set `notify: false` there and use a transport that needs no
    /// LISTEN (NATS, Redis): a LISTEN cannot outlive a transaction either.
    pub prepared_statements: bool,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        PgStoreOptions {
            schema: "broker_dispatch".to_owned(),
            pool_size: 16,
            channel_prefix: String::new(),
            args_codec: None,
            notify: true,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: None,
            prepared_statements: true,
        }
    }
}

/// The statements, rendered once for the store's schema.
#[derive(Debug)]
struct Sql {
    insert: String,
    find_existing: String,
    claim: String,
    heartbeat: String,
    complete: String,
    fail: String,
    retry: String,
    release: String,
    late: String,
    insert_many: String,
    finish_many: String,
    notify: String,
    cancel: String,
    request_cancel: String,
    quarantine: String,
    read_at: String,
    get: String,
    list: String,
    sweep_lock: String,
    sweep_expire: String,
    sweep_exhaust: String,
    sweep_claimable: String,
    sweep_pending: String,
    sweep_purge: String,
    connect: String,
    affinity: String,
    affinity_at: String,
    disconnect: String,
    touch: String,
}

/// `x` is claimable at `clock.now`: [`Dispatch::is_claimable`] in SQL.
fn claimable(x: &str) -> String {
    format!(
        "((({x}.state = 'pending' AND {x}.available_at <= clock.now) \
           OR ({x}.state = 'in_progress' AND {x}.lease_until <= clock.now)) \
          AND {x}.attempt < 4294967295 AND {x}.attempt - {x}.released < {x}.max_attempts \
          AND {x}.failure IS NULL \
          AND ({x}.deadline IS NULL OR clock.now < {x}.deadline))"
    )
}

/// No other live row of `x`'s ordering key blocks it at `clock.now`: [`fsm::blocks`] in SQL
/// (held, or older and not [`Dispatch::is_dead`]). Reads the rows as of the statement's
/// snapshot, so one claim takes at most the first row of each key.
fn key_free(s: &str, x: &str) -> String {
    format!(
        "({x}.key IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.dispatch AS o \
           WHERE o.broker = {x}.broker AND o.key = {x}.key AND o.id <> {x}.id \
             AND o.state IN ('pending', 'in_progress') \
             AND ((o.state = 'in_progress' AND o.lease_until > clock.now) \
               OR ((o.created_at, o.id) < ({x}.created_at, {x}.id) \
                 AND NOT ((o.deadline IS NOT NULL AND o.deadline <= clock.now \
                           AND (o.state = 'pending' OR o.lease_until <= clock.now)) \
                       OR (o.state = 'in_progress' AND o.lease_until <= clock.now \
                           AND (o.attempt - o.released >= o.max_attempts \
                                OR o.failure IS NOT NULL)))))))"
    )
}

impl Sql {
    fn new(s: &str) -> Sql {
        // Reads the database clock once per statement (MATERIALIZED: a volatile CTE evaluated
        // once), unless the caller passed an explicit `now` as parameter `$n`.
        let clock = |n: u32| {
            format!(
                "WITH clock AS MATERIALIZED \
                 (SELECT COALESCE(${n}::bigint, {s}.clock_micros()) AS now)"
            )
        };
        // A guarded holder transition: $1 id, $2 now, $3 attempt, then the event's own values.
        let holder = |set: &str, guard: &str| {
            format!(
                "{} UPDATE {s}.dispatch AS d SET {set}, updated_at = clock.now FROM clock \
                 WHERE d.id = $1::uuid AND d.attempt = $3::bigint AND d.state = 'in_progress'{guard} \
                 RETURNING {COLS}",
                clock(2)
            )
        };
        Sql {
            insert: format!(
                "{}, ins AS ( \
                   INSERT INTO {s}.dispatch AS d (id, broker, op, args, state, attempt, \
                     max_attempts, available_at, deadline, idempotency_key, created_at, \
                     updated_at, key, released) \
                   SELECT $1::uuid, $2::text, $3::text, $4::json, 'pending', $11::bigint, \
                     $5::bigint, \
                     GREATEST(COALESCE($6::bigint, clock.now), \
                              {s}.sat_add(clock.now, COALESCE($12::bigint, 0))), \
                     CASE WHEN $13::bigint IS NULL THEN $7::bigint \
                          ELSE LEAST(COALESCE($7::bigint, 9223372036854775807), \
                                     {s}.sat_add(clock.now, $13::bigint)) END, \
                     $8::text, clock.now, clock.now, $14::text, 0 \
                   FROM clock \
                   ON CONFLICT DO NOTHING \
                   RETURNING {COLS}), \
                 sig AS (SELECT pg_notify($9::text, ins.broker) FROM ins \
                         WHERE $9::text IS NOT NULL) \
                 SELECT ins.*, (SELECT count(*) FROM sig) FROM ins",
                clock(10)
            ),
            // A batch in one statement: parallel arrays as `insert`'s parameters, one signal per
            // broker that got a row. Rows already present are not returned (see `insert_many`).
            insert_many: format!(
                "WITH clock AS MATERIALIZED (SELECT {s}.clock_micros() AS now), \
                 v AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::json[], \
                         $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $10::bigint[], \
                         $11::bigint[], $12::bigint[], $13::text[], $14::bigint[]) \
                       AS v(id, broker, op, args, max_attempts, available_at, deadline, ikey, \
                            attempt, delay, ttl, key, at)), \
                 ins AS ( \
                   INSERT INTO {s}.dispatch AS d (id, broker, op, args, state, attempt, \
                     max_attempts, available_at, deadline, idempotency_key, created_at, \
                     updated_at, key, released) \
                   SELECT v.id, v.broker, v.op, v.args, 'pending', v.attempt, v.max_attempts, \
                     GREATEST(COALESCE(v.available_at, COALESCE(v.at, clock.now)), \
                              {s}.sat_add(COALESCE(v.at, clock.now), COALESCE(v.delay, 0))), \
                     CASE WHEN v.ttl IS NULL THEN v.deadline \
                          ELSE LEAST(COALESCE(v.deadline, 9223372036854775807), \
                                     {s}.sat_add(COALESCE(v.at, clock.now), v.ttl)) END, \
                     v.ikey, COALESCE(v.at, clock.now), COALESCE(v.at, clock.now), v.key, 0 \
                   FROM clock, v \
                   ON CONFLICT DO NOTHING \
                   RETURNING {COLS}), \
                 sig AS (SELECT pg_notify($9::text, b.broker) \
                         FROM (SELECT DISTINCT broker FROM ins) AS b \
                         WHERE $9::text IS NOT NULL) \
                 SELECT ins.*, (SELECT count(*) FROM sig) FROM ins"
            ),
            find_existing: format!(
                "SELECT {COLS} FROM {s}.dispatch AS d \
                 WHERE d.id = $1::uuid OR d.idempotency_key = $2::text \
                 ORDER BY (d.id = $1::uuid) DESC LIMIT 1"
            ),
            // The candidates are picked in a MATERIALIZED CTE, not an `IN (subquery)`: the
            // planner may re-run such a subquery per updated row, and a re-run skips the rows
            // this very statement already locked, overshooting the limit.
            // Tagged, so that an operator (and the fault tests) can tell a claim apart in
            // `pg_stat_activity`, which keeps only the head of a long statement.
            claim: format!(
                "/* claim */ {}, picked AS MATERIALIZED ( \
                     SELECT c.id FROM {s}.dispatch AS c, clock \
                     WHERE c.broker = $1::text AND c.state IN ('pending', 'in_progress') \
                       AND {} AND {} \
                     ORDER BY c.created_at, c.id \
                     LIMIT $4::bigint \
                     FOR UPDATE OF c SKIP LOCKED) \
                 UPDATE {s}.dispatch AS d \
                 SET state = 'in_progress', attempt = d.attempt + 1, claimed_by = $2::text, \
                     lease_until = {s}.sat_add(clock.now, $3::bigint), updated_at = clock.now \
                 FROM clock, picked \
                 WHERE d.id = picked.id AND {} \
                 RETURNING {COLS}",
                clock(5),
                claimable("c"),
                key_free(s, "c"),
                claimable("d"),
            ),
            heartbeat: holder(
                "lease_until = {s}.sat_add(clock.now, $4::bigint), \
                 progress = COALESCE($5::json, d.progress)"
                    .replace("{s}", s)
                    .as_str(),
                " AND d.lease_until > clock.now",
            ),
            // An in-progress row with a `failure` has a cancel request: every outcome but a
            // completion ends it with that failure (`Cancelled`), without the outcome's guard.
            complete: holder(
                "state = 'done', result = $4::json, failure = NULL, lease_until = NULL",
                "",
            ),
            fail: holder(
                "state = 'failed', failure = COALESCE(d.failure, $4::json), lease_until = NULL",
                "",
            ),
            retry: holder(
                format!(
                    "state = CASE WHEN d.failure IS NULL THEN 'pending' ELSE 'failed' END, \
                     available_at = CASE WHEN d.failure IS NULL \
                       THEN {s}.sat_add(clock.now, $4::bigint) ELSE d.available_at END, \
                     lease_until = NULL"
                )
                .as_str(),
                " AND (d.attempt - d.released < d.max_attempts OR d.failure IS NOT NULL)",
            ),
            release: holder(
                "state = CASE WHEN d.failure IS NULL THEN 'pending' ELSE 'failed' END, \
                 available_at = CASE WHEN d.failure IS NULL THEN clock.now \
                   ELSE d.available_at END, \
                 lease_until = NULL, \
                 released = CASE WHEN d.failure IS NULL THEN d.released + 1 \
                   ELSE d.released END",
                "",
            ),
            late: holder(
                "state = 'failed', failure = COALESCE(d.failure, $4::json), lease_until = NULL",
                " AND (d.deadline IS NOT NULL OR d.failure IS NOT NULL)",
            ),
            // Every finish of a batch in one statement, each row still guarded by its own
            // attempt (the same guards as `complete`, `fail`, `retry` and `release` above), and
            // an event per finished row on `$8` in the same transaction. `$1..$7` are parallel
            // arrays: id, attempt, kind, result, failure, retry delay, explicit now.
            finish_many: format!(
                "/* finish */ WITH clock AS MATERIALIZED (SELECT {s}.clock_micros() AS now), \
                 v AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::json[], \
                         $5::json[], $6::bigint[], $7::bigint[]) \
                       AS v(id, attempt, kind, result, failure, delay, at)), \
                 upd AS ( \
                   UPDATE {s}.dispatch AS d SET \
                     state = CASE WHEN v.kind = 'complete' THEN 'done' \
                             WHEN v.kind IN ('fail', 'late') OR d.failure IS NOT NULL \
                               THEN 'failed' \
                             ELSE 'pending' END, \
                     result = CASE WHEN v.kind = 'complete' THEN v.result ELSE d.result END, \
                     failure = CASE WHEN v.kind = 'complete' THEN NULL \
                               WHEN d.failure IS NOT NULL THEN d.failure \
                               WHEN v.kind IN ('fail', 'late') THEN v.failure \
                               ELSE d.failure END, \
                     released = CASE WHEN v.kind = 'release' AND d.failure IS NULL \
                                THEN d.released + 1 ELSE d.released END, \
                     available_at = CASE WHEN d.failure IS NOT NULL THEN d.available_at \
                       WHEN v.kind = 'retry' THEN {s}.sat_add(COALESCE(v.at, clock.now), v.delay) \
                       WHEN v.kind = 'release' THEN COALESCE(v.at, clock.now) \
                       ELSE d.available_at END, \
                     lease_until = NULL, updated_at = COALESCE(v.at, clock.now) \
                   FROM clock, v \
                   WHERE d.id = v.id AND d.attempt = v.attempt AND d.state = 'in_progress' \
                     AND (v.kind <> 'retry' OR d.failure IS NOT NULL \
                          OR d.attempt - d.released < d.max_attempts) \
                     AND (v.kind <> 'late' OR d.failure IS NOT NULL OR d.deadline IS NOT NULL) \
                   RETURNING {COLS}), \
                 ev AS (SELECT pg_notify($8::text, upd.id::text) FROM upd \
                         WHERE $8::text IS NOT NULL) \
                 SELECT upd.*, (SELECT count(*) FROM ev) FROM upd"
            ),
            notify: "SELECT pg_notify($1::text, $2::text)".to_owned(),
            cancel: format!(
                "{} UPDATE {s}.dispatch AS d \
                 SET state = 'failed', failure = $3::json, updated_at = clock.now FROM clock \
                 WHERE d.id = $1::uuid AND d.state = 'pending' RETURNING {COLS}",
                clock(2)
            ),
            quarantine: format!(
                "WITH clock AS MATERIALIZED (SELECT {s}.clock_micros() AS now) \
                 UPDATE {s}.dispatch AS d SET state = 'failed', failure = $3::json, \
                     lease_until = NULL, updated_at = clock.now FROM clock \
                 WHERE d.id = $1::uuid AND d.attempt = $2::bigint AND d.state = 'in_progress'"
            ),
            // Pending: cancelled at once; in progress: marked (its `failure` set).
            request_cancel: format!(
                "{} UPDATE {s}.dispatch AS d \
                 SET state = CASE WHEN d.state = 'pending' THEN 'failed' ELSE d.state END, \
                     failure = $3::json, updated_at = clock.now FROM clock \
                 WHERE d.id = $1::uuid AND d.state IN ('pending', 'in_progress') \
                 RETURNING {COLS}",
                clock(2)
            ),
            read_at: format!(
                "SELECT {COLS}, COALESCE($2::bigint, {s}.clock_micros()) \
                 FROM {s}.dispatch AS d WHERE d.id = $1::uuid"
            ),
            get: format!("SELECT {COLS} FROM {s}.dispatch AS d WHERE d.id = $1::uuid"),
            list: format!(
                "SELECT {COLS} FROM {s}.dispatch AS d \
                 WHERE ($1::text IS NULL OR d.broker = $1::text) \
                   AND ($2::text IS NULL OR d.state = $2::text) \
                   AND ($3::uuid IS NULL OR d.id > $3::uuid) \
                 ORDER BY d.id LIMIT $4::bigint"
            ),
            sweep_lock: format!(
                "SELECT pg_try_advisory_xact_lock($1::bigint), \
                        COALESCE($2::bigint, {s}.clock_micros())"
            ),
            sweep_expire: format!(
                "WITH picked AS MATERIALIZED ( \
                     SELECT c.id FROM {s}.dispatch AS c \
                     WHERE c.state IN ('pending', 'in_progress') AND c.deadline <= $1::bigint \
                       AND (c.state = 'pending' OR c.lease_until <= $1::bigint) \
                     ORDER BY c.id LIMIT $2::bigint FOR UPDATE OF c) \
                 UPDATE {s}.dispatch AS d \
                 SET state = 'failed', failure = $3::json, lease_until = NULL, \
                     updated_at = $1::bigint \
                 FROM picked WHERE d.id = picked.id \
                 RETURNING d.id"
            ),
            sweep_exhaust: format!(
                "WITH picked AS MATERIALIZED ( \
                     SELECT c.id FROM {s}.dispatch AS c \
                     WHERE (c.state = 'in_progress' AND c.lease_until <= $1::bigint \
                       AND c.attempt >= c.max_attempts AND c.attempt - c.released >= c.max_attempts) \
                     OR (c.state = 'in_progress' AND c.failure IS NOT NULL \
                       AND c.lease_until <= $1::bigint) \
                     ORDER BY c.id LIMIT $2::bigint FOR UPDATE OF c) \
                 UPDATE {s}.dispatch AS d \
                 SET state = 'failed', failure = COALESCE(d.failure, $3::json), \
                     lease_until = NULL, updated_at = $1::bigint \
                 FROM picked WHERE d.id = picked.id \
                 RETURNING d.id"
            ),
            sweep_claimable: format!(
                "WITH clock AS (SELECT $1::bigint AS now) \
                 SELECT DISTINCT d.broker FROM {s}.dispatch AS d, clock \
                 WHERE d.state IN ('pending', 'in_progress') AND {} \
                 ORDER BY d.broker LIMIT $2::bigint",
                claimable("d")
            ),
            sweep_pending: format!(
                "SELECT count(*), min(created_at) FROM {s}.dispatch WHERE state = 'pending'"
            ),
            sweep_purge: format!(
                "WITH picked AS MATERIALIZED ( \
                     SELECT c.id FROM {s}.dispatch AS c \
                     WHERE c.state IN ('done', 'failed') AND c.updated_at < $1::bigint \
                     ORDER BY c.id LIMIT $2::bigint) \
                 DELETE FROM {s}.dispatch AS d USING picked WHERE d.id = picked.id"
            ),
            // `decide_connect` in SQL: the claim wins unless (connected_at, session) is older
            // than the row's, or this very session already released the broker; and nothing is
            // written for a `connected_at` in the future of the database clock
            // (`Affinity::connected_in_future`). The clock is returned either way, so the
            // store can tell that refusal from a superseded claim.
            connect: format!(
                "{}, ins AS ( \
                   INSERT INTO {s}.affinity AS a (broker, node, session, connected_at, last_seen) \
                   SELECT $1::text, $2::text, $3::text, COALESCE($4::bigint, clock.now), \
                     clock.now FROM clock \
                   WHERE $4::bigint IS NULL OR $4::bigint <= {s}.sat_add(clock.now, {lead}) \
                   ON CONFLICT (broker) DO UPDATE \
                   SET node = EXCLUDED.node, session = EXCLUDED.session, \
                       connected_at = EXCLUDED.connected_at, last_seen = EXCLUDED.last_seen \
                   WHERE (a.connected_at, a.session) <= (EXCLUDED.connected_at, EXCLUDED.session) \
                     AND NOT (a.session = EXCLUDED.session \
                              AND a.connected_at = EXCLUDED.connected_at AND a.node IS NULL) \
                   RETURNING a.broker, a.node, a.session, a.connected_at, a.last_seen) \
                 SELECT ins.broker, ins.node, ins.session, ins.connected_at, ins.last_seen, \
                        clock.now \
                 FROM clock LEFT JOIN ins ON true",
                clock(5),
                lead = micros(fsm::MAX_CONNECT_LEAD),
            ),
            affinity: format!(
                "SELECT a.broker, a.node, a.session, a.connected_at, a.last_seen \
                 FROM {s}.affinity AS a WHERE a.broker = $1::text"
            ),
            // The row (if any) and the database clock, in one statement.
            affinity_at: format!(
                "SELECT a.broker, a.node, a.session, a.connected_at, a.last_seen, \
                        {s}.clock_micros() AS now \
                 FROM (SELECT 1) AS one \
                 LEFT JOIN {s}.affinity AS a ON a.broker = $1::text"
            ),
            disconnect: format!(
                "{} UPDATE {s}.affinity AS a SET node = NULL, last_seen = clock.now FROM clock \
                 WHERE a.broker = $1::text AND a.node = $2::text AND a.session = $3::text",
                clock(4)
            ),
            touch: format!(
                "{} UPDATE {s}.affinity AS a SET last_seen = GREATEST(a.last_seen, clock.now) \
                 FROM clock \
                 WHERE a.broker = $1::text AND a.node = $2::text AND a.session = $3::text",
                clock(4)
            ),
        }
    }
}

/// The Postgres store (`postgres` feature).
///
/// Build one with [`PgStore::connect`] (from a DSN) or [`PgStore::from_pool`] (sharing a
/// `deadpool_postgres` pool), then call [`PgStore::migrate`] once per deployment (it is
/// idempotent and safe to run from every replica at start-up). Clone it freely: clones share
/// the pool.
///
/// Connections made by [`PgStore::connect`] do not use TLS; to use TLS, build the pool yourself
/// with a TLS connector and pass it to [`PgStore::from_pool`].
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    sql: Arc<Sql>,
    schema: Arc<str>,
    signal_channel: Arc<str>,
    event_channel: Arc<str>,
    codec: Option<Arc<dyn ArgsCodec>>,
    sweep_key: i64,
    notify: bool,
    /// [`PgStoreOptions::prepared_statements`].
    named: bool,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .field("signal_channel", &self.signal_channel)
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

/// Checks a schema name (see [`pg::check_schema`]).
fn check_schema(schema: &str) -> Result<(), StoreError> {
    pg::check_schema(schema).map_err(StoreError::invalid)
}

/// A stable 64-bit key for an advisory lock (FNV-1a), so every replica derives the same key.
fn lock_key(purpose: &str, schema: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "broker_dispatch:"
        .bytes()
        .chain(purpose.bytes())
        .chain(b":".iter().copied())
        .chain(schema.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Backend(Box::new(e)))
}

fn corrupt(what: impl fmt::Display) -> StoreError {
    StoreError::Backend(format!("corrupt row: {what}").into())
}

/// An error the server reported, as the store passes it on: its severity, SQLSTATE and
/// message, and nothing else. The driver's error would display as just `db error` (the server's
/// words only in its source), and its `detail` may quote the row a statement was writing
/// ("Failing row contains (…)"), args included; so neither the driver error nor the detail is
/// kept, in the display, the `Debug` or the source chain.
#[derive(Debug)]
struct PgServerError {
    severity: String,
    code: String,
    message: String,
}

impl fmt::Display for PgServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

impl std::error::Error for PgServerError {}

/// Classifies a driver error: what a retry may fix is [`StoreError::Unavailable`], the rest
/// [`StoreError::Backend`]. An error from the server becomes a [`PgServerError`] (its message
/// and SQLSTATE shown, no row data kept); any other driver error (I/O, connect, timeout) is
/// the boxed source as it is.
fn map_pg(e: tokio_postgres::Error) -> StoreError {
    let retryable = pg::is_retryable(&e);
    let boxed: crate::error::BoxError = match e.as_db_error() {
        Some(db) => Box::new(PgServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
        }),
        None => Box::new(e),
    };
    if retryable {
        StoreError::Unavailable(boxed)
    } else {
        StoreError::Backend(boxed)
    }
}

/// Hands the connection back to the pool, unless the call failed in a way that may have
/// broken it: a backend terminated mid-call is not always noticed before the pool would hand
/// the connection out again, so it is discarded rather than failing the next caller too.
/// A pooled connection that goes back to the pool only when its call settles without a
/// connection error. If the caller's future is dropped mid-statement (a timeout around the store
/// call), the connection may still be busy on the server; handing it to the next caller would
/// make that caller wait behind the abandoned statement, so it leaves the pool instead.
struct Conn {
    obj: Option<deadpool_postgres::Object>,
}

impl Conn {
    fn obj(&self) -> &deadpool_postgres::Object {
        self.obj
            .as_ref()
            .expect("a Conn holds its connection until it is dropped")
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.obj()
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.obj
            .as_mut()
            .expect("a Conn holds its connection until it is dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Reached only when the call did not settle: detach, so the pool never reuses it.
        if let Some(obj) = self.obj.take() {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

fn settle<T>(mut client: Conn, r: Result<T, StoreError>) -> Result<T, StoreError> {
    if let Some(obj) = client.obj.take() {
        if matches!(r, Err(StoreError::Unavailable(_))) {
            drop(deadpool_postgres::Object::take(obj));
        }
        // Otherwise dropping `obj` returns it to the pool.
    }
    r
}

fn map_pool(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => map_pg(e),
        PoolError::Timeout(_) => StoreError::Unavailable(Box::new(e)),
        other => StoreError::Backend(Box::new(other)),
    }
}

impl PgStore {
    /// Connects a pool to the database at `dsn` (a `postgres://` URL or a `key=value`
    /// string) and checks that one connection can be made.
    ///
    /// It does not create or migrate the schema: call [`migrate`](Self::migrate).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a malformed DSN, schema or channel prefix, or a
    /// `connect_timeout` or `statement_timeout` under 1 ms;
    /// [`StoreError::Unavailable`] if the server cannot be reached within
    /// `options.connect_timeout`; [`StoreError::Backend`] if it refuses the connection
    /// (authentication, unknown database).
    pub async fn connect(dsn: &str, options: PgStoreOptions) -> Result<Self, StoreError> {
        // Checked, not rounded: a zero connect timeout gives up at once, and the server takes
        // `statement_timeout` in whole milliseconds, where 0 means "no limit".
        super::check_duration("PgStoreOptions::connect_timeout", options.connect_timeout)?;
        if let Some(t) = options.statement_timeout {
            super::check_duration("PgStoreOptions::statement_timeout", t)?;
        }
        let mut config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|e| StoreError::invalid(format!("bad postgres dsn: {e}")))?;
        // The parser accepts a DSN without a host (an empty string, say); the driver only
        // refuses it when connecting, which would surface as a backend failure.
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(StoreError::invalid("bad postgres dsn: no host"));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        if let Some(t) = options.statement_timeout {
            let ms = t.as_millis();
            let opts = match config.get_options() {
                Some(o) if !o.is_empty() => format!("{o} -c statement_timeout={ms}"),
                _ => format!("-c statement_timeout={ms}"),
            };
            config.options(opts);
        }
        let pool = pg::build_pool(config, options.pool_size, options.connect_timeout)
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let store = Self::from_pool(pool, options)?;
        drop(store.client().await?);
        Ok(store)
    }

    /// Wraps an existing pool (for TLS, or to share connections with the rest of a server).
    /// The pool's size, timeouts and connection settings are the caller's; only `schema`,
    /// `channel_prefix` and `args_codec` of `options` apply.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a malformed schema name or channel prefix.
    pub fn from_pool(pool: Pool, options: PgStoreOptions) -> Result<Self, StoreError> {
        check_schema(&options.schema)?;
        let prefix = resolve_channel_prefix(&options.channel_prefix, &options.schema)
            .map_err(StoreError::invalid)?;
        let quoted = format!("\"{}\"", options.schema);
        Ok(PgStore {
            pool,
            sql: Arc::new(Sql::new(&quoted)),
            sweep_key: lock_key("sweep", &options.schema),
            schema: options.schema.into(),
            signal_channel: signal_channel(&prefix).into(),
            event_channel: event_channel(&prefix).into(),
            codec: options.args_codec,
            notify: options.notify,
            named: options.prepared_statements,
        })
    }

    /// The channel this store's inserts signal on (with `notify`).
    pub(crate) fn signal_channel(&self) -> &str {
        &self.signal_channel
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The schema holding the store's tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The advisory lock key a sweep holds for the length of its transaction: one sweeper per
    /// schema at a time, across the cluster.
    pub fn sweep_lock_key(&self) -> i64 {
        self.sweep_key
    }

    /// Creates the schema and applies the embedded migrations it lacks, in one transaction
    /// under an advisory lock (so replicas starting together do not race). Idempotent.
    ///
    /// # Errors
    ///
    /// [`StoreError::SchemaTooNew`] if a newer build already migrated the schema; otherwise
    /// as any call.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future rolls the transaction back: the schema is migrated fully or not at all.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let s = format!("\"{}\"", self.schema);
        let mut client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let tx = client.transaction().await.map_err(map_pg)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1::bigint)",
                &[&lock_key("migrate", &self.schema)],
            )
            .await
            .map_err(map_pg)?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s}; \
                 CREATE TABLE IF NOT EXISTS {s}.schema_version ( \
                     version bigint PRIMARY KEY, \
                     applied_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(map_pg)?;
            let found: i64 = tx
                .query_one(
                    &format!("SELECT COALESCE(max(version), 0)::bigint FROM {s}.schema_version"),
                    &[],
                )
                .await
                .map_err(map_pg)?
                .get(0);
            if found > PG_SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew {
                    found,
                    supported: PG_SCHEMA_VERSION,
                });
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
                tx.batch_execute(&sql.replace("{schema}", &s))
                    .await
                    .map_err(map_pg)?;
                tx.execute(
                    &format!("INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                    &[version],
                )
                .await
                .map_err(map_pg)?;
            }
            tx.commit().await.map_err(map_pg)
        }
        .await;
        settle(client, r)
    }

    /// Inserts a dispatch through `client`, typically inside the caller's own transaction: the
    /// row and its signal (`pg_notify` on `{prefix}_signal`) then become visible when, and only
    /// if, that transaction commits. Semantics as [`Store::insert`].
    ///
    /// `client` must be connected to the database this store uses, with the store's schema
    /// migrated. Statements are prepared on `client` for each call (they are not cached). From
    /// a transaction on this store's own pool, pass the driver's transaction:
    ///
    /// ```no_run
    /// # async fn f(store: broker_dispatch::store::PgStore,
    /// #            new: broker_dispatch::store::NewDispatch) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut client = store.pool().get().await?;
    /// let tx = client.transaction().await?;
    /// // ... the caller's own writes on `tx` ...
    /// store.insert_in(&*tx, new).await?;
    /// tx.commit().await?; // the row and its signal become visible together
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Store::insert`]. After an error inside a transaction, the transaction is aborted
    /// (Postgres semantics): roll it back.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the statement applied within the caller's transaction.
    pub async fn insert_in<C>(&self, client: &C, new: NewDispatch) -> Result<Dispatch, StoreError>
    where
        C: GenericClient + Sync,
    {
        self.insert_on(&Caller(client), new).await
    }

    async fn client(&self) -> Result<Conn, StoreError> {
        let obj = self.pool.get().await.map_err(map_pool)?;
        Ok(Conn { obj: Some(obj) })
    }

    /// A pooled connection (or one of its transactions) as the store runs statements on it.
    fn db<'a>(&self, client: &'a deadpool_postgres::ClientWrapper) -> Db<'a> {
        Db::Client(client, self.named)
    }

    fn tx<'a>(&self, tx: &'a deadpool_postgres::Transaction<'a>) -> Db<'a> {
        Db::Tx(tx, self.named)
    }

    async fn insert_on(
        &self,
        db: &dyn Statements,
        new: NewDispatch,
    ) -> Result<Dispatch, StoreError> {
        new.validate()?;
        let args = match &self.codec {
            Some(codec) => codec.encode(&new.args)?,
            None => new.args.clone(),
        };
        let id: &Uuid = new.id.as_uuid();
        let max_attempts = i64::from(new.max_attempts);
        let available_at = new.available_at.map(Timestamp::as_micros);
        let deadline = new.deadline.map(Timestamp::as_micros);
        let now = new.now.map(Timestamp::as_micros);
        let executions = i64::from(new.executions);
        let delay = new.delay.map(micros);
        let ttl = new.ttl.map(micros);
        let channel: Option<&str> = self.notify.then_some(&*self.signal_channel);
        // A conflicting row can vanish (purged) between the insert and the lookup: try again.
        for _ in 0..3 {
            let inserted = db
                .row(
                    &self.sql.insert,
                    &[
                        id,
                        &new.broker.as_str(),
                        &new.op,
                        &args,
                        &max_attempts,
                        &available_at,
                        &deadline,
                        &new.idempotency_key,
                        &channel,
                        &now,
                        &executions,
                        &delay,
                        &ttl,
                        &new.key,
                    ],
                )
                .await
                .map_err(map_pg)?;
            if let Some(row) = inserted {
                // The row holds the caller's own args: hand those back rather than decode what
                // was just encoded (a codec that cannot must not turn a committed insert into an
                // error).
                let mut d = self.decode_for_read(&row)?;
                d.args = new.args;
                return Ok(d);
            }
            let existing = db
                .row(&self.sql.find_existing, &[id, &new.idempotency_key])
                .await
                .map_err(map_pg)?;
            if let Some(row) = existing {
                let d = self.decode(&row)?;
                return if new.same_payload(&d) {
                    Ok(d)
                } else {
                    Err(StoreError::Conflict(format!(
                        "dispatch {} exists with a different payload",
                        d.id
                    )))
                };
            }
        }
        Err(StoreError::Unavailable(
            "insert kept conflicting with rows that were deleted concurrently".into(),
        ))
    }

    /// Runs a guarded transition (`$1` id, `$2` now, then `params`). When it touches no row,
    /// reads the row and lets [`fsm::apply`] say why, so errors match the memory store's.
    async fn guarded(
        &self,
        sql: &str,
        id: DispatchId,
        now: Option<Timestamp>,
        params: &[&(dyn ToSql + Sync)],
        event: impl Fn(Timestamp) -> Event,
    ) -> Result<Dispatch, StoreError> {
        let uuid: &Uuid = id.as_uuid();
        let now = now.map(Timestamp::as_micros);
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![uuid, &now];
        all.extend_from_slice(params);
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let db = self.db(&client);
            for _ in 0..3 {
                if let Some(row) = db.row(sql, &all).await.map_err(map_pg)? {
                    return self.decode(&row);
                }
                let Some(row) = db
                    .row(&self.sql.read_at, &[uuid, &now])
                    .await
                    .map_err(map_pg)?
                else {
                    return Err(StoreError::NotFound(id));
                };
                let current = self.decode(&row)?;
                let at = Timestamp::from_micros(row.try_get(NCOLS).map_err(map_pg)?);
                fsm::apply(&current, event(at))?;
                // The guard holds now: the row changed between the update and the read. Again.
            }
            // Three times running, the statement's guard refused what `fsm::apply` allows on
            // the row as read back. A race would need the row to change between the two
            // statements every time; far likelier the SQL guard and the state machine disagree
            // (a defect, or a foreign trigger or edit), which retrying the same call cannot
            // fix. `Backend`, not retryable, as SQLite reports the same divergence.
            Err(StoreError::Backend(
                format!("the guard refused a legal transition of {id} three times").into(),
            ))
        }
        .await;
        settle(client, r)
    }

    fn decode(&self, r: &Row) -> Result<Dispatch, StoreError> {
        self.decode_with(r, false)
    }

    /// For reads (`get`, `list`): args the codec cannot decode come back as stored, so one such
    /// row neither hides its state nor breaks a listing. Only a claim, which hands args to an
    /// executor, insists on decoding them (and quarantines the row when it cannot).
    fn decode_for_read(&self, r: &Row) -> Result<Dispatch, StoreError> {
        self.decode_with(r, true)
    }

    fn decode_with(&self, r: &Row, lenient: bool) -> Result<Dispatch, StoreError> {
        let id: Uuid = r.try_get(0).map_err(map_pg)?;
        let broker: String = r.try_get(1).map_err(map_pg)?;
        let state: String = r.try_get(4).map_err(map_pg)?;
        let attempt: i64 = r.try_get(5).map_err(map_pg)?;
        let max_attempts: i64 = r.try_get(6).map_err(map_pg)?;
        let claimed_by: Option<String> = r.try_get(7).map_err(map_pg)?;
        let stored_args: serde_json::Value = r.try_get(3).map_err(map_pg)?;
        let failure: Option<serde_json::Value> = r.try_get(12).map_err(map_pg)?;
        let progress: Option<serde_json::Value> = r.try_get(13).map_err(map_pg)?;
        let ts = |i: usize| -> Result<Timestamp, StoreError> {
            Ok(Timestamp::from_micros(r.try_get(i).map_err(map_pg)?))
        };
        let opt_ts = |i: usize| -> Result<Option<Timestamp>, StoreError> {
            Ok(r.try_get::<_, Option<i64>>(i)
                .map_err(map_pg)?
                .map(Timestamp::from_micros))
        };
        let args = match &self.codec {
            Some(codec) if lenient => codec.decode(stored_args.clone()).unwrap_or(stored_args),
            Some(codec) => codec.decode(stored_args)?,
            None => stored_args,
        };
        Ok(Dispatch {
            id: DispatchId::from_uuid(id),
            broker: BrokerId::new(broker).map_err(corrupt)?,
            op: r.try_get(2).map_err(map_pg)?,
            args,
            state: state.parse::<DispatchState>().map_err(corrupt)?,
            attempt: Attempt::try_from(attempt).map_err(corrupt)?,
            max_attempts: u32::try_from(max_attempts).map_err(corrupt)?,
            claimed_by: claimed_by.map(NodeId::new).transpose().map_err(corrupt)?,
            lease_until: opt_ts(8)?,
            available_at: ts(9)?,
            deadline: opt_ts(10)?,
            result: r.try_get(11).map_err(map_pg)?,
            failure: failure
                .map(serde_json::from_value::<FailReason>)
                .transpose()
                .map_err(corrupt)?,
            progress: progress
                .map(serde_json::from_value)
                .transpose()
                .map_err(corrupt)?,
            idempotency_key: r.try_get(14).map_err(map_pg)?,
            created_at: ts(15)?,
            updated_at: ts(16)?,
            key: r.try_get(17).map_err(map_pg)?,
            released: u32::try_from(r.try_get::<_, i64>(18).map_err(map_pg)?).map_err(corrupt)?,
        })
    }
}

fn decode_affinity(r: &Row) -> Result<Affinity, StoreError> {
    let broker: String = r.try_get(0).map_err(map_pg)?;
    let node: Option<String> = r.try_get(1).map_err(map_pg)?;
    let session: String = r.try_get(2).map_err(map_pg)?;
    Ok(Affinity {
        broker: BrokerId::new(broker).map_err(corrupt)?,
        node: node.map(NodeId::new).transpose().map_err(corrupt)?,
        session: SessionId::new(session).map_err(corrupt)?,
        connected_at: Timestamp::from_micros(r.try_get(3).map_err(map_pg)?),
        last_seen: Timestamp::from_micros(r.try_get(4).map_err(map_pg)?),
    })
}

/// Every method runs one statement (or, for `sweep`, one transaction) on a pooled connection.
///
/// # Errors
///
/// Besides each method's own, [`StoreError::Unavailable`] when the database is unreachable, the
/// connection drops, or a statement times out; [`StoreError::Backend`] for anything else the
/// database refuses (a missing schema: run [`PgStore::migrate`]).
///
/// # Cancel safety
///
/// A statement runs in its own implicit transaction: dropping a future applies it fully or not
/// at all. A dropped `claim` may leave rows claimed; they are re-claimed after their lease.
#[async_trait]
impl Store for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        new.validate()?;
        let client = self.client().await?;
        let r: Result<_, StoreError> = async { self.insert_on(&self.db(&client), new).await }.await;
        settle(client, r)
    }

    /// One transaction: the batch in one statement (with one signal per broker), then a lookup
    /// of each row that was already present; any conflict rolls the whole batch back.
    async fn insert_many(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        for new in &batch {
            new.validate()?;
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut brokers = Vec::with_capacity(batch.len());
        let mut ops = Vec::with_capacity(batch.len());
        let mut args = Vec::with_capacity(batch.len());
        let mut max_attempts = Vec::with_capacity(batch.len());
        let mut available = Vec::with_capacity(batch.len());
        let mut deadlines = Vec::with_capacity(batch.len());
        let mut ikeys = Vec::with_capacity(batch.len());
        let mut attempts = Vec::with_capacity(batch.len());
        let mut delays = Vec::with_capacity(batch.len());
        let mut ttls = Vec::with_capacity(batch.len());
        let mut keys = Vec::with_capacity(batch.len());
        let mut ats = Vec::with_capacity(batch.len());
        for new in &batch {
            ids.push(*new.id.as_uuid());
            brokers.push(new.broker.as_str());
            ops.push(new.op.as_str());
            args.push(match &self.codec {
                Some(codec) => codec.encode(&new.args)?,
                None => new.args.clone(),
            });
            max_attempts.push(i64::from(new.max_attempts));
            available.push(new.available_at.map(Timestamp::as_micros));
            deadlines.push(new.deadline.map(Timestamp::as_micros));
            ikeys.push(new.idempotency_key.as_deref());
            attempts.push(i64::from(new.executions));
            delays.push(new.delay.map(micros));
            ttls.push(new.ttl.map(micros));
            keys.push(new.key.as_deref());
            ats.push(new.now.map(Timestamp::as_micros));
        }
        let mut client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let tx = client.transaction().await.map_err(map_pg)?;
            let db = self.tx(&tx);
            let channel: Option<&str> = self.notify.then_some(&*self.signal_channel);
            let rows = db
                .rows(
                    &self.sql.insert_many,
                    &[
                        &ids,
                        &brokers,
                        &ops,
                        &args,
                        &max_attempts,
                        &available,
                        &deadlines,
                        &ikeys,
                        &channel,
                        &attempts,
                        &delays,
                        &ttls,
                        &keys,
                        &ats,
                    ],
                )
                .await
                .map_err(map_pg)?;
            let mut inserted = std::collections::HashMap::with_capacity(rows.len());
            let given: std::collections::HashMap<DispatchId, &serde_json::Value> =
                batch.iter().map(|n| (n.id, &n.args)).collect();
            for row in &rows {
                // As for one insert: the caller's own args, not a decode of what was stored.
                let mut d = self.decode_for_read(row)?;
                if let Some(args) = given.get(&d.id) {
                    d.args = (*args).clone();
                }
                inserted.insert(d.id, d);
            }
            let mut out = Vec::with_capacity(batch.len());
            for new in &batch {
                let d = match inserted.get(&new.id) {
                    Some(d) => d.clone(),
                    None => {
                        let row = db
                            .row(
                                &self.sql.find_existing,
                                &[new.id.as_uuid(), &new.idempotency_key],
                            )
                            .await
                            .map_err(map_pg)?
                            .ok_or_else(|| {
                                StoreError::Unavailable(
                                    "a conflicting row was deleted concurrently".into(),
                                )
                            })?;
                        self.decode(&row)?
                    }
                };
                if !new.same_payload(&d) {
                    return Err(StoreError::Conflict(format!(
                        "dispatch {} exists with a different payload",
                        d.id
                    )));
                }
                out.push(d);
            }
            tx.commit().await.map_err(map_pg)?;
            Ok(out)
        }
        .await;
        settle(client, r)
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        p.validate()?;
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let rows = self
                .db(&client)
                .rows(
                    &self.sql.claim,
                    &[
                        &p.broker.as_str(),
                        &p.node.as_str(),
                        &micros(p.lease),
                        &i64::from(p.limit),
                        &p.now.map(Timestamp::as_micros),
                    ],
                )
                .await
                .map_err(map_pg)?;
            // A row that cannot be read back is quarantined (`Failed(Corrupt)`), not returned
            // as an error for the whole batch: the broker's other rows run. The claim is one
            // statement (no transaction of its own, for speed), so the quarantine is a second
            // one, fenced by the attempt this claim took: until it lands the row is held by
            // this node's lease, and if this node dies first the next claimer quarantines it.
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                match self.decode(row) {
                    Ok(d) => out.push(d),
                    Err(e) => self.quarantine(&client, row, &e).await?,
                }
            }
            out.sort_by_key(|d| (d.created_at, d.id));
            Ok(out.into_iter().map(Claimed::mint).collect())
        }
        .await;
        settle(client, r)
    }

    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        super::check_heartbeat(&p)?;
        let attempt = i64::from(c.attempt());
        let progress = p.progress.as_ref().map(to_json).transpose()?;
        let lease = micros(p.lease);
        self.guarded(
            &self.sql.heartbeat,
            c.id(),
            p.now,
            &[&attempt, &lease, &progress],
            |now| Event::Heartbeat {
                attempt: c.attempt(),
                now,
                lease: p.lease,
                progress: p.progress.clone(),
            },
        )
        .await
    }

    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        super::check_outcome(&p.outcome)?;
        let attempt = c.attempt();
        let a = i64::from(attempt);
        match p.outcome {
            Outcome::Complete(result) => {
                self.guarded(&self.sql.complete, c.id(), p.now, &[&a, &result], |now| {
                    Event::Complete {
                        attempt,
                        now,
                        result: result.clone(),
                    }
                })
                .await
            }
            Outcome::Fail(error) => {
                let failure = to_json(&FailReason::Error(error.clone()))?;
                self.guarded(&self.sql.fail, c.id(), p.now, &[&a, &failure], |now| {
                    Event::Fail {
                        attempt,
                        now,
                        error: error.clone(),
                    }
                })
                .await
            }
            Outcome::Retry { after } => {
                let delay = micros(after);
                self.guarded(&self.sql.retry, c.id(), p.now, &[&a, &delay], |now| {
                    Event::Retry {
                        attempt,
                        now,
                        at: now.saturating_add(after),
                    }
                })
                .await
            }
            Outcome::Release => {
                self.guarded(&self.sql.release, c.id(), p.now, &[&a], |now| {
                    Event::Release { attempt, now }
                })
                .await
            }
            Outcome::Late => {
                let failure = to_json(&FailReason::Expired)?;
                self.guarded(&self.sql.late, c.id(), p.now, &[&a, &failure], |now| {
                    Event::Late { attempt, now }
                })
                .await
            }
        }
    }

    /// Outcomes are checked first (a refused one is never written); the rest go out in one
    /// statement per run of distinct ids (`finish_runs`).
    async fn finish_many(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        super::finish_checked(batch, |valid| self.finish_runs(valid)).await
    }

    fn announces_finishes(&self) -> bool {
        self.notify
    }

    fn signals_on_insert(&self) -> bool {
        self.notify
    }

    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let failure = to_json(&FailReason::Cancelled)?;
        self.guarded(&self.sql.cancel, p.id, p.now, &[&failure], |now| {
            Event::Cancel { now }
        })
        .await
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let failure = to_json(&FailReason::Cancelled)?;
        self.guarded(&self.sql.request_cancel, p.id, p.now, &[&failure], |now| {
            Event::RequestCancel { now }
        })
        .await
    }

    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            self.db(&client)
                .row(&self.sql.get, &[id.as_uuid()])
                .await
                .map_err(map_pg)?
                .map(|r| self.decode_for_read(&r))
                .transpose()
        }
        .await;
        settle(client, r)
    }

    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        check_limit(f.limit)?;
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let broker = f.broker.as_ref().map(BrokerId::as_str);
            let state = f.state.map(DispatchState::as_str);
            let after = f.after.as_ref().map(DispatchId::as_uuid);
            let rows = self
                .db(&client)
                .rows(
                    &self.sql.list,
                    &[&broker, &state, &after, &i64::from(f.limit)],
                )
                .await
                .map_err(map_pg)?;
            rows.iter().map(|r| self.decode_for_read(r)).collect()
        }
        .await;
        settle(client, r)
    }

    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        p.validate()?;
        let limit = i64::from(p.limit);
        let mut client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let tx = client.transaction().await.map_err(map_pg)?;
            let db = self.tx(&tx);
            let row = db
                .row(
                    &self.sql.sweep_lock,
                    &[&self.sweep_key, &p.now.map(Timestamp::as_micros)],
                )
                .await
                .map_err(map_pg)?
                .ok_or_else(|| {
                    StoreError::Backend("the sweep lock query returned no row".into())
                })?;
            let held: bool = row.get(0);
            if !held {
                tx.rollback().await.map_err(map_pg)?;
                return Ok(SweepReport::default());
            }
            let now: i64 = row.get(1);
            let ids = |rows: Vec<Row>| -> Vec<DispatchId> {
                let mut ids: Vec<DispatchId> = rows
                    .iter()
                    .map(|r| DispatchId::from_uuid(r.get::<_, Uuid>(0)))
                    .collect();
                ids.sort();
                ids
            };
            let expired = ids(db
                .rows(
                    &self.sql.sweep_expire,
                    &[&now, &limit, &to_json(&FailReason::Expired)?],
                )
                .await
                .map_err(map_pg)?);
            let exhausted = ids(db
                .rows(
                    &self.sql.sweep_exhaust,
                    &[&now, &limit, &to_json(&FailReason::AttemptsExhausted)?],
                )
                .await
                .map_err(map_pg)?);
            let claimable = db
                .rows(&self.sql.sweep_claimable, &[&now, &limit])
                .await
                .map_err(map_pg)?
                .iter()
                .map(|r| BrokerId::new(r.get::<_, String>(0)).map_err(corrupt))
                .collect::<Result<Vec<_>, _>>()?;
            let pending = db
                .row(&self.sql.sweep_pending, &[])
                .await
                .map_err(map_pg)?
                .ok_or_else(|| StoreError::Backend("the pending count returned no row".into()))?;
            let (pending, oldest_pending): (i64, Option<i64>) = (pending.get(0), pending.get(1));
            let cutoff = Timestamp::from_micros(now)
                .saturating_sub(p.retention)
                .as_micros();
            let purged = db
                .count(&self.sql.sweep_purge, &[&cutoff, &limit])
                .await
                .map_err(map_pg)?;
            tx.commit().await.map_err(map_pg)?;
            Ok(SweepReport {
                expired,
                exhausted,
                purged,
                claimable,
                pending: u64::try_from(pending).unwrap_or(0),
                oldest_pending: oldest_pending.map(Timestamp::from_micros),
                swept: true,
            })
        }
        .await;
        settle(client, r)
    }

    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let db = self.db(&client);
            let now = p.now.map(Timestamp::as_micros);
            for _ in 0..3 {
                let claimed = db
                    .row(
                        &self.sql.connect,
                        &[
                            &p.broker.as_str(),
                            &p.node.as_str(),
                            &p.session.as_str(),
                            &p.connected_at.map(Timestamp::as_micros),
                            &now,
                        ],
                    )
                    .await
                    .map_err(map_pg)?;
                let row = claimed.ok_or_else(|| {
                    StoreError::Backend("the connect statement returned no row".into())
                })?;
                if row
                    .try_get::<_, Option<String>>(0)
                    .map_err(map_pg)?
                    .is_some()
                {
                    return Ok(ConnectOutcome::Claimed(decode_affinity(&row)?));
                }
                let db_now = Timestamp::from_micros(row.try_get(5).map_err(map_pg)?);
                p.check_connected_at(db_now)?;
                if let Some(row) = db
                    .row(&self.sql.affinity, &[&p.broker.as_str()])
                    .await
                    .map_err(map_pg)?
                {
                    return Ok(ConnectOutcome::Superseded(decode_affinity(&row)?));
                }
            }
            Err(StoreError::Unavailable(
                "affinity kept changing under concurrent writers".into(),
            ))
        }
        .await;
        settle(client, r)
    }

    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        self.affinity_cas(&self.sql.disconnect, p).await
    }

    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        self.affinity_cas(&self.sql.touch, p).await
    }

    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            self.db(&client)
                .row(&self.sql.affinity, &[&broker.as_str()])
                .await
                .map_err(map_pg)?
                .map(|r| decode_affinity(&r))
                .transpose()
        }
        .await;
        settle(client, r)
    }

    async fn affinity_at(
        &self,
        broker: &BrokerId,
    ) -> Result<(Option<Affinity>, Option<Timestamp>), StoreError> {
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let row = self
                .db(&client)
                .row(&self.sql.affinity_at, &[&broker.as_str()])
                .await
                .map_err(map_pg)?
                .ok_or_else(|| StoreError::Backend("the affinity read returned no row".into()))?;
            let now = Timestamp::from_micros(row.try_get(5).map_err(map_pg)?);
            let held: Option<String> = row.try_get(0).map_err(map_pg)?;
            let affinity = held.map(|_| decode_affinity(&row)).transpose()?;
            Ok((affinity, Some(now)))
        }
        .await;
        settle(client, r)
    }
}

impl PgStore {
    /// [`Store::finish_many`] for entries whose outcomes passed [`super::check_outcome`]: one
    /// statement per run of distinct ids; an entry naming an id already in the run starts a new
    /// one, so each entry sees the row as the entries before it left it.
    async fn finish_runs(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let mut out = Vec::with_capacity(batch.len());
        let mut run = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for (c, p) in batch {
            if !ids.insert(c.id()) {
                out.extend(self.finish_run(std::mem::take(&mut run)).await);
                ids.clear();
                ids.insert(c.id());
            }
            run.push((c, p));
        }
        out.extend(self.finish_run(run).await);
        out
    }

    /// Finishes a batch of distinct dispatches in one statement. Rows the statement's guards
    /// refused go through [`Store::finish`] one by one, which re-applies the guard and, when it
    /// refuses again, names the error exactly as `finish` does.
    async fn finish_run(
        &self,
        run: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let n = run.len();
        if n == 0 {
            return Vec::new();
        }
        let mut ids = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut results = Vec::with_capacity(n);
        let mut failures = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut ats = Vec::with_capacity(n);
        for (c, p) in &run {
            ids.push(*c.id().as_uuid());
            attempts.push(i64::from(c.attempt()));
            ats.push(p.now.map(Timestamp::as_micros));
            let (kind, result, failure, delay) = match &p.outcome {
                Outcome::Complete(v) => ("complete", Some(v.clone()), None, None),
                Outcome::Fail(m) => match to_json(&FailReason::Error(m.clone())) {
                    Ok(f) => ("fail", None, Some(f), None),
                    Err(e) => return super::batch_failure(&e, n),
                },
                Outcome::Retry { after } => ("retry", None, None, Some(micros(*after))),
                Outcome::Release => ("release", None, None, None),
                Outcome::Late => match to_json(&FailReason::Expired) {
                    Ok(f) => ("late", None, Some(f), None),
                    Err(e) => return super::batch_failure(&e, n),
                },
            };
            kinds.push(kind);
            results.push(result);
            failures.push(failure);
            delays.push(delay);
        }
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return super::batch_failure(&e, n),
        };
        let r: Result<_, StoreError> = async {
            let channel: Option<&str> = self.notify.then_some(&*self.event_channel);
            self.db(&client)
                .rows(
                    &self.sql.finish_many,
                    &[
                        &ids, &attempts, &kinds, &results, &failures, &delays, &ats, &channel,
                    ],
                )
                .await
                .map_err(map_pg)
        }
        .await;
        let rows = match settle(client, r) {
            Ok(rows) => rows,
            Err(e) => return super::batch_failure(&e, n),
        };
        let mut finished: std::collections::HashMap<Uuid, Result<Dispatch, StoreError>> = rows
            .iter()
            .filter_map(|r| {
                let id: Uuid = r.try_get(0).ok()?;
                Some((id, self.decode(r)))
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for (c, p) in run {
            match finished.remove(c.id().as_uuid()) {
                Some(r) => out.push(r),
                None => {
                    let id = c.id();
                    let r = self.finish(c, p).await;
                    if r.is_ok() {
                        // The row changed between the statement and the retry, and the retry
                        // applied it: announce it as the statement would have.
                        self.announce(id).await;
                    }
                    out.push(r);
                }
            }
        }
        out
    }

    /// Publishes an event for `id` on the event channel. Best effort: events are hints.
    async fn announce(&self, id: DispatchId) {
        if !self.notify {
            return;
        }
        let Ok(client) = self.client().await else {
            return;
        };
        let r: Result<_, StoreError> = async {
            let channel: &str = &self.event_channel;
            self.db(&client)
                .count(&self.sql.notify, &[&channel, &id.to_string()])
                .await
                .map_err(map_pg)
        }
        .await;
        if let Err(e) = settle(client, r) {
            tracing::debug!(%id, error = %e, "event not announced; waiters poll");
        }
    }
}

impl PgStore {
    /// Fails a row this claim took but cannot decode (`Failed(Corrupt)`), fenced by its attempt.
    /// The reason names what could not be read, never the row's content.
    async fn quarantine(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        row: &Row,
        error: &StoreError,
    ) -> Result<(), StoreError> {
        let id: Uuid = row.try_get(0).map_err(map_pg)?;
        let attempt: i64 = row.try_get(5).map_err(map_pg)?;
        let reason = error.to_string();
        tracing::error!(%id, %reason, "a claimed row cannot be read back; quarantined as failed: corrupt");
        metrics::counter!("broker_dispatch_corrupt_rows_total").increment(1);
        let failure = to_json(&FailReason::Corrupt(reason))?;
        self.db(client)
            .count(&self.sql.quarantine, &[&id, &attempt, &failure])
            .await
            .map_err(map_pg)?;
        Ok(())
    }

    async fn affinity_cas(&self, sql: &str, p: DisconnectParams) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let r: Result<_, StoreError> = async {
            let n = self
                .db(&client)
                .count(
                    sql,
                    &[
                        &p.broker.as_str(),
                        &p.node.as_str(),
                        &p.session.as_str(),
                        &p.now.map(Timestamp::as_micros),
                    ],
                )
                .await
                .map_err(map_pg)?;
            Ok(n == 1)
        }
        .await;
        settle(client, r)
    }
}

/// What one [`PgImport`] call did with the rows it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Rows written.
    pub inserted: u64,
    /// Rows that were already there with exactly the same content (left as they were).
    pub present: u64,
    /// The keys (dispatch ids, broker ids) of rows the destination holds with different
    /// content, or whose idempotency key another dispatch holds. Nothing was written for them.
    pub conflicts: Vec<String>,
}

/// A bulk copy of exact rows into a [`PgStore`], inside one transaction: the path by which
/// rows move from another store (`migrate::sqlite_to_postgres`). Begin one with
/// [`PgStore::begin_import`].
///
/// Rows are written as given, field for field (ids, attempts, states, leases, timestamps,
/// results, failures, progress, idempotency keys, affinity high-water marks): no transition is
/// applied and no signal is sent. A row already present with the same content is skipped, so a
/// repeated import writes nothing new; a row present with different content is reported as a
/// conflict and not touched.
///
/// Both tables are locked against writers (`SHARE ROW EXCLUSIVE`) from
/// [`begin_import`](PgStore::begin_import) until the end, so the counts it reports are exact
/// and running hubs wait rather than interleave. Nothing is visible to anyone until
/// [`commit`](Self::commit); dropping the import without committing closes its connection,
/// which rolls everything back.
pub struct PgImport {
    store: PgStore,
    client: Option<Conn>,
    before: (u64, u64),
}

impl fmt::Debug for PgImport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgImport")
            .field("schema", &self.store.schema)
            .field("open", &self.client.is_some())
            .field("before", &self.before)
            .finish()
    }
}

impl PgStore {
    /// Begins a [`PgImport`]: one transaction on a dedicated pooled connection, with both
    /// tables locked against writers. The schema must be migrated.
    ///
    /// # Errors
    ///
    /// As any call ([`StoreError::Backend`] for a missing schema).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future rolls the transaction back.
    pub async fn begin_import(&self) -> Result<PgImport, StoreError> {
        let client = self.client().await?;
        let mut import = PgImport {
            store: self.clone(),
            client: Some(client),
            before: (0, 0),
        };
        let s = format!("\"{}\"", self.schema);
        import
            .conn()?
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {s}.dispatch, {s}.affinity IN SHARE ROW EXCLUSIVE MODE"
            ))
            .await
            .map_err(map_pg)?;
        import.before = import.counts().await?;
        Ok(import)
    }

    /// Drops the store's schema and everything in it (for tests and demos that made a schema
    /// of their own). Idempotent.
    ///
    /// # Errors
    ///
    /// As any call.
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let r = client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ))
            .await
            .map_err(map_pg);
        settle(client, r)
    }
}

impl PgImport {
    fn conn(&self) -> Result<&deadpool_postgres::Object, StoreError> {
        self.client
            .as_deref()
            .ok_or_else(|| StoreError::Backend("the import has ended".into()))
    }

    /// (dispatches, affinity rows) in the destination when the import began.
    pub fn counts_before(&self) -> (u64, u64) {
        self.before
    }

    /// (dispatches, affinity rows) in the destination now, as this transaction sees it.
    ///
    /// # Errors
    ///
    /// As any call.
    pub async fn counts(&self) -> Result<(u64, u64), StoreError> {
        let s = format!("\"{}\"", self.store.schema);
        let row = self
            .conn()?
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {s}.dispatch), \
                            (SELECT count(*) FROM {s}.affinity)"
                ),
                &[],
            )
            .await
            .map_err(map_pg)?;
        let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok((n(0), n(1)))
    }

    /// Writes dispatches exactly as given (args through the store's codec, if any).
    ///
    /// Every row is checked first with the rules every store applies to what it writes
    /// ([`check_dispatch`](super::check_dispatch)); if any is out of bounds, none of them is
    /// written.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a row out of bounds (nothing of this call was written;
    /// the import stays usable). As any call otherwise; a row the schema's checks refuse is
    /// [`StoreError::Backend`] (the transaction is then aborted: drop the import).
    pub async fn dispatches(&mut self, rows: &[Dispatch]) -> Result<ImportOutcome, StoreError> {
        // Before the first write: a row no store could have written (or could read back) must
        // not reach the destination, whatever the source let through.
        for d in rows {
            super::check_dispatch(d).map_err(|e| match e {
                StoreError::InvalidInput(m) => {
                    StoreError::invalid(format!("dispatch {}: {m}", d.id))
                }
                other => other,
            })?;
        }
        let s = format!("\"{}\"", self.store.schema);
        let client = self.conn()?;
        let insert = client
            .prepare_cached(&format!(
                "INSERT INTO {s}.dispatch AS d (id, broker, op, args, state, attempt, \
                   max_attempts, claimed_by, lease_until, available_at, deadline, result, \
                   failure, progress, idempotency_key, created_at, updated_at, key, released) \
                 VALUES ($1::uuid, $2::text, $3::text, $4::json, $5::text, $6::bigint, \
                   $7::bigint, $8::text, $9::bigint, $10::bigint, $11::bigint, $12::json, \
                   $13::json, $14::json, $15::text, $16::bigint, $17::bigint, $18::text, \
                   $19::bigint) \
                 ON CONFLICT DO NOTHING RETURNING d.id"
            ))
            .await
            .map_err(map_pg)?;
        let get = client
            .prepare_cached(&self.store.sql.get)
            .await
            .map_err(map_pg)?;
        let mut out = ImportOutcome::default();
        for d in rows {
            let args = match &self.store.codec {
                Some(codec) => codec.encode(&d.args)?,
                None => d.args.clone(),
            };
            let failure = d.failure.as_ref().map(to_json).transpose()?;
            let progress = d.progress.as_ref().map(to_json).transpose()?;
            let inserted = client
                .query_opt(
                    &insert,
                    &[
                        d.id.as_uuid(),
                        &d.broker.as_str(),
                        &d.op,
                        &args,
                        &d.state.as_str(),
                        &i64::from(d.attempt),
                        &i64::from(d.max_attempts),
                        &d.claimed_by.as_ref().map(NodeId::as_str),
                        &d.lease_until.map(Timestamp::as_micros),
                        &d.available_at.as_micros(),
                        &d.deadline.map(Timestamp::as_micros),
                        &d.result,
                        &failure,
                        &progress,
                        &d.idempotency_key,
                        &d.created_at.as_micros(),
                        &d.updated_at.as_micros(),
                        &d.key,
                        &i64::from(d.released),
                    ],
                )
                .await
                .map_err(map_pg)?;
            if inserted.is_some() {
                out.inserted += 1;
                continue;
            }
            let existing = client
                .query_opt(&get, &[d.id.as_uuid()])
                .await
                .map_err(map_pg)?
                .map(|r| self.store.decode(&r))
                .transpose()?;
            match existing {
                Some(e) if e == *d => out.present += 1,
                Some(_) => out.conflicts.push(d.id.to_string()),
                // The id is free, so another dispatch holds its idempotency key.
                None => out.conflicts.push(format!("{} (idempotency key)", d.id)),
            }
        }
        Ok(out)
    }

    /// Writes affinity rows exactly as given (released rows included).
    ///
    /// # Errors
    ///
    /// As [`dispatches`](Self::dispatches).
    pub async fn affinity(&mut self, rows: &[Affinity]) -> Result<ImportOutcome, StoreError> {
        let client = self.conn()?;
        let s = format!("\"{}\"", self.store.schema);
        let insert = client
            .prepare_cached(&format!(
                "INSERT INTO {s}.affinity AS a (broker, node, session, connected_at, last_seen) \
                 VALUES ($1::text, $2::text, $3::text, $4::bigint, $5::bigint) \
                 ON CONFLICT DO NOTHING RETURNING a.broker"
            ))
            .await
            .map_err(map_pg)?;
        let get = client
            .prepare_cached(&self.store.sql.affinity)
            .await
            .map_err(map_pg)?;
        let mut out = ImportOutcome::default();
        for a in rows {
            let inserted = client
                .query_opt(
                    &insert,
                    &[
                        &a.broker.as_str(),
                        &a.node.as_ref().map(NodeId::as_str),
                        &a.session.as_str(),
                        &a.connected_at.as_micros(),
                        &a.last_seen.as_micros(),
                    ],
                )
                .await
                .map_err(map_pg)?;
            if inserted.is_some() {
                out.inserted += 1;
                continue;
            }
            let existing = client
                .query_opt(&get, &[&a.broker.as_str()])
                .await
                .map_err(map_pg)?
                .map(|r| decode_affinity(&r))
                .transpose()?;
            if existing.as_ref() == Some(a) {
                out.present += 1;
            } else {
                out.conflicts.push(a.broker.to_string());
            }
        }
        Ok(out)
    }

    /// Commits: every row written becomes visible at once.
    ///
    /// # Errors
    ///
    /// As any call; then nothing was written.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let client = self
            .client
            .take()
            .ok_or_else(|| StoreError::Backend("the import has ended".into()))?;
        let r = client.batch_execute("COMMIT").await.map_err(map_pg);
        settle(client, r)
    }
}

impl Drop for PgImport {
    fn drop(&mut self) {
        // An open transaction cannot be rolled back from a destructor (it would need to
        // await), so its connection is closed instead (dropping an unsettled `Conn` detaches
        // it from the pool): the server rolls back.
        drop(self.client.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement the store runs can go out unnamed: each parameter carries a cast the
    /// statement layer reads its type from.
    #[test]
    fn every_statement_types_each_of_its_parameters() {
        let sql = Sql::new("\"s\"");
        let all = [
            &sql.insert,
            &sql.find_existing,
            &sql.claim,
            &sql.heartbeat,
            &sql.complete,
            &sql.fail,
            &sql.retry,
            &sql.release,
            &sql.late,
            &sql.insert_many,
            &sql.finish_many,
            &sql.notify,
            &sql.cancel,
            &sql.request_cancel,
            &sql.quarantine,
            &sql.read_at,
            &sql.get,
            &sql.list,
            &sql.sweep_lock,
            &sql.sweep_expire,
            &sql.sweep_exhaust,
            &sql.sweep_claimable,
            &sql.sweep_pending,
            &sql.sweep_purge,
            &sql.connect,
            &sql.affinity,
            &sql.affinity_at,
            &sql.disconnect,
            &sql.touch,
        ];
        for text in all {
            if let Err(e) = statements::param_types(text) {
                panic!("{e} in: {text}");
            }
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema("broker_dispatch").is_ok());
        assert!(check_schema("_t1").is_ok());
        for bad in ["", "1abc", "Upper", "a-b", "a\"b", "a b", &"x".repeat(64)] {
            assert!(
                matches!(check_schema(bad), Err(StoreError::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("sweep", "a"), lock_key("sweep", "a"));
        assert_ne!(lock_key("sweep", "a"), lock_key("sweep", "b"));
        assert_ne!(lock_key("sweep", "a"), lock_key("migrate", "a"));
    }

    #[test]
    fn every_migration_is_versioned_in_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        let expected: Vec<i64> = (1..=PG_SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }

    #[tokio::test]
    async fn a_malformed_dsn_is_invalid_input() {
        let err = PgStore::connect("postgres://host:notaport/db", PgStoreOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    }
}
