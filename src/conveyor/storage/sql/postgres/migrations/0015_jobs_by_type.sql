-- The jobs of one type, newest first: the dashboard's and GET /api/jobs' type
-- filter. Without it a type with few or no jobs walks the whole table (129 ms
-- for no match on 1M jobs). Built in the migration's transaction: writes to
-- conveyor.jobs wait for it (about a second per million jobs).
CREATE INDEX jobs_type_created ON conveyor.jobs (job_type, created_at);
