-- Outbox consumers (the relay, the webhook dispatcher) and webhooks.
-- SQLite commits one writer at a time and AUTOINCREMENT hands out ids inside
-- the write lock, so event ids are already in commit order.

-- One row per named outbox consumer: how far it got, and who holds its lease.
CREATE TABLE outbox_consumers (
    name             TEXT PRIMARY KEY,
    position         INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    lease_expires_at REAL,
    updated_at       REAL NOT NULL
);

CREATE TABLE webhooks (
    id                   TEXT PRIMARY KEY,
    url                  TEXT    NOT NULL,
    event_types          TEXT    NOT NULL,
    secret               TEXT    NOT NULL,
    state                TEXT    NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    created_at           REAL    NOT NULL,
    disabled_at          REAL,
    disabled_reason      TEXT
);

-- One row per HTTP attempt; delivery_id is shared by the attempts of one event.
CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id  TEXT    NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    delivery_id TEXT    NOT NULL,
    event_id    INTEGER NOT NULL,
    event_type  TEXT    NOT NULL,
    job_id      TEXT,
    attempt     INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration_ms REAL    NOT NULL,
    created_at  REAL    NOT NULL
);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries (webhook_id, id);
