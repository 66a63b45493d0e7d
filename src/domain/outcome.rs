//! The closed set of things that can happen to a message, and the reasons the
//! contract names for each. Every caller decides ack, retry or dead letter
//! from these types alone.

use std::fmt;

/// Why a message goes to `training-credits.dead` (SPEC §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadReason {
    TooLarge,
    InvalidJson,
    InvalidEnvelope,
    UnknownType,
    SchemaViolation,
    IdConflict,
    RetriesExhausted,
    UnknownAccount,
    UnknownRequest,
    UnknownPurchase,
    UntrustedSource,
}

impl DeadReason {
    pub const ALL: [DeadReason; 11] = [
        DeadReason::TooLarge,
        DeadReason::InvalidJson,
        DeadReason::InvalidEnvelope,
        DeadReason::UnknownType,
        DeadReason::SchemaViolation,
        DeadReason::IdConflict,
        DeadReason::RetriesExhausted,
        DeadReason::UnknownAccount,
        DeadReason::UnknownRequest,
        DeadReason::UnknownPurchase,
        DeadReason::UntrustedSource,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::TooLarge => "too_large",
            DeadReason::InvalidJson => "invalid_json",
            DeadReason::InvalidEnvelope => "invalid_envelope",
            DeadReason::UnknownType => "unknown_type",
            DeadReason::SchemaViolation => "schema_violation",
            DeadReason::IdConflict => "id_conflict",
            DeadReason::RetriesExhausted => "retries_exhausted",
            DeadReason::UnknownAccount => "unknown_account",
            DeadReason::UnknownRequest => "unknown_request",
            DeadReason::UnknownPurchase => "unknown_purchase",
            DeadReason::UntrustedSource => "untrusted_source",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message should be tried again later. `UnknownAccount`,
/// `UnknownRequest` and `UnknownPurchase` may resolve themselves when an overtaken predecessor
/// arrives; once the retries are spent they become dead letters of the same
/// name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryReason {
    UnknownAccount,
    UnknownRequest,
    UnknownPurchase,
    /// The message's own transaction failed (a conflict, a constraint the
    /// rules did not foresee): worth another try, dead-lettered
    /// `retries_exhausted` if it keeps failing.
    Transient,
}

impl RetryReason {
    /// The dead-letter reason once every retry has failed.
    pub fn exhausted(self) -> DeadReason {
        match self {
            RetryReason::UnknownAccount => DeadReason::UnknownAccount,
            RetryReason::UnknownRequest => DeadReason::UnknownRequest,
            RetryReason::UnknownPurchase => DeadReason::UnknownPurchase,
            RetryReason::Transient => DeadReason::RetriesExhausted,
        }
    }
}

/// A business refusal of a redemption request (`training-credits.redemption.rejected`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    InvalidCode,
    AccountInactive,
    AccountClosed,
    OutOfScope,
    InsufficientBalance,
    AlreadyRedeemed,
    TooManyAttempts,
    LearnerLimit,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InvalidCode => "invalid_code",
            Rejection::AccountInactive => "account_inactive",
            Rejection::AccountClosed => "account_closed",
            Rejection::OutOfScope => "out_of_scope",
            Rejection::InsufficientBalance => "insufficient_balance",
            Rejection::AlreadyRedeemed => "already_redeemed",
            Rejection::TooManyAttempts => "too_many_attempts",
            Rejection::LearnerLimit => "learner_limit",
        }
    }

    /// The reason in plain words, for the learner's email.
    pub fn explain(self) -> &'static str {
        match self {
            Rejection::InvalidCode => {
                "the code you entered does not match any training credit account"
            }
            Rejection::AccountInactive => "the training credit account is not active at the moment",
            Rejection::AccountClosed => "the training credit account has been closed",
            Rejection::OutOfScope => {
                "the training credits of this account cannot be used for this item"
            }
            Rejection::InsufficientBalance => {
                "the account does not have enough training credits for this item"
            }
            Rejection::AlreadyRedeemed => {
                "you already have a pending or approved redemption for this item"
            }
            Rejection::TooManyAttempts => {
                "too many invalid codes were entered; please wait 15 minutes before trying again"
            }
            Rejection::LearnerLimit => {
                "this item would take you past what one learner may spend on this account within a year"
            }
        }
    }
}

/// A business refusal of any other command (`training-credits.command.refused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    NotAnOwner,
    NotStaff,
    NotPending,
    NotRequester,
    LastOwner,
    OwnerOfOtherAccount,
    CodeTaken,
    AccountExists,
    AccountClosed,
    NotLater,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAnOwner => "not_an_owner",
            Refusal::NotStaff => "not_staff",
            Refusal::NotPending => "not_pending",
            Refusal::NotRequester => "not_requester",
            Refusal::LastOwner => "last_owner",
            Refusal::OwnerOfOtherAccount => "owner_of_other_account",
            Refusal::CodeTaken => "code_taken",
            Refusal::AccountExists => "account_exists",
            Refusal::AccountClosed => "account_closed",
            Refusal::NotLater => "not_later",
        }
    }
}

/// What became of a message the ledger looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; its changes, idempotency record and outbox rows are committed.
    Applied,
    /// Seen before (by event key or business key): nothing changed.
    Duplicate,
    /// A redemption request refused at once, recorded and announced by
    /// `training-credits.redemption.rejected`.
    Rejected(Rejection),
    /// Any other command refused, announced by
    /// `training-credits.command.refused`.
    Refused(Refusal),
    /// Not now: try again later.
    Retry { reason: RetryReason, detail: String },
    /// Never going to work.
    Dead { reason: DeadReason, detail: String },
}

impl Outcome {
    pub fn dead(reason: DeadReason, detail: impl Into<String>) -> Outcome {
        Outcome::Dead {
            reason,
            detail: detail.into(),
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(_) | Outcome::Refused(_) => "refused",
            Outcome::Retry { .. } => "retry",
            Outcome::Dead { .. } => "dead_letter",
        }
    }
}

/// Why an unenrollment gave nothing back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoRefund {
    RefundWindowClosed,
}

impl NoRefund {
    pub fn as_str(self) -> &'static str {
        match self {
            NoRefund::RefundWindowClosed => "refund_window_closed",
        }
    }
}

serialize_as_str!(Rejection, Refusal, NoRefund);
