-- Cron schedules (docs/schedules.md). A schedule_fires row per fired instant,
-- unique per (schedule, instant) and written in the transaction of the job it
-- creates: however many schedulers run, an instant fires once.
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
