-- The exhaust step only looks for held rows on their last attempt (`attempt >= max_attempts`);
-- rows with attempts left whose lease lapsed are claimed again, not swept. Indexing only those
-- keeps a first claim (and its finish) from writing and then deleting an entry of this index
-- for every row that still has attempts left.
DROP INDEX dispatch_lease;
CREATE INDEX dispatch_lease ON dispatch (lease_until)
    WHERE state = 'in_progress' AND attempt >= max_attempts;
