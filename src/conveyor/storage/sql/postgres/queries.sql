-- Named queries of the PostgreSQL store (asyncpg, $n parameters, prepared once
-- per connection). Batches travel as arrays and are expanded with unnest, so a
-- batch of any size is one statement.

-- name: migrations_table
CREATE TABLE IF NOT EXISTS public.conveyor_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migration_lock
SELECT pg_advisory_xact_lock(7366427211)

-- name: applied_migrations
SELECT version, name, checksum FROM public.conveyor_schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO public.conveyor_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)

-- name: lock_parents
SELECT id, state FROM conveyor.jobs WHERE id = ANY($1::text[]) FOR SHARE

-- name: insert_jobs
-- $1 (ids) and $6 (payloads) hold one element per job. Every other column holds
-- one per job too, or, when all jobs of the batch share its value (the usual
-- bulk submit), that value once: less for the client to encode and send.
-- $16: the job_submitted event data when the batch shares job type, queue,
-- state and priority (one JSON value for all), else NULL (built per row). The
-- job id is not repeated in the data: it is the event's job_id column.
-- The placeholder in braces becomes the on_key_conflict clause when a job of
-- the batch has an idempotency key, else nothing: a batch without keys cannot
-- conflict, and speculative insertion costs ~5% of a bulk insert.
-- Returns the ids of the inserted jobs that have an idempotency key (a job
-- without one is always inserted: no need to send its id back), and a NULL
-- row when a NOTIFY went out.
WITH new AS (
    -- JSON arrives as text[] (a jsonb[] parameter would read a JSON list as a dimension).
    SELECT t.id,
           CASE WHEN cardinality($2::text[]) = 1 THEN $2[1] ELSE t.queue END AS queue,
           CASE WHEN cardinality($3::text[]) = 1 THEN $3[1] ELSE t.job_type END AS job_type,
           CASE WHEN cardinality($4::text[]) = 1 THEN $4[1] ELSE t.state END AS state,
           CASE WHEN cardinality($5::smallint[]) = 1 THEN $5[1] ELSE t.priority END
               AS priority,
           t.payload,
           CASE WHEN cardinality($7::text[]) = 1 THEN $7[1] ELSE t.error END AS error,
           CASE WHEN cardinality($8::integer[]) = 1 THEN $8[1] ELSE t.max_retries END
               AS max_retries,
           CASE WHEN cardinality($9::integer[]) = 1 THEN $9[1] ELSE t.timeout_ms END
               AS timeout_ms,
           CASE WHEN cardinality($10::timestamptz[]) = 1 THEN $10[1] ELSE t.run_at END
               AS run_at,
           CASE WHEN cardinality($11::text[]) = 1 THEN $11[1] ELSE t.idempotency_key END
               AS idempotency_key,
           CASE WHEN cardinality($12::text[]) = 1 THEN $12[1] ELSE t.workflow_id END
               AS workflow_id,
           CASE WHEN cardinality($13::text[]) = 1 THEN $13[1] ELSE t.created_by END
               AS created_by,
           CASE WHEN cardinality($14::text[]) = 1 THEN $14[1] ELSE t.metadata END AS metadata
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[],
                $6::text[], $7::text[], $8::integer[], $9::integer[],
                $10::timestamptz[], $11::text[], $12::text[], $13::text[], $14::text[])
        AS t(id, queue, job_type, state, priority, payload, error, max_retries, timeout_ms,
             run_at, idempotency_key, workflow_id, created_by, metadata)
), ins AS (
    INSERT INTO conveyor.jobs (id, queue, job_type, state, priority, payload, error,
                               max_retries, timeout_ms, run_at, idempotency_key, workflow_id,
                               created_by, metadata, created_at, updated_at, completed_at)
    SELECT id, queue, job_type, state, priority, payload::jsonb, error, max_retries, timeout_ms,
           run_at, idempotency_key, workflow_id, created_by, metadata::jsonb, $15, $15,
           CASE WHEN state = 'cancelled' THEN $15::timestamptz END
    FROM new
    {on_key_conflict}
    RETURNING id, job_type, queue, state, priority, idempotency_key
), ev AS (
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT 'job_submitted', id,
           COALESCE($16::jsonb,
                    jsonb_build_object('job_type', job_type, 'queue', queue, 'status', state,
                                       'attempt', 0, 'priority', priority)),
           $15
    FROM ins
), wake AS (
    -- One NOTIFY per statement (delivered at commit), only if a job is ready.
    SELECT pg_notify('conveyor_jobs', '') FROM ins WHERE state = 'pending' LIMIT 1
)
SELECT id FROM ins WHERE idempotency_key IS NOT NULL
UNION ALL
SELECT NULL FROM wake

-- name: on_key_conflict
-- (A clause of insert_jobs.) A job whose key a kept job holds (any state) is not inserted.
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING

-- name: insert_job
-- insert_jobs for a single job, with plain parameters: for one row, encoding and
-- unpacking fourteen arrays costs more than the insert itself.
WITH ins AS (
    INSERT INTO conveyor.jobs (id, queue, job_type, state, priority, payload, error,
                               max_retries, timeout_ms, run_at, idempotency_key, workflow_id,
                               created_by, metadata, created_at, updated_at, completed_at)
    VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12, $13,
            $14::text::jsonb, $15, $15, CASE WHEN $4::text = 'cancelled' THEN $15::timestamptz END)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, job_type, queue, state, priority
), ev AS (
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT 'job_submitted', id,
           jsonb_build_object('job_type', job_type, 'queue', queue, 'status', state,
                              'attempt', 0, 'priority', priority),
           $15
    FROM ins
), wake AS (
    SELECT pg_notify('conveyor_jobs', '') FROM ins WHERE state = 'pending'
)
SELECT id FROM ins
UNION ALL
SELECT NULL FROM wake

-- name: by_keys
-- The jobs holding these idempotency keys (one per key: the index is unique).
SELECT * FROM conveyor.jobs WHERE idempotency_key = ANY($1::text[])

-- name: insert_dependencies
WITH d AS (
    INSERT INTO conveyor.job_dependencies (child_id, parent_id)
    SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING
)
UPDATE conveyor.jobs SET has_children = true WHERE id = ANY($2::text[]) AND NOT has_children

-- name: notify
SELECT pg_notify('conveyor_jobs', $1)

-- name: fetch
WITH next AS (
    SELECT id FROM conveyor.jobs
    WHERE state = 'pending' AND run_at <= $1
      AND ($2::boolean OR queue = ANY($3::text[]))
      AND ($4::boolean OR job_type = ANY($5::text[]))
      -- flow control: once a limit, a paused queue or a job with requirements
      -- concerns this fetch, this returns nothing and the store takes fetch_limited
      -- (flow.sql, which filters them). One-time checks of tiny tables: the row
      -- estimates, and so the plan, stay those of the ordinary fetch.
      AND NOT EXISTS (SELECT 1 FROM conveyor.flow_limits l
                      WHERE (l.concurrency_limit IS NOT NULL OR l.rate_limit IS NOT NULL)
                        AND ($4::boolean OR l.job_type = ANY($5::text[])))
      AND NOT EXISTS (SELECT 1 FROM conveyor.queue_settings s
                      WHERE (s.paused OR s.concurrency_limit IS NOT NULL)
                        AND ($2::boolean OR s.queue = ANY($3::text[])))
      AND NOT EXISTS (SELECT 1 FROM conveyor.flow_flags f WHERE f.flag = 'requires')
    ORDER BY priority DESC, run_at, seq
    LIMIT $6
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE conveyor.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = $7, worker_id = $8,
        started_at = $1, updated_at = $1
    FROM next WHERE j.id = next.id
    RETURNING j.*
), ev AS (
    -- No execution row yet: the running attempt lives in the job row (worker_id,
    -- started_at, attempt) and its execution row is written once, when it ends.
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT 'job_started', id,
           jsonb_build_object('job_id', id, 'job_type', job_type, 'queue', queue,
                              'status', 'running', 'attempt', attempt, 'worker_id', worker_id),
           $1
    FROM upd
)
SELECT * FROM upd ORDER BY priority DESC, run_at, seq

-- name: lock_running
-- Lock the jobs to finish, one by one through the primary key; the caller keeps
-- those still running. A state = 'running' condition here tempts the planner
-- into an index over the running jobs, a scan of all of them per id, whenever
-- its statistics say few run (a big backlog analyzed before the workers
-- started): a finish of 12,600 jobs took minutes. ($1 is sorted, so concurrent
-- finishers lock in one order.)
SELECT j.* FROM unnest($1::text[]) AS t(id)
CROSS JOIN LATERAL (
    SELECT id, state, lease_token, attempt, started_at, job_type, queue, has_children,
           cancel_requested_at, run_at, error, workflow_id, step_name, payload_version
    FROM conveyor.jobs
    WHERE id = t.id
    FOR UPDATE
) j

-- name: apply_finishes
-- One statement for a whole batch: new job columns, execution rows, outbox events.
-- Every job of it is running and locked by lock_running in this transaction: the
-- joins go by id alone (see lock_running on why not by state too).
WITH f AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::integer[], $7::boolean[], $8::timestamptz[], $16::text[])
        AS t(id, state, result, error, run_at, attempt, keep_worker, completed_at, payload)
), upd AS (
    -- A healed retry (payload not NULL) replaces the payload and bumps its version.
    UPDATE conveyor.jobs j
    SET state = f.state, result = f.result::jsonb, error = f.error, run_at = f.run_at,
        attempt = f.attempt, worker_id = CASE WHEN f.keep_worker THEN j.worker_id END,
        lease_token = NULL, completed_at = f.completed_at, updated_at = $12,
        payload = coalesce(f.payload::jsonb, j.payload),
        payload_version = j.payload_version + (f.payload IS NOT NULL)::integer
    FROM f WHERE j.id = f.id
), x AS (
    SELECT * FROM unnest($1::text[], $9::integer[], $10::text[], $11::text[], $17::text[])
        AS x(job_id, attempt, outcome, error, traceback)
), legacy AS (
    -- Attempts started before 0003 have an open execution row: close it.
    UPDATE conveyor.job_executions e
    SET finished_at = $12, outcome = x.outcome, error = x.error, traceback = x.traceback
    FROM x WHERE e.job_id = x.job_id AND e.attempt = x.attempt AND e.finished_at IS NULL
    RETURNING e.job_id
), ex AS (
    -- The attempt's one execution row. Every CTE reads the snapshot from before the
    -- UPDATE above, so j is the running row: its worker and start time.
    INSERT INTO conveyor.job_executions (job_id, attempt, worker_id, started_at, finished_at,
                                         outcome, error, payload_version, traceback)
    SELECT x.job_id, x.attempt, j.worker_id, j.started_at, $12, x.outcome, x.error,
           j.payload_version, x.traceback
    FROM x JOIN conveyor.jobs j ON j.id = x.job_id
    WHERE x.job_id NOT IN (SELECT job_id FROM legacy)
)
INSERT INTO conveyor.events (type, job_id, data, created_at)
SELECT type, job_id, data::jsonb, $12
FROM unnest($13::text[], $14::text[], $15::text[]) AS t(type, job_id, data)

-- name: insert_events
INSERT INTO conveyor.events (type, job_id, data, created_at)
SELECT type, job_id, data::jsonb, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t(type, job_id, data)

-- name: blocked_children
SELECT * FROM conveyor.jobs
WHERE id IN (SELECT child_id FROM conveyor.job_dependencies WHERE parent_id = ANY($1::text[]))
  AND state = 'blocked'
ORDER BY seq
FOR UPDATE

-- name: parent_verdicts
-- For children locked by blocked_children: what their parents' states decide. A
-- statement of its own, after the lock: its snapshot sees a parent another
-- transaction finished while we waited for that lock.
SELECT d.child_id, bool_or(p.state IN ('failed', 'cancelled')) AS any_failed,
       bool_and(p.state = 'completed') AS all_completed
FROM conveyor.job_dependencies d JOIN conveyor.jobs p ON p.id = d.parent_id
WHERE d.child_id = ANY($1::text[])
GROUP BY d.child_id

-- name: unblock_with_events
-- unblock ($2: may be empty), the events of a level of children ($3-$5) and one
-- NOTIFY when a child became ready, in one statement.
WITH u AS (
    UPDATE conveyor.jobs SET state = 'pending', run_at = $1, updated_at = $1
    WHERE id = ANY($2::text[]) AND state = 'blocked'
    RETURNING id
), ev AS (
    INSERT INTO conveyor.events (type, job_id, data, created_at)
    SELECT type, job_id, data::jsonb, $1
    FROM unnest($3::text[], $4::text[], $5::text[]) AS t(type, job_id, data)
)
SELECT pg_notify('conveyor_jobs', '') FROM u LIMIT 1

-- name: cancel_blocked
UPDATE conveyor.jobs SET state = 'cancelled', error = $1, completed_at = $2, updated_at = $2
WHERE id = ANY($3::text[]) AND state = 'blocked'

-- name: get_job_for_update
SELECT * FROM conveyor.jobs WHERE id = $1 FOR UPDATE

-- name: cancel_waiting
UPDATE conveyor.jobs SET state = 'cancelled', completed_at = $2, updated_at = $2,
    error = CASE WHEN $3::text IS NULL THEN 'cancelled' ELSE 'cancelled: ' || $3::text END,
    metadata = CASE WHEN $3::text IS NULL THEN metadata
                    ELSE metadata || jsonb_build_object('cancel_reason', $3::text) END
WHERE id = $1 AND state IN ('pending', 'blocked')

-- name: request_cancel
UPDATE conveyor.jobs SET cancel_requested_at = $2, updated_at = $2,
    metadata = CASE WHEN $3::text IS NULL THEN metadata
                    ELSE metadata || jsonb_build_object('cancel_reason', $3::text) END
WHERE id = $1 AND state = 'running' AND cancel_requested_at IS NULL

-- name: upsert_worker
-- An id registered again is a new process (a restart with --worker-id): its row
-- describes the new one, and its started_at tells the old process's jobs apart
-- (see orphaned_running).
INSERT INTO conveyor.workers (id, host, pid, queues, job_types, concurrency, started_at,
                              heartbeat_at, state, jobs_running)
VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 'running', 0)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                               queues = excluded.queues, job_types = excluded.job_types,
                               concurrency = excluded.concurrency, started_at = $7,
                               heartbeat_at = $7, state = 'running', jobs_running = 0

-- name: heartbeat
WITH w AS (
    UPDATE conveyor.workers SET heartbeat_at = $2, jobs_running = $3, stuck_jobs = $4,
                                state = 'running'
    WHERE id = $1
)
SELECT id FROM conveyor.jobs
WHERE state = 'running' AND worker_id = $1 AND cancel_requested_at IS NOT NULL

-- name: deregister_worker
UPDATE conveyor.workers SET state = 'stopped', heartbeat_at = $2, jobs_running = 0
WHERE id = $1 AND state != 'stopped'
RETURNING id

-- name: mark_stale_workers_dead
UPDATE conveyor.workers SET state = 'dead'
WHERE state = 'running' AND heartbeat_at < $1
RETURNING id

-- name: orphaned_running
-- SKIP LOCKED: two rescuers never take the same job; rows a worker is finishing
-- right now are left for the next round.
-- A job is orphaned when its worker is not running, or was registered again
-- (restarted under the same id) after the job started: that process is gone.
SELECT * FROM conveyor.jobs j
WHERE j.state = 'running'
  AND NOT EXISTS (SELECT 1 FROM conveyor.workers w
                  WHERE w.id = j.worker_id AND w.state = 'running'
                    AND w.started_at <= j.started_at)
FOR UPDATE SKIP LOCKED

-- name: rescue_lost
UPDATE conveyor.jobs SET state = 'pending', lost_count = lost_count + 1, lease_token = NULL,
                         error = 'worker_lost', run_at = $1, updated_at = $1
WHERE id = $2 AND state = 'running' AND lease_token IS NOT DISTINCT FROM $3

-- name: rescue_quarantine
UPDATE conveyor.jobs SET state = 'failed', lost_count = lost_count + 1, lease_token = NULL,
                         error = 'worker_lost', completed_at = $1, updated_at = $1
WHERE id = $2 AND state = 'running' AND lease_token IS NOT DISTINCT FROM $3

-- name: rescue_cancel
UPDATE conveyor.jobs SET state = 'cancelled', lost_count = lost_count + 1, lease_token = NULL,
                         error = 'cancelled', completed_at = $1, updated_at = $1
WHERE id = $2 AND state = 'running' AND lease_token IS NOT DISTINCT FROM $3

-- name: end_execution
-- A lost attempt's execution row (or, for one started before 0003, its open row closed).
WITH legacy AS (
    UPDATE conveyor.job_executions SET finished_at = $1, outcome = $2, error = $3
    WHERE job_id = $4 AND attempt = $5 AND finished_at IS NULL
    RETURNING job_id
)
INSERT INTO conveyor.job_executions (job_id, attempt, worker_id, started_at, finished_at,
                                     outcome, error, payload_version)
SELECT $4, $5, $6, $7, $1, $2, $3, $8 WHERE NOT EXISTS (SELECT 1 FROM legacy)

-- name: retry_failed
UPDATE conveyor.jobs SET state = 'pending', attempt = 0, lost_count = 0, run_at = $2,
                         completed_at = NULL, cancel_requested_at = NULL, worker_id = NULL,
                         updated_at = $2
WHERE id = $1 AND state = 'failed'
RETURNING *

-- name: failed_ids
SELECT id FROM conveyor.jobs WHERE state = 'failed' FOR UPDATE

-- name: delete_jobs
WITH j AS (DELETE FROM conveyor.jobs WHERE id = ANY($1::text[])),
     e AS (DELETE FROM conveyor.job_executions WHERE job_id = ANY($1::text[])),
     s AS (DELETE FROM conveyor.job_steps WHERE job_id = ANY($1::text[]))
DELETE FROM conveyor.job_dependencies WHERE child_id = ANY($1::text[])

-- name: prunable
SELECT id FROM conveyor.jobs
WHERE state IN ('completed', 'cancelled') AND completed_at < $1
LIMIT 5000
FOR UPDATE SKIP LOCKED

-- name: prune_events
DELETE FROM conveyor.events WHERE created_at < $1

-- name: get_job
SELECT * FROM conveyor.jobs WHERE id = $1

-- name: job_parents
SELECT parent_id FROM conveyor.job_dependencies WHERE child_id = $1 ORDER BY parent_id

-- name: job_exists
SELECT 1 FROM conveyor.jobs WHERE id = $1

-- name: executions
-- Ended attempts, then the running one (from the job row: its execution row is
-- written when it ends).
SELECT job_id, attempt, worker_id, started_at, finished_at, outcome, error, payload_version,
       traceback
FROM (
    SELECT id AS ord, job_id, attempt, worker_id, started_at, finished_at, outcome, error,
           payload_version, traceback
    FROM conveyor.job_executions WHERE job_id = $1
    UNION ALL
    SELECT 9223372036854775807, j.id, j.attempt, j.worker_id, j.started_at, NULL, NULL, NULL,
           j.payload_version, NULL
    FROM conveyor.jobs j
    WHERE j.id = $1 AND j.state = 'running'
      AND NOT EXISTS (SELECT 1 FROM conveyor.job_executions e
                      WHERE e.job_id = j.id AND e.attempt = j.attempt AND e.finished_at IS NULL)
) runs ORDER BY ord

-- name: list_jobs
SELECT * FROM conveyor.jobs
WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
  AND ($2::text IS NULL OR job_type = $2)
  AND ($3::text IS NULL OR queue = $3)
  AND ($4::text IS NULL OR created_by = $4)
  AND ($7::boolean OR job_type NOT LIKE 'conveyor.%')
ORDER BY {order_by}
LIMIT $5 OFFSET $6

-- name: count_jobs
SELECT count(*) FROM conveyor.jobs
WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
  AND ($2::text IS NULL OR job_type = $2)
  AND ($3::text IS NULL OR queue = $3)
  AND ($4::text IS NULL OR created_by = $4)
  AND ($5::boolean OR job_type NOT LIKE 'conveyor.%')

-- name: count_by_state
SELECT state, count(*) FROM conveyor.jobs GROUP BY state

-- name: pending_by_type
SELECT queue, job_type, count(*) FROM conveyor.jobs WHERE state = 'pending'
GROUP BY queue, job_type

-- name: list_workers
SELECT * FROM conveyor.workers ORDER BY started_at

-- name: events_after
-- Used when the anchor event is gone (pruned) or for the very start (0).
SELECT id, type, job_id, data, created_at, txid::text AS anchor FROM conveyor.events
WHERE id > $1 AND txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, id LIMIT $2

-- name: submitted_since
SELECT count(*) FROM conveyor.jobs WHERE created_at >= $1

-- name: finished_since
SELECT job_type, state, count(*) FROM conveyor.jobs
WHERE completed_at >= $1 AND state IN ('completed', 'failed', 'cancelled')
GROUP BY job_type, state

-- name: insert_api_key
INSERT INTO conveyor.api_keys (id, name, scope, key_hash, prefix, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)

-- name: list_api_keys
SELECT * FROM conveyor.api_keys ORDER BY created_at

-- name: find_api_key
SELECT * FROM conveyor.api_keys WHERE key_hash = $1 AND revoked_at IS NULL

-- name: revoke_api_key
WITH r AS (
    UPDATE conveyor.api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL
    RETURNING *
)
SELECT * FROM r UNION ALL SELECT * FROM conveyor.api_keys WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM r)

-- name: count_active_api_keys
SELECT count(*) FROM conveyor.api_keys WHERE revoked_at IS NULL

-- name: event_anchor
SELECT txid::text FROM conveyor.events WHERE id = $1

-- name: events_after_anchor
-- Settled events after the event (txid, id), in the order no later commit changes.
SELECT id, type, job_id, data, created_at, txid::text AS anchor FROM conveyor.events
WHERE (txid, id) > ($1::text::xid8, $2)
  AND txid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY txid, id LIMIT $3

-- name: latest_event_id
SELECT coalesce((SELECT id FROM conveyor.events
                 WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY txid DESC, id DESC LIMIT 1), 0)

-- name: claim_consumer
-- Take the lease when it is free, expired or already ours; returns the position.
INSERT INTO conveyor.outbox_consumers AS c (name, position, owner, lease_expires_at, updated_at)
VALUES ($1, 0, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET owner = $2, lease_expires_at = $3, updated_at = $4
WHERE c.owner IS NULL OR c.owner = $2 OR c.lease_expires_at < $4
RETURNING position

-- name: advance_consumer
UPDATE conveyor.outbox_consumers SET position = $3, updated_at = $4
WHERE name = $1 AND owner = $2

-- name: release_consumer
UPDATE conveyor.outbox_consumers SET owner = NULL, lease_expires_at = NULL, updated_at = $3
WHERE name = $1 AND owner = $2

-- name: insert_webhook
INSERT INTO conveyor.webhooks (id, url, event_types, secret, state, consecutive_failures, created_at,
                               secret_ref)
VALUES ($1, $2, $3, $4, $5, 0, $6, $7)

-- name: list_webhooks
SELECT * FROM conveyor.webhooks ORDER BY created_at, id

-- name: get_webhook
SELECT * FROM conveyor.webhooks WHERE id = $1

-- name: delete_webhook
DELETE FROM conveyor.webhooks WHERE id = $1

-- name: insert_delivery
INSERT INTO conveyor.webhook_deliveries (webhook_id, delivery_id, event_id, event_type, job_id,
                                         attempt, outcome, status_code, error, duration_ms, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)

-- name: webhook_succeeded
UPDATE conveyor.webhooks SET consecutive_failures = 0, failing_since = NULL, last_delivered_at = $2
WHERE id = $1 RETURNING *

-- name: webhook_failed
UPDATE conveyor.webhooks SET consecutive_failures = consecutive_failures + 1,
                             failing_since = coalesce(failing_since, $2)
WHERE id = $1 RETURNING *

-- name: disable_webhook
UPDATE conveyor.webhooks SET state = 'disabled', disabled_at = $2, disabled_reason = $3,
                             replay_after = $4
WHERE id = $1 AND state = 'active' RETURNING *

-- name: lock_webhook
SELECT * FROM conveyor.webhooks WHERE id = $1 FOR UPDATE

-- name: enable_webhook
UPDATE conveyor.webhooks SET state = 'active', consecutive_failures = 0, failing_since = NULL,
                             disabled_at = NULL, disabled_reason = NULL, replay_after = NULL
WHERE id = $1 AND state = 'disabled' RETURNING *

-- name: insert_event_returning
INSERT INTO conveyor.events (type, job_id, data, created_at) VALUES ($1, $2, $3::jsonb, $4)
RETURNING id

-- name: list_deliveries
SELECT * FROM conveyor.webhook_deliveries WHERE webhook_id = $1 ORDER BY id DESC LIMIT $2

-- name: consumer_positions
SELECT name, position FROM conveyor.outbox_consumers ORDER BY name

-- name: upsert_job_types
INSERT INTO conveyor.job_types (job_type, queue, priority, max_retries, timeout_ms, updated_at)
SELECT t, q, p, r, ms, $6
FROM unnest($1::text[], $2::text[], $3::smallint[], $4::integer[], $5::integer[])
    AS u(t, q, p, r, ms)
ON CONFLICT (job_type) DO UPDATE SET
    queue = excluded.queue, priority = excluded.priority, max_retries = excluded.max_retries,
    timeout_ms = excluded.timeout_ms, updated_at = excluded.updated_at

-- name: list_job_types
SELECT job_type, queue, priority, max_retries, timeout_ms, updated_at
FROM conveyor.job_types ORDER BY job_type

-- name: ids_with_prefix
-- A range on the primary key: ids are lowercase hex, so [prefix, upper) is exactly
-- the ids starting with prefix (COLLATE "C": byte order, whatever the database's).
SELECT id FROM conveyor.jobs
WHERE id COLLATE "C" >= $1 AND id COLLATE "C" < $2
ORDER BY id COLLATE "C" LIMIT $3

-- name: save_step
-- Fenced by the attempt's lease: FOR SHARE waits for a concurrent rescue or
-- finish of the row and re-checks the lease on the row it left. A step stored
-- already keeps its first result. Returns the job's id when the lease is held.
WITH j AS (
    SELECT id, attempt FROM conveyor.jobs
    WHERE id = $1 AND state = 'running' AND lease_token = $2
    FOR SHARE
), ins AS (
    INSERT INTO conveyor.job_steps (job_id, name, result, attempt, created_at)
    SELECT id, $3, $4::text::jsonb, attempt, $5 FROM j
    ON CONFLICT (job_id, name) DO NOTHING
)
SELECT id FROM j

-- name: job_steps
SELECT name, result FROM conveyor.job_steps WHERE job_id = $1

-- name: save_checkpoint
UPDATE conveyor.jobs SET checkpoint = $3::text::jsonb
WHERE id = $1 AND state = 'running' AND lease_token = $2
