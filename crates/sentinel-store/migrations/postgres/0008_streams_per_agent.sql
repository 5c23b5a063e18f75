-- A stream's chain is its sender's: keyed by (agent_id, stream), so that another agent sending
-- to the same stream name keeps a chain of its own instead of moving this one (which made the
-- owner's next lines look like forks, not stored) or being refused. Each ledger line records the
-- agent it is attributed to (its own `agent_id`, or its stream's agent where it names none or
-- `default`, as ingest attributes it), so that an entry id is judged against the line's agent.
-- Findings say whose chain broke; those before this migration take their stream's agent (each
-- stream name had one agent until now).
ALTER TABLE tamper_findings ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
UPDATE tamper_findings f SET agent_id = s.agent_id FROM streams s WHERE s.stream = f.stream;
ALTER TABLE streams DROP CONSTRAINT streams_pkey, ADD PRIMARY KEY (agent_id, stream);
ALTER TABLE ledger_entries ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
-- The line's own top-level `agent_id`: the last one in the line (the SDK writes it after the
-- payload; keys inside strings are escaped and do not match). A pattern, not a jsonb cast, so that
-- no stored line can make the migration fail.
UPDATE ledger_entries e SET agent_id = COALESCE(
    NULLIF(NULLIF(substring(e.line from '.*"agent_id":"([^"\\]*)"'), ''), 'default'),
    s.agent_id)
FROM streams s WHERE s.stream = e.stream;
