-- The first schema. Ids are compared byte by byte (COLLATE "C"), as the
-- embedded store orders its keys: job ids are UUIDv7, so id order is time
-- order, and a prefix scan is an index range.

CREATE TABLE tokens (
    id text COLLATE "C" PRIMARY KEY,
    -- Hex SHA-256 of the secret; the secret itself is never stored.
    secret_hash text NOT NULL,
    expires_at bigint NOT NULL,
    uses_left integer NOT NULL CHECK (uses_left >= 0),
    record jsonb NOT NULL
);

CREATE TABLE agents (
    id text COLLATE "C" PRIMARY KEY,
    revoked boolean NOT NULL,
    joined_at bigint NOT NULL,
    record jsonb NOT NULL
);

CREATE TABLE jobs (
    id text COLLATE "C" PRIMARY KEY,
    created_at_ms bigint NOT NULL,
    state text NOT NULL,
    requester text NOT NULL,
    command text NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX jobs_requester ON jobs (requester, id);
CREATE INDEX jobs_state ON jobs (state, id);

-- A job's short id (the last 12 hex digits of its id) names one job.
CREATE TABLE job_short (
    short text COLLATE "C" PRIMARY KEY,
    job_id text COLLATE "C" NOT NULL
);
CREATE INDEX job_short_job ON job_short (job_id);

-- No foreign key to jobs: a dispatch chunk may be written before or
-- without its job record (the embedded store allows it too).
CREATE TABLE targets (
    job_id text COLLATE "C" NOT NULL,
    agent text COLLATE "C" NOT NULL,
    state text NOT NULL,
    -- The agent's JobResult, protobuf-encoded, once it arrived.
    result bytea,
    reason text NOT NULL,
    dispatched_at bigint NOT NULL,
    PRIMARY KEY (job_id, agent)
);

-- One row: the current policy bundle.
CREATE TABLE policy (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL,
    record jsonb NOT NULL
);

-- The audit trail: hash-chained records by sequence number (contiguous:
-- the store checks each append against the newest under a lock), their
-- search index, and signed chain heads.
CREATE TABLE audit_log (
    seq bigint PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE audit_index (
    dim text COLLATE "C" NOT NULL,
    value text COLLATE "C" NOT NULL,
    time_ms bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (dim, value, time_ms, seq)
);
CREATE INDEX audit_index_seq ON audit_index (seq);
CREATE TABLE audit_heads (
    seq bigint PRIMARY KEY,
    record jsonb NOT NULL
);

-- What health evaluation announced per service or HOST/CHECK, and each
-- one's recent transitions.
CREATE TABLE health_state (
    name text COLLATE "C" PRIMARY KEY,
    record jsonb NOT NULL
);
CREATE TABLE health_transitions (
    name text COLLATE "C" NOT NULL,
    at_ms bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (name, at_ms)
);

-- Revoked operator and gateway certificates.
CREATE TABLE revocations (
    key text COLLATE "C" PRIMARY KEY,
    record jsonb NOT NULL
);
