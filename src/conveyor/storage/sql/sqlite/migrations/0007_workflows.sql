-- Workflows: a DAG of named steps, each step a job (jobs.workflow_id, jobs.step_name;
-- edges in job_dependencies). Step counts are read from the jobs, not stored.
CREATE TABLE workflows (
    id                  TEXT PRIMARY KEY,
    name                TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    on_failure          TEXT    NOT NULL,
    total_steps         INTEGER NOT NULL,
    idempotency_key     TEXT UNIQUE,
    metadata            TEXT    NOT NULL DEFAULT '{}',
    created_by          TEXT,
    cancel_requested_at REAL,
    created_at          REAL    NOT NULL,
    finished_at         REAL,
    updated_at          REAL    NOT NULL
);
CREATE INDEX workflows_created ON workflows (created_at);
CREATE INDEX workflows_status ON workflows (status, created_at);

ALTER TABLE jobs ADD COLUMN step_name TEXT;
CREATE INDEX jobs_workflow ON jobs (workflow_id, state) WHERE workflow_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_workflow_step ON jobs (workflow_id, step_name)
    WHERE workflow_id IS NOT NULL;
