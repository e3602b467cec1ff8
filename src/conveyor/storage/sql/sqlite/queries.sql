-- Named queries of the SQLite store. Lists are passed as JSON arrays and read
-- with json_each, so every statement here is static and prepared once.
-- Write statements run inside BEGIN IMMEDIATE transactions (one writer).

-- name: insert_job
INSERT INTO jobs (id, queue, job_type, state, priority, payload, error, max_retries, timeout_ms,
                  run_at, idempotency_key, workflow_id, created_by, metadata, created_at,
                  completed_at, updated_at)
VALUES (:id, :queue, :job_type, :state, :priority, :payload, :error, :max_retries, :timeout_ms,
        :run_at, :idempotency_key, :workflow_id, :created_by, :metadata, :created_at,
        :completed_at, :created_at)

-- name: insert_dependency
INSERT OR IGNORE INTO job_dependencies (child_id, parent_id) VALUES (?, ?)

-- name: mark_has_children
UPDATE jobs SET has_children = 1 WHERE id = ?

-- name: insert_event
INSERT INTO events (type, job_id, data, created_at) VALUES (?, ?, ?, ?)

-- name: by_keys
-- The jobs holding these idempotency keys (one per key, any state: the index is unique).
SELECT * FROM jobs WHERE idempotency_key IN (SELECT value FROM json_each(?))

-- name: jobs_by_ids
SELECT * FROM jobs WHERE id IN (SELECT value FROM json_each(?))

-- name: fetch
UPDATE jobs
SET state = 'running', attempt = attempt + 1, lease_token = :token, worker_id = :worker,
    started_at = :now, updated_at = :now
WHERE seq IN (
    -- INDEXED BY: left alone, the planner picks jobs_state_created and sorts every
    -- pending job on each fetch (28 ms at 100,000 pending instead of 0.5 ms).
    SELECT seq FROM jobs INDEXED BY jobs_ready
    WHERE state = 'pending' AND run_at <= :now
      AND (:any_queue OR queue IN (SELECT value FROM json_each(:queues)))
      AND (:any_type OR job_type IN (SELECT value FROM json_each(:types)))
      -- flow control: paused queues (read once per statement) and requirements
      AND queue NOT IN (SELECT queue FROM queue_settings WHERE paused)
      AND (requires IS NULL OR NOT EXISTS (
            SELECT 1 FROM json_each(requires) AS r
            WHERE json_extract(:caps, '$."' || r.key || '"') IS NOT r.value))
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit)
RETURNING *

-- name: insert_started_executions
INSERT INTO job_executions (job_id, attempt, worker_id, started_at, payload_version)
SELECT id, attempt, worker_id, started_at, payload_version FROM jobs INDEXED BY jobs_running
WHERE state = 'running' AND worker_id = :worker AND lease_token = :token
ORDER BY priority DESC, run_at, seq

-- name: insert_started_events
INSERT INTO events (type, job_id, data, created_at)
SELECT 'job_started', id,
       json_object('job_id', id, 'job_type', job_type, 'queue', queue, 'status', 'running',
                   'attempt', attempt, 'worker_id', worker_id),
       :now
FROM jobs INDEXED BY jobs_running
WHERE state = 'running' AND worker_id = :worker AND lease_token = :token
ORDER BY priority DESC, run_at, seq

-- name: running_by_ids
-- Driven from the id list: otherwise the planner scans by state.
SELECT jobs.id, jobs.lease_token, jobs.attempt, jobs.started_at, jobs.job_type, jobs.queue,
       jobs.has_children, jobs.cancel_requested_at, jobs.workflow_id, jobs.step_name,
       jobs.payload_version
FROM json_each(?) AS ids CROSS JOIN jobs ON jobs.id = ids.value
WHERE jobs.state = 'running'

-- name: finish_complete
UPDATE jobs SET state = 'completed', result = ?, error = NULL, lease_token = NULL,
                completed_at = ?, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: finish_retry
UPDATE jobs SET state = 'pending', error = ?, run_at = ?, lease_token = NULL, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: finish_fail
UPDATE jobs SET state = 'failed', error = ?, lease_token = NULL, completed_at = ?, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: finish_cancel
UPDATE jobs SET state = 'cancelled', error = ?, lease_token = NULL, completed_at = ?,
                updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: finish_release
UPDATE jobs SET state = 'pending', attempt = attempt - 1, run_at = ?, lease_token = NULL,
                worker_id = NULL, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: end_execution
UPDATE job_executions SET finished_at = ?, outcome = ?, error = ?, traceback = ?
WHERE job_id = ? AND attempt = ? AND finished_at IS NULL

-- name: blocked_children
-- Driven from the parents' ids (CROSS JOIN keeps that order): otherwise the
-- planner starts from every blocked job.
SELECT DISTINCT j.* FROM json_each(?) AS ids
CROSS JOIN job_dependencies d ON d.parent_id = ids.value
CROSS JOIN jobs j ON j.id = d.child_id
WHERE j.state = 'blocked'

-- name: parent_states
SELECT j.state, count(*) AS n FROM job_dependencies d JOIN jobs j ON j.id = d.parent_id
WHERE d.child_id = ? GROUP BY j.state

-- name: unblock
UPDATE jobs SET state = 'pending', run_at = ?, updated_at = ? WHERE id = ? AND state = 'blocked'

-- name: cancel_blocked
UPDATE jobs SET state = 'cancelled', error = ?, completed_at = ?, updated_at = ?
WHERE id = ? AND state = 'blocked'

-- name: cancel_waiting
UPDATE jobs SET state = 'cancelled', completed_at = :now, updated_at = :now,
    error = CASE WHEN :reason IS NULL THEN 'cancelled' ELSE 'cancelled: ' || :reason END,
    metadata = CASE WHEN :reason IS NULL THEN metadata
                    ELSE json_set(metadata, '$.cancel_reason', :reason) END
WHERE id = :id AND state IN ('pending', 'blocked')

-- name: request_cancel
UPDATE jobs SET cancel_requested_at = :now, updated_at = :now,
    metadata = CASE WHEN :reason IS NULL THEN metadata
                    ELSE json_set(metadata, '$.cancel_reason', :reason) END
WHERE id = :id AND state = 'running' AND cancel_requested_at IS NULL

-- name: upsert_worker
-- An id registered again is a new process (a restart with --worker-id): its row
-- describes the new one, and its started_at tells the old process's jobs apart
-- (see orphaned_running).
INSERT INTO workers (id, host, pid, queues, job_types, concurrency, started_at, heartbeat_at,
                     state, jobs_running)
VALUES (:id, :host, :pid, :queues, :job_types, :concurrency, :now, :now, 'running', 0)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                               queues = excluded.queues, job_types = excluded.job_types,
                               concurrency = excluded.concurrency, started_at = :now,
                               heartbeat_at = :now, state = 'running', jobs_running = 0

-- name: heartbeat
UPDATE workers SET heartbeat_at = ?, jobs_running = ?, stuck_jobs = ?, state = 'running'
WHERE id = ?

-- name: cancel_requested_for_worker
SELECT id FROM jobs
WHERE state = 'running' AND worker_id = ? AND cancel_requested_at IS NOT NULL

-- name: deregister_worker
UPDATE workers SET state = 'stopped', heartbeat_at = ?, jobs_running = 0
WHERE id = ? AND state != 'stopped'

-- name: mark_stale_workers_dead
UPDATE workers SET state = 'dead' WHERE state = 'running' AND heartbeat_at < ? RETURNING id

-- name: orphaned_running
-- Running jobs whose process is gone: their worker is not running, or it was
-- registered again (restarted under the same id) after the job started.
SELECT * FROM jobs
WHERE state = 'running'
  AND NOT EXISTS (SELECT 1 FROM workers w
                  WHERE w.id = jobs.worker_id AND w.state = 'running'
                    AND w.started_at <= jobs.started_at)

-- name: rescue_lost
UPDATE jobs SET state = 'pending', lost_count = lost_count + 1, lease_token = NULL,
                error = 'worker_lost', run_at = ?, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token IS ?

-- name: rescue_quarantine
UPDATE jobs SET state = 'failed', lost_count = lost_count + 1, lease_token = NULL,
                error = 'worker_lost', completed_at = ?, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token IS ?

-- name: rescue_cancel
UPDATE jobs SET state = 'cancelled', lost_count = lost_count + 1, lease_token = NULL,
                error = 'cancelled', completed_at = ?, updated_at = ?
WHERE id = ? AND state = 'running' AND lease_token IS ?

-- name: retry_failed
UPDATE jobs SET state = 'pending', attempt = 0, lost_count = 0, run_at = :now,
                completed_at = NULL, cancel_requested_at = NULL, worker_id = NULL,
                updated_at = :now
WHERE id = :id AND state = 'failed'

-- name: failed_ids
SELECT id FROM jobs WHERE state = 'failed'

-- name: delete_job
DELETE FROM jobs WHERE id = ?

-- name: delete_executions
DELETE FROM job_executions WHERE job_id = ?

-- name: delete_dependencies
DELETE FROM job_dependencies WHERE child_id = ?

-- name: prunable
SELECT id FROM jobs
WHERE state IN ('completed', 'cancelled') AND completed_at < ?
LIMIT 5000

-- name: prune_events
DELETE FROM events WHERE created_at < ?

-- name: get_job
SELECT * FROM jobs WHERE id = ?

-- name: job_parents
SELECT parent_id FROM job_dependencies WHERE child_id = ?

-- name: executions
SELECT job_id, attempt, worker_id, started_at, finished_at, outcome, error, payload_version,
       traceback
FROM job_executions WHERE job_id = ? ORDER BY id

-- name: list_jobs
SELECT * FROM jobs
WHERE (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
  AND (:job_type IS NULL OR job_type = :job_type)
  AND (:queue IS NULL OR queue = :queue)
  AND (:created_by IS NULL OR created_by = :created_by)
  AND (:internal OR job_type NOT LIKE 'conveyor.%')
ORDER BY {order_by}
LIMIT :limit OFFSET :offset

-- name: count_jobs
SELECT count(*) FROM jobs
WHERE (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
  AND (:job_type IS NULL OR job_type = :job_type)
  AND (:queue IS NULL OR queue = :queue)
  AND (:created_by IS NULL OR created_by = :created_by)
  AND (:internal OR job_type NOT LIKE 'conveyor.%')

-- name: count_by_state
SELECT state, count(*) FROM jobs GROUP BY state

-- name: pending_by_type
SELECT queue, job_type, count(*) FROM jobs WHERE state = 'pending' GROUP BY queue, job_type

-- name: list_workers
SELECT * FROM workers ORDER BY started_at

-- name: events_after
SELECT id, type, job_id, data, created_at FROM events WHERE id > ? ORDER BY id LIMIT ?

-- name: migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at REAL NOT NULL
)

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)

-- name: insert_api_key
INSERT INTO api_keys (id, name, scope, key_hash, prefix, created_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)

-- name: list_api_keys
SELECT * FROM api_keys ORDER BY created_at

-- name: find_api_key
SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL

-- name: get_api_key
SELECT * FROM api_keys WHERE id = ?

-- name: count_active_api_keys
SELECT count(*) FROM api_keys WHERE revoked_at IS NULL

-- name: submitted_since
SELECT count(*) FROM jobs WHERE created_at >= ?

-- name: finished_since
SELECT job_type, state, count(*) FROM jobs
WHERE completed_at >= ? AND state IN ('completed', 'failed', 'cancelled')
GROUP BY job_type, state

-- name: data_version
PRAGMA data_version

-- name: connection_pragmas
-- Durable defaults: WAL (readers never block the writer), FULL sync (a commit
-- is on disk before enqueue returns), and a large page cache.
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
PRAGMA foreign_keys = OFF;
PRAGMA temp_store = MEMORY;
PRAGMA cache_size = -65536

-- name: begin_write
BEGIN IMMEDIATE

-- name: commit
COMMIT

-- name: rollback
ROLLBACK

-- name: max_seq
SELECT coalesce(max(seq), 0) FROM jobs

-- name: insert_submitted_events
-- The rows this transaction just inserted are those above the max seq read
-- before the insert (one writer at a time), in insertion order.
INSERT INTO events (type, job_id, data, created_at)
SELECT 'job_submitted', id,
       json_object('job_id', id, 'job_type', job_type, 'queue', queue, 'status', state,
                   'attempt', 0, 'priority', priority),
       ?
FROM jobs WHERE seq > ? ORDER BY seq

-- name: latest_event_id
SELECT coalesce(max(id), 0) FROM events

-- name: claim_consumer
-- Take the lease when it is free, expired or already ours; returns the position.
INSERT INTO outbox_consumers (name, position, owner, lease_expires_at, updated_at)
VALUES (:name, 0, :owner, :expires, :now)
ON CONFLICT (name) DO UPDATE SET owner = :owner, lease_expires_at = :expires, updated_at = :now
WHERE outbox_consumers.owner IS NULL OR outbox_consumers.owner = :owner
   OR outbox_consumers.lease_expires_at < :now
RETURNING position

-- name: advance_consumer
UPDATE outbox_consumers SET position = :position, updated_at = :now
WHERE name = :name AND owner = :owner AND position <= :position

-- name: release_consumer
UPDATE outbox_consumers SET owner = NULL, lease_expires_at = NULL, updated_at = :now
WHERE name = :name AND owner = :owner

-- name: insert_webhook
INSERT INTO webhooks (id, url, event_types, secret, state, consecutive_failures, created_at,
                      secret_ref)
VALUES (?, ?, ?, ?, ?, 0, ?, ?)

-- name: list_webhooks
SELECT * FROM webhooks ORDER BY created_at, id

-- name: get_webhook
SELECT * FROM webhooks WHERE id = ?

-- name: delete_webhook
DELETE FROM webhooks WHERE id = ?

-- name: delete_webhook_deliveries
DELETE FROM webhook_deliveries WHERE webhook_id = ?

-- name: insert_delivery
INSERT INTO webhook_deliveries (webhook_id, delivery_id, event_id, event_type, job_id, attempt,
                                outcome, status_code, error, duration_ms, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: webhook_succeeded
UPDATE webhooks SET consecutive_failures = 0, failing_since = NULL, last_delivered_at = :at
WHERE id = :id RETURNING *

-- name: webhook_failed
UPDATE webhooks SET consecutive_failures = consecutive_failures + 1,
                    failing_since = coalesce(failing_since, :at)
WHERE id = :id RETURNING *

-- name: disable_webhook
UPDATE webhooks SET state = 'disabled', disabled_at = :at, disabled_reason = :reason,
                    replay_after = :event_id
WHERE id = :id AND state = 'active' RETURNING *

-- name: enable_webhook
UPDATE webhooks SET state = 'active', consecutive_failures = 0, failing_since = NULL,
                    disabled_at = NULL, disabled_reason = NULL, replay_after = NULL
WHERE id = :id AND state = 'disabled' RETURNING *

-- name: list_deliveries
SELECT * FROM webhook_deliveries WHERE webhook_id = ? ORDER BY id DESC LIMIT ?

-- name: consumer_positions
SELECT name, position FROM outbox_consumers ORDER BY name

-- name: upsert_job_type
INSERT INTO job_types (job_type, queue, priority, max_retries, timeout_ms, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (job_type) DO UPDATE SET
    queue = excluded.queue, priority = excluded.priority, max_retries = excluded.max_retries,
    timeout_ms = excluded.timeout_ms, updated_at = excluded.updated_at

-- name: list_job_types
SELECT job_type, queue, priority, max_retries, timeout_ms, updated_at
FROM job_types ORDER BY job_type

-- name: ids_with_prefix
-- A range on the primary key: ids are lowercase hex, so [prefix, upper) is exactly
-- the ids starting with prefix.
SELECT id FROM jobs WHERE id >= ? AND id < ? ORDER BY id LIMIT ?

-- name: finish_retry_healed
-- A retry whose heal replaced the payload: the next attempt runs the new version.
UPDATE jobs SET state = 'pending', error = ?, run_at = ?, lease_token = NULL, updated_at = ?,
                payload = ?, payload_version = payload_version + 1
WHERE id = ? AND state = 'running' AND lease_token = ?

-- name: save_step
-- Fenced by the attempt's lease; a step stored already keeps its first result.
INSERT INTO job_steps (job_id, name, result, attempt, created_at)
SELECT id, :name, :result, attempt, :now FROM jobs
WHERE id = :id AND state = 'running' AND lease_token = :token
ON CONFLICT (job_id, name) DO NOTHING

-- name: holds_lease
SELECT 1 FROM jobs WHERE id = :id AND state = 'running' AND lease_token = :token

-- name: job_steps
SELECT name, result FROM job_steps WHERE job_id = ?

-- name: save_checkpoint
UPDATE jobs SET checkpoint = :state
WHERE id = :id AND state = 'running' AND lease_token = :token

-- name: delete_steps
DELETE FROM job_steps WHERE job_id = ?
