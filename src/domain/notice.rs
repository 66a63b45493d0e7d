//! The notification emails of SPEC §7: one variant per email, with the
//! values its template shows. `notify` renders them; serialising a variant
//! gives its template's variables.

use serde::Serialize;

use super::ids::{Code, Email, Id};
use super::model::Owner;
use super::money::Credits;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Notice {
    /// To every owner: a request waits for their decision.
    RedemptionPending {
        request_id: Id,
        learner_name: String,
        learner_email: Email,
        title: String,
        cost: Credits,
        available: Credits,
    },
    /// To the learner.
    RedemptionApproved { title: String, cost: Credits },
    /// To the learner; `reason` in plain words, as for the next two.
    RedemptionDenied {
        title: String,
        cost: Credits,
        reason: String,
    },
    RedemptionExpired {
        title: String,
        cost: Credits,
        reason: String,
    },
    RedemptionRejected {
        title: String,
        cost: Credits,
        reason: String,
    },
    /// To every owner, as are all that follow but the report's.
    PurchaseRecorded {
        account_id: Id,
        account_name: String,
        purchase_id: Id,
        credits: Credits,
        /// Amount and currency, as paid.
        price_paid: Option<String>,
        expires_on: String,
        available: Credits,
    },
    PurchaseRefunded {
        account_id: Id,
        account_name: String,
        purchase_id: Id,
        refunded: Credits,
        shortfall: Credits,
        available: Credits,
    },
    LotExpiring {
        account_id: Id,
        account_name: String,
        purchase_id: Id,
        remaining: Credits,
        expires_on: String,
        days_left: i64,
    },
    LotExpired {
        account_id: Id,
        account_name: String,
        purchase_id: Id,
        expired: Credits,
        expired_on: String,
        available: Credits,
    },
    BalanceLow {
        account_id: Id,
        available: Credits,
        threshold: Credits,
    },
    /// To the owners before and after the change.
    OwnerAdded {
        account_id: Id,
        account_name: String,
        actor: Email,
        owner: Owner,
    },
    OwnerRemoved {
        account_id: Id,
        account_name: String,
        actor: Email,
        email: Email,
    },
    CodeRotated {
        account_id: Id,
        account_name: String,
        actor: Email,
        code: Code,
    },
    AccountClosed {
        account_id: Id,
        account_name: String,
        actor: String,
        reason: Option<String>,
    },
    /// To a report's recipient, with the report attached.
    ReportReady {
        title: String,
        filename: String,
        rows: u64,
    },
}

impl Notice {
    /// The name of the email's templates.
    pub fn template(&self) -> &'static str {
        match self {
            Notice::RedemptionPending { .. } => "redemption_pending",
            Notice::RedemptionApproved { .. } => "redemption_approved",
            Notice::RedemptionDenied { .. } => "redemption_denied",
            Notice::RedemptionExpired { .. } => "redemption_expired",
            Notice::RedemptionRejected { .. } => "redemption_rejected",
            Notice::PurchaseRecorded { .. } => "purchase_recorded",
            Notice::PurchaseRefunded { .. } => "purchase_refunded",
            Notice::LotExpiring { .. } => "lot_expiring",
            Notice::LotExpired { .. } => "lot_expired",
            Notice::BalanceLow { .. } => "balance_low",
            Notice::OwnerAdded { .. } => "owner_added",
            Notice::OwnerRemoved { .. } => "owner_removed",
            Notice::CodeRotated { .. } => "code_rotated",
            Notice::AccountClosed { .. } => "account_closed",
            Notice::ReportReady { .. } => "report_ready",
        }
    }
}

/// One email of every kind, for the tests that render each.
#[cfg(test)]
pub(crate) fn one_of_each() -> Vec<Notice> {
    let id = |s: &str| -> Id { s.parse().expect("an id") };
    let email = |s: &str| -> Email { s.parse().expect("an email") };
    let c = Credits::from_cents;
    let account = || (id("acct-1"), "Team".to_owned());
    let ask = || ("Rust 101".to_owned(), c(2_000));
    vec![
        Notice::RedemptionPending {
            request_id: id("r-1"),
            learner_name: "Lee".to_owned(),
            learner_email: email("lee@example.com"),
            title: ask().0,
            cost: ask().1,
            available: c(8_000),
        },
        Notice::RedemptionApproved {
            title: ask().0,
            cost: ask().1,
        },
        Notice::RedemptionDenied {
            title: ask().0,
            cost: ask().1,
            reason: "not now".to_owned(),
        },
        Notice::RedemptionExpired {
            title: ask().0,
            cost: ask().1,
            reason: "the account owners did not answer within 14 days".to_owned(),
        },
        Notice::RedemptionRejected {
            title: ask().0,
            cost: ask().1,
            reason: "the code you entered does not match".to_owned(),
        },
        Notice::PurchaseRecorded {
            account_id: account().0,
            account_name: account().1,
            purchase_id: id("p-1"),
            credits: c(10_000),
            price_paid: None,
            expires_on: "2027-12-07".to_owned(),
            available: c(10_000),
        },
        Notice::PurchaseRefunded {
            account_id: account().0,
            account_name: account().1,
            purchase_id: id("p-1"),
            refunded: c(7_000),
            shortfall: c(3_000),
            available: c(100),
        },
        Notice::LotExpiring {
            account_id: account().0,
            account_name: account().1,
            purchase_id: id("p-1"),
            remaining: c(100),
            expires_on: "2027-12-07".to_owned(),
            days_left: 6,
        },
        Notice::LotExpired {
            account_id: account().0,
            account_name: account().1,
            purchase_id: id("p-1"),
            expired: c(100),
            expired_on: "2027-12-07".to_owned(),
            available: Credits::ZERO,
        },
        Notice::BalanceLow {
            account_id: account().0,
            available: c(100),
            threshold: c(500),
        },
        Notice::OwnerAdded {
            account_id: account().0,
            account_name: account().1,
            actor: email("ann@example.com"),
            owner: Owner {
                email: email("bob@example.com"),
                name: "Bob".to_owned(),
            },
        },
        Notice::OwnerRemoved {
            account_id: account().0,
            account_name: account().1,
            actor: email("ann@example.com"),
            email: email("bob@example.com"),
        },
        Notice::CodeRotated {
            account_id: account().0,
            account_name: account().1,
            actor: email("ann@example.com"),
            code: "TEAM-CODE-2".parse().expect("a code"),
        },
        Notice::AccountClosed {
            account_id: account().0,
            account_name: account().1,
            actor: "staff@example.com".to_owned(),
            reason: None,
        },
        Notice::ReportReady {
            title: "Your balances report".to_owned(),
            filename: "balances.csv".to_owned(),
            rows: 3,
        },
    ]
}
