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
    CONSTRAINT jobs_run_at_range CHECK (((run_at >= '0001-01-02 00:00:00+00'::timestamp with time zone) AND (run_at <= '9999-12-30 00:00:00+00'::timestamp with time zone))),
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
    replay_after bigint,
    secret_ref text
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
-- 0009_flow_control

ALTER TABLE conveyor.jobs ADD COLUMN concurrency_key text DEFAULT ''::text NOT NULL;

ALTER TABLE conveyor.jobs ADD COLUMN requires jsonb;

ALTER TABLE conveyor.workers ADD COLUMN capabilities jsonb DEFAULT '{}'::jsonb NOT NULL;

CREATE TABLE conveyor.flow_limits (
    job_type text NOT NULL,
    concurrency_key text,
    concurrency_limit integer,
    rate_limit integer,
    rate_window double precision,
    requires jsonb,
    cursor_key text DEFAULT ''::text NOT NULL,
    updated_at timestamp with time zone NOT NULL
);

CREATE TABLE conveyor.flow_flags (
    flag text NOT NULL
);

CREATE TABLE conveyor.flow_windows (
    job_type text NOT NULL,
    concurrency_key text NOT NULL,
    window_start double precision NOT NULL,
    started integer NOT NULL
);

CREATE TABLE conveyor.queue_settings (
    queue text NOT NULL,
    paused boolean DEFAULT false NOT NULL,
    concurrency_limit integer,
    updated_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY conveyor.flow_limits
    ADD CONSTRAINT flow_limits_pkey PRIMARY KEY (job_type);

ALTER TABLE ONLY conveyor.flow_flags
    ADD CONSTRAINT flow_flags_pkey PRIMARY KEY (flag);

ALTER TABLE ONLY conveyor.flow_windows
    ADD CONSTRAINT flow_windows_pkey PRIMARY KEY (job_type, concurrency_key);

ALTER TABLE ONLY conveyor.queue_settings
    ADD CONSTRAINT queue_settings_pkey PRIMARY KEY (queue);

CREATE INDEX jobs_flow_pending ON conveyor.jobs USING btree (job_type, concurrency_key, priority DESC, run_at, seq) WHERE ((state = 'pending'::text) AND (concurrency_key IS NOT NULL));

CREATE INDEX jobs_flow_running ON conveyor.jobs USING btree (job_type, concurrency_key) WHERE ((state = 'running'::text) AND (concurrency_key <> ''::text));

CREATE FUNCTION conveyor.flow_candidates(
    p_now timestamp with time zone, p_any_queue boolean, p_queues text[],
    p_any_type boolean, p_types text[], p_caps jsonb, p_limit integer)
RETURNS TABLE (rank integer, priority integer, walk integer, run_at timestamp with time zone,
               seq bigint, id text, queue text, job_type text, key text, queue_room integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lim record;
    k text;
    after_key text;
    phase integer;
    pos integer;
    gave integer;
    room integer;
    n_running integer;
    n_started integer;
    ws double precision;
    got integer;
    limited text[];
    keyed text[];
    open_type boolean;
    running_map jsonb;
    batch text[];
    idx integer;
    ks text[];
    rs integer[];
    ps integer[];
    done boolean;
    rec record;
    last_ord bigint;
    now_ts double precision := extract(epoch FROM p_now);
BEGIN
    PERFORM pg_advisory_xact_lock(7366427212);
    -- keyed: types whose keys come from a template; their keyless jobs (submitted
    -- before it) are not limited and come with the unlimited ones (no scan for them).
    SELECT coalesce(array_agg(l.job_type) FILTER (WHERE l.concurrency_key IS NULL), '{}'),
           coalesce(array_agg(l.job_type) FILTER (WHERE l.concurrency_key IS NOT NULL), '{}')
    INTO limited, keyed
    FROM conveyor.flow_limits l
    WHERE (l.concurrency_limit IS NOT NULL OR l.rate_limit IS NOT NULL)
      AND (p_any_type OR l.job_type = ANY(p_types));
    IF p_any_type THEN
        RETURN QUERY
            SELECT 1, j.priority::integer, 0, j.run_at, j.seq, j.id, j.queue, j.job_type,
                   ''::text, NULL::integer
            FROM conveyor.jobs j
            WHERE j.state = 'pending' AND j.run_at <= p_now
              AND (p_any_queue OR j.queue = ANY(p_queues))
              AND (p_any_type OR j.job_type = ANY(p_types))
              AND j.job_type <> ALL(limited) AND j.job_type <> ALL(keyed)
              AND j.queue NOT IN (SELECT s.queue FROM conveyor.queue_settings s WHERE s.paused)
              AND (j.requires IS NULL OR j.requires <@ p_caps)
            ORDER BY j.priority DESC, j.run_at, j.seq
            LIMIT p_limit;
    END IF;
    -- Keyless jobs of types with a key template: not limited (one index range each).
    RETURN QUERY
        SELECT 1, j.priority::integer, 0, j.run_at, j.seq, j.id, j.queue, j.job_type, ''::text,
               NULL::integer
        FROM unnest(keyed) AS t(name)
        CROSS JOIN LATERAL (
            SELECT * FROM conveyor.jobs j
            WHERE j.state = 'pending' AND j.job_type = t.name AND j.concurrency_key = ''
              AND j.run_at <= p_now AND (p_any_queue OR j.queue = ANY(p_queues))
              AND j.queue NOT IN (SELECT s.queue FROM conveyor.queue_settings s WHERE s.paused)
              AND (j.requires IS NULL OR j.requires <@ p_caps)
            ORDER BY j.priority DESC, j.run_at, j.seq
            LIMIT p_limit) j;
    -- Limited types, then (a worker names its types) those without limits, walked
    -- the same way with nothing to count: index ranges per type and key, never a
    -- scan past a limited backlog.
    FOR lim IN SELECT l.job_type, l.concurrency_key, l.concurrency_limit, l.rate_limit,
                      l.rate_window, l.cursor_key
               FROM conveyor.flow_limits l
               WHERE l.job_type = ANY(limited) OR l.job_type = ANY(keyed)
               UNION ALL
               SELECT t.name, NULL, NULL, NULL, NULL, ''
               FROM unnest(p_types) AS t(name)
               WHERE NOT p_any_type AND t.name <> ALL(limited) AND t.name <> ALL(keyed)
               ORDER BY 1 LOOP
        open_type := lim.concurrency_limit IS NULL AND lim.rate_limit IS NULL;
        ws := CASE WHEN lim.rate_limit IS NULL THEN NULL
                   ELSE floor(now_ts / lim.rate_window) * lim.rate_window END;
        pos := 0;
        gave := 0;
        running_map := '{}'::jsonb;  -- key -> its running jobs, read once per type
        IF lim.concurrency_limit IS NOT NULL THEN
            SELECT coalesce(jsonb_object_agg(r.concurrency_key, r.n), '{}'::jsonb)
            INTO running_map
            FROM (SELECT j.concurrency_key, count(*) AS n FROM conveyor.jobs j
                  WHERE j.state = 'running' AND j.job_type = lim.job_type
                  GROUP BY j.concurrency_key) r;
        END IF;
        -- 0: keyless jobs (types without a template); 1: keys after the cursor; 2: up to it
        phase := CASE WHEN lim.concurrency_key IS NULL THEN 0 ELSE 1 END;
        after_key := lim.cursor_key;
        batch := '{}';
        idx := 1;
        ks := '{}';
        rs := '{}';
        ps := '{}';
        done := false;
        LOOP
            IF phase = 0 THEN
                k := '';
                phase := 1;
            ELSE
                IF idx > cardinality(batch) THEN
                    -- The next 64 keys with pending jobs: a loose index scan, one
                    -- index probe per key however many jobs each holds.
                    SELECT coalesce(array_agg(w.key ORDER BY w.n), '{}') INTO batch
                    FROM (WITH RECURSIVE walk(key, n) AS (
                              SELECT (SELECT j.concurrency_key FROM conveyor.jobs j
                                      WHERE j.state = 'pending' AND j.job_type = lim.job_type
                                        AND j.concurrency_key > after_key
                                      ORDER BY j.concurrency_key LIMIT 1), 1
                              UNION ALL
                              SELECT (SELECT j.concurrency_key FROM conveyor.jobs j
                                      WHERE j.state = 'pending' AND j.job_type = lim.job_type
                                        AND j.concurrency_key > walk.key
                                      ORDER BY j.concurrency_key LIMIT 1), walk.n + 1
                              FROM walk WHERE walk.key IS NOT NULL AND walk.n < 64)
                          SELECT walk.key, walk.n FROM walk WHERE walk.key IS NOT NULL) w;
                    idx := 1;
                END IF;
                IF cardinality(batch) = 0 OR (phase = 2 AND batch[idx] > lim.cursor_key) THEN
                    IF phase = 2 OR lim.cursor_key = '' THEN
                        done := true;
                    ELSE
                        phase := 2;
                        after_key := '';
                        batch := '{}';
                        idx := 1;
                        CONTINUE;
                    END IF;
                ELSE
                    k := batch[idx];
                    idx := idx + 1;
                    after_key := k;
                END IF;
            END IF;
            IF NOT done THEN
            pos := pos + 1;
            n_running := coalesce((running_map ->> k)::integer, 0);
            n_started := 0;
            IF ws IS NOT NULL THEN
                SELECT w.started INTO n_started FROM conveyor.flow_windows w
                WHERE w.job_type = lim.job_type AND w.concurrency_key = k
                  AND w.window_start = ws;
                n_started := coalesce(n_started, 0);
            END IF;
            room := least(coalesce(lim.concurrency_limit - n_running, p_limit),
                          coalesce(lim.rate_limit - n_started, p_limit), p_limit);
            IF room > 0 THEN
                ks := ks || k;
                rs := rs || room;
                ps := ps || pos;
            END IF;
            END IF;
            -- The next jobs of the keys gathered so far, in one statement.
            IF cardinality(ks) > 0 AND (done OR cardinality(ks) >= p_limit - gave) THEN
                last_ord := NULL;
                FOR rec IN
                    SELECT x.ord, x.key AS kk, x.pos AS kpos, c.priority AS prio, c.run_at AS at,
                           c.seq AS s, c.id AS jid, c.queue AS q,
                           row_number() OVER (PARTITION BY x.ord
                                              ORDER BY c.priority DESC, c.run_at, c.seq) AS rn
                    FROM unnest(ks, rs, ps) WITH ORDINALITY AS x(key, room, pos, ord)
                    CROSS JOIN LATERAL (
                        SELECT j.priority, j.run_at, j.seq, j.id, j.queue FROM conveyor.jobs j
                        WHERE j.state = 'pending' AND j.job_type = lim.job_type
                          AND j.concurrency_key = x.key AND j.run_at <= p_now
                          AND (p_any_queue OR j.queue = ANY(p_queues))
                          AND j.queue NOT IN (SELECT s.queue FROM conveyor.queue_settings s
                                              WHERE s.paused)
                          AND (j.requires IS NULL OR j.requires <@ p_caps)
                        ORDER BY j.priority DESC, j.run_at, j.seq
                        LIMIT x.room) c
                LOOP
                    -- A type without limits: priority and FIFO alone (rank 1, no walk).
                    rank := CASE WHEN open_type THEN 1 ELSE rec.rn END;
                    priority := rec.prio;
                    walk := CASE WHEN open_type THEN 0 ELSE rec.kpos END;
                    run_at := rec.at;
                    seq := rec.s;
                    id := rec.jid;
                    queue := rec.q;
                    job_type := lim.job_type;
                    key := CASE WHEN open_type THEN '' ELSE rec.kk END;
                    queue_room := NULL;
                    RETURN NEXT;
                    IF open_type OR last_ord IS DISTINCT FROM rec.ord THEN
                        gave := gave + 1;
                        last_ord := rec.ord;
                    END IF;
                END LOOP;
                ks := '{}';
                rs := '{}';
                ps := '{}';
            END IF;
            EXIT WHEN done OR gave >= p_limit;
        END LOOP;
    END LOOP;
    RETURN QUERY
        SELECT 0, 0, 0, NULL::timestamptz, NULL::bigint, NULL::text, s.queue, NULL::text,
               NULL::text,
               (s.concurrency_limit - (SELECT count(*) FROM conveyor.jobs j
                                       WHERE j.state = 'running' AND j.queue = s.queue))::integer
        FROM conveyor.queue_settings s
        WHERE s.concurrency_limit IS NOT NULL AND (p_any_queue OR s.queue = ANY(p_queues));
END
$$;
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
ALTER TABLE conveyor.workers ADD COLUMN stuck_jobs integer DEFAULT 0 NOT NULL;
ALTER TABLE conveyor.job_executions ADD COLUMN traceback text;
-- Jobs by type, newest first (migration 0015).
CREATE INDEX jobs_type_created ON conveyor.jobs USING btree (job_type, created_at);

-- The hash-chained audit log (migration 0013).
CREATE TABLE conveyor.audit_log (
    seq bigint NOT NULL,
    at text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    summary text NOT NULL,
    request_id text,
    model text,
    prompt text,
    response text,
    ai_hashed boolean DEFAULT false NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);

ALTER TABLE ONLY conveyor.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (seq);

CREATE INDEX audit_log_resource ON conveyor.audit_log USING btree (resource_id, seq);
CREATE INDEX audit_log_actor ON conveyor.audit_log USING btree (actor, seq);
CREATE INDEX audit_log_action ON conveyor.audit_log USING btree (action, seq);

CREATE TABLE conveyor.audit_anchors (
    seq bigint NOT NULL,
    hash text NOT NULL,
    at text NOT NULL,
    key_id text,
    mac text
);

ALTER TABLE ONLY conveyor.audit_anchors
    ADD CONSTRAINT audit_anchors_pkey PRIMARY KEY (seq);
