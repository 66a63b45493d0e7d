-- The ledger schema (SQLite). Instants are microseconds since the Unix epoch (INTEGER).

CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'inactive', 'closed')),
    approval_mode TEXT NOT NULL CHECK (approval_mode IN ('automatic', 'manual')),
    code TEXT NOT NULL,
    code_key TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    low_balance_threshold BIGINT CHECK (low_balance_threshold >= 0),
    notes TEXT,
    created_at INTEGER NOT NULL
);

-- An email owns at most one account (SPEC §6 rule 8).
CREATE TABLE owners (
    email TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    name TEXT NOT NULL,
    position BIGINT NOT NULL
);
CREATE INDEX owners_by_account ON owners (account_id, position);

-- Amounts are whole cents. remaining, held and expired are kept beside the
-- journal for speed; `verify` recomputes them from it.
CREATE TABLE lots (
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    purchase_id TEXT NOT NULL,
    credits BIGINT NOT NULL CHECK (credits > 0),
    remaining BIGINT NOT NULL,
    held BIGINT NOT NULL,
    expired BIGINT NOT NULL CHECK (expired >= 0),
    purchased_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    price_amount BIGINT,
    price_currency TEXT,
    channel TEXT,
    reminded_stage BIGINT,
    remind_at INTEGER,
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (account_id, purchase_id),
    CHECK (0 <= held AND held <= remaining AND remaining <= credits)
);
CREATE INDEX lots_expiring ON lots (expires_at) WHERE remaining > held;
CREATE INDEX lots_reminding ON lots (remind_at) WHERE remaining > held;

CREATE TABLE redemptions (
    request_id TEXT PRIMARY KEY,
    account_id TEXT REFERENCES accounts (account_id),
    learner_id TEXT NOT NULL,
    learner_email TEXT NOT NULL,
    learner_name TEXT NOT NULL,
    item_id TEXT NOT NULL,
    item_kind TEXT NOT NULL,
    item_title TEXT NOT NULL,
    item_group_ids TEXT NOT NULL,
    cost BIGINT NOT NULL CHECK (cost > 0),
    status TEXT NOT NULL CHECK (status IN
        ('pending', 'approved', 'denied', 'cancelled', 'expired', 'refunded', 'unenrolled', 'rejected')),
    reason TEXT,
    requested_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    decided_by TEXT,
    decided_at INTEGER,
    allocations TEXT NOT NULL,
    refunded BIGINT NOT NULL,
    fingerprint TEXT NOT NULL
);
-- One pending or approved redemption per learner and item (SPEC §6 rule 6).
CREATE UNIQUE INDEX redemptions_active ON redemptions (learner_id, item_id)
    WHERE status IN ('pending', 'approved');
CREATE INDEX redemptions_by_account ON redemptions (account_id, status);
CREATE INDEX redemptions_pending ON redemptions (created_at) WHERE status = 'pending';
CREATE INDEX redemptions_by_requested_at ON redemptions (requested_at);

-- Append-only: the triggers below refuse every UPDATE and DELETE.
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    purchase_id TEXT NOT NULL,
    request_id TEXT,
    amount BIGINT NOT NULL,
    held_delta BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    actor TEXT NOT NULL,
    causation_id TEXT NOT NULL
);
CREATE INDEX journal_by_lot ON journal (account_id, purchase_id);
CREATE INDEX journal_by_at ON journal (at);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    account_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    field TEXT NOT NULL,
    old_value TEXT NOT NULL,
    new_value TEXT NOT NULL,
    causation_id TEXT NOT NULL
);
CREATE INDEX audit_by_account ON audit (account_id, seq);

-- Idempotency: one row per inbound event applied, refused or recognised.
CREATE TABLE processed (
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    outcome TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (source, event_id)
);

CREATE TABLE code_attempts (
    learner_id TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX code_attempts_by_learner ON code_attempts (learner_id, at);
CREATE INDEX code_attempts_by_at ON code_attempts (at);

CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('event', 'email', 'report')),
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    dispatched_at INTEGER,
    last_error TEXT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE dispatched_at IS NULL;

CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
BEGIN
    SELECT RAISE(ABORT, 'the journal is append-only');
END;
CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
BEGIN
    SELECT RAISE(ABORT, 'the journal is append-only');
END;
