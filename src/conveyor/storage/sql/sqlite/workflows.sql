-- Named queries of the SQLite store for workflows (see storage/sqlite_workflows.py).

-- name: insert_workflow
INSERT INTO workflows (id, name, status, on_failure, total_steps, idempotency_key, metadata,
                       created_by, created_at, updated_at)
VALUES (:id, :name, 'running', :on_failure, :total_steps, :idempotency_key, :metadata,
        :created_by, :now, :now)

-- name: workflow_by_key
SELECT * FROM workflows WHERE idempotency_key = ?

-- name: get_workflow
SELECT * FROM workflows WHERE id = ?

-- name: workflows_by_ids
SELECT * FROM workflows WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id

-- name: insert_step
INSERT INTO jobs (id, queue, job_type, state, priority, payload, error, max_retries, timeout_ms,
                  run_at, workflow_id, step_name, created_by, metadata, created_at,
                  completed_at, updated_at)
VALUES (:id, :queue, :job_type, :state, :priority, :payload, :error, :max_retries, :timeout_ms,
        :run_at, :workflow_id, :step_name, :created_by, :metadata, :created_at,
        :completed_at, :created_at)

-- name: step_counts
SELECT state, count(*) AS n FROM jobs WHERE workflow_id = ? GROUP BY state

-- name: step_counts_many
SELECT jobs.workflow_id, jobs.state, count(*) AS n
FROM json_each(?) AS ids CROSS JOIN jobs ON jobs.workflow_id = ids.value
GROUP BY jobs.workflow_id, jobs.state

-- name: step_rows
SELECT id, step_name, job_type, state, cancel_requested_at, attempt, started_at, completed_at,
       error, result, has_children
FROM jobs WHERE workflow_id = ? ORDER BY seq

-- name: step_edges
SELECT c.step_name AS child, p.step_name AS parent
FROM jobs AS c JOIN job_dependencies AS d ON d.child_id = c.id JOIN jobs AS p ON p.id = d.parent_id
WHERE c.workflow_id = ?

-- name: cancel_waiting_steps
UPDATE jobs SET state = 'cancelled', completed_at = :now, updated_at = :now,
    error = 'cancelled: ' || :reason, metadata = json_set(metadata, '$.cancel_reason', :reason)
WHERE workflow_id = :workflow_id AND state IN ('pending', 'blocked')
RETURNING id, job_type, queue, attempt, step_name, has_children

-- name: cancel_running_steps
UPDATE jobs SET cancel_requested_at = :now, updated_at = :now,
    metadata = json_set(metadata, '$.cancel_reason', :reason)
WHERE workflow_id = :workflow_id AND state = 'running' AND cancel_requested_at IS NULL
RETURNING id, job_type, queue, attempt, step_name

-- name: set_workflow_status
UPDATE workflows SET status = :status, finished_at = :finished_at, updated_at = :now
WHERE id = :id

-- name: request_workflow_cancel
UPDATE workflows SET cancel_requested_at = :now, updated_at = :now WHERE id = :id

-- name: list_workflows
SELECT * FROM workflows
WHERE (:status IS NULL OR status = :status) AND (:name IS NULL OR name = :name)
ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset

-- name: count_workflows
SELECT count(*) FROM workflows
WHERE (:status IS NULL OR status = :status) AND (:name IS NULL OR name = :name)

-- name: retryable_steps
SELECT id, job_type, queue, step_name FROM jobs
WHERE workflow_id = ? AND state IN ('failed', 'cancelled') ORDER BY seq

-- name: reset_step
UPDATE jobs SET state = :state, attempt = 0, error = NULL, result = NULL, lease_token = NULL,
    worker_id = NULL, cancel_requested_at = NULL, lost_count = 0, started_at = NULL,
    completed_at = NULL, run_at = :now, updated_at = :now,
    metadata = json_remove(metadata, '$.cancel_reason')
WHERE id = :id AND state IN ('failed', 'cancelled')

-- name: reopen_workflow
UPDATE workflows SET status = 'running', finished_at = NULL, cancel_requested_at = NULL,
    updated_at = :now
WHERE id = :id

-- name: reopen_finished_workflow
-- A step retried from the dead-letter queue: its finished workflow runs again.
UPDATE workflows SET status = 'running', finished_at = NULL, updated_at = :now
WHERE id = :id AND status != 'running'

-- name: add_total_steps
UPDATE workflows SET total_steps = total_steps + :n, updated_at = :now WHERE id = :id

-- name: parent_results
-- Driven from the id list (CROSS JOIN keeps that order): otherwise the planner
-- starts from every completed job.
SELECT d.child_id, p.id AS parent_id, p.step_name, p.result
FROM json_each(?) AS ids
CROSS JOIN job_dependencies AS d ON d.child_id = ids.value
CROSS JOIN jobs AS p ON p.id = d.parent_id
WHERE p.state = 'completed'

-- name: prunable_workflows
SELECT id FROM workflows WHERE status != 'running' AND finished_at < ?
  AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.workflow_id = workflows.id)
LIMIT 500

-- name: delete_workflow
DELETE FROM workflows WHERE id = ?

-- name: workflow_ids_with_prefix
-- A range on the primary key: ids are lowercase hex, so [prefix, upper) is exactly
-- the ids starting with prefix.
SELECT id FROM workflows WHERE id >= ? AND id < ? ORDER BY id LIMIT ?
