-- Conveyor schema for SQLite. Times are UNIX seconds (REAL), JSON is TEXT.

CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY,      -- FIFO order within a priority
    id                  TEXT    NOT NULL UNIQUE,
    queue               TEXT    NOT NULL,
    job_type            TEXT    NOT NULL,
    state               TEXT    NOT NULL,
    priority            INTEGER NOT NULL,
    payload             TEXT    NOT NULL,
    result              TEXT,
    error               TEXT,
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_retries         INTEGER NOT NULL,
    timeout_ms          INTEGER,
    run_at              REAL    NOT NULL,
    lease_token         TEXT,
    worker_id           TEXT,
    idempotency_key     TEXT,
    workflow_id         TEXT,
    cancel_requested_at REAL,
    lost_count          INTEGER NOT NULL DEFAULT 0,
    created_by          TEXT,
    metadata            TEXT    NOT NULL DEFAULT '{}',
    has_children        INTEGER NOT NULL DEFAULT 0,
    created_at          REAL    NOT NULL,
    started_at          REAL,
    completed_at        REAL,
    updated_at          REAL    NOT NULL
);

-- The hot path: ready jobs in fetch order. Partial, so finished jobs cost nothing.
CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, seq) WHERE state = 'pending';
-- Unique jobs: one active job per idempotency key.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL AND state IN ('blocked', 'pending', 'running');
CREATE INDEX jobs_running ON jobs (worker_id) WHERE state = 'running';
CREATE INDEX jobs_state_created ON jobs (state, created_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE job_executions (
    id          INTEGER PRIMARY KEY,
    job_id      TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    worker_id   TEXT,
    started_at  REAL    NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    error       TEXT
);
CREATE INDEX job_executions_job ON job_executions (job_id, attempt);

CREATE TABLE job_dependencies (
    child_id  TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    PRIMARY KEY (child_id, parent_id)
) WITHOUT ROWID;
CREATE INDEX job_dependencies_parent ON job_dependencies (parent_id);

CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT    NOT NULL,
    job_types    TEXT    NOT NULL,
    concurrency  INTEGER NOT NULL,
    started_at   REAL    NOT NULL,
    heartbeat_at REAL    NOT NULL,
    state        TEXT    NOT NULL,
    jobs_running INTEGER NOT NULL DEFAULT 0
);

-- The outbox: every transition appends here in its own transaction.
-- AUTOINCREMENT: ids never go back, so a reader's cursor never skips an event.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    type       TEXT NOT NULL,
    job_id     TEXT,
    data       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX events_created ON events (created_at);

CREATE VIEW dead_letter AS
    SELECT id, queue, job_type, error, attempt, lost_count, completed_at AS failed_at
    FROM jobs WHERE state = 'failed';
