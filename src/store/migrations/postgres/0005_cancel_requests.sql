-- Cancel requests. A running dispatch that someone cancels keeps running, marked by a
-- `failure` while `in_progress` (the `cancelled` it ends with unless its holder completes it):
-- it is never claimed again. When the holder dies instead, the sweeper fails it once its lease
-- lapses; this index finds those few rows without a scan.
CREATE INDEX dispatch_cancel_requested ON {schema}.dispatch (lease_until)
    WHERE state = 'in_progress' AND failure IS NOT NULL;
