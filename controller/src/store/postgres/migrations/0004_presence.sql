-- One row per controller: the agents connected to it when it last wrote
-- (every few seconds), and whether it was still settling (agents
-- reconnecting after it started). Fresh rows tell a controller whether an
-- agent it does not have is connected to another one or to none.
CREATE TABLE presence (
    controller text PRIMARY KEY,
    settling boolean NOT NULL,
    agents text[] NOT NULL,
    written_at timestamptz NOT NULL
);
