-- A stream's chain is its sender's: keyed by (agent_id, stream), so that another agent sending
-- to the same stream name keeps a chain of its own instead of moving this one (which made the
-- owner's next lines look like forks, not stored) or being refused. Each ledger line records the
-- agent it is attributed to (its own `agent_id`, or its stream's agent where it names none or
-- `default`, as ingest attributes it), so that an entry id is judged against the line's agent.
CREATE TABLE streams_per_agent (
    stream     TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    last_seq   BIGINT NOT NULL,
    last_hash  TEXT NOT NULL,
    entries    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, stream)
);
INSERT INTO streams_per_agent (stream, agent_id, last_seq, last_hash, entries, updated_at)
    SELECT stream, agent_id, last_seq, last_hash, entries, updated_at FROM streams;
ALTER TABLE ledger_entries ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
UPDATE ledger_entries SET agent_id = COALESCE(
    NULLIF(NULLIF(CASE WHEN json_valid(line) THEN CAST(json_extract(line, '$.agent_id') AS TEXT) END, ''), 'default'),
    (SELECT s.agent_id FROM streams s WHERE s.stream = ledger_entries.stream),
    '');
-- Findings say whose chain broke; those before this migration take their stream's agent.
ALTER TABLE tamper_findings ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
UPDATE tamper_findings SET agent_id = COALESCE((SELECT s.agent_id FROM streams s WHERE s.stream = tamper_findings.stream), '');
DROP TABLE streams;
ALTER TABLE streams_per_agent RENAME TO streams;
