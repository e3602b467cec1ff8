-- Durable steps inside one job, checkpoints, and healed payloads.
-- A job's checkpoint (JSON, NULL: none) and the version of its payload: 1 as
-- submitted, +1 each time a heal before a retry replaced it.
ALTER TABLE jobs ADD COLUMN checkpoint TEXT;
ALTER TABLE jobs ADD COLUMN payload_version INTEGER NOT NULL DEFAULT 1;
-- Which payload version each attempt ran with.
ALTER TABLE job_executions ADD COLUMN payload_version INTEGER NOT NULL DEFAULT 1;
-- The stored result of each completed durable step (ctx.step) of a job: kept
-- across attempts, deleted with the job.
CREATE TABLE job_steps (
    job_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    result     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
