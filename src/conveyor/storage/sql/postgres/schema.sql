-- The PostgreSQL schema that migrations/ produce, as pg_dump prints it (schema
-- conveyor, no owners). A test checks that a fresh migrate equals this file.

CREATE SCHEMA conveyor;

CREATE TABLE conveyor.api_keys (
    id text NOT NULL,
    name text NOT NULL,
    scope text NOT NULL,
    key_hash text NOT NULL,
    prefix text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    revoked_at timestamp with time zone
);

CREATE TABLE conveyor.job_types (
    job_type text NOT NULL,
    queue text NOT NULL,
    priority smallint NOT NULL,
    max_retries integer NOT NULL,
    timeout_ms integer,
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE conveyor.jobs (
    id text NOT NULL,
    seq bigint NOT NULL,
    queue text NOT NULL,
    job_type text NOT NULL,
    state text NOT NULL,
    priority smallint NOT NULL,
    payload jsonb NOT NULL,
    result jsonb,
    error text,
    attempt integer DEFAULT 0 NOT NULL,
    max_retries integer NOT NULL,
    timeout_ms integer,
    run_at timestamp with time zone NOT NULL,
    lease_token text,
    worker_id text,
    idempotency_key text,
    workflow_id text,
    cancel_requested_at timestamp with time zone,
    lost_count integer DEFAULT 0 NOT NULL,
    created_by text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    has_children boolean DEFAULT false NOT NULL,
    created_at timestamp with time zone NOT NULL,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    updated_at timestamp with time zone NOT NULL,
    step_name text,
    CONSTRAINT jobs_state_check CHECK ((state = ANY (ARRAY['blocked'::text, 'pending'::text, 'running'::text, 'completed'::text, 'failed'::text, 'cancelled'::text])))
)
WITH (autovacuum_vacuum_scale_factor='0.01', autovacuum_analyze_scale_factor='0.02', fillfactor='80');

CREATE VIEW conveyor.dead_letter AS
 SELECT jobs.id,
    jobs.queue,
    jobs.job_type,
    jobs.error,
    jobs.attempt,
    jobs.lost_count,
    jobs.completed_at AS failed_at
   FROM conveyor.jobs
  WHERE (jobs.state = 'failed'::text);

CREATE TABLE conveyor.events (
    id bigint NOT NULL,
    type text NOT NULL,
    job_id text,
    data jsonb NOT NULL,
    created_at timestamp with time zone NOT NULL,
    txid xid8 DEFAULT pg_current_xact_id() NOT NULL
);

ALTER TABLE conveyor.events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE conveyor.job_dependencies (
    child_id text NOT NULL,
    parent_id text NOT NULL
);

CREATE TABLE conveyor.job_executions (
    id bigint NOT NULL,
    job_id text NOT NULL,
    attempt integer NOT NULL,
    worker_id text,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone,
    outcome text,
    error text
);

ALTER TABLE conveyor.job_executions ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.job_executions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE conveyor.jobs ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.jobs_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE conveyor.outbox_consumers (
    name text NOT NULL,
    "position" bigint DEFAULT 0 NOT NULL,
    owner text,
    lease_expires_at timestamp with time zone,
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE conveyor.webhook_deliveries (
    id bigint NOT NULL,
    webhook_id text NOT NULL,
    delivery_id text NOT NULL,
    event_id bigint NOT NULL,
    event_type text NOT NULL,
    job_id text,
    attempt integer NOT NULL,
    outcome text NOT NULL,
    status_code integer,
    error text,
    duration_ms double precision NOT NULL,
    created_at timestamp with time zone NOT NULL
);

ALTER TABLE conveyor.webhook_deliveries ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.webhook_deliveries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE conveyor.webhooks (
    id text NOT NULL,
    url text NOT NULL,
    event_types jsonb NOT NULL,
    secret text NOT NULL,
    state text NOT NULL,
    consecutive_failures integer DEFAULT 0 NOT NULL,
    created_at timestamp with time zone NOT NULL,
    disabled_at timestamp with time zone,
    disabled_reason text,
    failing_since timestamp with time zone,
    last_delivered_at timestamp with time zone,
    replay_after bigint
);

CREATE TABLE conveyor.workflows (
    id text NOT NULL,
    name text NOT NULL,
    status text NOT NULL,
    on_failure text NOT NULL,
    total_steps integer NOT NULL,
    idempotency_key text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_by text,
    cancel_requested_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone,
    updated_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.workflows
    ADD CONSTRAINT workflows_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.workflows
    ADD CONSTRAINT workflows_idempotency_key_key UNIQUE (idempotency_key);

CREATE INDEX workflows_created ON conveyor.workflows USING btree (created_at);

CREATE INDEX workflows_status ON conveyor.workflows USING btree (status, created_at);

CREATE INDEX jobs_workflow ON conveyor.jobs USING btree (workflow_id, state) WHERE (workflow_id IS NOT NULL);

CREATE UNIQUE INDEX jobs_workflow_step ON conveyor.jobs USING btree (workflow_id, step_name) WHERE (workflow_id IS NOT NULL);

CREATE TABLE conveyor.workers (
    id text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    queues jsonb NOT NULL,
    job_types jsonb NOT NULL,
    concurrency integer NOT NULL,
    started_at timestamp with time zone NOT NULL,
    heartbeat_at timestamp with time zone NOT NULL,
    state text NOT NULL,
    jobs_running integer DEFAULT 0 NOT NULL
);

ALTER TABLE ONLY conveyor.api_keys
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);

ALTER TABLE ONLY conveyor.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.job_dependencies
    ADD CONSTRAINT job_dependencies_pkey PRIMARY KEY (child_id, parent_id);

ALTER TABLE ONLY conveyor.job_executions
    ADD CONSTRAINT job_executions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.outbox_consumers
    ADD CONSTRAINT outbox_consumers_pkey PRIMARY KEY (name);

ALTER TABLE ONLY conveyor.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.webhooks
    ADD CONSTRAINT webhooks_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.workers
    ADD CONSTRAINT workers_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.job_types
    ADD CONSTRAINT job_types_pkey PRIMARY KEY (job_type);

CREATE INDEX events_created ON conveyor.events USING brin (created_at);

CREATE INDEX events_order ON conveyor.events USING btree (txid, id);

CREATE INDEX job_dependencies_parent ON conveyor.job_dependencies USING btree (parent_id);

CREATE INDEX job_executions_job ON conveyor.job_executions USING btree (job_id, attempt);

CREATE INDEX jobs_created ON conveyor.jobs USING btree (created_at);

CREATE INDEX jobs_finished ON conveyor.jobs USING btree (completed_at) WHERE (completed_at IS NOT NULL);

CREATE UNIQUE INDEX jobs_idempotency ON conveyor.jobs USING btree (idempotency_key) WHERE (idempotency_key IS NOT NULL);

CREATE INDEX jobs_ready ON conveyor.jobs USING btree (priority DESC, run_at, seq) WHERE (state = 'pending'::text);

CREATE INDEX jobs_running ON conveyor.jobs USING btree (worker_id) WHERE (state = 'running'::text);

CREATE INDEX jobs_state_created ON conveyor.jobs USING btree (state, created_at);

CREATE INDEX webhook_deliveries_hook ON conveyor.webhook_deliveries USING btree (webhook_id, id);

ALTER TABLE ONLY conveyor.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_webhook_id_fkey FOREIGN KEY (webhook_id) REFERENCES conveyor.webhooks(id) ON DELETE CASCADE;

CREATE TABLE conveyor.locks (
    key text NOT NULL,
    owner text,
    token bigint NOT NULL,
    acquired_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.locks
    ADD CONSTRAINT locks_pkey PRIMARY KEY (key);
-- 0008_schedules: cron schedules (docs/schedules.md)
CREATE TABLE conveyor.job_schedules (
    id text NOT NULL,
    name text NOT NULL,
    cron text NOT NULL,
    timezone text NOT NULL,
    job_type text NOT NULL,
    payload jsonb NOT NULL,
    queue text NOT NULL,
    priority smallint NOT NULL,
    max_retries integer NOT NULL,
    timeout_ms integer,
    misfire text NOT NULL,
    catch_up_max integer NOT NULL,
    jitter double precision NOT NULL,
    overlap text NOT NULL,
    state text NOT NULL,
    source text NOT NULL,
    next_fire_at timestamp with time zone,
    last_fired_at timestamp with time zone,
    last_job_id text,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.job_schedules
    ADD CONSTRAINT job_schedules_pkey PRIMARY KEY (id);

ALTER TABLE ONLY conveyor.job_schedules
    ADD CONSTRAINT job_schedules_name_key UNIQUE (name);

CREATE INDEX job_schedules_due ON conveyor.job_schedules USING btree (next_fire_at) WHERE (state = 'active'::text);

CREATE TABLE conveyor.schedule_fires (
    schedule_id text NOT NULL,
    fire_at timestamp with time zone NOT NULL,
    job_id text,
    fired_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.schedule_fires
    ADD CONSTRAINT schedule_fires_pkey PRIMARY KEY (schedule_id, fire_at);

ALTER TABLE ONLY conveyor.schedule_fires
    ADD CONSTRAINT schedule_fires_schedule_id_fkey FOREIGN KEY (schedule_id) REFERENCES conveyor.job_schedules(id) ON DELETE CASCADE;

ALTER TABLE conveyor.jobs ADD COLUMN schedule_id text;

CREATE INDEX jobs_schedule ON conveyor.jobs USING btree (schedule_id) WHERE (schedule_id IS NOT NULL);
-- Durable steps, checkpoints and healed payloads (migration 0011).
ALTER TABLE conveyor.jobs ADD COLUMN checkpoint jsonb;
ALTER TABLE conveyor.jobs ADD COLUMN payload_version integer DEFAULT 1 NOT NULL;
ALTER TABLE conveyor.job_executions ADD COLUMN payload_version integer DEFAULT 1 NOT NULL;

CREATE TABLE conveyor.job_steps (
    job_id text NOT NULL,
    name text NOT NULL,
    result jsonb NOT NULL,
    attempt integer NOT NULL,
    created_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.job_steps
    ADD CONSTRAINT job_steps_pkey PRIMARY KEY (job_id, name);
-- The secrets vault and key lifecycle (migration 0012).
CREATE TABLE conveyor.secrets (
    name text NOT NULL,
    version integer NOT NULL,
    key_id text NOT NULL,
    ciphertext bytea NOT NULL,
    created_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.secrets
    ADD CONSTRAINT secrets_pkey PRIMARY KEY (name, version);

ALTER TABLE conveyor.api_keys ADD COLUMN expires_at timestamp with time zone;
ALTER TABLE conveyor.api_keys ADD COLUMN last_used_at timestamp with time zone;
