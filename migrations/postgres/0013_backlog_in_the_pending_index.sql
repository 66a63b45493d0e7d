-- The backlog gauge (rows not dispatched by kind, and when the oldest was
-- written) reads only the pending index: with `created_at` in it, the
-- oldest is found without reading every waiting row.
DROP INDEX outbox_pending_by_kind;
CREATE INDEX outbox_pending_by_kind ON outbox (kind, seq, next_attempt_at) INCLUDE (created_at) WHERE dispatched_at IS NULL;
