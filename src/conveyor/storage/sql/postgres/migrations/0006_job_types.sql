-- The job types workers serve, with their registered defaults: a process without
-- the handlers (conveyor api) submits with the same defaults and refuses types
-- no one serves.
CREATE TABLE conveyor.job_types (
    job_type text PRIMARY KEY,
    queue text NOT NULL,
    priority smallint NOT NULL,
    max_retries integer NOT NULL,
    timeout_ms integer,
    updated_at timestamp with time zone NOT NULL
);
