-- Webhook signing secrets in the vault (docs/security.md): secret_ref names the
-- vault secret holding an endpoint's signing secret; while it is set, the
-- secret column is empty. Rows written before a master key was configured keep
-- their secret here until an open with a master key moves it (a Python step:
-- SQL cannot encrypt).
ALTER TABLE conveyor.webhooks ADD COLUMN secret_ref text;
