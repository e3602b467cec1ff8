-- The audit log (storage/audit.py). Appends run inside the caller's write
-- transaction (BEGIN IMMEDIATE), which is what keeps the chain from forking.

-- name: audit_head
SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1

-- name: insert_audit
INSERT INTO audit_log (seq, at, actor, action, resource_type, resource_id, summary, request_id, model, prompt, response, ai_hashed, prev_hash, hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: list_audit
SELECT seq, at, actor, action, resource_type, resource_id, summary, request_id, model, prompt, response, ai_hashed, prev_hash, hash FROM audit_log
WHERE seq > :after
  AND (:resource_id IS NULL OR resource_id = :resource_id)
  AND (:actor IS NULL OR actor = :actor)
  AND (:action IS NULL OR action = :action)
ORDER BY seq
LIMIT :limit

-- name: insert_anchor
INSERT OR IGNORE INTO audit_anchors (seq, hash, at, key_id, mac) VALUES (?, ?, ?, ?, ?)

-- name: list_anchors
SELECT seq, hash, at, key_id, mac FROM audit_anchors ORDER BY seq
