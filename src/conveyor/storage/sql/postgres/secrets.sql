-- The secrets vault (storage/secrets_postgres.py).

-- name: lock_secret_name
-- Two writers of one name take turns, so versions never collide.
SELECT pg_advisory_xact_lock(hashtextextended('conveyor.secrets:' || $1::text, 0))

-- name: latest_secret_version
SELECT max(version) FROM conveyor.secrets WHERE name = $1

-- name: insert_secret
INSERT INTO conveyor.secrets (name, version, key_id, ciphertext, created_at)
VALUES ($1, $2, $3, $4, $5)

-- name: prune_secret
-- Keep the newest $3 versions of one secret.
DELETE FROM conveyor.secrets WHERE name = $1 AND version <= $2::integer - $3::integer

-- name: get_secret
SELECT name, version, key_id, ciphertext, created_at FROM conveyor.secrets
WHERE name = $1 AND version = $2

-- name: list_secrets
SELECT name, max(version), count(*), min(created_at), max(created_at) FROM conveyor.secrets
GROUP BY name ORDER BY name

-- name: delete_secret
DELETE FROM conveyor.secrets WHERE name = $1

-- name: all_secrets
-- Locks every row: a rotation and a concurrent set take turns.
SELECT name, version, key_id, ciphertext, created_at FROM conveyor.secrets
ORDER BY name, version FOR UPDATE

-- name: rewrap_secret
UPDATE conveyor.secrets SET key_id = $1, ciphertext = $2 WHERE name = $3 AND version = $4

-- name: touch_api_key
-- Key lifecycle: when a key last authenticated (never moves back).
UPDATE conveyor.api_keys SET last_used_at = $1
WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)
