-- Distributed locks and leader leases: one row per key, never deleted, so the
-- fencing token (the count of acquisitions) only grows. A released lock keeps
-- its token with owner NULL; an expired one is free from expires_at on.
CREATE TABLE conveyor.locks (
    key text PRIMARY KEY,
    owner text,
    token bigint NOT NULL,
    acquired_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL
);
