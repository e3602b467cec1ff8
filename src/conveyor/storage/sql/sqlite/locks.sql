-- Distributed locks (storage/sqlite.py, "locks"). Times are epoch seconds.

-- name: acquire_lock
-- Take the key when it was never held, was released or has expired: one
-- statement, the token one above the key's last.
INSERT INTO locks (key, owner, token, acquired_at, expires_at)
VALUES (:key, :owner, 1, :now, :expires)
ON CONFLICT (key) DO UPDATE SET owner = :owner, token = locks.token + 1, acquired_at = :now,
                                expires_at = :expires
WHERE locks.owner IS NULL OR locks.expires_at <= :now
RETURNING token

-- name: extend_lock
UPDATE locks SET expires_at = :expires
WHERE key = :key AND owner = :owner AND token = :token AND expires_at > :now

-- name: release_lock
-- Only its holder frees a key; returns whether it still held it (not expired).
UPDATE locks SET owner = NULL
WHERE key = :key AND owner = :owner AND token = :token
RETURNING expires_at > :now

-- name: check_lock
SELECT 1 FROM locks
WHERE key = :key AND token = :token AND owner IS NOT NULL AND expires_at > :now

-- name: list_locks
SELECT key, owner, token, acquired_at, expires_at FROM locks
WHERE :all OR (owner IS NOT NULL AND expires_at > :now)
ORDER BY key LIMIT :limit
