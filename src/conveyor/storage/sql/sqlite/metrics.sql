-- Queries behind the fleet gauges of /metrics (docs/metrics.md).

-- name: queue_stats
-- Work to do or to look at, by queue and state; finished jobs are not scanned.
-- For pending rows, the oldest run_at already due (NULL when none is due).
SELECT queue, state, count(*) AS n,
       min(CASE WHEN state = 'pending' AND run_at <= :now THEN run_at END) AS oldest_due
FROM jobs
WHERE state IN ('blocked', 'pending', 'running', 'failed')
GROUP BY queue, state
