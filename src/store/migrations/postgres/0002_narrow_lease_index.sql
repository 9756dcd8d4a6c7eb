-- The exhaust step only looks for held rows on their last attempt (`attempt >= max_attempts`);
-- rows with attempts left whose lease lapsed are claimed again, not swept. Indexing only those
-- keeps a first claim (and its finish) from inserting an entry into this index for every row
-- that still has attempts left.
DROP INDEX {schema}.dispatch_sweep_lease;
CREATE INDEX dispatch_sweep_lease ON {schema}.dispatch (lease_until)
    WHERE state = 'in_progress' AND attempt >= max_attempts;
