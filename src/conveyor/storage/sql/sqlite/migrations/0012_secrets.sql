-- The secrets vault (docs/security.md): one row per kept version of a secret,
-- its value sealed (AES-256-GCM under a per-version data key wrapped by the
-- master key); key_id names the master key, so rotation finds what to re-wrap.
CREATE TABLE secrets (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    key_id     TEXT    NOT NULL,
    ciphertext BLOB    NOT NULL,
    created_at REAL    NOT NULL,
    PRIMARY KEY (name, version)
);

-- Key lifecycle: an optional expiry, and when the key last authenticated.
ALTER TABLE api_keys ADD COLUMN expires_at REAL;
ALTER TABLE api_keys ADD COLUMN last_used_at REAL;
