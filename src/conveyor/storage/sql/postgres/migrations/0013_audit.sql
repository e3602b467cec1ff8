-- The hash-chained audit log (docs/security.md): append-only entries, each
-- hash covering the entry's fields and the previous entry's hash; anchors are
-- signed checkpoints (seq, hash) that let `conveyor audit verify` detect a
-- truncated tail. Times and summaries are kept as the canonical text the
-- hashes cover (not timestamptz/jsonb, which would normalise them).
CREATE TABLE conveyor.audit_log (
    seq bigint PRIMARY KEY,
    at text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    summary text NOT NULL,
    request_id text,
    model text,
    prompt text,
    response text,
    ai_hashed boolean NOT NULL DEFAULT false,
    prev_hash text NOT NULL,
    hash text NOT NULL
);
CREATE INDEX audit_log_resource ON conveyor.audit_log (resource_id, seq);
CREATE INDEX audit_log_actor ON conveyor.audit_log (actor, seq);
CREATE INDEX audit_log_action ON conveyor.audit_log (action, seq);

CREATE TABLE conveyor.audit_anchors (
    seq bigint PRIMARY KEY,
    hash text NOT NULL,
    at text NOT NULL,
    key_id text,
    mac text
);
