-- One row per agent: what the controller it is connected to knows of it
-- (an encoded fleetcmd.v1.Agent without labels: heartbeat figures, check
-- results, versions), written when that changes and every few minutes,
-- so every controller can list it and the health lease holder can judge
-- its checks wherever it is connected.
CREATE TABLE agent_live (
    agent text PRIMARY KEY,
    controller text NOT NULL,
    data bytea NOT NULL,
    written_at timestamptz NOT NULL
);
CREATE INDEX agent_live_written_at ON agent_live (written_at);
