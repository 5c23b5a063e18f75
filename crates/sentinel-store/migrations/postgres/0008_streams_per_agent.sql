-- A stream's chain is its sender's: keyed by (agent_id, stream), so that another agent sending
-- to the same stream name keeps a chain of its own instead of moving this one (which made the
-- owner's next lines look like forks, not stored) or being refused. Each ledger line records the
-- agent it is attributed to, so that an entry id is judged against the line's own agent; lines
-- stored before this migration take their stream's agent.
ALTER TABLE streams DROP CONSTRAINT streams_pkey, ADD PRIMARY KEY (agent_id, stream);
ALTER TABLE ledger_entries ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
UPDATE ledger_entries e SET agent_id = s.agent_id FROM streams s WHERE s.stream = e.stream;
