-- Webhooks are disabled by time failing, not by a count of failures in a row,
-- and re-enabling one delivers the events it missed while disabled.
ALTER TABLE conveyor.webhooks ADD COLUMN failing_since timestamptz;
ALTER TABLE conveyor.webhooks ADD COLUMN last_delivered_at timestamptz;
-- While disabled: the id of its webhook_disabled event (missed events come after it).
ALTER TABLE conveyor.webhooks ADD COLUMN replay_after bigint;
