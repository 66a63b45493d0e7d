//! Typed commands: what an inbound event asks of the ledger, once decoded.
//! Field names follow SPEC §5.1 exactly; `decode` builds these from the
//! CloudEvent's `type` and `data`.

use serde::{Deserialize, Serialize};

use super::ids::{Code, Email, Id};
use super::model::{ApprovalMode, Item, Learner, Owner, Price, Scope};
use super::money::Credits;
use super::time::Ts;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Command {
    #[serde(rename = "credits.account.opened")]
    AccountOpened(AccountOpened),
    #[serde(rename = "credits.account.updated")]
    AccountUpdated(AccountUpdated),
    #[serde(rename = "credits.account.owner_added")]
    OwnerAdded(OwnerAdded),
    #[serde(rename = "credits.account.owner_removed")]
    OwnerRemoved(OwnerRemoved),
    #[serde(rename = "credits.account.code_rotated")]
    CodeRotated(CodeRotated),
    #[serde(rename = "credits.account.closed")]
    AccountClosed(AccountClosed),
    #[serde(rename = "credits.purchase.completed")]
    PurchaseCompleted(PurchaseCompleted),
    #[serde(rename = "credits.lot.extended")]
    LotExtended(LotExtended),
    #[serde(rename = "credits.redemption.requested")]
    RedemptionRequested(RedemptionRequested),
    #[serde(rename = "credits.redemption.approved")]
    RedemptionApproved(RedemptionDecided),
    #[serde(rename = "credits.redemption.denied")]
    RedemptionDenied(RedemptionDecided),
    #[serde(rename = "credits.redemption.cancelled")]
    RedemptionCancelled(RedemptionCancelled),
    #[serde(rename = "credits.enrollment.unenrolled")]
    Unenrolled(Unenrolled),
    #[serde(rename = "credits.report.requested")]
    ReportRequested(ReportRequested),
    /// The scheduled jobs (expiry sweep, reminders, pending timeout) as of an
    /// instant; never read from a message.
    #[serde(skip)]
    Sweep { account_id: Id },
}

impl Command {
    /// The inbound `type` this command came from.
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::AccountOpened(_) => "credits.account.opened",
            Command::AccountUpdated(_) => "credits.account.updated",
            Command::OwnerAdded(_) => "credits.account.owner_added",
            Command::OwnerRemoved(_) => "credits.account.owner_removed",
            Command::CodeRotated(_) => "credits.account.code_rotated",
            Command::AccountClosed(_) => "credits.account.closed",
            Command::PurchaseCompleted(_) => "credits.purchase.completed",
            Command::LotExtended(_) => "credits.lot.extended",
            Command::RedemptionRequested(_) => "credits.redemption.requested",
            Command::RedemptionApproved(_) => "credits.redemption.approved",
            Command::RedemptionDenied(_) => "credits.redemption.denied",
            Command::RedemptionCancelled(_) => "credits.redemption.cancelled",
            Command::Unenrolled(_) => "credits.enrollment.unenrolled",
            Command::ReportRequested(_) => "credits.report.requested",
            Command::Sweep { .. } => "schedule.sweep",
        }
    }

    /// The account a command names directly, if any.
    pub fn account_id(&self) -> Option<&Id> {
        match self {
            Command::AccountOpened(c) => Some(&c.account_id),
            Command::AccountUpdated(c) => Some(&c.account_id),
            Command::OwnerAdded(c) => Some(&c.account_id),
            Command::OwnerRemoved(c) => Some(&c.account_id),
            Command::CodeRotated(c) => Some(&c.account_id),
            Command::AccountClosed(c) => Some(&c.account_id),
            Command::PurchaseCompleted(c) => Some(&c.account_id),
            Command::LotExtended(c) => Some(&c.account_id),
            Command::ReportRequested(c) => c.account_id.as_ref(),
            Command::Sweep { account_id } => Some(account_id),
            _ => None,
        }
    }

    /// The redemption request a command names, if any.
    pub fn request_id(&self) -> Option<&Id> {
        match self {
            Command::RedemptionRequested(c) => Some(&c.request_id),
            Command::RedemptionApproved(c) | Command::RedemptionDenied(c) => Some(&c.request_id),
            Command::RedemptionCancelled(c) => Some(&c.request_id),
            Command::Unenrolled(c) => Some(&c.request_id),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AccountOpened {
    pub account_id: Id,
    pub name: Option<String>,
    pub owners: Vec<Owner>,
    pub approval_mode: ApprovalMode,
    pub code: Option<Code>,
    pub scope: Option<Scope>,
    pub low_balance_threshold: Option<Credits>,
    pub notes: Option<String>,
}

/// A field that may be absent (no change), `null` (cleared) or set.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Patch<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<T: Clone> Patch<T> {
    /// The field's new value, if it changes: `Some(None)` clears it.
    pub fn value(&self) -> Option<Option<T>> {
        match self {
            Patch::Keep => None,
            Patch::Clear => Some(None),
            Patch::Set(value) => Some(Some(value.clone())),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(deserializer)? {
            Some(value) => Patch::Set(value),
            None => Patch::Clear,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettableStatus {
    Active,
    Inactive,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AccountUpdated {
    pub account_id: Id,
    pub actor: Email,
    pub name: Option<String>,
    pub approval_mode: Option<ApprovalMode>,
    pub scope_ids: Option<Vec<Id>>,
    pub status: Option<SettableStatus>,
    #[serde(default)]
    pub low_balance_threshold: Patch<Credits>,
    #[serde(default)]
    pub notes: Patch<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct OwnerAdded {
    pub account_id: Id,
    pub actor: Email,
    pub owner: Owner,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct OwnerRemoved {
    pub account_id: Id,
    pub actor: Email,
    pub email: Email,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CodeRotated {
    pub account_id: Id,
    pub actor: Email,
    pub code: Option<Code>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AccountClosed {
    pub account_id: Id,
    pub actor: Email,
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Card,
    Invoice,
    Grant,
    Migration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PurchaseCompleted {
    pub account_id: Id,
    pub purchase_id: Id,
    pub credits: Credits,
    pub price_paid: Option<Price>,
    pub channel: Option<Channel>,
    pub purchased_at: Ts,
    pub expires_at: Option<Ts>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct LotExtended {
    pub account_id: Id,
    pub purchase_id: Id,
    pub expires_at: Ts,
    pub actor: Email,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RedemptionRequested {
    pub request_id: Id,
    /// Kept as text: a code that matches nothing is a business refusal
    /// (`invalid_code`), not a malformed message.
    pub code: String,
    pub learner: Learner,
    pub item: Item,
    pub cost: Credits,
    pub requested_at: Ts,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RedemptionDecided {
    pub request_id: Id,
    pub approver: Email,
    pub note: Option<String>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RedemptionCancelled {
    pub request_id: Id,
    pub learner_id: Id,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Unenrolled {
    pub request_id: Id,
    pub unenrolled_at: Ts,
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    Transactions,
    Credits,
    Redemptions,
    Balances,
    Audit,
}

impl ReportKind {
    /// The columns of SPEC §8, in their default order.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            ReportKind::Transactions => &[
                "at",
                "account_id",
                "entry",
                "amount",
                "balance_after",
                "purchase_id",
                "request_id",
                "learner_email",
                "item_title",
                "actor",
            ],
            ReportKind::Credits => &[
                "account_id",
                "account_name",
                "owners",
                "code",
                "purchase_id",
                "credits",
                "price_paid",
                "remaining",
                "held",
                "expires_at",
                "status",
                "notes",
            ],
            ReportKind::Redemptions => &[
                "requested_at",
                "request_id",
                "account_id",
                "learner_email",
                "item_id",
                "item_title",
                "cost",
                "status",
                "decided_by",
                "decided_at",
                "refunded",
            ],
            ReportKind::Balances => &[
                "account_id",
                "account_name",
                "status",
                "balance",
                "held",
                "available",
                "expiring_30d",
                "owners",
            ],
            ReportKind::Audit => &["at", "account_id", "actor", "field", "old", "new"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportFormat {
    Csv,
    Xlsx,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ReportRequested {
    pub report: ReportKind,
    pub format: ReportFormat,
    pub recipient: Email,
    pub account_id: Option<Id>,
    pub from: Option<Ts>,
    pub to: Option<Ts>,
    pub columns: Option<Vec<String>>,
}
