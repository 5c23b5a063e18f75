-- A stream's chain is its sender's: keyed by (agent_id, stream), so that another agent sending
-- to the same stream name keeps a chain of its own instead of moving this one (which made the
-- owner's next lines look like forks, not stored) or being refused. Each ledger line records the
-- agent it is attributed to, so that an entry id is judged against the line's own agent; lines
-- stored before this migration take their stream's agent.
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
UPDATE ledger_entries SET agent_id = COALESCE((SELECT s.agent_id FROM streams s WHERE s.stream = ledger_entries.stream), '');
DROP TABLE streams;
ALTER TABLE streams_per_agent RENAME TO streams;
