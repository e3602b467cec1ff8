-- The secrets vault (storage/secrets_sqlite.py). Times are epoch seconds.

-- name: latest_secret_version
SELECT max(version) FROM secrets WHERE name = ?

-- name: insert_secret
INSERT INTO secrets (name, version, key_id, ciphertext, created_at) VALUES (?, ?, ?, ?, ?)

-- name: prune_secret
-- Keep the newest :keep versions of one secret.
DELETE FROM secrets WHERE name = :name AND version <= :newest - :keep

-- name: get_secret
SELECT name, version, key_id, ciphertext, created_at FROM secrets
WHERE name = ? AND version = ?

-- name: list_secrets
SELECT name, max(version), count(*), min(created_at), max(created_at) FROM secrets
GROUP BY name ORDER BY name

-- name: delete_secret
DELETE FROM secrets WHERE name = ?

-- name: all_secrets
SELECT name, version, key_id, ciphertext, created_at FROM secrets ORDER BY name, version

-- name: rewrap_secret
UPDATE secrets SET key_id = ?, ciphertext = ? WHERE name = ? AND version = ?

-- name: touch_api_key
-- Key lifecycle: when a key last authenticated (never moves back).
UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)
