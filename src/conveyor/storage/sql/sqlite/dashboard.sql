-- The dashboard's reads: each bounded (LIMIT inside counts, time windows on
-- indexed columns), so a page stays cheap with many jobs.

-- name: state_count_capped
SELECT count(*) FROM (SELECT 1 FROM jobs WHERE state = ? LIMIT ?)

-- name: queue_depths_state
SELECT queue, count(*) FROM (SELECT queue FROM jobs WHERE state = ? LIMIT ?) GROUP BY queue

-- name: finished_per_minute
SELECT CAST(completed_at / 60 AS INTEGER) * 60 AS minute, state, count(*)
FROM jobs WHERE completed_at >= ? GROUP BY 1, 2

-- name: submitted_per_minute
SELECT CAST(created_at / 60 AS INTEGER) * 60 AS minute, count(*)
FROM jobs WHERE created_at >= ? GROUP BY 1

-- name: recent_waits
SELECT (started_at - max(created_at, run_at)) * 1000 FROM jobs
WHERE completed_at >= ? AND started_at IS NOT NULL
ORDER BY completed_at DESC LIMIT ?

-- name: oldest_pending
SELECT created_at FROM jobs WHERE state = 'pending' ORDER BY created_at LIMIT 1

-- name: job_events
SELECT id, type, job_id, data, created_at FROM events
WHERE created_at >= ? AND created_at <= ? AND job_id = ?
ORDER BY id LIMIT ?

-- name: job_children
SELECT child_id FROM job_dependencies WHERE parent_id = ? ORDER BY child_id LIMIT ?
