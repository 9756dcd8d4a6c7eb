-- Ordering keys and hand-backs.
-- `key`: dispatches of one broker with the same key run one at a time, in insertion order; the
-- claim looks up the other live rows of a key through `dispatch_key`.
-- `released`: claims handed back unexecuted. `attempt` stays the fencing token (never reused);
-- `attempt - released` is the number of executions begun, which `max_attempts` bounds.
ALTER TABLE dispatch ADD COLUMN key TEXT;
ALTER TABLE dispatch ADD COLUMN released INTEGER NOT NULL DEFAULT 0;

CREATE INDEX dispatch_key ON dispatch (broker, key, created_at, id)
    WHERE key IS NOT NULL AND state IN ('pending', 'in_progress');

-- The exhaust step (held rows with no executions left: `attempt - released >= max_attempts`)
-- keeps the lease index of migration 2, whose predicate `attempt >= max_attempts` covers those
-- rows (released >= 0); the query states both terms, so the planner still picks that index.
