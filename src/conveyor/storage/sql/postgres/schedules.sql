-- Named queries of the PostgreSQL store's schedules (docs/schedules.md).

-- name: insert_schedule
INSERT INTO conveyor.job_schedules (id, name, cron, timezone, job_type, payload, queue,
                                    priority, max_retries, timeout_ms, misfire, catch_up_max,
                                    jitter, overlap, state, source, next_fire_at, created_at,
                                    updated_at)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
        $18, $18)
ON CONFLICT DO NOTHING
RETURNING *

-- name: update_schedule
UPDATE conveyor.job_schedules
SET name = $2, cron = $3, timezone = $4, job_type = $5, payload = $6::text::jsonb, queue = $7,
    priority = $8, max_retries = $9, timeout_ms = $10, misfire = $11, catch_up_max = $12,
    jitter = $13, overlap = $14, state = $15, source = $16, next_fire_at = $17, updated_at = $18
WHERE id = $1
RETURNING *

-- name: schedule_by_id
SELECT * FROM conveyor.job_schedules WHERE id = $1

-- name: schedule_id_by_name
SELECT id FROM conveyor.job_schedules WHERE name = $1

-- name: list_schedules
SELECT * FROM conveyor.job_schedules ORDER BY name

-- name: delete_schedule
DELETE FROM conveyor.job_schedules WHERE id = $1 RETURNING id

-- name: due_schedules
SELECT * FROM conveyor.job_schedules
WHERE state = 'active' AND next_fire_at <= $1 ORDER BY next_fire_at, id LIMIT $2

-- name: advance_schedule
-- Compare-and-set on next_fire_at: of several schedulers, only the first moves it
-- (the others wait for its row lock, then find next_fire_at changed).
UPDATE conveyor.job_schedules SET next_fire_at = $3, updated_at = $4
WHERE id = $1 AND state = 'active' AND next_fire_at = $2
RETURNING *

-- name: insert_fire
INSERT INTO conveyor.schedule_fires (schedule_id, fire_at, job_id, fired_at)
VALUES ($1, $2, NULL, $3)
ON CONFLICT DO NOTHING
RETURNING fire_at

-- name: job_state
SELECT state FROM conveyor.jobs WHERE id = $1

-- name: link_job
UPDATE conveyor.jobs SET schedule_id = $1 WHERE id = $2

-- name: fire_done
UPDATE conveyor.schedule_fires SET job_id = $1 WHERE schedule_id = $2 AND fire_at = $3

-- name: schedule_fired
UPDATE conveyor.job_schedules SET last_fired_at = $1, last_job_id = $2 WHERE id = $3

-- name: insert_schedule_event
INSERT INTO conveyor.events (type, job_id, data, created_at) VALUES ($1, $2, $3::text::jsonb, $4)

-- name: prune_fires
DELETE FROM conveyor.schedule_fires WHERE fire_at < $1
