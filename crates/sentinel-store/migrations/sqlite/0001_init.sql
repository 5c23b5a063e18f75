-- Timestamps are milliseconds since the Unix epoch, so both backends share one schema shape.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    prefix       TEXT NOT NULL,
    key_hash     BLOB NOT NULL UNIQUE,
    name         TEXT NOT NULL DEFAULT '',
    scope        TEXT NOT NULL CHECK (scope IN ('admin', 'agent', 'readonly')),
    agent_id     TEXT,
    active       INTEGER NOT NULL DEFAULT 1,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    CHECK ((scope = 'agent') = (agent_id IS NOT NULL))
);

CREATE TABLE policies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL
);

CREATE TABLE policy_versions (
    policy_id TEXT NOT NULL,
    version   INTEGER NOT NULL,
    name      TEXT NOT NULL,
    change    TEXT NOT NULL CHECK (change IN ('create', 'update', 'delete')),
    body      TEXT,
    diff      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (policy_id, version)
);
