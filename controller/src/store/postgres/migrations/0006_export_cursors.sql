-- Where each audit exporter ([[audit_export]] NAME) stands: the last
-- record and signed-head sequence numbers its sink acknowledged. Written
-- only by the holder of the exporter's lease (`audit-export:NAME`), so the
-- next holder resumes where the last one stopped.
CREATE TABLE export_cursors (
    name text PRIMARY KEY,
    records bigint NOT NULL,
    heads bigint NOT NULL
);
