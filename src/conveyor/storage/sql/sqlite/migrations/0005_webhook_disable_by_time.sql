-- Webhooks are disabled by time failing, not by a count of failures in a row,
-- and re-enabling one delivers the events it missed while disabled.
ALTER TABLE webhooks ADD COLUMN failing_since REAL;
ALTER TABLE webhooks ADD COLUMN last_delivered_at REAL;
-- While disabled: the id of its webhook_disabled event (missed events come after it).
ALTER TABLE webhooks ADD COLUMN replay_after INTEGER;
