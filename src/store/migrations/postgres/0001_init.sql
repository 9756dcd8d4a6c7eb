-- Dispatches and broker affinity. `{schema}` is replaced by the store's quoted schema name.
-- Timestamps are microseconds since the Unix epoch (BIGINT), like `fsm::Timestamp`.
-- Text that is compared or ordered uses COLLATE "C" so the database orders it byte-wise, exactly
-- like Rust's `String` (the memory store is the reference).

-- The database clock. Every statement whose caller passed no `now` reads it once, so leases and
-- deadlines are measured on one clock whatever the skew between nodes.
CREATE FUNCTION {schema}.clock_micros() RETURNS bigint
    LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;

-- `a + b` saturating at the largest bigint, like `Timestamp::saturating_add` (b >= 0).
CREATE FUNCTION {schema}.sat_add(a bigint, b bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT CASE WHEN a > 9223372036854775807 - b THEN 9223372036854775807 ELSE a + b END $$;

CREATE TABLE {schema}.dispatch (
    id              uuid PRIMARY KEY,
    broker          text COLLATE "C" NOT NULL,
    op              text NOT NULL,
    args            json NOT NULL,
    state           text NOT NULL
                    CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    attempt         bigint NOT NULL CHECK (attempt >= 0),
    max_attempts    bigint NOT NULL CHECK (max_attempts >= 1),
    claimed_by      text,
    lease_until     bigint,
    available_at    bigint NOT NULL,
    deadline        bigint,
    result          json,
    failure         json,
    progress        json,
    idempotency_key text COLLATE "C" UNIQUE,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL
);

-- The claim: one broker's live rows in claim order.
CREATE INDEX dispatch_claim ON {schema}.dispatch (broker, created_at, id)
    WHERE state IN ('pending', 'in_progress');
-- The sweep's expire step: live rows with a deadline.
CREATE INDEX dispatch_sweep_deadline ON {schema}.dispatch (deadline)
    WHERE state IN ('pending', 'in_progress') AND deadline IS NOT NULL;
-- The sweep's exhaust step: held rows by lease.
CREATE INDEX dispatch_sweep_lease ON {schema}.dispatch (lease_until)
    WHERE state = 'in_progress';
-- The sweep's purge step: terminal rows in id order (ids are time-ordered UUID v7s, so the oldest
-- come first and the scan stops early).
CREATE INDEX dispatch_sweep_purge ON {schema}.dispatch (id) INCLUDE (updated_at)
    WHERE state IN ('done', 'failed');
-- Listing one broker's rows page by page.
CREATE INDEX dispatch_list_broker ON {schema}.dispatch (broker, id);

CREATE TABLE {schema}.affinity (
    broker       text COLLATE "C" PRIMARY KEY,
    node         text COLLATE "C",
    session      text COLLATE "C" NOT NULL,
    connected_at bigint NOT NULL,
    last_seen    bigint NOT NULL
);
