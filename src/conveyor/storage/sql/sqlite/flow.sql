-- Flow control queries of the SQLite store (docs/flow_control.md). They run in
-- the fetch's BEGIN IMMEDIATE transaction: one writer, so counts read here
-- cannot change before the jobs are leased.

-- name: limited_types
SELECT job_type, concurrency_limit, rate_limit, rate_window, cursor_key,
       concurrency_key IS NOT NULL AS templated
FROM flow_limits
WHERE (concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL)
  AND (:any_type OR job_type IN (SELECT value FROM json_each(:types)))
ORDER BY job_type

-- name: queue_limits
SELECT queue, concurrency_limit FROM queue_settings
WHERE concurrency_limit IS NOT NULL
  AND (:any_queue OR queue IN (SELECT value FROM json_each(:queues)))

-- name: open_candidates
-- Ready jobs of the types without limits, in the ordinary fetch order.
SELECT seq, priority, run_at, queue, job_type FROM jobs INDEXED BY jobs_ready
WHERE state = 'pending' AND run_at <= :now
  AND (:any_queue OR queue IN (SELECT value FROM json_each(:queues)))
  AND (:any_type OR job_type IN (SELECT value FROM json_each(:types)))
  AND job_type NOT IN (SELECT value FROM json_each(:limited))
  AND job_type NOT IN (SELECT value FROM json_each(:keyed))
  AND queue NOT IN (SELECT queue FROM queue_settings WHERE paused)
  AND (requires IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(requires) AS r
        WHERE json_extract(:caps, '$."' || r.key || '"') IS NOT r.value))
ORDER BY priority DESC, run_at, seq
LIMIT :limit

-- name: keys_after
-- The next :m keys after :key with pending jobs of the type: one index seek per
-- key (a loose index scan), however many jobs each key holds.
WITH RECURSIVE walk(key, n) AS (
    SELECT (SELECT concurrency_key FROM jobs INDEXED BY jobs_flow_pending
            WHERE state = 'pending' AND job_type = :job_type AND concurrency_key > :key
            ORDER BY job_type, concurrency_key LIMIT 1), 1
    UNION ALL
    SELECT (SELECT concurrency_key FROM jobs INDEXED BY jobs_flow_pending
            WHERE state = 'pending' AND job_type = :job_type AND concurrency_key > walk.key
            ORDER BY job_type, concurrency_key LIMIT 1), n + 1
    FROM walk WHERE walk.key IS NOT NULL AND n < :m
)
SELECT key FROM walk WHERE key IS NOT NULL

-- name: key_candidates
-- A key's next ready jobs (keyed jobs through jobs_flow_pending).
SELECT seq, priority, run_at, queue FROM jobs INDEXED BY jobs_flow_pending
WHERE state = 'pending' AND job_type = :job_type
  AND concurrency_key = :key AND run_at <= :now
  AND (:any_queue OR queue IN (SELECT value FROM json_each(:queues)))
  AND queue NOT IN (SELECT queue FROM queue_settings WHERE paused)
  AND (requires IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(requires) AS r
        WHERE json_extract(:caps, '$."' || r.key || '"') IS NOT r.value))
ORDER BY priority DESC, run_at, seq
LIMIT :n

-- name: keyless_candidates
-- The next ready keyless jobs of a limited type (one bucket, or not limited at all
-- when the type's keys come from a template).
SELECT seq, priority, run_at, queue FROM jobs INDEXED BY jobs_flow_pending
WHERE state = 'pending' AND run_at <= :now AND job_type = :job_type
  AND concurrency_key = ''
  AND (:any_queue OR queue IN (SELECT value FROM json_each(:queues)))
  AND queue NOT IN (SELECT queue FROM queue_settings WHERE paused)
  AND (requires IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(requires) AS r
        WHERE json_extract(:caps, '$."' || r.key || '"') IS NOT r.value))
ORDER BY priority DESC, run_at, seq
LIMIT :n

-- name: running_by_key
SELECT concurrency_key, count(*) FROM jobs
WHERE state = 'running' AND job_type = ? GROUP BY concurrency_key

-- name: running_by_queue
SELECT queue, count(*) FROM jobs WHERE state = 'running' GROUP BY queue

-- name: window_started
-- Jobs started in this fetch's window; a later window already counted (a fetch
-- whose clock was read before another one's) leaves no room: a stale clock
-- never reopens a window.
SELECT CASE WHEN window_start > ?3 THEN 1000000000 ELSE started END FROM flow_windows
WHERE job_type = ?1 AND concurrency_key = ?2 AND window_start >= ?3

-- name: count_start
INSERT INTO flow_windows (job_type, concurrency_key, window_start, started)
VALUES (:job_type, :key, :window_start, :n)
ON CONFLICT (job_type, concurrency_key) DO UPDATE SET
    started = CASE WHEN window_start = excluded.window_start THEN started + excluded.started
                   ELSE excluded.started END,
    window_start = excluded.window_start
WHERE excluded.window_start >= flow_windows.window_start

-- name: move_cursor
UPDATE flow_limits SET cursor_key = ? WHERE job_type = ?

-- name: lease_chosen
UPDATE jobs
SET state = 'running', attempt = attempt + 1, lease_token = :token, worker_id = :worker,
    started_at = :now, updated_at = :now
-- +state: by rowid, not by an index over every pending job
WHERE seq IN (SELECT value FROM json_each(:seqs)) AND +state = 'pending'
RETURNING *

-- name: upsert_flow_limits
INSERT INTO flow_limits (job_type, concurrency_key, concurrency_limit, rate_limit, rate_window,
                         requires, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (job_type) DO UPDATE SET
    concurrency_key = excluded.concurrency_key,
    concurrency_limit = excluded.concurrency_limit, rate_limit = excluded.rate_limit,
    rate_window = excluded.rate_window, requires = excluded.requires,
    updated_at = excluded.updated_at

-- name: delete_flow_limits
DELETE FROM flow_limits WHERE job_type = ?

-- name: list_flow_limits
SELECT * FROM flow_limits ORDER BY job_type

-- name: get_queue_settings
SELECT * FROM queue_settings WHERE queue = ?

-- name: upsert_queue_settings
INSERT INTO queue_settings (queue, paused, concurrency_limit, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (queue) DO UPDATE SET
    paused = excluded.paused, concurrency_limit = excluded.concurrency_limit,
    updated_at = excluded.updated_at

-- name: list_queue_settings
SELECT * FROM queue_settings ORDER BY queue

-- name: queue_counts
SELECT queue, state, count(*) FROM jobs WHERE state IN ('pending', 'running')
GROUP BY queue, state

-- name: flow_rows
SELECT queue, job_type, concurrency_key, state, run_at <= :now AS ready, requires, count(*)
FROM jobs WHERE state IN ('pending', 'running')
GROUP BY queue, job_type, concurrency_key, state, run_at <= :now, requires

-- name: flow_windows
SELECT job_type, concurrency_key, window_start, started FROM flow_windows

-- name: set_capabilities
UPDATE workers SET capabilities = ? WHERE id = ?

-- name: set_flow_columns
-- In the submit's transaction, right after insert_job: no fetch sees the job without them.
UPDATE jobs SET concurrency_key = :concurrency_key, requires = :requires WHERE id = :id

-- name: prune_flow_windows
-- Rate windows long over (?1 = now, epoch seconds): two of the type's windows
-- and a minute behind, so that a fetch whose clock lags never finds its window
-- gone; a type without a recorded rate keeps them ?2 seconds (the longest window).
DELETE FROM flow_windows
WHERE window_start < ?1 - 60 - 2 * coalesce(
    (SELECT l.rate_window FROM flow_limits l
     WHERE l.job_type = flow_windows.job_type AND l.rate_limit IS NOT NULL), ?2)
