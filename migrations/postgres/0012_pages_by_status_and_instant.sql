-- A page of one status, or of a window of instants, is an index range too
-- (SPEC §9): requests by account, status and position, and the journal by
-- account and instant, the order its pages are in.
CREATE INDEX redemptions_by_account_status ON redemptions (account_id, status, seq);
DROP INDEX journal_by_account;
CREATE INDEX journal_by_account ON journal (account_id, at, seq);
