-- Distributed locks and leader leases: one row per key, never deleted, so the
-- fencing token (the count of acquisitions) only grows. A released lock keeps
-- its token with owner NULL; an expired one is free from expires_at on.
CREATE TABLE locks (
    key         TEXT    PRIMARY KEY,
    owner       TEXT,
    token       INTEGER NOT NULL,
    acquired_at REAL    NOT NULL,
    expires_at  REAL    NOT NULL
);
