-- The traceback of an attempt that raised (its last 8,192 characters), shown by
-- the job's history (API, CLI, dashboard); the job's error stays one line.
ALTER TABLE job_executions ADD COLUMN traceback text;
