-- SPEC §6 rules 11 and 12. A lot keeps what purchase refunds took out of it
-- (a refund without an amount asks for the rest of the purchase); each
-- refund is recorded once per account and refund_id, with the fingerprint
-- that tells a repeat from a conflict. An account may limit what one learner
-- spends on it within 365 days.
ALTER TABLE accounts ADD COLUMN learner_limit BIGINT CHECK (learner_limit >= 0);
ALTER TABLE lots ADD COLUMN refunded BIGINT NOT NULL DEFAULT 0 CHECK (refunded >= 0);
CREATE TABLE purchase_refunds (
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    refund_id TEXT NOT NULL,
    purchase_id TEXT NOT NULL,
    refunded BIGINT NOT NULL CHECK (refunded >= 0),
    shortfall BIGINT NOT NULL CHECK (shortfall >= 0),
    reason TEXT,
    refunded_at TIMESTAMPTZ NOT NULL,
    fingerprint TEXT NOT NULL,
    causation_id TEXT NOT NULL,
    PRIMARY KEY (account_id, refund_id)
);
