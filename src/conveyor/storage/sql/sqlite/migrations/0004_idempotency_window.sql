-- An idempotency key names one job for as long as that job is kept, whatever its
-- state (until it is pruned or purged), not only while it is active: a client
-- that retries its submit after the first job finished gets that job back.
--
-- Before this, a key could be reused once its job had finished, so a database
-- may hold several jobs with one key. The one that keeps it: the active job if
-- there is one (at most one was allowed), else the newest; the others keep their
-- history and lose the key.
CREATE INDEX jobs_idempotency_all ON jobs (idempotency_key, seq)
    WHERE idempotency_key IS NOT NULL;

UPDATE jobs SET idempotency_key = NULL
WHERE idempotency_key IS NOT NULL
  AND seq != (SELECT k.seq FROM jobs AS k
              WHERE k.idempotency_key = jobs.idempotency_key
              ORDER BY k.state IN ('blocked', 'pending', 'running') DESC, k.seq DESC
              LIMIT 1);

DROP INDEX jobs_idempotency_all;
DROP INDEX jobs_idempotency;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
