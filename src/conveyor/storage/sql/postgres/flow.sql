-- Flow control queries of the PostgreSQL store (docs/flow_control.md).

-- name: flow_config
-- Which job types and queues have limits, which queues are paused, and whether a
-- job with requirements exists: the fetch takes the limited path for those (and
-- the ordinary fetch returns nothing once one concerns it).
SELECT 'type' AS kind, job_type AS name FROM conveyor.flow_limits
WHERE concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL
UNION ALL
SELECT 'queue', queue FROM conveyor.queue_settings
WHERE concurrency_limit IS NOT NULL OR paused
UNION ALL
SELECT 'flag', flag FROM conveyor.flow_flags

-- name: flag_requires
INSERT INTO conveyor.flow_flags (flag) VALUES ('requires') ON CONFLICT DO NOTHING

-- name: fetch_limited
-- $1 now, $2 any queue, $3 queues, $4 any type, $5 types, $6 capabilities,
-- $7 limit, $8 token, $9 worker.
WITH cand AS MATERIALIZED (
    SELECT * FROM conveyor.flow_candidates($1, $2, $3, $4, $5, $6::text::jsonb, $7)
), ordered AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.queue
                                   ORDER BY c.rank, c.priority DESC, c.walk, c.run_at, c.seq)
               AS queue_pos
    FROM cand c WHERE c.rank > 0
), chosen AS MATERIALIZED (
    SELECT o.* FROM ordered o
    LEFT JOIN cand q ON q.rank = 0 AND q.queue = o.queue
    WHERE q.queue IS NULL OR o.queue_pos <= q.queue_room
    ORDER BY o.rank, o.priority DESC, o.walk, o.run_at, o.seq
    LIMIT $7
), upd AS (
    UPDATE conveyor.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = $8, worker_id = $9,
        started_at = $1, updated_at = $1
    FROM chosen WHERE j.id = chosen.id AND j.state = 'pending'
    RETURNING j.*
), ev AS (
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT 'job_started', id,
           jsonb_build_object('job_id', id, 'job_type', job_type, 'queue', queue,
                              'status', 'running', 'attempt', attempt, 'worker_id', worker_id),
           $1
    FROM upd
), rate AS (
    INSERT INTO conveyor.flow_windows (job_type, concurrency_key, window_start, started)
    SELECT u.job_type, u.concurrency_key,
           floor(extract(epoch FROM $1) / l.rate_window) * l.rate_window, count(*)
    FROM upd u JOIN conveyor.flow_limits l ON l.job_type = u.job_type
    WHERE l.rate_limit IS NOT NULL
    GROUP BY u.job_type, u.concurrency_key, l.rate_window
    ON CONFLICT (job_type, concurrency_key) DO UPDATE SET
        started = CASE WHEN conveyor.flow_windows.window_start = excluded.window_start
                       THEN conveyor.flow_windows.started + excluded.started
                       ELSE excluded.started END,
        window_start = excluded.window_start
    WHERE excluded.window_start >= conveyor.flow_windows.window_start
), cur AS (
    UPDATE conveyor.flow_limits l SET cursor_key = x.key
    FROM (SELECT DISTINCT ON (c.job_type) c.job_type, c.key FROM chosen c
          WHERE c.walk > 0 AND c.key <> '' ORDER BY c.job_type, c.walk DESC) x
    WHERE l.job_type = x.job_type
)
SELECT * FROM upd ORDER BY priority DESC, run_at, seq

-- name: set_flow_columns
UPDATE conveyor.jobs j SET concurrency_key = t.key, requires = t.requires::jsonb
FROM unnest($1::text[], $2::text[], $3::text[]) AS t(id, key, requires)
WHERE j.id = t.id

-- name: set_capabilities
UPDATE conveyor.workers SET capabilities = $2::text::jsonb WHERE id = $1

-- name: upsert_flow_limits
INSERT INTO conveyor.flow_limits (job_type, concurrency_key, concurrency_limit, rate_limit,
                                  rate_window, requires, updated_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::integer[],
                     $5::double precision[], $6::text[]::jsonb[], $7::timestamptz[])
ON CONFLICT (job_type) DO UPDATE SET
    concurrency_key = excluded.concurrency_key,
    concurrency_limit = excluded.concurrency_limit, rate_limit = excluded.rate_limit,
    rate_window = excluded.rate_window, requires = excluded.requires,
    updated_at = excluded.updated_at

-- name: delete_flow_limits
DELETE FROM conveyor.flow_limits WHERE job_type = ANY($1::text[])

-- name: list_flow_limits
SELECT * FROM conveyor.flow_limits ORDER BY job_type

-- name: set_queue
INSERT INTO conveyor.queue_settings (queue, paused, concurrency_limit, updated_at)
VALUES ($1, coalesce($2, false), CASE WHEN $3::integer = -1 THEN NULL ELSE $3 END, $4)
ON CONFLICT (queue) DO UPDATE SET
    paused = coalesce($2, conveyor.queue_settings.paused),
    concurrency_limit = CASE WHEN $3::integer = -1 THEN conveyor.queue_settings.concurrency_limit
                             ELSE $3 END,
    updated_at = $4

-- name: list_queue_settings
SELECT * FROM conveyor.queue_settings ORDER BY queue

-- name: queue_counts
SELECT queue, state, count(*) FROM conveyor.jobs WHERE state IN ('pending', 'running')
GROUP BY queue, state

-- name: flow_rows
SELECT queue, job_type, concurrency_key, state, run_at <= $1 AS ready, requires::text, count(*)
FROM conveyor.jobs WHERE state IN ('pending', 'running')
GROUP BY queue, job_type, concurrency_key, state, run_at <= $1, requires::text

-- name: flow_windows
SELECT job_type, concurrency_key, window_start, started FROM conveyor.flow_windows

-- name: prune_flow_windows
-- Rate windows long over ($1 = now, epoch seconds): two of the type's windows
-- and a minute behind, so that a fetch whose clock lags never finds its window
-- gone; a type without a recorded rate keeps them $2 seconds (the longest window).
DELETE FROM conveyor.flow_windows w
WHERE w.window_start < $1 - 60 - 2 * coalesce(
    (SELECT l.rate_window FROM conveyor.flow_limits l
     WHERE l.job_type = w.job_type AND l.rate_limit IS NOT NULL), $2)
