-- The secrets vault (docs/security.md): one row per kept version of a secret,
-- its value sealed (AES-256-GCM under a per-version data key wrapped by the
-- master key); key_id names the master key, so rotation finds what to re-wrap.
CREATE TABLE conveyor.secrets (
    name text NOT NULL,
    version integer NOT NULL,
    key_id text NOT NULL,
    ciphertext bytea NOT NULL,
    created_at timestamp with time zone NOT NULL,
    PRIMARY KEY (name, version)
);

-- Key lifecycle: an optional expiry, and when the key last authenticated.
ALTER TABLE conveyor.api_keys ADD COLUMN expires_at timestamp with time zone;
ALTER TABLE conveyor.api_keys ADD COLUMN last_used_at timestamp with time zone;
