//! The in-memory ledger a batch works on, and what one message changes in it.
//!
//! `apply` loads every account, request and index entry a batch refers to
//! into a [`Ledger`], hands each message to [`rules::handle`](super::rules::handle),
//! and absorbs the [`Changes`] of those that succeed. A message whose handler
//! stops early leaves the ledger untouched: that is how one bad message never
//! spoils the others in its batch.

use std::collections::HashMap;

use serde_json::Value;

use super::command::ReportRequested;
use super::event::Event;
use super::ids::{CodeKey, Email, Id};
use super::model::{Account, Redemption};
use super::money::Credits;
use super::notice::Notice;
use super::time::Ts;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A purchase adds a lot.
    Purchase,
    /// A pending request reserves part of a lot.
    Hold,
    /// A hold is given back (denied, cancelled, expired, account closed).
    Release,
    /// Credits leave a lot to pay for a redemption.
    Redeem,
    /// An unenrollment within the window returns credits to their lot.
    Refund,
    /// Credits of an expired lot are written off.
    Expire,
    /// An extension makes expired credits count again.
    Reinstate,
    /// Closing an account writes off its remainder.
    Forfeit,
    /// A refunded payment takes credits out of its lot.
    PurchaseRefund,
}

impl EntryKind {
    pub const ALL: [EntryKind; 9] = [
        EntryKind::Purchase,
        EntryKind::Hold,
        EntryKind::Release,
        EntryKind::Redeem,
        EntryKind::Refund,
        EntryKind::Expire,
        EntryKind::Reinstate,
        EntryKind::Forfeit,
        EntryKind::PurchaseRefund,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Purchase => "purchase",
            EntryKind::Hold => "hold",
            EntryKind::Release => "release",
            EntryKind::Redeem => "redeem",
            EntryKind::Refund => "refund",
            EntryKind::Expire => "expire",
            EntryKind::Reinstate => "reinstate",
            EntryKind::Forfeit => "forfeit",
            EntryKind::PurchaseRefund => "purchase_refund",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One immutable line of the journal: how one lot's `remaining` and `held`
/// moved, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub at: Ts,
    pub account_id: Id,
    pub kind: EntryKind,
    pub purchase_id: Id,
    pub request_id: Option<Id>,
    /// Change of the lot's `remaining` (negative when credits leave it).
    pub amount: Credits,
    /// Change of the lot's `held`.
    pub held_delta: Credits,
    /// The account's balance right after this entry.
    pub balance_after: Credits,
    pub actor: String,
}

/// One changed field of an account, for the audit report.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub at: Ts,
    pub account_id: Id,
    pub actor: String,
    pub field: String,
    pub old: Value,
    pub new: Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub email: Email,
    pub name: Option<String>,
}

/// Something to tell the world once the transaction has committed.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// An outbound event about an account (none for a refusal that names
    /// no known account).
    Event {
        account_id: Option<Id>,
        event: Event,
    },
    /// A notification email, one per recipient.
    Email { to: Vec<Recipient>, notice: Notice },
    /// A report to build and send (SPEC §5.1 `credits.report.requested`).
    Report(ReportRequested),
}

/// A purchase refund as recorded: each `refund_id` of an account is applied
/// once (SPEC §6 rule 11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseRefund {
    pub account_id: Id,
    pub refund_id: Id,
    pub purchase_id: Id,
    pub refunded: Credits,
    pub shortfall: Credits,
    pub reason: Option<String>,
    pub refunded_at: Ts,
    /// Fingerprint of the message, to tell a repeat from a conflict.
    pub fingerprint: String,
}

/// Everything one message changed, kept apart until the message succeeds.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub accounts: HashMap<Id, Account>,
    pub requests: HashMap<Id, Redemption>,
    /// `invalid_code` rejections, per learner.
    pub attempts: Vec<(Id, Ts)>,
    pub refunds: Vec<PurchaseRefund>,
    pub journal: Vec<JournalEntry>,
    pub audit: Vec<AuditEntry>,
    pub effects: Vec<Effect>,
}

/// The part of the ledger one batch can see.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub accounts: HashMap<Id, Account>,
    /// Which account holds a code, for every code the batch mentions.
    pub codes: HashMap<CodeKey, Id>,
    /// Which account an email owns, for every owner email the batch mentions.
    pub owner_of: HashMap<Email, Id>,
    pub requests: HashMap<Id, Redemption>,
    /// Pending or approved redemption per (learner, item).
    pub active: HashMap<(Id, Id), Id>,
    /// Recent `invalid_code` rejections per learner.
    pub attempts: HashMap<Id, Vec<Ts>>,
    /// Purchase refunds already applied, by account and `refund_id`.
    pub refunds: HashMap<(Id, Id), PurchaseRefund>,
}

impl Ledger {
    pub fn insert_account(&mut self, account: Account) {
        self.codes.insert(account.code.key(), account.id.clone());
        for owner in &account.owners {
            self.owner_of
                .insert(owner.email.clone(), account.id.clone());
        }
        self.accounts.insert(account.id.clone(), account);
    }

    pub fn insert_request(&mut self, request: Redemption) {
        let key = (request.learner.id.clone(), request.item.id.clone());
        if request.status.is_active() {
            self.active.insert(key, request.request_id.clone());
        } else if self.active.get(&key) == Some(&request.request_id) {
            self.active.remove(&key);
        }
        self.requests.insert(request.request_id.clone(), request);
    }

    /// Takes in what one successful message changed, keeping every index in
    /// step with it.
    pub fn absorb(&mut self, changes: &Changes) {
        for account in changes.accounts.values() {
            if let Some(old) = self.accounts.get(&account.id) {
                if old.code != account.code {
                    self.codes.remove(&old.code.key());
                }
                for owner in &old.owners {
                    if !account.is_owner(&owner.email) {
                        self.owner_of.remove(&owner.email);
                    }
                }
            }
            self.insert_account(account.clone());
        }
        for request in changes.requests.values() {
            self.insert_request(request.clone());
        }
        for (learner, at) in &changes.attempts {
            self.attempts.entry(learner.clone()).or_default().push(*at);
        }
        for refund in &changes.refunds {
            self.refunds.insert(
                (refund.account_id.clone(), refund.refund_id.clone()),
                refund.clone(),
            );
        }
    }
}
