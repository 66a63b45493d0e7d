//! The ledger's entities: accounts with their owners and lots, and redemption
//! requests with the lots they hold or spent. Pure data and the arithmetic of
//! SPEC §6 rule 2; the rules that change them live in `rules`.

use serde::{Deserialize, Serialize};

use super::ids::{Code, Email, Id};
use super::money::Credits;
use super::time::Ts;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    Inactive,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalMode {
    Automatic,
    Manual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub email: Email,
    pub name: String,
}

/// What the credits of an account may pay for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    All,
    Activity { ids: Vec<Id> },
    Group { ids: Vec<Id> },
}

impl Scope {
    pub fn covers(&self, item: &Item) -> bool {
        match self {
            Scope::All => true,
            Scope::Activity { ids } => ids.contains(&item.id),
            Scope::Group { ids } => item.group_ids.iter().any(|g| ids.contains(g)),
        }
    }
}

/// One purchase's credits, with their own expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lot {
    pub purchase_id: Id,
    pub credits: Credits,
    /// Credits still in the lot, held ones included.
    pub remaining: Credits,
    /// Part of `remaining` reserved by pending requests.
    pub held: Credits,
    /// Credits of this lot that expired (the sweep, or a refund into an
    /// expired lot) and that an extension would reinstate.
    pub expired: Credits,
    pub purchased_at: Ts,
    pub expires_at: Ts,
    pub price_paid: Option<Price>,
    pub channel: Option<String>,
    /// Credits taken out by purchase refunds (SPEC §6 rule 11).
    pub refunded: Credits,
    /// The nearest reminder stage (days before expiry) already sent.
    pub reminded_stage: Option<u32>,
    /// Fingerprint of the purchase that created the lot, to tell a repeated
    /// purchase from a conflicting one.
    pub fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub amount: Credits,
    pub currency: String,
}

impl Lot {
    pub fn is_expired_at(&self, now: Ts) -> bool {
        self.expires_at <= now
    }

    /// What this lot can still give at `now`.
    pub fn free_at(&self, now: Ts) -> Credits {
        if self.is_expired_at(now) {
            Credits::ZERO
        } else {
            self.remaining - self.held
        }
    }

    /// When the next reminder stage falls due, if one is left to send.
    pub fn next_reminder_at(&self, stages: &[u32]) -> Option<Ts> {
        stages
            .iter()
            .copied()
            .filter(|stage| self.reminded_stage.is_none_or(|sent| *stage < sent))
            .max()
            .map(|stage| self.expires_at.plus_days(-i64::from(stage)))
    }

    /// SPEC §6 rule 2 for one lot.
    pub fn is_consistent(&self) -> bool {
        lot_figures_hold(self.credits, self.remaining, self.held, self.expired)
    }
}

/// SPEC §6 rule 2 for one lot's figures: `0 ≤ held ≤ remaining ≤ credits`,
/// and nothing expired below 0. `verify` holds the stored lots to it too.
pub fn lot_figures_hold(
    credits: Credits,
    remaining: Credits,
    held: Credits,
    expired: Credits,
) -> bool {
    Credits::ZERO <= held && held <= remaining && remaining <= credits && Credits::ZERO <= expired
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: Id,
    pub name: String,
    pub status: AccountStatus,
    pub approval_mode: ApprovalMode,
    pub owners: Vec<Owner>,
    pub code: Code,
    pub scope: Scope,
    pub low_balance_threshold: Option<Credits>,
    /// The most one learner may spend within any 365 days (SPEC §6 rule 12).
    pub learner_limit: Option<Credits>,
    pub notes: Option<String>,
    pub created_at: Ts,
    /// Soonest-expiring first, then oldest purchase: the order credits are
    /// taken in (SPEC §6 rule 3).
    pub lots: Vec<Lot>,
}

/// The three figures of SPEC §6 rule 2 at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balances {
    pub balance: Credits,
    pub held: Credits,
    pub available: Credits,
}

impl Account {
    /// Whether `self` and `other` have the same `accounts` row (their lots
    /// and owners aside).
    pub fn same_row(&self, other: &Account) -> bool {
        // Every field named, so that a new one cannot be left out unseen.
        let Account {
            id,
            name,
            status,
            approval_mode,
            owners: _,
            code,
            scope,
            low_balance_threshold,
            learner_limit,
            notes,
            created_at,
            lots: _,
        } = self;
        *id == other.id
            && *name == other.name
            && *status == other.status
            && *approval_mode == other.approval_mode
            && *code == other.code
            && *scope == other.scope
            && *low_balance_threshold == other.low_balance_threshold
            && *learner_limit == other.learner_limit
            && *notes == other.notes
            && *created_at == other.created_at
    }

    pub fn balances_at(&self, now: Ts) -> Balances {
        let mut balance = Credits::ZERO;
        let mut held = Credits::ZERO;
        for lot in &self.lots {
            held += lot.held;
            balance += if lot.is_expired_at(now) {
                lot.held
            } else {
                lot.remaining
            };
        }
        Balances {
            balance,
            held,
            available: balance - held,
        }
    }

    pub fn available_at(&self, now: Ts) -> Credits {
        self.balances_at(now).available
    }

    pub fn is_owner(&self, email: &Email) -> bool {
        self.owners.iter().any(|o| &o.email == email)
    }

    pub fn lot(&self, purchase_id: &Id) -> Option<usize> {
        self.lots.iter().position(|l| &l.purchase_id == purchase_id)
    }

    /// Keeps `lots` in spending order after a lot was added or its expiry
    /// moved; the purchase id breaks ties so the order never depends on how
    /// the lots were loaded.
    pub fn sort_lots(&mut self) {
        self.lots.sort_by(|a, b| {
            a.expires_at
                .cmp(&b.expires_at)
                .then(a.purchased_at.cmp(&b.purchased_at))
                .then_with(|| a.purchase_id.cmp(&b.purchase_id))
        });
    }

    /// Which lots would pay `cost` at `now`, soonest-expiring first; `None`
    /// when the account cannot pay it in full (no partial payment).
    pub fn allocate(&self, cost: Credits, now: Ts) -> Option<Vec<Allocation>> {
        let mut rest = cost;
        let mut allocations = Vec::new();
        for lot in &self.lots {
            if rest.is_zero() {
                break;
            }
            let take = lot.free_at(now).min(rest);
            if take.is_positive() {
                allocations.push(Allocation {
                    purchase_id: lot.purchase_id.clone(),
                    amount: take,
                });
                rest -= take;
            }
        }
        rest.is_zero().then_some(allocations)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedemptionStatus {
    Pending,
    Approved,
    Denied,
    Cancelled,
    Expired,
    Refunded,
    Unenrolled,
    /// Refused at once; kept so that the same `request_id` is recognised.
    Rejected,
}

impl RedemptionStatus {
    /// A pending or approved redemption blocks the learner from redeeming the
    /// same item again (SPEC §6 rule 6).
    pub fn is_active(self) -> bool {
        matches!(self, RedemptionStatus::Pending | RedemptionStatus::Approved)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RedemptionStatus::Pending => "pending",
            RedemptionStatus::Approved => "approved",
            RedemptionStatus::Denied => "denied",
            RedemptionStatus::Cancelled => "cancelled",
            RedemptionStatus::Expired => "expired",
            RedemptionStatus::Refunded => "refunded",
            RedemptionStatus::Unenrolled => "unenrolled",
            RedemptionStatus::Rejected => "rejected",
        }
    }

    pub fn parse(text: &str) -> Option<RedemptionStatus> {
        serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
    }
}

/// Credits of one lot reserved by, or spent on, one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub purchase_id: Id,
    pub amount: Credits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learner {
    pub id: Id,
    pub email: Email,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    Course,
    Path,
    Plan,
    Activity,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: Id,
    pub kind: ItemKind,
    pub title: String,
    #[serde(default)]
    pub group_ids: Vec<Id>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redemption {
    pub request_id: Id,
    /// `None` only for a request rejected before any account was found.
    pub account_id: Option<Id>,
    pub learner: Learner,
    pub item: Item,
    pub cost: Credits,
    pub status: RedemptionStatus,
    /// Why it was rejected, denied or not refunded.
    pub reason: Option<String>,
    pub requested_at: Ts,
    /// When the ledger accepted it; the pending timeout counts from here.
    pub created_at: Ts,
    pub decided_by: Option<String>,
    pub decided_at: Option<Ts>,
    pub allocations: Vec<Allocation>,
    pub refunded: Credits,
    pub fingerprint: String,
}

impl Redemption {
    pub fn allocated(&self) -> Credits {
        self.allocations.iter().map(|a| a.amount).sum()
    }
}
