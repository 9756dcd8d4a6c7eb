-- Dispatches and broker affinity. Timestamps are INTEGER microseconds since the Unix epoch;
-- ids are the 16 bytes of the UUID v7, so `ORDER BY id` is creation order and matches the
-- ordering of `DispatchId`. JSON columns (args, result, progress) are TEXT.
CREATE TABLE dispatch (
    id              BLOB    NOT NULL UNIQUE,
    broker          TEXT    NOT NULL,
    op              TEXT    NOT NULL,
    args            TEXT    NOT NULL,
    state           TEXT    NOT NULL
                    CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    attempt         INTEGER NOT NULL,
    max_attempts    INTEGER NOT NULL CHECK (max_attempts >= 1),
    claimed_by      TEXT,
    lease_until     INTEGER,
    available_at    INTEGER NOT NULL,
    deadline        INTEGER,
    result          TEXT,
    failure_kind    TEXT,
    failure_message TEXT,
    progress        TEXT,
    idempotency_key TEXT    UNIQUE,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

-- The claim: one broker's live rows in claim order.
CREATE INDEX dispatch_claim ON dispatch (broker, created_at, id)
    WHERE state IN ('pending', 'in_progress');

-- The sweep's expire step: live rows with a deadline.
CREATE INDEX dispatch_deadline ON dispatch (deadline)
    WHERE state IN ('pending', 'in_progress') AND deadline IS NOT NULL;

-- The sweep's exhaust step: held rows by lease.
CREATE INDEX dispatch_lease ON dispatch (lease_until)
    WHERE state = 'in_progress';

-- The sweep's purge step: terminal rows by age.
CREATE INDEX dispatch_terminal ON dispatch (updated_at)
    WHERE state IN ('done', 'failed');

-- One row per broker; `node` is NULL after a release, the rest stays as the high-water mark.
CREATE TABLE affinity (
    broker       TEXT    NOT NULL PRIMARY KEY,
    node         TEXT,
    session      TEXT    NOT NULL,
    connected_at INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL
);
