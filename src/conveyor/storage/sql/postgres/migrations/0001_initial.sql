-- Conveyor schema for PostgreSQL. Everything lives in schema "conveyor", so an
-- application database can host it beside its own tables (transactional enqueue).

CREATE SCHEMA IF NOT EXISTS conveyor;

CREATE TABLE conveyor.jobs (
    id                  text PRIMARY KEY,
    seq                 bigint GENERATED ALWAYS AS IDENTITY,  -- FIFO within a priority
    queue               text        NOT NULL,
    job_type            text        NOT NULL,
    state               text        NOT NULL CHECK (state IN
                          ('blocked', 'pending', 'running', 'completed', 'failed', 'cancelled')),
    priority            smallint    NOT NULL,
    payload             jsonb       NOT NULL,
    result              jsonb,
    error               text,
    attempt             integer     NOT NULL DEFAULT 0,
    max_retries         integer     NOT NULL,
    timeout_ms          integer,
    run_at              timestamptz NOT NULL,
    lease_token         text,
    worker_id           text,
    idempotency_key     text,
    workflow_id         text,
    cancel_requested_at timestamptz,
    lost_count          integer     NOT NULL DEFAULT 0,
    created_by          text,
    metadata            jsonb       NOT NULL DEFAULT '{}',
    has_children        boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL,
    started_at          timestamptz,
    completed_at        timestamptz,
    updated_at          timestamptz NOT NULL
);

-- The hot path: ready jobs in fetch order. Partial, so finished rows cost nothing.
CREATE INDEX jobs_ready ON conveyor.jobs (priority DESC, run_at, seq) WHERE state = 'pending';
-- Unique jobs: one active job per idempotency key (safe for bulk inserts, no advisory locks).
CREATE UNIQUE INDEX jobs_idempotency ON conveyor.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state IN ('blocked', 'pending', 'running');
CREATE INDEX jobs_running ON conveyor.jobs (worker_id) WHERE state = 'running';
CREATE INDEX jobs_state_created ON conveyor.jobs (state, created_at);
CREATE INDEX jobs_created ON conveyor.jobs (created_at);
CREATE INDEX jobs_finished ON conveyor.jobs (completed_at) WHERE completed_at IS NOT NULL;

-- A hot queue table churns: vacuum it early and often (see docs/postgres.md).
ALTER TABLE conveyor.jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 80
);

CREATE TABLE conveyor.job_executions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      text        NOT NULL,
    attempt     integer     NOT NULL,
    worker_id   text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    outcome     text,
    error       text
);
CREATE INDEX job_executions_job ON conveyor.job_executions (job_id, attempt);

CREATE TABLE conveyor.job_dependencies (
    child_id  text NOT NULL,
    parent_id text NOT NULL,
    PRIMARY KEY (child_id, parent_id)
);
CREATE INDEX job_dependencies_parent ON conveyor.job_dependencies (parent_id);

CREATE TABLE conveyor.workers (
    id           text PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    queues       jsonb       NOT NULL,
    job_types    jsonb       NOT NULL,
    concurrency  integer     NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    state        text        NOT NULL,
    jobs_running integer     NOT NULL DEFAULT 0
);

-- The outbox. Ids come from one sequence, so they only go up.
CREATE TABLE conveyor.events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type       text        NOT NULL,
    job_id     text,
    data       jsonb       NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX events_created ON conveyor.events (created_at);

CREATE TABLE conveyor.api_keys (
    id         text PRIMARY KEY,
    name       text        NOT NULL,
    scope      text        NOT NULL,
    key_hash   text        NOT NULL UNIQUE,
    prefix     text        NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);

CREATE VIEW conveyor.dead_letter AS
    SELECT id, queue, job_type, error, attempt, lost_count, completed_at AS failed_at
    FROM conveyor.jobs WHERE state = 'failed';
