-- The read API pages an account's journal and redemption requests in the
-- order they were written (SPEC §9): a page is an index range, whatever the
-- size of the ledger. A request's position is a sequence of its own.
CREATE INDEX journal_by_account ON journal (account_id, seq);
ALTER TABLE redemptions ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY;
CREATE INDEX redemptions_by_account ON redemptions (account_id, seq);
