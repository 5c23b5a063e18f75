-- Central decisions: reservations (one row per allowed /decide), spend totals and sliding-window
-- events (the counters every replica shares), and halts.
-- One B-tree per reservation (no rowid, no secondary indexes): every allowed decision is a small
-- commit, so each page a commit touches counts. Start-up scans the table once.
CREATE TABLE reservations (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    action         TEXT NOT NULL,
    args_digest    BIGINT NOT NULL,
    cost_micros    BIGINT NOT NULL,
    actual_micros  BIGINT,
    state          TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'released', 'expired')),
    at_ns          BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    settled_at     BIGINT,
    policy_version TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE spend (
    key    TEXT PRIMARY KEY,
    micros BIGINT NOT NULL
);

CREATE TABLE window_events (
    key            TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    at_ns          BIGINT NOT NULL,
    expires_ns     BIGINT NOT NULL,
    PRIMARY KEY (key, reservation_id)
);
CREATE INDEX window_events_by_time ON window_events (key, at_ns);
CREATE INDEX window_events_expiry ON window_events (expires_ns);
CREATE INDEX window_events_by_reservation ON window_events (reservation_id);

CREATE TABLE halts (
    kind   TEXT NOT NULL CHECK (kind IN ('agent', 'run')),
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor  TEXT NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (kind, target)
);

-- Ingest: ledger lines and interventions from SDKs, by stream, with chain state and findings.
-- The line is stored exactly as the SDK wrote it (its hash covers its bytes); its fields are not
-- copied into columns, so an ingest writes each byte once.
CREATE TABLE ledger_entries (
    id          TEXT PRIMARY KEY,
    stream      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    line        TEXT NOT NULL
);
CREATE INDEX ledger_entries_stream ON ledger_entries (stream, seq);

CREATE TABLE streams (
    stream    TEXT PRIMARY KEY,
    agent_id  TEXT NOT NULL,
    last_seq  BIGINT NOT NULL,
    last_hash TEXT NOT NULL,
    entries   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE tamper_findings (
    id        TEXT PRIMARY KEY,
    stream    TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    entry_id  TEXT,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL,
    at        BIGINT NOT NULL
);

CREATE TABLE interventions (
    id                TEXT PRIMARY KEY,
    at                BIGINT NOT NULL,
    agent_id          TEXT NOT NULL,
    run_id            TEXT NOT NULL,
    session_id        TEXT NOT NULL,
    type              TEXT NOT NULL,
    outcome           TEXT NOT NULL,
    risk_level        TEXT NOT NULL,
    action            TEXT NOT NULL,
    policy            TEXT,
    rule              TEXT,
    estimated_micros  BIGINT NOT NULL,
    prevented_micros  BIGINT NOT NULL,
    source            TEXT NOT NULL,
    body              TEXT NOT NULL
);
CREATE INDEX interventions_by_time ON interventions (at, id);
CREATE INDEX interventions_by_agent ON interventions (agent_id, at);

CREATE TABLE agents (
    agent_id        TEXT PRIMARY KEY,
    first_seen      BIGINT NOT NULL,
    last_seen       BIGINT NOT NULL,
    -- Calls executed and their actual cost, from uploaded ledgers; decisions made by `/decide`.
    calls           BIGINT NOT NULL DEFAULT 0,
    cost_micros     BIGINT NOT NULL DEFAULT 0,
    decisions       BIGINT NOT NULL DEFAULT 0,
    interventions   BIGINT NOT NULL DEFAULT 0,
    blocked         BIGINT NOT NULL DEFAULT 0,
    events          BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE runs (
    agent_id    TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    calls       BIGINT NOT NULL DEFAULT 0,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    decisions   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, run_id)
);

CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    tool_name   TEXT NOT NULL,
    session_id  TEXT,
    at          BIGINT NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX events_by_agent ON events (agent_id, at);

-- Facts every replica must agree on, such as a check value of the key-hashing secret.
CREATE TABLE server_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
