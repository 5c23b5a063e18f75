-- Notifications: channels (email, Slack, signed webhooks), a persistent outbox delivered at least
-- once with retries, single-use approval links, once-only alert marks, and approval escalation.
CREATE TABLE channels (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('email', 'slack', 'webhook')),
    -- JSON: {"to": [...]} for email, {"url": ...} for Slack, {"url": ..., "secret": ...} for webhooks.
    config      TEXT NOT NULL,
    -- JSON list of event types; empty means every event.
    events      TEXT NOT NULL,
    enabled     BIGINT NOT NULL DEFAULT 1,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- One row per message to one target. The id is the idempotency key every delivery carries.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    event           TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('email', 'slack', 'webhook')),
    channel_id      TEXT,
    target          TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    claimed_until   BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX outbox_recent ON outbox (created_at, id);

CREATE TABLE approval_links (
    id          TEXT PRIMARY KEY,
    approval_id TEXT NOT NULL,
    issued_to   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);

CREATE TABLE alert_marks (
    key TEXT PRIMARY KEY,
    at  BIGINT NOT NULL
);

ALTER TABLE approvals ADD COLUMN escalate_at BIGINT;
ALTER TABLE approvals ADD COLUMN escalated_at BIGINT;
ALTER TABLE agents ADD COLUMN failure_streak BIGINT NOT NULL DEFAULT 0;
