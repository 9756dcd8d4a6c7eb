//! Stores: where dispatches and affinity rows live. The row is the truth.
//!
//! [`Store`] is the one seam every backend implements: [`MemoryStore`] (the reference, always
//! built), [`SqliteStore`] (the embedded default, `sqlite` feature) and `PgStore` (`postgres`
//! feature). Each mutating method is one [`fsm::apply`](crate::fsm::apply) transition, guarded
//! by state and attempt: memory calls `apply` under a lock, the SQL stores encode the same guards
//! in their `WHERE` clauses, and the conformance suite proves they agree.
//!
//! Every params struct has an optional `now`. `None` means "the store's clock" (the system clock
//! for memory and SQLite, the database clock for Postgres, so node clock skew cannot shorten a
//! lease); tests pass an explicit `now` to control time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::fsm::{
    Affinity, Attempt, BrokerId, Dispatch, DispatchId, DispatchState, NodeId, Progress, SessionId,
    Timestamp,
};

mod memory;
pub use memory::MemoryStore;
#[doc(hidden)]
pub use memory::StoreFault;

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{SqliteOptions, SqliteStore};

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{ImportOutcome, PgImport, PgStore, PgStoreOptions, PG_SCHEMA_VERSION};

#[cfg(any(test, feature = "conformance"))]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

/// The most rows one claim, list or sweep step may touch.
pub const MAX_BATCH: u32 = 1000;

/// The largest `args` accepted, in bytes of JSON.
pub const MAX_ARGS_BYTES: usize = 16 * 1024 * 1024;

/// The largest executor result accepted, in bytes of JSON.
pub const MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;

/// The largest progress detail or failure message accepted, in bytes (of JSON, for progress).
pub const MAX_DETAIL_BYTES: usize = 64 * 1024;

/// The shortest duration any store parameter or hub knob accepts (leases, delays, TTLs,
/// retention, timeouts): anything shorter would be a zero lease (two nodes holding one row at
/// once), a busy loop, or, where the backend counts in milliseconds, silently rounded.
pub const MIN_DURATION: Duration = Duration::from_millis(1);

/// The deepest nesting of arrays and objects accepted in any JSON value a row holds (args,
/// result, progress). Every store reads back what it wrote: serde_json refuses to parse more
/// than 128 levels, so a deeper value, once written, could never be read again.
pub const MAX_JSON_DEPTH: usize = 64;

/// Checks a JSON value before it goes into a row: at most [`MAX_JSON_DEPTH`] levels of nesting
/// and `max_bytes` bytes as compact JSON. The depth is measured without recursion, so even a
/// value nested thousands of levels deep is refused, not a stack overflow.
///
/// # Errors
///
/// [`StoreError::InvalidInput`] naming `what`.
pub fn check_json(what: &str, v: &serde_json::Value, max_bytes: usize) -> Result<(), StoreError> {
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        let depth = depth + 1;
        if depth > MAX_JSON_DEPTH {
            return Err(StoreError::invalid(format!(
                "{what} nests deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        stack.extend(children.map(|c| (c, depth)));
    }
    let size = json_size(v);
    if size > max_bytes {
        return Err(StoreError::invalid(format!(
            "{what} is {size} bytes of JSON; the limit is {max_bytes}"
        )));
    }
    Ok(())
}

/// Checks a holder's outcome before it is written (every store calls it): the result's depth
/// and size, a failure message's size.
///
/// # Errors
///
/// [`StoreError::InvalidInput`].
pub fn check_outcome(outcome: &Outcome) -> Result<(), StoreError> {
    match outcome {
        Outcome::Complete(v) => check_json("result", v, MAX_RESULT_BYTES),
        Outcome::Fail(m) if m.len() > MAX_DETAIL_BYTES => Err(StoreError::invalid(format!(
            "failure message is {} bytes; the limit is {MAX_DETAIL_BYTES}",
            m.len()
        ))),
        _ => Ok(()),
    }
}

/// What [`fit_failure_text`] appends to a message it shortened.
pub const TRUNCATION_MARKER: &str = " …[truncated]";

/// Shortens a failure message to fit [`MAX_DETAIL_BYTES`]: cut on a char boundary and marked
/// with [`TRUNCATION_MARKER`]; a message that fits is returned as it is. The hub passes every
/// executor failure through it before writing it, since a message the store refused could not
/// end the attempt at all (its lease would lapse and the command run again).
pub fn fit_failure_text(mut message: String) -> String {
    if message.len() <= MAX_DETAIL_BYTES {
        return message;
    }
    let mut cut = MAX_DETAIL_BYTES - TRUNCATION_MARKER.len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(TRUNCATION_MARKER);
    message
}

/// Checks a whole row before it is copied into a store as it is (an import, which applies no
/// transition): the fields an insert checks ([`NewDispatch::validate`]) and the values a
/// holder's writes check (result, progress detail, failure text), by the same rules, so a
/// copied row is one every store could have written and can read back.
///
/// # Errors
///
/// [`StoreError::InvalidInput`] naming the first field out of bounds.
pub fn check_dispatch(d: &Dispatch) -> Result<(), StoreError> {
    crate::fsm::check_op(&d.op)?;
    if d.max_attempts == 0 {
        return Err(StoreError::invalid("max_attempts must be at least 1"));
    }
    if let Some(k) = &d.idempotency_key {
        crate::fsm::check_idempotency_key(k)?;
    }
    if let Some(k) = &d.key {
        crate::fsm::check_key(k)?;
    }
    if d.released > d.attempt {
        return Err(StoreError::invalid(format!(
            "released {} exceeds attempt {}",
            d.released, d.attempt
        )));
    }
    check_json("args", &d.args, MAX_ARGS_BYTES)?;
    if let Some(r) = &d.result {
        check_json("result", r, MAX_RESULT_BYTES)?;
    }
    if let Some(p) = &d.progress {
        check_json("progress detail", &p.detail, MAX_DETAIL_BYTES)?;
    }
    if let Some(crate::fsm::FailReason::Error(m)) = &d.failure {
        check_outcome(&Outcome::Fail(m.clone()))?;
    }
    Ok(())
}

/// Checks a heartbeat before it is written (every store calls it): a lease of at least 1 ms,
/// and the progress detail's depth and size.
///
/// # Errors
///
/// [`StoreError::InvalidInput`].
pub fn check_heartbeat(p: &HeartbeatParams) -> Result<(), StoreError> {
    check_duration("lease", p.lease)?;
    match &p.progress {
        Some(progress) => check_json("progress detail", &progress.detail, MAX_DETAIL_BYTES),
        None => Ok(()),
    }
}

/// The durable home of dispatches and broker affinity.
///
/// # Contract
///
/// - Each mutating method applies exactly one [`fsm::apply`](crate::fsm::apply) transition per
///   row, atomically: on error nothing changed.
/// - `claim` is exclusive: for each (dispatch, attempt) at most one caller ever receives a
///   [`Claimed`], even under concurrent callers on several processes.
/// - Writes carrying a [`Claimed`] are fenced by its attempt: a stale holder gets
///   [`StoreError::Fenced`], never a silent success.
/// - Methods are cancel safe in the sense that dropping the future either leaves the
///   transition applied in full or not at all; a dropped `claim` may leave rows claimed, which
///   are re-claimed after their lease.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and summaries (`"memory"`, `"sqlite"`, `"postgres"`).
    fn name(&self) -> &'static str;

    /// Whether [`insert`](Store::insert) itself signals the broker's owner on the cluster's
    /// transport, in the same transaction as the row (Postgres with NOTIFY). When `false` (the
    /// default) the hub publishes the signal after the insert returns.
    fn signals_on_insert(&self) -> bool {
        false
    }

    /// This store as [`Any`](std::any::Any), so code holding a `dyn Store` can reach the
    /// backend's own API: [`Hub::send_in`](crate::hub::Hub::send_in) finds the
    /// [`PgStore`] this way. The default is `None`; a wrapper around another store should
    /// forward it.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Writes a new pending dispatch.
    ///
    /// Idempotent: inserting an id (or idempotency key) that exists with the same broker, op and
    /// args returns the existing row unchanged.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] if the id or key exists with a different payload;
    /// [`StoreError::InvalidInput`] for bad fields.
    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError>;

    /// Writes several dispatches atomically: every row, or (on any error) none. Each entry is
    /// idempotent exactly as [`insert`](Store::insert); the answer is in input order.
    ///
    /// The default inserts one by one and is **not** atomic; the memory and SQL stores override
    /// it (SQLite: one transaction; Postgres: one statement plus one signal per broker).
    ///
    /// # Errors
    ///
    /// The first entry's error, as [`insert`](Store::insert); then nothing was written.
    async fn insert_many(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        for new in &batch {
            new.validate()?;
        }
        let mut out = Vec::with_capacity(batch.len());
        for new in batch {
            out.push(self.insert(new).await?);
        }
        Ok(out)
    }

    /// Claims up to `limit` claimable dispatches of one broker, oldest first (by creation time,
    /// then id). Claimable: pending and available and before the deadline, or in progress with an
    /// expired lease, attempts left, and before the deadline.
    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError>;

    /// Extends the holder's lease and optionally records progress.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] if the attempt is stale; [`StoreError::Illegal`] if the dispatch is
    /// no longer in progress.
    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError>;

    /// Finishes the holder's attempt: complete, fail, retry later, or release unexecuted.
    ///
    /// # Errors
    ///
    /// As [`heartbeat`](Store::heartbeat); a `Retry` with no attempts left is `Illegal`.
    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError>;

    /// Finishes several attempts at once: each entry exactly as [`finish`](Store::finish) would
    /// (same guards, same fencing by its own attempt, same typed errors), answered in input
    /// order. Entries are independent: a refused entry changes nothing and does not stop the
    /// others. A result is `Ok` only once that row's new state is durable.
    ///
    /// The default calls `finish` once per entry; the SQL stores write a batch in one
    /// statement (SQLite: one transaction), which is what makes draining fast.
    ///
    /// # Errors
    ///
    /// Per entry, as [`finish`](Store::finish). A failure of the whole batch (connection lost)
    /// is reported on every entry it affected, as the same variant.
    ///
    /// # Cancel safety
    ///
    /// As `finish`: dropping the future leaves each entry applied in full or not at all; which
    /// entries were applied is then unknown (a re-read tells).
    async fn finish_many(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let mut out = Vec::with_capacity(batch.len());
        for (c, p) in batch {
            out.push(self.finish(c, p).await);
        }
        out
    }

    /// Whether [`finish_many`](Store::finish_many) itself announces every row it finishes
    /// ([`Notice::Event`](crate::transport::Notice::Event)) on the cluster's transport, in the
    /// same transaction as the rows (Postgres, with NOTIFY). When `false` (the default) the hub
    /// publishes the events after `finish_many` returns.
    fn announces_finishes(&self) -> bool {
        false
    }

    /// Cancels a pending dispatch so it never runs.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::Illegal`] if it is not pending.
    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError>;

    /// Cancels a dispatch whatever its state ([`Event::RequestCancel`](crate::fsm::Event)): a
    /// pending one ends `Failed(Cancelled)` at once; a running one keeps running but is marked
    /// ([`Dispatch::cancel_requested`]): it is never claimed again, its holder learns of it
    /// from its next heartbeat or read, and it ends `Failed(Cancelled)` unless its holder
    /// completes it.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`]; [`StoreError::Illegal`] if it already finished.
    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError>;

    /// Reads one dispatch.
    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError>;

    /// Lists dispatches by ascending id, one page at a time.
    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError>;

    /// One sweep step: expire, exhaust, purge old terminal rows, and report the brokers that have
    /// claimable work (so the caller can signal their owners).
    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError>;

    /// Claims a broker's affinity for `node`/`session` if it is the newest connection.
    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError>;

    /// Releases the affinity if `node`/`session` still holds it (compare-and-clear). Returns
    /// whether it did.
    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError>;

    /// Refreshes the holder's `last_seen`. Returns `false` if `node`/`session` no longer holds it.
    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError>;

    /// Reads a broker's affinity row.
    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError>;

    /// Reads a broker's affinity row together with the store's clock at that read (`None`: the
    /// store keeps no clock of its own, and the caller's is as good). Routing judges the row's
    /// freshness by that clock, so a node whose clock is off does not take a live owner for
    /// dead, or a dead one for live. The default reads [`affinity`](Self::affinity) and
    /// returns `None`: right for stores that share the node's clock (memory, SQLite).
    async fn affinity_at(
        &self,
        broker: &BrokerId,
    ) -> Result<(Option<Affinity>, Option<Timestamp>), StoreError> {
        Ok((self.affinity(broker).await?, None))
    }
}

/// Proof that the caller holds one attempt of one dispatch.
///
/// Only a store's [`claim`](Store::claim) mints one: there is no public constructor (a reader
/// of a row cannot build a handle and finish the row in its holder's place), except
/// [`Claimed::new`] under the `store-impl` feature, for third-party [`Store`] implementations
/// and their tests. [`Store::finish`] consumes it, so one holder cannot finish twice by
/// accident; a handle of an older attempt is fenced by the store.
#[derive(Debug)]
pub struct Claimed {
    dispatch: Arc<Dispatch>,
}

impl Claimed {
    /// Wraps a freshly claimed dispatch: what a [`Store::claim`] implementation returns.
    /// Available with the `store-impl` feature only.
    #[cfg(feature = "store-impl")]
    #[cfg_attr(docsrs, doc(cfg(feature = "store-impl")))]
    pub fn new(dispatch: Dispatch) -> Self {
        Self::mint(dispatch)
    }

    /// Wraps a dispatch this crate's stores just claimed.
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres", feature = "store-impl")),
        allow(dead_code)
    )]
    pub(crate) fn mint(dispatch: Dispatch) -> Self {
        Claimed {
            dispatch: Arc::new(dispatch),
        }
    }

    /// Wraps a claimed dispatch the store also keeps (no copy).
    pub(crate) fn from_shared(dispatch: Arc<Dispatch>) -> Self {
        Claimed { dispatch }
    }

    /// A second handle on the same attempt, for the lease-renewal task that runs beside the
    /// executor. It carries no more power than the original: the store fences both alike.
    pub(crate) fn renewal_handle(&self) -> Claimed {
        Claimed {
            dispatch: Arc::clone(&self.dispatch),
        }
    }

    /// The dispatch as it was claimed.
    pub fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    /// Its id.
    pub fn id(&self) -> DispatchId {
        self.dispatch.id
    }

    /// The attempt this claim holds.
    pub fn attempt(&self) -> Attempt {
        self.dispatch.attempt
    }

    /// The store's time of the claim (a claim stamps `updated_at`): with the row's deadline, how
    /// long the holder has to start it.
    pub fn claimed_at(&self) -> Timestamp {
        self.dispatch.updated_at
    }

    /// Unwraps the snapshot.
    pub fn into_dispatch(self) -> Dispatch {
        Arc::unwrap_or_clone(self.dispatch)
    }
}

/// A dispatch to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDispatch {
    /// Its id; mint it first to subscribe before writing.
    pub id: DispatchId,
    /// The target broker.
    pub broker: BrokerId,
    /// The operation.
    pub op: String,
    /// The arguments (stored as given; see [`ArgsCodec`]).
    pub args: serde_json::Value,
    /// At least 1.
    pub max_attempts: u32,
    /// Not claimable before this instant (`None`: now).
    pub available_at: Option<Timestamp>,
    /// Never claimed at or after this instant.
    pub deadline: Option<Timestamp>,
    /// Deduplication key, unique across the store.
    pub idempotency_key: Option<String>,
    /// Ordering key: rows of one broker with the same key run one at a time, in insertion order
    /// (see [`fsm::claim_order`](crate::fsm::claim_order)).
    pub key: Option<String>,
    /// Not claimable until this long after the store's `now` (combined with `available_at`:
    /// the later wins). Measured on the store's clock, so a node's skew cannot shift it. At
    /// least [`MIN_DURATION`] when given.
    pub delay: Option<Duration>,
    /// Never claimed at or after this long after the store's `now` (combined with `deadline`:
    /// the earlier wins). Measured on the store's clock. At least [`MIN_DURATION`] when given.
    pub ttl: Option<Duration>,
    /// Executions already begun elsewhere (the local fast path's first attempt, whose retry
    /// this row is): the row starts at this attempt. Less than `max_attempts`.
    pub executions: u32,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

impl NewDispatch {
    /// A dispatch with a fresh id, three attempts, no deadline.
    pub fn new(broker: BrokerId, op: impl Into<String>, args: serde_json::Value) -> Self {
        NewDispatch {
            id: DispatchId::new(),
            broker,
            op: op.into(),
            args,
            max_attempts: 3,
            available_at: None,
            deadline: None,
            idempotency_key: None,
            key: None,
            delay: None,
            ttl: None,
            executions: 0,
            now: None,
        }
    }

    /// Validates the fields every store checks the same way.
    pub fn validate(&self) -> Result<(), StoreError> {
        crate::fsm::check_op(&self.op)?;
        if self.max_attempts == 0 {
            return Err(StoreError::invalid("max_attempts must be at least 1"));
        }
        if let Some(k) = &self.idempotency_key {
            crate::fsm::check_idempotency_key(k)?;
        }
        if let Some(k) = &self.key {
            crate::fsm::check_key(k)?;
        }
        // `None` is "no delay" and "no TTL"; a duration given is a period like any other.
        if let Some(d) = self.delay {
            check_duration("delay", d)?;
        }
        if let Some(t) = self.ttl {
            check_duration("ttl", t)?;
        }
        if self.executions >= self.max_attempts {
            return Err(StoreError::invalid(format!(
                "a row that already had {} executions of max_attempts {} could never run",
                self.executions, self.max_attempts
            )));
        }
        check_json("args", &self.args, MAX_ARGS_BYTES)
    }

    /// Whether an existing row carries the same payload (the idempotency comparison).
    pub fn same_payload(&self, d: &Dispatch) -> bool {
        self.broker == d.broker && self.op == d.op && self.args == d.args && self.key == d.key
    }

    /// `available_at` at the store's `now`: the later of the given instant and `now + delay`.
    pub fn available_at_from(&self, now: Timestamp) -> Timestamp {
        let after_delay = now.saturating_add(self.delay.unwrap_or_default());
        self.available_at
            .map_or(after_delay, |a| a.max(after_delay))
    }

    /// `deadline` at the store's `now`: the earlier of the given instant and `now + ttl`.
    pub fn deadline_from(&self, now: Timestamp) -> Option<Timestamp> {
        let by_ttl = self.ttl.map(|t| now.saturating_add(t));
        match (self.deadline, by_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The row this insert creates at `now` (shared by every store).
    pub fn into_dispatch(self, now: Timestamp) -> Dispatch {
        let available_at = self.available_at_from(now);
        let deadline = self.deadline_from(now);
        Dispatch {
            id: self.id,
            broker: self.broker,
            op: self.op,
            args: self.args,
            state: DispatchState::Pending,
            attempt: self.executions,
            max_attempts: self.max_attempts,
            claimed_by: None,
            lease_until: None,
            available_at,
            deadline,
            result: None,
            failure: None,
            progress: None,
            idempotency_key: self.idempotency_key,
            key: self.key,
            released: 0,
            created_at: now,
            updated_at: now,
        }
    }
}

/// Parameters of [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimParams {
    /// Whose work.
    pub broker: BrokerId,
    /// The claiming node.
    pub node: NodeId,
    /// At most this many rows (1..=[`MAX_BATCH`]).
    pub limit: u32,
    /// The lease each claimed row gets (at least [`MIN_DURATION`]).
    pub lease: Duration,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

impl ClaimParams {
    /// Checks limit and lease.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a limit outside `1..=`[`MAX_BATCH`] or a lease under
    /// [`MIN_DURATION`].
    pub fn validate(&self) -> Result<(), StoreError> {
        check_limit(self.limit)?;
        check_duration("lease", self.lease)
    }
}

/// Parameters of [`Store::heartbeat`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatParams {
    /// The new lease, from now (at least [`MIN_DURATION`]).
    pub lease: Duration,
    /// New progress, if any.
    pub progress: Option<Progress>,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success, with the executor's result.
    Complete(serde_json::Value),
    /// Fatal failure, with a message.
    Fail(String),
    /// Run again after this delay (uses up the attempt).
    Retry {
        /// Delay before the row is claimable again.
        after: Duration,
    },
    /// Hand back without having executed: the fencing token is spent, the execution is not.
    Release,
    /// Not started (or not re-run) because its deadline passed: `Failed(Expired)`.
    Late,
}

impl Outcome {
    /// The [`fsm::apply`](crate::fsm::apply) event this outcome is for the holder of `attempt`
    /// at `now` (a retry becomes claimable again `after` from `now`).
    pub fn into_event(self, attempt: Attempt, now: Timestamp) -> crate::fsm::Event {
        use crate::fsm::Event;
        match self {
            Outcome::Complete(result) => Event::Complete {
                attempt,
                now,
                result,
            },
            Outcome::Fail(error) => Event::Fail {
                attempt,
                now,
                error,
            },
            Outcome::Retry { after } => Event::Retry {
                attempt,
                now,
                at: now.saturating_add(after),
            },
            Outcome::Release => Event::Release { attempt, now },
            Outcome::Late => Event::Late { attempt, now },
        }
    }
}

/// Parameters of [`Store::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct FinishParams {
    /// How the attempt ended.
    pub outcome: Outcome,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

impl FinishParams {
    /// An outcome at the store's clock.
    pub fn new(outcome: Outcome) -> Self {
        FinishParams { outcome, now: None }
    }
}

/// Parameters of [`Store::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelParams {
    /// The dispatch.
    pub id: DispatchId,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

/// A page request for [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this broker's dispatches.
    pub broker: Option<BrokerId>,
    /// Only dispatches in this state.
    pub state: Option<DispatchState>,
    /// Only ids strictly greater than this (the previous page's last id).
    pub after: Option<DispatchId>,
    /// Page size (1..=[`MAX_BATCH`]).
    pub limit: u32,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            broker: None,
            state: None,
            after: None,
            limit: 100,
        }
    }
}

/// Parameters of [`Store::sweep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepParams {
    /// Terminal rows last updated longer ago than this are deleted (at least
    /// [`MIN_DURATION`]).
    pub retention: Duration,
    /// At most this many rows per kind of work (1..=[`MAX_BATCH`]).
    pub limit: u32,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

impl SweepParams {
    /// Checks limit and retention.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a limit outside `1..=`[`MAX_BATCH`] or a retention
    /// under [`MIN_DURATION`].
    pub fn validate(&self) -> Result<(), StoreError> {
        check_limit(self.limit)?;
        check_duration("retention", self.retention)
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Dispatches it moved to `Failed(Expired)`.
    pub expired: Vec<DispatchId>,
    /// Dispatches it moved to `Failed(AttemptsExhausted)`.
    pub exhausted: Vec<DispatchId>,
    /// How many terminal rows it deleted.
    pub purged: u64,
    /// Brokers with claimable work (sorted, deduplicated): signal their owners.
    pub claimable: Vec<BrokerId>,
    /// How many dispatches are pending after the sweep (for the pending gauge).
    pub pending: u64,
    /// When the oldest pending dispatch was written (for the oldest-pending-age gauge).
    pub oldest_pending: Option<Timestamp>,
    /// Whether this caller actually swept (`false` when another node holds the sweep lock).
    pub swept: bool,
}

/// Parameters of [`Store::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// The broker.
    pub broker: BrokerId,
    /// The node that received the connection.
    pub node: NodeId,
    /// The connection's session.
    pub session: SessionId,
    /// When the connection was accepted (the ordering key: newest wins); `None`: the store's
    /// `now` (on Postgres, the database clock), so a node whose own clock is off cannot order
    /// its connections wrongly. At most [`MAX_CONNECT_LEAD`](crate::fsm::MAX_CONNECT_LEAD)
    /// after the store's `now`: a later one is refused, so no caller can pin a broker.
    pub connected_at: Option<Timestamp>,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

/// The result of [`Store::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The caller now holds the broker.
    Claimed(Affinity),
    /// A newer session holds (or held) it; the claim was refused.
    Superseded(Affinity),
}

impl ConnectParams {
    /// Checks `connected_at` against the store's `now`: at most
    /// [`MAX_CONNECT_LEAD`](crate::fsm::MAX_CONNECT_LEAD) ahead of it.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidInput`] for a `connected_at` further in the future.
    pub fn check_connected_at(&self, now: Timestamp) -> Result<(), StoreError> {
        match self.connected_at {
            Some(at) if Affinity::connected_in_future(at, now) => Err(StoreError::invalid(
                format!("connected_at {at} is in the future (the store's now is {now})"),
            )),
            _ => Ok(()),
        }
    }
}

/// Parameters of [`Store::disconnect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectParams {
    /// The broker.
    pub broker: BrokerId,
    /// The node releasing it.
    pub node: NodeId,
    /// The session being torn down.
    pub session: SessionId,
    /// The store's clock if `None`.
    pub now: Option<Timestamp>,
}

/// Parameters of [`Store::touch`].
pub type TouchParams = DisconnectParams;

/// Encodes `args` before they are written and decodes them after they are read: the hook to
/// encrypt or redact secrets at rest. The default stores JSON as given.
///
/// Only args go through the codec. Executor results, progress details and failure text are
/// stored as given, in the clear, whatever the codec: an executor must not put a secret in
/// what it returns, reports or fails with (encrypt it itself if it must). Ids, ops, keys and
/// idempotency keys are not covered either. Moving rows between stores with different codecs:
/// `migrate::MigrateOptions` takes one for each side.
pub trait ArgsCodec: Send + Sync + fmt::Debug + 'static {
    /// Turns the caller's args into what is stored.
    fn encode(&self, args: &serde_json::Value) -> Result<serde_json::Value, StoreError>;
    /// Turns what is stored back into the caller's args.
    fn decode(&self, stored: serde_json::Value) -> Result<serde_json::Value, StoreError>;
}

/// The length of `v` serialised as compact JSON, without allocating it.
fn json_size(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a `Value` to an infallible sink cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// The same failure for each of `n` entries of a batch that failed as a whole. Driver errors
/// cannot be cloned, so the copies carry its message (and keep its variant, hence
/// [`StoreError::is_retryable`]).
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn batch_failure(e: &StoreError, n: usize) -> Vec<Result<Dispatch, StoreError>> {
    (0..n)
        .map(|_| {
            Err(match e {
                StoreError::NotFound(id) => StoreError::NotFound(*id),
                StoreError::Fenced { presented, current } => StoreError::Fenced {
                    presented: *presented,
                    current: *current,
                },
                StoreError::Illegal { from, event } => StoreError::Illegal {
                    from: *from,
                    event: *event,
                },
                StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
                StoreError::InvalidInput(m) => StoreError::InvalidInput(m.clone()),
                StoreError::SchemaTooNew { found, supported } => StoreError::SchemaTooNew {
                    found: *found,
                    supported: *supported,
                },
                StoreError::Unavailable(src) => StoreError::Unavailable(src.to_string().into()),
                StoreError::Backend(src) => StoreError::Backend(src.to_string().into()),
            })
        })
        .collect()
}

/// Runs `write` on the entries of `batch` whose outcomes pass [`check_outcome`] and answers in
/// input order: a refused entry gets its `InvalidInput` and is never written, the others get
/// what `write` answered for them.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) async fn finish_checked<F, Fut>(
    batch: Vec<(Claimed, FinishParams)>,
    write: F,
) -> Vec<Result<Dispatch, StoreError>>
where
    F: FnOnce(Vec<(Claimed, FinishParams)>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<Dispatch, StoreError>>>,
{
    let mut refused: Vec<Option<StoreError>> = Vec::with_capacity(batch.len());
    let mut valid = Vec::with_capacity(batch.len());
    for (c, p) in batch {
        match check_outcome(&p.outcome) {
            Ok(()) => {
                refused.push(None);
                valid.push((c, p));
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    let mut written = write(valid).await.into_iter();
    refused
        .into_iter()
        .map(|r| match r {
            Some(e) => Err(e),
            None => written.next().unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "a batched finish answered fewer entries than it was given".into(),
                ))
            }),
        })
        .collect()
}

/// Every dispatch matching `filter`, reading [`Store::list`] page by page (`filter.limit` rows a
/// page, starting after `filter.after`): for tools, migrations and tests that need the whole set.
/// The result is as large as the match; page through `list` yourself to bound memory.
///
/// # Errors
///
/// The first error of any page read.
pub async fn list_all<S: Store + ?Sized>(
    store: &S,
    mut filter: ListFilter,
) -> Result<Vec<Dispatch>, StoreError> {
    let mut out = Vec::new();
    loop {
        let page = store.list(filter.clone()).await?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        filter.after = Some(last.id);
        out.extend(page);
    }
}

pub(crate) fn check_limit(limit: u32) -> Result<(), StoreError> {
    if limit == 0 || limit > MAX_BATCH {
        return Err(StoreError::invalid(format!(
            "limit must be in 1..={MAX_BATCH}, got {limit}"
        )));
    }
    Ok(())
}

/// Checks a duration parameter: at least [`MIN_DURATION`].
pub(crate) fn check_duration(what: &str, d: Duration) -> Result<(), StoreError> {
    if d < MIN_DURATION {
        return Err(StoreError::invalid(format!(
            "{what} must be at least {MIN_DURATION:?}, got {d:?}"
        )));
    }
    Ok(())
}

pub(crate) fn system_now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_text_is_cut_on_a_char_boundary_to_fit_the_limit() {
        let fits = "é".repeat(MAX_DETAIL_BYTES / 2);
        assert_eq!(fit_failure_text(fits.clone()), fits);
        for long in [
            "x".repeat(MAX_DETAIL_BYTES + 1),
            "é".repeat(MAX_DETAIL_BYTES),
            format!("x{}", "€".repeat(MAX_DETAIL_BYTES)),
        ] {
            let cut = fit_failure_text(long.clone());
            assert!(cut.len() <= MAX_DETAIL_BYTES, "{}", cut.len());
            assert!(cut.len() > MAX_DETAIL_BYTES - 8, "{}", cut.len());
            assert!(cut.ends_with(TRUNCATION_MARKER));
            assert!(long.starts_with(cut.trim_end_matches(TRUNCATION_MARKER)));
            assert!(check_outcome(&Outcome::Fail(cut)).is_ok());
        }
    }
}
