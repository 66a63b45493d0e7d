-- Idempotency records keyed the way they are looked up, event id first, the
-- digest carried in the key's index: one index per record instead of two.
ALTER TABLE processed DROP CONSTRAINT processed_pkey;
ALTER TABLE processed ADD CONSTRAINT processed_pkey PRIMARY KEY (event_id, source) INCLUDE (digest);
DROP INDEX processed_by_event_id;
