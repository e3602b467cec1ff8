-- Key rotation, webhook secrets in the vault, secret retention by time
-- (storage/secrets_sqlite.py). Times are epoch seconds.

-- name: api_key_state
SELECT revoked_at, expires_at FROM api_keys WHERE id = ?

-- name: insert_rotated_api_key
INSERT INTO api_keys (id, name, scope, key_hash, prefix, created_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)

-- name: end_api_key
-- The old key of a rotation stops at :until (an earlier expiry stays).
UPDATE api_keys SET expires_at = :until
WHERE id = :id AND (expires_at IS NULL OR expires_at > :until)

-- name: revoke_rotated_api_key
UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL

-- name: move_webhook_secret
-- Only while the row still holds the secret that was sealed (a concurrent move wins once).
UPDATE webhooks SET secret = '', secret_ref = :ref
WHERE id = :id AND secret = :secret AND secret_ref IS NULL

-- name: prune_replaced_secrets
-- A version replaced at or before :before goes (the newest version never does).
DELETE FROM secrets WHERE EXISTS (
    SELECT 1 FROM secrets AS newer
    WHERE newer.name = secrets.name AND newer.version > secrets.version
      AND newer.created_at <= :before
)
