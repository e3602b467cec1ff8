-- Key rotation, webhook secrets in the vault, secret retention by time
-- (storage/secrets_postgres.py).

-- name: api_key_state
-- Locks the old key's row: two rotations of one key take turns.
SELECT revoked_at, expires_at FROM conveyor.api_keys WHERE id = $1 FOR UPDATE

-- name: insert_rotated_api_key
INSERT INTO conveyor.api_keys (id, name, scope, key_hash, prefix, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)

-- name: end_api_key
-- The old key of a rotation stops at $2 (an earlier expiry stays).
UPDATE conveyor.api_keys SET expires_at = $2
WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2)

-- name: revoke_rotated_api_key
UPDATE conveyor.api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL

-- name: move_webhook_secret
-- Only while the row still holds the secret that was sealed (a concurrent move wins once).
UPDATE conveyor.webhooks SET secret = '', secret_ref = $2
WHERE id = $1 AND secret = $3 AND secret_ref IS NULL

-- name: prune_replaced_secrets
-- A version replaced at or before $1 goes (the newest version never does).
DELETE FROM conveyor.secrets AS s WHERE EXISTS (
    SELECT 1 FROM conveyor.secrets AS newer
    WHERE newer.name = s.name AND newer.version > s.version AND newer.created_at <= $1
)
