-- An idempotency key names one job for as long as that job is kept, whatever its
-- state (until it is pruned or purged), not only while it is active: a client
-- that retries its submit after the first job finished gets that job back.
--
-- Before this, a key could be reused once its job had finished, so a database
-- may hold several jobs with one key. The one that keeps it: the active job if
-- there is one (at most one was allowed), else the newest; the others keep their
-- history and lose the key.
UPDATE conveyor.jobs j SET idempotency_key = NULL
FROM (
    SELECT id, row_number() OVER (
               PARTITION BY idempotency_key
               ORDER BY state IN ('blocked', 'pending', 'running') DESC, seq DESC) AS rank
    FROM conveyor.jobs
    WHERE idempotency_key IS NOT NULL
) ranked
WHERE j.id = ranked.id AND ranked.rank > 1;

DROP INDEX conveyor.jobs_idempotency;
CREATE UNIQUE INDEX jobs_idempotency ON conveyor.jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
