-- Outbox ordering, outbox consumers (the relay, the webhook dispatcher), webhooks.

-- Identity values are taken before commit, so ids can commit out of order. The
-- writing transaction's id says when an event is settled: every event whose
-- txid is older than the oldest running transaction is committed or gone for
-- good. Readers deliver settled events in (txid, id) order, which no later
-- commit can go back on.
ALTER TABLE conveyor.events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_order ON conveyor.events (txid, id);

-- One row per named outbox consumer: how far it got, and who holds its lease.
CREATE TABLE conveyor.outbox_consumers (
    name             text PRIMARY KEY,
    position         bigint      NOT NULL DEFAULT 0,
    owner            text,
    lease_expires_at timestamptz,
    updated_at       timestamptz NOT NULL
);

CREATE TABLE conveyor.webhooks (
    id                   text PRIMARY KEY,
    url                  text        NOT NULL,
    event_types          jsonb       NOT NULL,
    secret               text        NOT NULL,
    state                text        NOT NULL,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL,
    disabled_at          timestamptz,
    disabled_reason      text
);

-- One row per HTTP attempt; delivery_id is shared by the attempts of one event.
CREATE TABLE conveyor.webhook_deliveries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id  text             NOT NULL REFERENCES conveyor.webhooks (id) ON DELETE CASCADE,
    delivery_id text             NOT NULL,
    event_id    bigint           NOT NULL,
    event_type  text             NOT NULL,
    job_id      text,
    attempt     integer          NOT NULL,
    outcome     text             NOT NULL,
    status_code integer,
    error       text,
    duration_ms double precision NOT NULL,
    created_at  timestamptz      NOT NULL
);
CREATE INDEX webhook_deliveries_hook ON conveyor.webhook_deliveries (webhook_id, id);
