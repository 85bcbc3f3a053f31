-- One row per claimed key (the `Claims` service: several gateways on one
-- chat act once): held until expires_at (the database's clock); expired
-- rows are taken over by the next claim and pruned by retention.
CREATE TABLE claims (
    key text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX claims_expires_at ON claims (expires_at);
