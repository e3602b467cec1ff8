-- The dashboard's reads: each bounded (LIMIT inside counts, time windows on
-- indexed columns), so a page stays cheap with millions of jobs.

-- name: state_counts_capped
SELECT s.state,
       (SELECT count(*) FROM (SELECT 1 FROM conveyor.jobs j WHERE j.state = s.state LIMIT $2) c)
FROM unnest($1::text[]) AS s(state)

-- name: state_estimates
-- The planner's statistics: the table's row estimate and the state column's
-- most common values with their frequencies (NULL before the first ANALYZE).
SELECT c.reltuples::bigint AS total,
       (SELECT s.most_common_vals::text FROM pg_stats s
        WHERE s.schemaname = 'conveyor' AND s.tablename = 'jobs' AND s.attname = 'state') AS vals,
       (SELECT s.most_common_freqs FROM pg_stats s
        WHERE s.schemaname = 'conveyor' AND s.tablename = 'jobs' AND s.attname = 'state') AS freqs
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'conveyor' AND c.relname = 'jobs'

-- name: queue_depths_pending
-- The ready-queue index (pending only) serves this; a plain state filter would
-- make the planner scan the table.
SELECT queue, count(*) FROM (
    SELECT queue FROM conveyor.jobs WHERE state = 'pending'
    ORDER BY priority DESC, run_at, seq LIMIT $1
) s GROUP BY queue

-- name: queue_depths_state
SELECT queue, count(*) FROM (
    SELECT queue FROM conveyor.jobs WHERE state = $1 ORDER BY state, created_at LIMIT $2
) s GROUP BY queue

-- name: finished_per_minute
SELECT date_trunc('minute', completed_at) AS minute, state, count(*) AS n
FROM conveyor.jobs WHERE completed_at >= $1 GROUP BY 1, 2

-- name: submitted_per_minute
SELECT date_trunc('minute', created_at) AS minute, count(*) AS n
FROM conveyor.jobs WHERE created_at >= $1 GROUP BY 1

-- name: wait_p95
SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY w) FROM (
    SELECT extract(epoch FROM started_at - greatest(created_at, run_at)) * 1000 AS w
    FROM conveyor.jobs
    WHERE completed_at >= $1 AND started_at IS NOT NULL
    ORDER BY completed_at DESC LIMIT $2
) s

-- name: oldest_pending
SELECT created_at FROM conveyor.jobs WHERE state = 'pending' ORDER BY created_at LIMIT 1

-- name: job_events
SELECT id, type, job_id, data, created_at FROM conveyor.events
WHERE created_at >= $2 AND created_at <= $3 AND job_id = $1
ORDER BY id LIMIT $4

-- name: job_children
SELECT child_id FROM conveyor.job_dependencies WHERE parent_id = $1 ORDER BY child_id LIMIT $2
