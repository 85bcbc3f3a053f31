-- One row per lease: who holds it, until when (the database's clock), and
-- its fencing term, which grows by one at every grant to a holder.
CREATE TABLE leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    term bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
