-- Cron schedules (docs/schedules.md). A schedule_fires row per fired instant,
-- unique per (schedule, instant) and written in the transaction of the job it
-- creates: however many schedulers run, an instant fires once.
CREATE TABLE job_schedules (
    id            TEXT PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    cron          TEXT    NOT NULL,
    timezone      TEXT    NOT NULL,
    job_type      TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    queue         TEXT    NOT NULL,
    priority      INTEGER NOT NULL,
    max_retries   INTEGER NOT NULL,
    timeout_ms    INTEGER,
    misfire       TEXT    NOT NULL,
    catch_up_max  INTEGER NOT NULL,
    jitter        REAL    NOT NULL,
    overlap       TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    next_fire_at  REAL,
    last_fired_at REAL,
    last_job_id   TEXT,
    created_at    REAL    NOT NULL,
    updated_at    REAL    NOT NULL
);

CREATE INDEX job_schedules_due ON job_schedules (next_fire_at) WHERE state = 'active';

CREATE TABLE schedule_fires (
    schedule_id TEXT NOT NULL,
    fire_at     REAL NOT NULL,
    job_id      TEXT,
    fired_at    REAL NOT NULL,
    PRIMARY KEY (schedule_id, fire_at)
) WITHOUT ROWID;

ALTER TABLE jobs ADD COLUMN schedule_id TEXT;

CREATE INDEX jobs_schedule ON jobs (schedule_id) WHERE schedule_id IS NOT NULL;
