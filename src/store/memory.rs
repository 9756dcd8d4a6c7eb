//! [`MemoryStore`]: the reference store. Every mutation is [`fsm::apply`] under one lock.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    check_limit, system_now, CancelParams, ClaimParams, Claimed, ConnectOutcome, ConnectParams,
    DisconnectParams, FinishParams, HeartbeatParams, ListFilter, NewDispatch, Store, SweepParams,
    SweepReport, TouchParams,
};
use crate::error::StoreError;
use crate::fsm::{
    self, Affinity, BrokerId, ConnectDecision, Dispatch, DispatchId, Event, Timestamp,
};
use crate::sync::Mutex;

/// An in-process store: the reference implementation of [`Store`].
///
/// Nothing survives the process. Use it for tests, the demo, and single-process hubs; share one
/// instance (behind an `Arc`) between hubs in one process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// A [`StoreFault`] as `u8`; `0` (none) in every store not built by a fault-injection test.
    fault: AtomicU8,
}

/// A guard [`MemoryStore`] can be told to skip. **For tests only**: it exists so that a
/// simulation can prove it notices a broken store. Never set it outside such a test.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoreFault {
    /// Every guard holds (the default).
    None = 0,
    /// Holder writes (heartbeat, finish) are accepted whatever attempt they carry.
    SkipFencing = 1,
    /// Claims ignore the dispatch's deadline.
    SkipClaimDeadline = 2,
}

#[derive(Debug, Default)]
struct Inner {
    /// Rows are shared with the `Claimed` handles minted from them (a claim clones nothing).
    rows: HashMap<DispatchId, Arc<Dispatch>>,
    /// Non-terminal rows per broker, in claim order.
    active: HashMap<BrokerId, BTreeSet<(Timestamp, DispatchId)>>,
    /// Non-terminal rows per (broker, ordering key), in claim order.
    keyed: HashMap<(BrokerId, String), BTreeSet<(Timestamp, DispatchId)>>,
    keys: HashMap<String, DispatchId>,
    affinity: HashMap<BrokerId, Affinity>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Disables one guard. **For tests only** (see [`StoreFault`]); costs the hot path one
    /// relaxed atomic load.
    #[doc(hidden)]
    pub fn set_fault(&self, fault: StoreFault) {
        self.fault.store(fault as u8, Ordering::Relaxed);
    }

    fn fault(&self) -> u8 {
        self.fault.load(Ordering::Relaxed)
    }

    /// How many rows it holds (all states).
    pub fn len(&self) -> usize {
        self.inner.lock().rows.len()
    }

    /// Whether it holds no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The synchronous core of [`Store::insert`].
    pub fn insert_sync(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        new.validate()?;
        let mut inner = self.inner.lock();
        insert_locked(&mut inner, new)
    }

    /// The synchronous core of [`Store::insert_many`]: all rows or none, under one lock.
    pub fn insert_many_sync(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        for new in &batch {
            new.validate()?;
        }
        let mut inner = self.inner.lock();
        // Dry run on the ids and keys first, so a conflict leaves nothing written.
        let mut seen_ids = HashMap::new();
        let mut seen_keys = HashMap::new();
        for new in &batch {
            let existing = inner
                .rows
                .get(&new.id)
                .map(|d| Dispatch::clone(d))
                .or_else(|| {
                    new.idempotency_key
                        .as_ref()
                        .and_then(|k| inner.keys.get(k))
                        .and_then(|id| inner.rows.get(id))
                        .map(|d| Dispatch::clone(d))
                });
            if let Some(d) = existing {
                if !new.same_payload(&d) {
                    return Err(conflict(&d));
                }
            }
            for prior in [
                seen_ids.insert(new.id, new),
                new.idempotency_key
                    .as_ref()
                    .and_then(|k| seen_keys.insert(k.clone(), new)),
            ]
            .into_iter()
            .flatten()
            {
                if !(prior.broker == new.broker
                    && prior.op == new.op
                    && prior.args == new.args
                    && prior.key == new.key)
                {
                    return Err(StoreError::Conflict(format!(
                        "dispatch {} appears twice in the batch with different payloads",
                        new.id
                    )));
                }
            }
        }
        batch
            .into_iter()
            .map(|new| insert_locked(&mut inner, new))
            .collect()
    }
}

fn conflict(d: &Dispatch) -> StoreError {
    StoreError::Conflict(format!("dispatch {} exists with a different payload", d.id))
}

fn insert_locked(inner: &mut Inner, new: NewDispatch) -> Result<Dispatch, StoreError> {
    {
        let now = new.now.unwrap_or_else(system_now);
        let existing = inner.rows.get(&new.id).or_else(|| {
            new.idempotency_key
                .as_ref()
                .and_then(|k| inner.keys.get(k))
                .and_then(|id| inner.rows.get(id))
        });
        if let Some(d) = existing {
            return if new.same_payload(d) {
                Ok(Dispatch::clone(d))
            } else {
                Err(conflict(d))
            };
        }
        let d = new.into_dispatch(now);
        if let Some(k) = &d.idempotency_key {
            inner.keys.insert(k.clone(), d.id);
        }
        inner
            .active
            .entry(d.broker.clone())
            .or_default()
            .insert((d.created_at, d.id));
        if let Some(k) = &d.key {
            inner
                .keyed
                .entry((d.broker.clone(), k.clone()))
                .or_default()
                .insert((d.created_at, d.id));
        }
        inner.rows.insert(d.id, Arc::new(d.clone()));
        Ok(d)
    }
}

impl MemoryStore {
    /// The synchronous core of [`Store::claim`].
    pub fn claim_sync(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        p.validate()?;
        let now = p.now.unwrap_or_else(system_now);
        let skip_deadline = self.fault() == StoreFault::SkipClaimDeadline as u8;
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(active) = inner.active.get(&p.broker) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (_, id) in active {
            if out.len() >= p.limit as usize {
                break;
            }
            let Some(row) = inner.rows.get(id) else {
                continue;
            };
            let claim = Event::Claim {
                node: p.node.clone(),
                now,
                lease: p.lease,
            };
            if let Some(k) = &row.key {
                let rows = &inner.rows;
                let blocked = inner
                    .keyed
                    .get(&(row.broker.clone(), k.clone()))
                    .into_iter()
                    .flatten()
                    .filter_map(|(_, o)| rows.get(o))
                    .any(|o| fsm::blocks(o, row, now));
                if blocked {
                    continue;
                }
            }
            let next = if skip_deadline {
                // Test-only fault: judge and claim the row as if it had no deadline.
                let mut probe = Dispatch::clone(row);
                probe.deadline = None;
                if !probe.is_claimable(now) {
                    continue;
                }
                let mut next = fsm::apply(&probe, claim)?;
                next.deadline = row.deadline;
                next
            } else {
                if !row.is_claimable(now) {
                    continue;
                }
                fsm::apply(row, claim)?
            };
            let Some(row) = inner.rows.get_mut(id) else {
                continue;
            };
            let next = Arc::new(next);
            *row = Arc::clone(&next);
            out.push(Claimed::from_shared(next));
        }
        Ok(out)
    }

    /// The synchronous core of [`Store::finish`].
    pub fn finish_sync(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        super::check_outcome(&p.outcome)?;
        let (id, event) = finish_event(&c, p);
        self.transition(id, event)
    }

    /// The synchronous core of [`Store::finish_many`]: every entry under one lock.
    pub fn finish_many_sync(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        let mut inner = self.inner.lock();
        batch
            .into_iter()
            .map(|(c, p)| {
                super::check_outcome(&p.outcome)?;
                let (id, event) = finish_event(&c, p);
                let event = self.maybe_unfenced(&inner, id, event);
                transition_locked(&mut inner, id, event)
            })
            .collect()
    }

    fn transition(&self, id: DispatchId, event: Event) -> Result<Dispatch, StoreError> {
        let mut inner = self.inner.lock();
        let event = self.maybe_unfenced(&inner, id, event);
        transition_locked(&mut inner, id, event)
    }

    /// `event` as given, or — with the test-only `SkipFencing` fault set — re-addressed to the
    /// row's current attempt, as a store without fencing would apply it.
    fn maybe_unfenced(&self, inner: &Inner, id: DispatchId, event: Event) -> Event {
        if self.fault() == StoreFault::SkipFencing as u8 {
            unfenced(event, inner.rows.get(&id).map(|d| d.attempt))
        } else {
            event
        }
    }
}

/// `event` re-addressed to the row's current attempt: what a store without fencing would do.
fn unfenced(mut event: Event, current: Option<fsm::Attempt>) -> Event {
    if let Some(current) = current {
        match &mut event {
            Event::Heartbeat { attempt, .. }
            | Event::Complete { attempt, .. }
            | Event::Fail { attempt, .. }
            | Event::Retry { attempt, .. }
            | Event::Release { attempt, .. }
            | Event::Late { attempt, .. } => *attempt = current,
            Event::Claim { .. }
            | Event::Cancel { .. }
            | Event::RequestCancel { .. }
            | Event::Expire { .. }
            | Event::Exhaust { .. } => {}
        }
    }
    event
}

/// The event `finish` applies for this holder and outcome.
fn finish_event(c: &Claimed, p: FinishParams) -> (DispatchId, Event) {
    let now = p.now.unwrap_or_else(system_now);
    (c.id(), p.outcome.into_event(c.attempt(), now))
}

/// Drops a row that became terminal from the live indexes.
fn retire(inner: &mut Inner, d: &Dispatch) {
    if let Some(set) = inner.active.get_mut(&d.broker) {
        set.remove(&(d.created_at, d.id));
    }
    if let Some(k) = &d.key {
        let slot = (d.broker.clone(), k.clone());
        if let Some(set) = inner.keyed.get_mut(&slot) {
            set.remove(&(d.created_at, d.id));
            if set.is_empty() {
                inner.keyed.remove(&slot);
            }
        }
    }
}

fn transition_locked(
    inner: &mut Inner,
    id: DispatchId,
    event: Event,
) -> Result<Dispatch, StoreError> {
    let row = inner.rows.get_mut(&id).ok_or(StoreError::NotFound(id))?;
    let next = fsm::apply(row, event)?;
    *row = Arc::new(next.clone());
    if next.state.is_terminal() {
        retire(inner, &next);
    }
    Ok(next)
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn insert(&self, new: NewDispatch) -> Result<Dispatch, StoreError> {
        self.insert_sync(new)
    }

    async fn insert_many(&self, batch: Vec<NewDispatch>) -> Result<Vec<Dispatch>, StoreError> {
        self.insert_many_sync(batch)
    }

    async fn claim(&self, p: ClaimParams) -> Result<Vec<Claimed>, StoreError> {
        self.claim_sync(p)
    }

    async fn heartbeat(&self, c: &Claimed, p: HeartbeatParams) -> Result<Dispatch, StoreError> {
        super::check_heartbeat(&p)?;
        let now = p.now.unwrap_or_else(system_now);
        self.transition(
            c.id(),
            Event::Heartbeat {
                attempt: c.attempt(),
                now,
                lease: p.lease,
                progress: p.progress,
            },
        )
    }

    async fn finish(&self, c: Claimed, p: FinishParams) -> Result<Dispatch, StoreError> {
        self.finish_sync(c, p)
    }

    async fn finish_many(
        &self,
        batch: Vec<(Claimed, FinishParams)>,
    ) -> Vec<Result<Dispatch, StoreError>> {
        self.finish_many_sync(batch)
    }

    async fn cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        self.transition(p.id, Event::Cancel { now })
    }

    async fn request_cancel(&self, p: CancelParams) -> Result<Dispatch, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        self.transition(p.id, Event::RequestCancel { now })
    }

    async fn get(&self, id: DispatchId) -> Result<Option<Dispatch>, StoreError> {
        Ok(self.inner.lock().rows.get(&id).map(|d| Dispatch::clone(d)))
    }

    async fn list(&self, f: ListFilter) -> Result<Vec<Dispatch>, StoreError> {
        check_limit(f.limit)?;
        let inner = self.inner.lock();
        let mut rows: Vec<&Dispatch> = inner
            .rows
            .values()
            .map(|d| &**d)
            .filter(|d| f.broker.as_ref().is_none_or(|b| *b == d.broker))
            .filter(|d| f.state.is_none_or(|s| s == d.state))
            .filter(|d| f.after.is_none_or(|a| d.id > a))
            .collect();
        rows.sort_by_key(|d| d.id);
        Ok(rows.into_iter().take(f.limit as usize).cloned().collect())
    }

    async fn sweep(&self, p: SweepParams) -> Result<SweepReport, StoreError> {
        p.validate()?;
        let now = p.now.unwrap_or_else(system_now);
        let limit = p.limit as usize;
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut report = SweepReport {
            swept: true,
            ..SweepReport::default()
        };
        let mut ids: Vec<DispatchId> = inner.active.values().flatten().map(|(_, id)| *id).collect();
        ids.sort();
        let mut claimable = BTreeSet::new();
        for id in ids {
            let Some(row) = inner.rows.get_mut(&id) else {
                continue;
            };
            let next = if report.expired.len() < limit {
                fsm::apply(row, Event::Expire { now }).ok()
            } else {
                None
            };
            let next = next.or_else(|| {
                if report.exhausted.len() < limit {
                    fsm::apply(row, Event::Exhaust { now }).ok()
                } else {
                    None
                }
            });
            match next {
                Some(next) => {
                    match next.failure {
                        Some(fsm::FailReason::Expired) => report.expired.push(id),
                        _ => report.exhausted.push(id),
                    }
                    let next = Arc::new(next);
                    *row = Arc::clone(&next);
                    retire(inner, &next);
                }
                None => {
                    if row.state == fsm::DispatchState::Pending {
                        report.pending += 1;
                        report.oldest_pending = Some(
                            report
                                .oldest_pending
                                .map_or(row.created_at, |t| t.min(row.created_at)),
                        );
                    }
                    if row.is_claimable(now) {
                        claimable.insert(row.broker.clone());
                    }
                }
            }
        }
        report.claimable = claimable.into_iter().take(limit).collect();
        let cutoff = now.saturating_sub(p.retention);
        let mut purge: Vec<DispatchId> = inner
            .rows
            .values()
            .filter(|d| d.state.is_terminal() && d.updated_at < cutoff)
            .map(|d| d.id)
            .collect();
        purge.sort();
        purge.truncate(limit);
        for id in purge {
            if let Some(d) = inner.rows.remove(&id) {
                if let Some(k) = &d.idempotency_key {
                    inner.keys.remove(k);
                }
                report.purged += 1;
            }
        }
        inner.active.retain(|_, set| !set.is_empty());
        Ok(report)
    }

    async fn connect(&self, p: ConnectParams) -> Result<ConnectOutcome, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        p.check_connected_at(now)?;
        let mut inner = self.inner.lock();
        let current = inner.affinity.get(&p.broker);
        let connected_at = p.connected_at.unwrap_or(now);
        match Affinity::decide_connect(current, &p.broker, &p.node, &p.session, connected_at, now) {
            ConnectDecision::Claim(a) => {
                inner.affinity.insert(p.broker, a.clone());
                Ok(ConnectOutcome::Claimed(a))
            }
            ConnectDecision::Superseded => {
                Ok(ConnectOutcome::Superseded(current.cloned().ok_or_else(
                    || StoreError::invalid("superseded without a row"),
                )?))
            }
        }
    }

    async fn disconnect(&self, p: DisconnectParams) -> Result<bool, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        let mut inner = self.inner.lock();
        match inner.affinity.get_mut(&p.broker) {
            Some(a) if a.is_held_by(&p.node, &p.session) => {
                a.node = None;
                a.last_seen = now;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn touch(&self, p: TouchParams) -> Result<bool, StoreError> {
        let now = p.now.unwrap_or_else(system_now);
        let mut inner = self.inner.lock();
        match inner.affinity.get_mut(&p.broker) {
            Some(a) if a.is_held_by(&p.node, &p.session) => {
                a.last_seen = a.last_seen.max(now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn affinity(&self, broker: &BrokerId) -> Result<Option<Affinity>, StoreError> {
        Ok(self.inner.lock().affinity.get(broker).cloned())
    }
}

#[cfg(test)]
mod conformance {
    crate::store_conformance_tests!(async { std::sync::Arc::new(super::MemoryStore::new()) });
}
