-- The job types workers serve, with their registered defaults: a process without
-- the handlers (conveyor api) submits with the same defaults and refuses types
-- no one serves.
CREATE TABLE job_types (
    job_type    TEXT PRIMARY KEY,
    queue       TEXT    NOT NULL,
    priority    INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    timeout_ms  INTEGER,
    updated_at  REAL    NOT NULL
);
