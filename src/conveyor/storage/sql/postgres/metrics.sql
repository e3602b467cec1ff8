-- Queries behind the fleet gauges of /metrics (docs/metrics.md).

-- name: queue_stats
-- Work to do or to look at, by queue and state; finished jobs are not scanned.
-- For pending rows, the oldest run_at already due (NULL when none is due).
SELECT queue, state, count(*) AS n,
       min(run_at) FILTER (WHERE state = 'pending' AND run_at <= $1) AS oldest_due
FROM conveyor.jobs
WHERE state IN ('blocked', 'pending', 'running', 'failed')
GROUP BY queue, state
