-- Named queries of the SQLite store's schedules (docs/schedules.md).

-- name: insert_schedule
INSERT INTO job_schedules (id, name, cron, timezone, job_type, payload, queue, priority,
                           max_retries, timeout_ms, misfire, catch_up_max, jitter, overlap,
                           state, source, next_fire_at, created_at, updated_at)
VALUES (:id, :name, :cron, :timezone, :job_type, :payload, :queue, :priority, :max_retries,
        :timeout_ms, :misfire, :catch_up_max, :jitter, :overlap, :state, :source,
        :next_fire_at, :now, :now)

-- name: update_schedule
UPDATE job_schedules
SET name = :name, cron = :cron, timezone = :timezone, job_type = :job_type, payload = :payload,
    queue = :queue, priority = :priority, max_retries = :max_retries, timeout_ms = :timeout_ms,
    misfire = :misfire, catch_up_max = :catch_up_max, jitter = :jitter, overlap = :overlap,
    state = :state, source = :source, next_fire_at = :next_fire_at, updated_at = :now
WHERE id = :id

-- name: schedule_by_id
SELECT * FROM job_schedules WHERE id = ?

-- name: schedule_id_by_name
SELECT id FROM job_schedules WHERE name = ?

-- name: list_schedules
SELECT * FROM job_schedules ORDER BY name

-- name: delete_schedule
DELETE FROM job_schedules WHERE id = ?

-- name: delete_schedule_fires
DELETE FROM schedule_fires WHERE schedule_id = ?

-- name: due_schedules
SELECT * FROM job_schedules INDEXED BY job_schedules_due
WHERE state = 'active' AND next_fire_at <= ? ORDER BY next_fire_at, id LIMIT ?

-- name: advance_schedule
-- Compare-and-set on next_fire_at: of several schedulers, only the first moves it.
UPDATE job_schedules SET next_fire_at = :next, updated_at = :now
WHERE id = :id AND state = 'active' AND next_fire_at = :expected
RETURNING *

-- name: insert_fire
INSERT INTO schedule_fires (schedule_id, fire_at, job_id, fired_at) VALUES (?, ?, NULL, ?)
ON CONFLICT DO NOTHING

-- name: job_state
SELECT state FROM jobs WHERE id = ?

-- name: link_job
UPDATE jobs SET schedule_id = ? WHERE id = ?

-- name: fire_done
UPDATE schedule_fires SET job_id = ? WHERE schedule_id = ? AND fire_at = ?

-- name: schedule_fired
UPDATE job_schedules SET last_fired_at = ?, last_job_id = ? WHERE id = ?

-- name: insert_event
INSERT INTO events (type, job_id, data, created_at) VALUES (?, ?, ?, ?)

-- name: prune_fires
DELETE FROM schedule_fires WHERE fire_at < ?
