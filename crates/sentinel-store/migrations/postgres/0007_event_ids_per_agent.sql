-- A monitoring event's id is its sender's: unique per agent, so that one agent's ids can never
-- shadow another agent's events (they were one namespace, and a second agent's event with a known
-- id was dropped).
ALTER TABLE events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (agent_id, id);
