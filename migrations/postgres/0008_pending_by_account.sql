-- A batch reads the pending requests of its accounts. An index of every
-- request by account and status took an insert at a random place of a tree
-- that grows with the history for each redemption; an index of the pending
-- ones stays small.
DROP INDEX redemptions_by_account;
CREATE INDEX redemptions_pending_by_account ON redemptions (account_id) WHERE status = 'pending';
