-- Timestamps are milliseconds since the Unix epoch, so both backends share one schema shape.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    prefix       TEXT NOT NULL,
    key_hash     BYTEA NOT NULL UNIQUE,
    name         TEXT NOT NULL DEFAULT '',
    scope        TEXT NOT NULL CHECK (scope IN ('admin', 'agent', 'readonly')),
    agent_id     TEXT,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    CHECK ((scope = 'agent') = (agent_id IS NOT NULL))
);

CREATE TABLE policies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    version    BIGINT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);

CREATE TABLE policy_versions (
    policy_id TEXT NOT NULL,
    version   BIGINT NOT NULL,
    name      TEXT NOT NULL,
    change    TEXT NOT NULL CHECK (change IN ('create', 'update', 'delete')),
    body      TEXT,
    diff      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    at        BIGINT NOT NULL,
    PRIMARY KEY (policy_id, version)
);
