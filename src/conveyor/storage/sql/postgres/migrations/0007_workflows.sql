-- Workflows: a DAG of named steps, each step a job (jobs.workflow_id, jobs.step_name;
-- edges in job_dependencies). Step counts are read from the jobs, not stored.
CREATE TABLE conveyor.workflows (
    id text PRIMARY KEY,
    name text NOT NULL,
    status text NOT NULL,
    on_failure text NOT NULL,
    total_steps integer NOT NULL,
    idempotency_key text UNIQUE,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_by text,
    cancel_requested_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone NOT NULL
);
CREATE INDEX workflows_created ON conveyor.workflows (created_at);
CREATE INDEX workflows_status ON conveyor.workflows (status, created_at);

ALTER TABLE conveyor.jobs ADD COLUMN step_name text;
CREATE INDEX jobs_workflow ON conveyor.jobs (workflow_id, state) WHERE workflow_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_workflow_step ON conveyor.jobs (workflow_id, step_name)
    WHERE workflow_id IS NOT NULL;
