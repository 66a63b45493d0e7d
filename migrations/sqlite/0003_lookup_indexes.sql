-- The duplicate check of a batch looks events up by id (then compares the
-- source), and the dispatcher walks undispatched rows in order: both stay
-- index lookups however long the history grows.
CREATE INDEX processed_by_event_id ON processed (event_id);
CREATE INDEX outbox_pending ON outbox (seq) WHERE dispatched_at IS NULL;
