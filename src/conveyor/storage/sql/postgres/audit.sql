-- The audit log (storage/audit.py). Appends run inside the caller's
-- transaction and take turns on a transaction advisory lock, so concurrent
-- appenders never fork the chain.

-- name: audit_lock
SELECT pg_advisory_xact_lock(7366427213)

-- name: wrote_anything
-- NULL while the transaction has written nothing: a read that a scope's
-- upgraded transaction carried must not take the change's entries.
SELECT pg_current_xact_id_if_assigned()

-- name: audit_head
SELECT seq, hash FROM conveyor.audit_log ORDER BY seq DESC LIMIT 1

-- name: insert_audit
INSERT INTO conveyor.audit_log (seq, at, actor, action, resource_type, resource_id, summary, request_id, model, prompt, response, ai_hashed, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)

-- name: list_audit
SELECT seq, at, actor, action, resource_type, resource_id, summary, request_id, model, prompt, response, ai_hashed, prev_hash, hash FROM conveyor.audit_log
WHERE seq > $1
  AND ($2::text IS NULL OR resource_id = $2)
  AND ($3::text IS NULL OR actor = $3)
  AND ($4::text IS NULL OR action = $4)
ORDER BY seq
LIMIT $5

-- name: insert_anchor
INSERT INTO conveyor.audit_anchors (seq, hash, at, key_id, mac) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (seq) DO NOTHING

-- name: list_anchors
SELECT seq, hash, at, key_id, mac FROM conveyor.audit_anchors ORDER BY seq
