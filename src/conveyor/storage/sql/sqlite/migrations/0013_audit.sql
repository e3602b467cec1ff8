-- The hash-chained audit log (docs/security.md): append-only entries, each
-- hash covering the entry's fields and the previous entry's hash; anchors are
-- signed checkpoints (seq, hash) that let `conveyor audit verify` detect a
-- truncated tail. Times and summaries are the canonical text the hashes cover.
CREATE TABLE audit_log (
    seq           INTEGER PRIMARY KEY,
    at            TEXT    NOT NULL,
    actor         TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    summary       TEXT    NOT NULL,
    request_id    TEXT,
    model         TEXT,
    prompt        TEXT,
    response      TEXT,
    ai_hashed     INTEGER NOT NULL DEFAULT 0,
    prev_hash     TEXT    NOT NULL,
    hash          TEXT    NOT NULL
);
CREATE INDEX audit_log_resource ON audit_log (resource_id, seq);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);

CREATE TABLE audit_anchors (
    seq    INTEGER PRIMARY KEY,
    hash   TEXT NOT NULL,
    at     TEXT NOT NULL,
    key_id TEXT,
    mac    TEXT
);
