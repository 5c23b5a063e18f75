-- Human approvals: a request is bound to one exact call (action, argument digest, policy version,
-- agent and run), decided once by an authenticated approver, and consumed once by the call.
CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    agent_id        TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    session_id      TEXT NOT NULL,
    action          TEXT NOT NULL,
    args_digest     BIGINT NOT NULL,
    policy_version  TEXT NOT NULL,
    cost_micros     BIGINT NOT NULL,
    intervention_id TEXT,
    request         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    decided_at      BIGINT,
    decided_by      TEXT,
    reason          TEXT,
    consumed_at     BIGINT
);
CREATE INDEX approvals_by_status ON approvals (status, created_at);
