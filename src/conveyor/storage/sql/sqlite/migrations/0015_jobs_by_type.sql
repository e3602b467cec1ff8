-- The jobs of one type, newest first: the dashboard's and GET /api/jobs' type
-- filter, without walking the whole table for a type with few or no jobs.
CREATE INDEX jobs_type_created ON jobs (job_type, created_at);
