-- Named queries of the PostgreSQL store for workflows (see PostgresStore's workflow methods).

-- name: insert_workflow
INSERT INTO conveyor.workflows (id, name, status, on_failure, total_steps, idempotency_key,
                                metadata, created_by, created_at, updated_at)
VALUES ($1, $2, 'running', $3, $4, $5, $6::text::jsonb, $7, $8, $8)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id

-- name: workflow_by_key
SELECT * FROM conveyor.workflows WHERE idempotency_key = $1

-- name: get_workflow
SELECT * FROM conveyor.workflows WHERE id = $1

-- name: lock_workflows
-- Sorted ids: concurrent settles lock in one order.
SELECT * FROM conveyor.workflows WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE

-- name: insert_steps
WITH ins AS (
    INSERT INTO conveyor.jobs (id, queue, job_type, state, priority, payload, error,
                               max_retries, timeout_ms, run_at, workflow_id, step_name,
                               created_by, metadata, created_at, updated_at, completed_at)
    SELECT t.id, t.queue, t.job_type, t.state, t.priority, t.payload::jsonb, t.error,
           t.max_retries, t.timeout_ms, t.run_at, $14, t.step_name, t.created_by,
           t.metadata::jsonb, $15, $15, CASE WHEN t.state = 'cancelled' THEN $15::timestamptz END
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::text[],
                $7::text[], $8::integer[], $9::integer[], $10::timestamptz[], $11::text[],
                $12::text[], $13::text[])
        AS t(id, queue, job_type, state, priority, payload, error, max_retries, timeout_ms,
             run_at, step_name, created_by, metadata)
    RETURNING id, job_type, queue, state, priority
), ev AS (
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT 'job_submitted', id,
           jsonb_build_object('job_type', job_type, 'queue', queue, 'status', state,
                              'attempt', 0, 'priority', priority),
           $15
    FROM ins
)
SELECT pg_notify('conveyor_jobs', '') FROM ins WHERE state = 'pending' LIMIT 1

-- name: step_counts
SELECT state, count(*)::int AS n FROM conveyor.jobs WHERE workflow_id = $1 GROUP BY state

-- name: step_counts_many
SELECT workflow_id, state, count(*)::int AS n FROM conveyor.jobs
WHERE workflow_id = ANY($1::text[]) GROUP BY workflow_id, state

-- name: step_rows
SELECT id, step_name, job_type, state, cancel_requested_at, attempt, started_at, completed_at,
       error, result, has_children
FROM conveyor.jobs WHERE workflow_id = $1 ORDER BY seq

-- name: step_rows_light
SELECT id, step_name, job_type, state, cancel_requested_at, attempt, started_at, completed_at,
       error, NULL::jsonb AS result, has_children
FROM conveyor.jobs WHERE workflow_id = $1 ORDER BY seq

-- name: step_edges
SELECT c.step_name AS child, p.step_name AS parent
FROM conveyor.jobs AS c
JOIN conveyor.job_dependencies AS d ON d.child_id = c.id
JOIN conveyor.jobs AS p ON p.id = d.parent_id
WHERE c.workflow_id = $1

-- name: cancel_waiting_steps
-- SKIP LOCKED: a step another transaction holds (a finisher, a fetch) is settled
-- by that transaction; waiting for it here, under the workflow's lock, could deadlock.
UPDATE conveyor.jobs SET state = 'cancelled', completed_at = $3, updated_at = $3,
    error = 'cancelled: ' || $2, metadata = metadata || jsonb_build_object('cancel_reason', $2::text)
WHERE id IN (SELECT id FROM conveyor.jobs
             WHERE workflow_id = $1 AND state IN ('pending', 'blocked')
             FOR UPDATE SKIP LOCKED)
RETURNING id, job_type, queue, attempt, step_name, has_children

-- name: cancel_running_steps
UPDATE conveyor.jobs SET cancel_requested_at = $3, updated_at = $3,
    metadata = metadata || jsonb_build_object('cancel_reason', $2::text)
WHERE id IN (SELECT id FROM conveyor.jobs
             WHERE workflow_id = $1 AND state = 'running' AND cancel_requested_at IS NULL
             FOR UPDATE SKIP LOCKED)
RETURNING id, job_type, queue, attempt, step_name

-- name: set_workflow_status
UPDATE conveyor.workflows SET status = $2, finished_at = $3, updated_at = $3 WHERE id = $1

-- name: request_workflow_cancel
UPDATE conveyor.workflows SET cancel_requested_at = $2, updated_at = $2 WHERE id = $1

-- name: list_workflows
SELECT * FROM conveyor.workflows
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4

-- name: count_workflows
SELECT count(*) FROM conveyor.workflows
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)

-- name: retryable_steps
SELECT id, job_type, queue, step_name FROM conveyor.jobs
WHERE workflow_id = $1 AND state IN ('failed', 'cancelled') ORDER BY seq FOR UPDATE

-- name: reset_steps
UPDATE conveyor.jobs AS j SET state = t.state, attempt = 0, error = NULL, result = NULL,
    lease_token = NULL, worker_id = NULL, cancel_requested_at = NULL, lost_count = 0,
    started_at = NULL, completed_at = NULL, run_at = $3, updated_at = $3,
    metadata = j.metadata - 'cancel_reason'
FROM unnest($1::text[], $2::text[]) AS t(id, state)
WHERE j.id = t.id AND j.state IN ('failed', 'cancelled')

-- name: reopen_workflow
UPDATE conveyor.workflows SET status = 'running', finished_at = NULL, cancel_requested_at = NULL,
    updated_at = $2
WHERE id = $1

-- name: reopen_finished_workflows
-- Steps retried from the dead-letter queue: their finished workflows run again.
UPDATE conveyor.workflows SET status = 'running', finished_at = NULL, updated_at = $2
WHERE id = ANY($1::text[]) AND status != 'running'

-- name: add_total_steps
UPDATE conveyor.workflows SET total_steps = total_steps + $2, updated_at = $3 WHERE id = $1

-- name: parent_results
SELECT d.child_id, p.id AS parent_id, p.step_name, p.result
FROM conveyor.job_dependencies AS d JOIN conveyor.jobs AS p ON p.id = d.parent_id
WHERE d.child_id = ANY($1::text[]) AND p.state = 'completed'

-- name: prune_workflows
DELETE FROM conveyor.workflows AS w
WHERE w.status != 'running' AND w.finished_at < $1
  AND NOT EXISTS (SELECT 1 FROM conveyor.jobs WHERE jobs.workflow_id = w.id)

-- name: workflow_ids_with_prefix
-- A range on the primary key: ids are lowercase hex, so [prefix, upper) is exactly
-- the ids starting with prefix (COLLATE "C": byte order, whatever the database's).
SELECT id FROM conveyor.workflows
WHERE id COLLATE "C" >= $1 AND id COLLATE "C" < $2
ORDER BY id COLLATE "C" LIMIT $3
