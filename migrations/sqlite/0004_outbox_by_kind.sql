-- Each dispatcher lane claims the undispatched rows of its own kinds in
-- order: walked per kind, a lane never steps over the other lane's backlog
-- (an event claim used to look at every waiting email first). The index
-- carries `next_attempt_at`, so rows leased or backing off are skipped
-- without reading them.
CREATE INDEX outbox_pending_by_kind ON outbox (kind, seq, next_attempt_at) WHERE dispatched_at IS NULL;
-- The duplicate check finds the source and digest in the index itself.
DROP INDEX processed_by_event_id;
CREATE INDEX processed_by_event_id ON processed (event_id, source, digest);
