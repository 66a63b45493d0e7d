//! What the ledger tells the world (SPEC §5.2): one variant per outbound
//! event type, with the fields of its `data`. `outbox` turns them into
//! CloudEvents; serialising a variant gives its `data` without the
//! `account_id` and `causation_id` every event carries.

use serde::Serialize;
use serde_json::Value;

use super::command::{InboundType, ReportFormat, ReportKind};
use super::ids::{Code, Email, Id};
use super::model::{ApprovalMode, Owner};
use super::money::Credits;
use super::outcome::{NoRefund, Refusal, Rejection};
use super::time::Ts;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    AccountOpened {
        name: String,
        code: Code,
        approval_mode: ApprovalMode,
        owners: Vec<Owner>,
    },
    AccountUpdated {
        changes: Vec<FieldChange>,
    },
    PurchaseRecorded {
        purchase_id: Id,
        credits: Credits,
        expires_at: Ts,
        available: Credits,
    },
    PurchaseRefunded {
        purchase_id: Id,
        refund_id: Id,
        refunded: Credits,
        shortfall: Credits,
        available: Credits,
    },
    LotExtended {
        purchase_id: Id,
        expires_at: Ts,
        reinstated: Credits,
        available: Credits,
    },
    RedemptionPending {
        request_id: Id,
        learner_id: Id,
        item_id: Id,
        cost: Credits,
        available: Credits,
    },
    RedemptionApproved {
        request_id: Id,
        learner_id: Id,
        item_id: Id,
        cost: Credits,
        decided_by: String,
        available: Credits,
    },
    RedemptionDenied {
        request_id: Id,
        decided_by: String,
        reason: String,
        available: Credits,
    },
    RedemptionRejected {
        request_id: Id,
        learner_id: Id,
        item_id: Id,
        reason: Rejection,
        /// Where an account was found.
        #[serde(skip_serializing_if = "Option::is_none")]
        available: Option<Credits>,
    },
    RedemptionCancelled {
        request_id: Id,
        available: Credits,
    },
    RedemptionExpired {
        request_id: Id,
        available: Credits,
    },
    RedemptionRefunded {
        request_id: Id,
        refunded: Credits,
        expired_on_refund: Credits,
        available: Credits,
    },
    RedemptionUnenrolled {
        request_id: Id,
        reason: NoRefund,
    },
    LotExpiring {
        purchase_id: Id,
        expires_at: Ts,
        remaining: Credits,
        stage: u32,
        days_left: i64,
    },
    LotExpired {
        purchase_id: Id,
        expired: Credits,
        available: Credits,
    },
    BalanceLow {
        available: Credits,
        threshold: Credits,
    },
    ReportGenerated {
        report: ReportKind,
        format: ReportFormat,
        rows: u64,
        recipient: Email,
    },
    CommandRefused {
        command_id: String,
        command_type: InboundType,
        reason: Refusal,
    },
}

impl Event {
    /// The CloudEvent `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::AccountOpened { .. } => "training-credits.account.opened",
            Event::AccountUpdated { .. } => "training-credits.account.updated",
            Event::PurchaseRecorded { .. } => "training-credits.purchase.recorded",
            Event::PurchaseRefunded { .. } => "training-credits.purchase.refunded",
            Event::LotExtended { .. } => "training-credits.lot.extended",
            Event::RedemptionPending { .. } => "training-credits.redemption.pending",
            Event::RedemptionApproved { .. } => "training-credits.redemption.approved",
            Event::RedemptionDenied { .. } => "training-credits.redemption.denied",
            Event::RedemptionRejected { .. } => "training-credits.redemption.rejected",
            Event::RedemptionCancelled { .. } => "training-credits.redemption.cancelled",
            Event::RedemptionExpired { .. } => "training-credits.redemption.expired",
            Event::RedemptionRefunded { .. } => "training-credits.redemption.refunded",
            Event::RedemptionUnenrolled { .. } => "training-credits.redemption.unenrolled",
            Event::LotExpiring { .. } => "training-credits.lot.expiring",
            Event::LotExpired { .. } => "training-credits.lot.expired",
            Event::BalanceLow { .. } => "training-credits.balance.low",
            Event::ReportGenerated { .. } => "training-credits.report.generated",
            Event::CommandRefused { .. } => "training-credits.command.refused",
        }
    }
}

/// One changed field of `training-credits.account.updated`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: &'static str,
    pub old: Value,
    pub new: Value,
}

/// One event of every type, for the tests that hold each to its schema.
#[cfg(test)]
pub(crate) fn one_of_each() -> Vec<Event> {
    let id = |s: &str| -> Id { s.parse().expect("an id") };
    let c = Credits::from_cents;
    let at = Ts::now();
    vec![
        Event::AccountOpened {
            name: "Team".to_owned(),
            code: "TEAM-CODE-1".parse().expect("a code"),
            approval_mode: ApprovalMode::Manual,
            owners: vec![Owner {
                email: "ann@example.com".parse().expect("an email"),
                name: "Ann".to_owned(),
            }],
        },
        Event::AccountUpdated {
            changes: vec![FieldChange {
                field: "name",
                old: "Team".into(),
                new: "Team B".into(),
            }],
        },
        Event::PurchaseRecorded {
            purchase_id: id("p-1"),
            credits: c(10_000),
            expires_at: at,
            available: c(10_000),
        },
        Event::PurchaseRefunded {
            purchase_id: id("p-1"),
            refund_id: id("rf-1"),
            refunded: c(7_000),
            shortfall: c(3_000),
            available: c(100),
        },
        Event::LotExtended {
            purchase_id: id("p-1"),
            expires_at: at,
            reinstated: Credits::ZERO,
            available: c(100),
        },
        Event::RedemptionPending {
            request_id: id("r-1"),
            learner_id: id("l-1"),
            item_id: id("i-1"),
            cost: c(2_000),
            available: c(8_000),
        },
        Event::RedemptionApproved {
            request_id: id("r-1"),
            learner_id: id("l-1"),
            item_id: id("i-1"),
            cost: c(2_000),
            decided_by: "system".to_owned(),
            available: c(8_000),
        },
        Event::RedemptionDenied {
            request_id: id("r-1"),
            decided_by: "ann@example.com".to_owned(),
            reason: "not now".to_owned(),
            available: c(8_000),
        },
        Event::RedemptionRejected {
            request_id: id("r-1"),
            learner_id: id("l-1"),
            item_id: id("i-1"),
            reason: Rejection::OutOfScope,
            available: Some(c(100)),
        },
        Event::RedemptionCancelled {
            request_id: id("r-1"),
            available: c(100),
        },
        Event::RedemptionExpired {
            request_id: id("r-1"),
            available: c(100),
        },
        Event::RedemptionRefunded {
            request_id: id("r-1"),
            refunded: c(2_000),
            expired_on_refund: Credits::ZERO,
            available: c(100),
        },
        Event::RedemptionUnenrolled {
            request_id: id("r-1"),
            reason: NoRefund::RefundWindowClosed,
        },
        Event::LotExpiring {
            purchase_id: id("p-1"),
            expires_at: at,
            remaining: c(100),
            stage: 7,
            days_left: 6,
        },
        Event::LotExpired {
            purchase_id: id("p-1"),
            expired: c(100),
            available: Credits::ZERO,
        },
        Event::BalanceLow {
            available: c(100),
            threshold: c(500),
        },
        Event::ReportGenerated {
            report: ReportKind::Balances,
            format: ReportFormat::Csv,
            rows: 3,
            recipient: "ann@example.com".parse().expect("an email"),
        },
        Event::CommandRefused {
            command_id: "ev-1".to_owned(),
            command_type: InboundType::AccountClosed,
            reason: Refusal::NotStaff,
        },
    ]
}
