-- Idempotency records keyed the way they are looked up, event id first, in
-- one B-tree: a message's record was three inserts (the table, its key by
-- source, an index by event id), two of them at random places of large trees.
CREATE TABLE processed_by_event (
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    digest TEXT NOT NULL,
    outcome TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (event_id, source)
) WITHOUT ROWID;
INSERT INTO processed_by_event (event_id, source, digest, outcome, processed_at)
    SELECT event_id, source, digest, outcome, processed_at FROM processed;
DROP TABLE processed;
ALTER TABLE processed_by_event RENAME TO processed;
