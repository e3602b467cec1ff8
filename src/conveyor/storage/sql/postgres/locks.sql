-- Distributed locks (storage/postgres.py, "locks").

-- name: acquire_lock
-- Take the key when it was never held, was released or has expired: one
-- statement; ON CONFLICT locks the row, so concurrent takers serialize on it and
-- re-check the WHERE against the winner's row. The token is one above the last.
INSERT INTO conveyor.locks AS l (key, owner, token, acquired_at, expires_at)
VALUES ($1, $2, 1, $3, $4)
ON CONFLICT (key) DO UPDATE SET owner = $2, token = l.token + 1, acquired_at = $3,
                                expires_at = $4
WHERE l.owner IS NULL OR l.expires_at <= $3
RETURNING token

-- name: extend_lock
UPDATE conveyor.locks SET expires_at = $5
WHERE key = $1 AND owner = $2 AND token = $3 AND expires_at > $4

-- name: release_lock
-- Only its holder frees a key; returns whether it still held it (not expired).
UPDATE conveyor.locks SET owner = NULL
WHERE key = $1 AND owner = $2 AND token = $3
RETURNING expires_at > $4

-- name: check_lock
SELECT 1 FROM conveyor.locks
WHERE key = $1 AND token = $2 AND owner IS NOT NULL AND expires_at > $3

-- name: list_locks
SELECT key, owner, token, acquired_at, expires_at FROM conveyor.locks
WHERE $1 OR (owner IS NOT NULL AND expires_at > $2)
ORDER BY key LIMIT $3
