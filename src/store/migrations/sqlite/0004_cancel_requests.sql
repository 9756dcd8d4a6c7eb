-- Cancel requests. A running dispatch that someone cancels keeps running, marked by
-- `failure_kind = 'cancelled'` while `in_progress`: it is never claimed again, and it ends
-- `failed: cancelled` unless its holder completes it. When the holder dies instead, the sweeper
-- fails it once its lease lapses; this index finds those few rows without a scan.
CREATE INDEX dispatch_cancel_requested ON dispatch (lease_until)
    WHERE state = 'in_progress' AND failure_kind = 'cancelled';
