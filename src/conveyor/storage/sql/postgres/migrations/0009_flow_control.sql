-- Flow control (docs/flow_control.md): per-key concurrency and rate limits,
-- pausable queues with their own concurrency limit, and capability routing.

-- '' = no key: the job type's limits count all its jobs together.
ALTER TABLE conveyor.jobs ADD COLUMN concurrency_key text NOT NULL DEFAULT '';
-- Object of name -> value a worker must offer; NULL = any worker.
ALTER TABLE conveyor.jobs ADD COLUMN requires jsonb;
ALTER TABLE conveyor.workers ADD COLUMN capabilities jsonb NOT NULL DEFAULT '{}'::jsonb;

-- "concurrency_key IS NOT NULL" (always true) keeps it for queries that name a
-- key: a generic plan of the ordinary fetch would otherwise read a job type's
-- every pending job through it and sort them (4x slower than jobs_ready).
CREATE INDEX jobs_flow_pending ON conveyor.jobs
    (job_type, concurrency_key, priority DESC, run_at, seq)
    WHERE state = 'pending' AND concurrency_key IS NOT NULL;
CREATE INDEX jobs_flow_running ON conveyor.jobs (job_type, concurrency_key)
    WHERE state = 'running' AND concurrency_key <> '';

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

-- 'requires': some job was submitted with requirements (set in its transaction);
-- from then on fetches filter by capabilities (the limited fetch).
CREATE TABLE conveyor.flow_flags (
    flag text PRIMARY KEY
);

CREATE TABLE conveyor.flow_windows (
    job_type text NOT NULL,
    concurrency_key text NOT NULL,
    window_start double precision NOT NULL,
    started integer NOT NULL,
    PRIMARY KEY (job_type, concurrency_key)
);

-- The limited fetch's candidates (docs/flow_control.md; the same steps as
-- storage/flow.py): every limited fetch takes one transaction-scoped advisory
-- lock first, so the running and started counts it reads (each query here gets
-- a fresh snapshot: VOLATILE) cannot change until it commits its leases.
-- Rows with rank 0 carry a queue's room under its concurrency limit instead.
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
                -- A later window already counted (a fetch whose clock was read
                -- before another one's): no room; a stale clock never reopens it.
                SELECT CASE WHEN w.window_start > ws THEN lim.rate_limit ELSE w.started END
                INTO n_started FROM conveyor.flow_windows w
                WHERE w.job_type = lim.job_type AND w.concurrency_key = k
                  AND w.window_start >= ws;
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
