//! Ordering keys: which of a broker's rows a claim may take, and in which order.
//!
//! Rows are claimed oldest first, by `(created_at, id)`. A row with an ordering key
//! ([`Dispatch::key`]) is also **first in line for its key**: no other row of the same broker and
//! key
//!
//! 1. is held (in progress with a live lease), whatever its age — one at a time; or
//! 2. is older and could still run (not terminal and not [dead](Dispatch::is_dead)) — insertion
//!    order.
//!
//! A retried row keeps its place: while it waits for its `available_at`, the later rows of its
//! key wait behind it. A row that can never run again (past its deadline, or out of executions
//! with its lease gone) stops holding up the rows behind it at once, before the sweeper fails it.
//!
//! Every store's claim applies exactly this rule (the memory store calls [`claim_order`]; the SQL
//! stores encode it in the claim's `WHERE` clause), and the conformance suite and the
//! differential test check that they agree.

use super::dispatch::{Dispatch, DispatchId, Timestamp};

/// Whether `other` keeps `row` (of the same broker) from being claimed at `now` because of their
/// shared ordering key.
pub fn blocks(other: &Dispatch, row: &Dispatch, now: Timestamp) -> bool {
    let same_key = row.key.is_some() && other.key == row.key && other.broker == row.broker;
    if !same_key || other.id == row.id || other.state.is_terminal() {
        return false;
    }
    let older = (other.created_at, other.id) < (row.created_at, row.id);
    other.is_held(now) || (older && !other.is_dead(now))
}

/// The ids a claim of one broker's rows at `now` takes, at most `limit`, in claim order.
///
/// `rows` are the broker's non-terminal rows in any order. The result is what a claim that
/// takes the rows one at a time would take: each claimed row is held from then on, so it blocks
/// the rest of its key.
pub fn claim_order(rows: &[&Dispatch], now: Timestamp, limit: usize) -> Vec<DispatchId> {
    let mut sorted: Vec<&Dispatch> = rows.to_vec();
    sorted.sort_by_key(|d| (d.created_at, d.id));
    let mut taken: Vec<DispatchId> = Vec::new();
    for row in &sorted {
        if taken.len() >= limit {
            break;
        }
        if !row.is_claimable(now) {
            continue;
        }
        // A row this very claim took is older and claimable, hence blocks the rest of its key
        // by rule 2 already.
        if row.key.is_none() || !sorted.iter().any(|o| blocks(o, row, now)) {
            taken.push(row.id);
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{BrokerId, DispatchState, NodeId};
    use std::time::Duration;
    use uuid::Uuid;

    fn row(n: u128, key: Option<&str>) -> Dispatch {
        let t = Timestamp::from_micros(n as i64);
        Dispatch {
            id: DispatchId::from_uuid(Uuid::from_u128(n)),
            broker: BrokerId::new("b").unwrap(),
            op: "op".into(),
            args: serde_json::Value::Null,
            state: DispatchState::Pending,
            attempt: 0,
            max_attempts: 3,
            claimed_by: None,
            lease_until: None,
            available_at: t,
            deadline: None,
            result: None,
            failure: None,
            progress: None,
            idempotency_key: None,
            key: key.map(str::to_owned),
            released: 0,
            created_at: t,
            updated_at: t,
        }
    }

    const NOW: Timestamp = Timestamp::from_micros(1_000);

    fn ids(v: &[u128]) -> Vec<DispatchId> {
        v.iter()
            .map(|n| DispatchId::from_uuid(Uuid::from_u128(*n)))
            .collect()
    }

    #[test]
    fn one_row_per_key_in_insertion_order_unkeyed_rows_free() {
        let rows = [
            row(1, Some("a")),
            row(2, Some("a")),
            row(3, None),
            row(4, Some("b")),
            row(5, None),
        ];
        let refs: Vec<&Dispatch> = rows.iter().collect();
        assert_eq!(claim_order(&refs, NOW, 10), ids(&[1, 3, 4, 5]));
        assert_eq!(claim_order(&refs, NOW, 2), ids(&[1, 3]));
    }

    #[test]
    fn a_held_row_blocks_its_key_even_when_younger() {
        let mut held = row(9, Some("a"));
        held.state = DispatchState::InProgress;
        held.attempt = 1;
        held.claimed_by = Some(NodeId::new("n").unwrap());
        held.lease_until = Some(NOW.saturating_add(Duration::from_secs(1)));
        let rows = [row(1, Some("a")), held.clone()];
        let refs: Vec<&Dispatch> = rows.iter().collect();
        assert!(claim_order(&refs, NOW, 10).is_empty());
        // Once its lease ran out it no longer holds the key; the older row goes first again.
        let later = held.lease_until.unwrap();
        assert_eq!(claim_order(&refs, later, 10), ids(&[1]));
    }

    #[test]
    fn a_waiting_retry_keeps_its_place_and_a_dead_row_gives_it_up() {
        let mut retried = row(1, Some("a"));
        retried.attempt = 1;
        retried.available_at = NOW.saturating_add(Duration::from_secs(5));
        let rows = [retried.clone(), row(2, Some("a"))];
        let refs: Vec<&Dispatch> = rows.iter().collect();
        assert!(claim_order(&refs, NOW, 10).is_empty());
        let mut expired = retried;
        expired.deadline = Some(NOW);
        let rows = [expired, row(2, Some("a"))];
        let refs: Vec<&Dispatch> = rows.iter().collect();
        assert_eq!(claim_order(&refs, NOW, 10), ids(&[2]));
    }
}
