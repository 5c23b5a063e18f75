-- A monitoring event's id is its sender's: unique per agent, so that one agent's ids can never
-- shadow another agent's events (they were one namespace, and a second agent's event with a known
-- id was dropped).
CREATE TABLE events_per_agent (
    id          TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    tool_name   TEXT NOT NULL,
    session_id  TEXT,
    at          BIGINT NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (agent_id, id)
);
INSERT INTO events_per_agent (id, agent_id, tool_name, session_id, at, body)
    SELECT id, agent_id, tool_name, session_id, at, body FROM events;
DROP TABLE events;
ALTER TABLE events_per_agent RENAME TO events;
CREATE INDEX events_by_agent ON events (agent_id, at);
