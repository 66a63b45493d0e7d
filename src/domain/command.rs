//! Typed commands: what an inbound event asks of the ledger, once decoded.
//! Field names follow SPEC §5.1 exactly; `decode` builds these from the
//! CloudEvent's `type` and `data`.

use serde::{Deserialize, Serialize};

use super::ids::{Code, Email, Id};
use super::model::{ApprovalMode, Item, Learner, Owner, Price, Scope};
use super::money::Credits;
use super::time::Ts;

/// Declares, from one table, every inbound `type` of SPEC §5.1 with its name
/// on the wire and the command its `data` decodes into: [`InboundType`] and
/// [`Command`].
macro_rules! inbound_types {
    ($($kind:ident => $name:literal ($data:ty),)*) => {
        /// The `type` of an inbound event (SPEC §5.1).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum InboundType {
            $($kind,)*
        }

        impl InboundType {
            pub const ALL: &[InboundType] = &[$(InboundType::$kind,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(InboundType::$kind => $name,)*
                }
            }

            pub fn parse(name: &str) -> Option<InboundType> {
                match name {
                    $($name => Some(InboundType::$kind),)*
                    _ => None,
                }
            }
        }

        /// What an inbound event asks of the ledger, or a scheduled job.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Command {
            $($kind($data),)*
            /// The scheduled jobs (expiry sweep, reminders, pending timeout)
            /// as of an instant; never read from a message.
            Sweep { account_id: Id },
        }

        impl Command {
            /// The command of an inbound event of type `kind`.
            pub fn decode(
                kind: InboundType,
                data: serde_json::Value,
            ) -> Result<Command, serde_json::Error> {
                Ok(match kind {
                    $(InboundType::$kind => Command::$kind(<$data>::deserialize(data)?),)*
                })
            }

            /// The inbound type this command came from; `None` for the sweep.
            pub fn kind(&self) -> Option<InboundType> {
                match self {
                    $(Command::$kind(_) => Some(InboundType::$kind),)*
                    Command::Sweep { .. } => None,
                }
            }
        }
    };
}

inbound_types! {
    AccountOpened => "credits.account.opened" (AccountOpened),
    AccountUpdated => "credits.account.updated" (AccountUpdated),
    OwnerAdded => "credits.account.owner_added" (OwnerAdded),
    OwnerRemoved => "credits.account.owner_removed" (OwnerRemoved),
    CodeRotated => "credits.account.code_rotated" (CodeRotated),
    AccountClosed => "credits.account.closed" (AccountClosed),
    PurchaseCompleted => "credits.purchase.completed" (PurchaseCompleted),
    PurchaseRefunded => "credits.purchase.refunded" (PurchaseRefunded),
    LotExtended => "credits.lot.extended" (LotExtended),
    RedemptionRequested => "credits.redemption.requested" (RedemptionRequested),
    RedemptionApproved => "credits.redemption.approved" (RedemptionDecided),
    RedemptionDenied => "credits.redemption.denied" (RedemptionDecided),
    RedemptionCancelled => "credits.redemption.cancelled" (RedemptionCancelled),
    Unenrolled => "credits.enrollment.unenrolled" (Unenrolled),
    ReportRequested => "credits.report.requested" (ReportRequested),
}

serialize_as_str!(InboundType);

impl Command {
    /// The name logs and metrics give this command.
    pub fn type_name(&self) -> &'static str {
        self.kind().map_or("schedule.sweep", InboundType::as_str)
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
            Command::PurchaseRefunded(c) => Some(&c.account_id),
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
    pub learner_limit: Option<Credits>,
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
    pub learner_limit: Patch<Credits>,
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

/// SPEC §6 rule 11: a payment refunded or charged back takes credits out of
/// its lot.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PurchaseRefunded {
    pub account_id: Id,
    pub purchase_id: Id,
    pub refund_id: Id,
    /// Default: everything of the purchase not refunded before.
    pub credits: Option<Credits>,
    pub reason: Option<String>,
    pub refunded_at: Ts,
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
