-- Durable steps inside one job, checkpoints, and healed payloads.
-- A job's checkpoint (NULL: none) and the version of its payload: 1 as
-- submitted, +1 each time a heal before a retry replaced it.
ALTER TABLE conveyor.jobs ADD COLUMN checkpoint jsonb;
ALTER TABLE conveyor.jobs ADD COLUMN payload_version integer DEFAULT 1 NOT NULL;
-- Which payload version each attempt ran with.
ALTER TABLE conveyor.job_executions ADD COLUMN payload_version integer DEFAULT 1 NOT NULL;
-- The stored result of each completed durable step (ctx.step) of a job: kept
-- across attempts, deleted with the job.
CREATE TABLE conveyor.job_steps (
    job_id text NOT NULL,
    name text NOT NULL,
    result jsonb NOT NULL,
    attempt integer NOT NULL,
    created_at timestamp with time zone NOT NULL,
    CONSTRAINT job_steps_pkey PRIMARY KEY (job_id, name)
);
