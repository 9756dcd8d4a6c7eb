-- Most dispatches have no idempotency key, and a NULL key can never conflict, yet the UNIQUE
-- constraint's index took an entry for every row version: each claim and each finish (neither
-- can be a HOT update, since `state` is in the partial indexes' predicates) wrote one more
-- index entry per dispatch. A unique index over the rows with a key enforces the same rule.
-- `ON CONFLICT DO NOTHING` (no target) arbitrates on it like on the constraint, and the
-- lookup `idempotency_key = $2` implies `IS NOT NULL`, so the planner still uses it.
ALTER TABLE {schema}.dispatch DROP CONSTRAINT dispatch_idempotency_key_key;
CREATE UNIQUE INDEX dispatch_idempotency_key ON {schema}.dispatch (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
