-- Claims, the backlog gauge and lease releases all walk
-- outbox_pending_by_kind: the two older partial indexes of undispatched rows
-- only cost every outbox insert and every dispatch two more index writes.
DROP INDEX outbox_due;
DROP INDEX outbox_pending;
