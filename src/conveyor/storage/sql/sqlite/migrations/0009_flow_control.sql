-- Flow control (docs/flow_control.md): per-key concurrency and rate limits,
-- pausable queues with their own concurrency limit, and capability routing.

-- '' = no key: the job type's limits count all its jobs together.
ALTER TABLE jobs ADD COLUMN concurrency_key TEXT NOT NULL DEFAULT '';
-- JSON object of name -> value a worker must offer; NULL = any worker.
ALTER TABLE jobs ADD COLUMN requires TEXT;
ALTER TABLE workers ADD COLUMN capabilities TEXT NOT NULL DEFAULT '{}';

-- The limited fetch walks keys and takes each key's next jobs (and a type's
-- keyless ones, under key '') through this index.
CREATE INDEX jobs_flow_pending ON jobs (job_type, concurrency_key, priority DESC, run_at, seq)
    WHERE state = 'pending';
CREATE INDEX jobs_flow_running ON jobs (job_type, concurrency_key)
    WHERE state = 'running' AND concurrency_key <> '';

-- Limits as registered in code (@app.job(concurrency_limit=..., rate_limit=...)):
-- workers record them at start, so every process enforces the same numbers.
CREATE TABLE flow_limits (
    job_type          TEXT PRIMARY KEY,
    concurrency_key   TEXT,      -- template, e.g. 'tenant:{tenant_id}'
    concurrency_limit INTEGER,   -- max running per key; NULL = none
    rate_limit        INTEGER,   -- max started per window per key; NULL = none
    rate_window       REAL,      -- seconds
    requires          TEXT,      -- JSON object; NULL = none
    cursor_key        TEXT NOT NULL DEFAULT '',  -- round robin: the key served last
    updated_at        REAL NOT NULL
);

-- Run-time queue controls (REST/CLI pause, resume, concurrency limit).
CREATE TABLE queue_settings (
    queue             TEXT PRIMARY KEY,
    paused            INTEGER NOT NULL DEFAULT 0,
    concurrency_limit INTEGER,
    updated_at        REAL NOT NULL
);

-- Fixed rate windows: starts counted per (job type, key) in the current window.
CREATE TABLE flow_windows (
    job_type        TEXT NOT NULL,
    concurrency_key TEXT NOT NULL,
    window_start    REAL NOT NULL,
    started         INTEGER NOT NULL,
    PRIMARY KEY (job_type, concurrency_key)
) WITHOUT ROWID;
