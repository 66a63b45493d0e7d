-- The worker an outbox row is leased to (its claim or its batch's
-- hand-off), NULL when no worker holds it. A worker that starts gives back
-- at once the rows of holders that are no longer alive, instead of leaving
-- them to wait out their lease.
ALTER TABLE outbox ADD COLUMN leased_by BIGINT;
