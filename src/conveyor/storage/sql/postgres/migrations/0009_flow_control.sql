-- Flow control (docs/flow_control.md): per-key concurrency and rate limits,
-- pausable queues with their own concurrency limit, and capability routing.

-- '' = no key: the job type's limits count all its jobs together.
ALTER TABLE conveyor.jobs ADD COLUMN concurrency_key text NOT NULL DEFAULT '';
-- Object of name -> value a worker must offer; NULL = any worker.
ALTER TABLE conveyor.jobs ADD COLUMN requires jsonb;
ALTER TABLE conveyor.workers ADD COLUMN capabilities jsonb NOT NULL DEFAULT '{}'::jsonb;

CREATE INDEX jobs_flow_pending ON conveyor.jobs
    (job_type, concurrency_key, priority DESC, run_at, seq)
    WHERE state = 'pending' AND concurrency_key <> '';
CREATE INDEX jobs_flow_running ON conveyor.jobs (job_type, concurrency_key)
    WHERE state = 'running';

CREATE TABLE conveyor.flow_limits (
    job_type text PRIMARY KEY,
    concurrency_key text,
    concurrency_limit integer,
    rate_limit integer,
    rate_window double precision,
    requires jsonb,
    cursor_key text NOT NULL DEFAULT '',
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE conveyor.queue_settings (
    queue text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false,
    concurrency_limit integer,
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE conveyor.flow_windows (
    job_type text NOT NULL,
    concurrency_key text NOT NULL,
    window_start double precision NOT NULL,
    started integer NOT NULL,
    PRIMARY KEY (job_type, concurrency_key)
);
