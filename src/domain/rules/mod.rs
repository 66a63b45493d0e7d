//! SPEC §6: the ledger rules, without I/O, in a file per concern. [`handle`] takes
//! the ledger a batch loaded and one command, and answers with the outcome and
//! every change, journal entry and effect that command causes.

use serde_json::Value;

use super::command::*;
use super::event::Event;
use super::ids::{Code, Email, Id};
use super::ledger::{AuditEntry, Changes, Effect, EntryKind, JournalEntry, Ledger, Recipient};
use super::model::*;
use super::money::Credits;
use super::notice::Notice;
use super::outcome::{Outcome, Refusal, RetryReason};
use super::time::Ts;

/// The limits of SPEC §5: credits per purchase and cost per redemption.
pub const PURCHASE_CREDITS_MIN: Credits = Credits::from_cents(1);
pub const PURCHASE_CREDITS_MAX: Credits = Credits::from_cents(1_000_000_000);
pub const REDEMPTION_COST_MIN: Credits = Credits::from_cents(1);
pub const REDEMPTION_COST_MAX: Credits = Credits::from_cents(100_000_000);
/// SPEC §6 rule 9: this many `invalid_code` rejections within the window
/// block a learner until the window has passed.
pub const INVALID_CODE_ATTEMPTS_MAX: usize = 5;
pub const INVALID_CODE_WINDOW_MINUTES: i64 = 15;
/// SPEC §6 rule 12: a learner limit counts the requests of this many days.
pub const LEARNER_LIMIT_DAYS: i64 = 365;

/// The configurable parts of the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub refund_window_days: i64,
    pub pending_timeout_days: i64,
    /// Days before expiry at which owners are reminded, largest first.
    pub reminder_stages: Vec<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            refund_window_days: 14,
            pending_timeout_days: 14,
            reminder_stages: vec![30, 7, 1],
        }
    }
}

/// What the rules need to know about the message besides its command.
#[derive(Clone, Debug)]
pub struct Ctx<'a> {
    pub now: Ts,
    /// The message's `source` is one of `ADMIN_SOURCES`.
    pub staff: bool,
    /// The inbound event id (`command_id` of a refusal).
    pub event_id: &'a str,
    /// A digest of the command's data, to tell a repeated business key from
    /// a conflicting one.
    pub fingerprint: &'a str,
    pub policy: &'a Policy,
    /// A code to use if the command asks for a generated one.
    pub fresh_code: Code,
}

/// Applies one command to a view of the ledger. On `Applied`, `Refused` and
/// `Duplicate` the changes are to be kept; on `Retry` and `Dead` there are
/// none.
pub fn handle(ledger: &Ledger, command: &Command, ctx: &Ctx) -> (Outcome, Changes) {
    let mut step = Step {
        ledger,
        ctx,
        out: Changes::default(),
    };
    let result = match command {
        Command::AccountOpened(c) => accounts::open_account(&mut step, c),
        Command::AccountUpdated(c) => accounts::update_account(&mut step, c),
        Command::OwnerAdded(c) => accounts::add_owner(&mut step, c),
        Command::OwnerRemoved(c) => accounts::remove_owner(&mut step, c),
        Command::CodeRotated(c) => accounts::rotate_code(&mut step, c),
        Command::AccountClosed(c) => accounts::close_account(&mut step, c),
        Command::PurchaseCompleted(c) => purchases::record_purchase(&mut step, c),
        Command::PurchaseRefunded(c) => purchases::refund_purchase(&mut step, c),
        Command::LotExtended(c) => purchases::extend_lot(&mut step, c),
        Command::RedemptionRequested(c) => redemptions::request_redemption(&mut step, c),
        Command::RedemptionApproved(c) => redemptions::approve(&mut step, c),
        Command::RedemptionDenied(c) => redemptions::deny(&mut step, c),
        Command::RedemptionCancelled(c) => redemptions::cancel(&mut step, c),
        Command::Unenrolled(c) => redemptions::unenroll(&mut step, c),
        Command::ReportRequested(c) => accounts::request_report(&mut step, c),
        Command::Sweep { account_id } => expiry::sweep(&mut step, account_id),
    };
    match result {
        Ok(()) => {
            step.announce_low_balances();
            (Outcome::Applied, step.out)
        }
        Err(outcome @ (Outcome::Rejected(_) | Outcome::Refused(_) | Outcome::Duplicate)) => {
            (outcome, step.out)
        }
        Err(outcome) => (outcome, Changes::default()),
    }
}

mod accounts;
#[cfg(test)]
mod book;
mod expiry;
mod purchases;
mod redemptions;

type Flow = Result<(), Outcome>;

struct Step<'a> {
    ledger: &'a Ledger,
    ctx: &'a Ctx<'a>,
    out: Changes,
}

fn retry(reason: RetryReason, detail: String) -> Outcome {
    Outcome::Retry { reason, detail }
}

fn owners_of(account: &Account) -> Vec<Recipient> {
    account
        .owners
        .iter()
        .map(|o| Recipient {
            email: o.email.clone(),
            name: Some(o.name.clone()),
        })
        .collect()
}

fn learner_of(request: &Redemption) -> Vec<Recipient> {
    vec![Recipient {
        email: request.learner.email.clone(),
        name: Some(request.learner.name.clone()),
    }]
}

impl<'a> Step<'a> {
    fn now(&self) -> Ts {
        self.ctx.now
    }

    fn account(&self, id: &Id) -> Option<Account> {
        self.out
            .accounts
            .get(id)
            .or_else(|| self.ledger.accounts.get(id))
            .cloned()
    }

    fn known_account(&self, id: &Id) -> Result<Account, Outcome> {
        self.account(id).ok_or_else(|| {
            retry(
                RetryReason::UnknownAccount,
                format!("account `{id}` is not known (yet)"),
            )
        })
    }

    fn request(&self, id: &Id) -> Option<Redemption> {
        self.out
            .requests
            .get(id)
            .or_else(|| self.ledger.requests.get(id))
            .cloned()
    }

    /// A request a command may act on. One that was rejected at once was
    /// never pending: the command is refused, and announced like any other
    /// refusal.
    fn known_request(&mut self, command: InboundType, id: &Id) -> Result<Redemption, Outcome> {
        match self.request(id) {
            Some(r) if r.status != RedemptionStatus::Rejected => Ok(r),
            Some(r) => Err(self.refuse(command, r.account_id.as_ref(), Refusal::NotPending)),
            None => Err(retry(
                RetryReason::UnknownRequest,
                format!("request `{id}` is not known (yet)"),
            )),
        }
    }

    fn save_account(&mut self, account: Account) {
        self.out.accounts.insert(account.id.clone(), account);
    }

    fn save_request(&mut self, request: Redemption) {
        self.out
            .requests
            .insert(request.request_id.clone(), request);
    }

    /// Moves one lot's `remaining` by `amount` and its `held` by `held`, and
    /// journals it. The lot's own invariants are asserted on every move.
    #[allow(clippy::too_many_arguments)]
    fn post(
        &mut self,
        account: &mut Account,
        lot: usize,
        kind: EntryKind,
        amount: Credits,
        held: Credits,
        request: Option<&Id>,
        actor: &str,
    ) {
        let entry_lot = &mut account.lots[lot];
        entry_lot.remaining += amount;
        entry_lot.held += held;
        if matches!(kind, EntryKind::Expire | EntryKind::Reinstate) {
            entry_lot.expired -= amount;
        }
        assert!(
            entry_lot.is_consistent(),
            "lot {} of {} broke 0 ≤ held ≤ remaining ≤ credits: {:?}",
            entry_lot.purchase_id,
            account.id,
            entry_lot
        );
        let purchase_id = entry_lot.purchase_id.clone();
        let balance_after = account.balances_at(self.now()).balance;
        self.out.journal.push(JournalEntry {
            at: self.now(),
            account_id: account.id.clone(),
            kind,
            purchase_id,
            request_id: request.cloned(),
            amount,
            held_delta: held,
            balance_after,
            actor: actor.to_owned(),
        });
    }

    fn event(&mut self, account: Option<&Id>, event: Event) {
        self.out.effects.push(Effect::Event {
            account_id: account.cloned(),
            event,
        });
    }

    fn email(&mut self, to: Vec<Recipient>, notice: Notice) {
        self.out.effects.push(Effect::Email { to, notice });
    }

    fn audit(&mut self, account: &Id, actor: &str, field: &str, old: Value, new: Value) {
        self.out.audit.push(AuditEntry {
            at: self.now(),
            account_id: account.clone(),
            actor: actor.to_owned(),
            field: field.to_owned(),
            old,
            new,
        });
    }

    /// A business refusal of an admin command: announced, not an error.
    fn refuse(&mut self, command: InboundType, account: Option<&Id>, reason: Refusal) -> Outcome {
        self.event(
            account,
            Event::CommandRefused {
                command_id: self.ctx.event_id.to_owned(),
                command_type: command,
                reason,
            },
        );
        Outcome::Refused(reason)
    }

    /// Owners may run owner commands; staff sources may run them on any account.
    fn authorize(
        &mut self,
        command: InboundType,
        account: &Account,
        actor: &Email,
    ) -> Result<(), Outcome> {
        if account.status == AccountStatus::Closed {
            return Err(self.refuse(command, Some(&account.id), Refusal::AccountClosed));
        }
        if self.ctx.staff || account.is_owner(actor) {
            Ok(())
        } else {
            Err(self.refuse(command, Some(&account.id), Refusal::NotAnOwner))
        }
    }

    fn require_staff(&mut self, command: InboundType, account: Option<&Id>) -> Flow {
        if self.ctx.staff {
            Ok(())
        } else {
            Err(self.refuse(command, account, Refusal::NotStaff))
        }
    }

    /// Whether `key` belongs to an account other than `account`.
    fn code_taken(&self, code: &Code, account: &Id) -> bool {
        self.ledger
            .codes
            .get(&code.key())
            .is_some_and(|holder| holder != account)
            || self
                .out
                .accounts
                .values()
                .any(|a| &a.id != account && a.code.key() == code.key())
    }

    /// Whether `email` owns an account other than `account`.
    fn owns_other(&self, email: &Email, account: &Id) -> bool {
        self.ledger
            .owner_of
            .get(email)
            .is_some_and(|holder| holder != account)
    }

    /// Gives a request's holds back to their lots; what returns to a lot that
    /// has expired meanwhile expires at once (SPEC §6 rule 4).
    fn release_holds(&mut self, account: &mut Account, request: &Redemption, actor: &str) {
        for allocation in &request.allocations {
            let lot = account
                .lot(&allocation.purchase_id)
                .expect("a hold names a lot of its own account");
            self.post(
                account,
                lot,
                EntryKind::Release,
                Credits::ZERO,
                -allocation.amount,
                Some(&request.request_id),
                actor,
            );
            self.write_off_if_dead(account, lot, allocation.amount, &request.request_id, actor);
        }
    }

    /// Credits that land in an expired lot, or in a closed account, are
    /// written off at once. Returns how much was.
    fn write_off_if_dead(
        &mut self,
        account: &mut Account,
        lot: usize,
        amount: Credits,
        request: &Id,
        actor: &str,
    ) -> Credits {
        let kind = if account.lots[lot].is_expired_at(self.now()) {
            EntryKind::Expire
        } else if account.status == AccountStatus::Closed {
            EntryKind::Forfeit
        } else {
            return Credits::ZERO;
        };
        self.post(
            account,
            lot,
            kind,
            -amount,
            Credits::ZERO,
            Some(request),
            actor,
        );
        amount
    }

    /// SPEC §5.2 `balance.low`: announced when a change takes `available`
    /// from at or above the threshold to below it.
    fn announce_low_balances(&mut self) {
        let now = self.now();
        let mut crossings = Vec::new();
        for account in self.out.accounts.values() {
            let Some(threshold) = account.low_balance_threshold else {
                continue;
            };
            let Some(before) = self.ledger.accounts.get(&account.id) else {
                continue;
            };
            // The sweep writes off credits that stopped counting when their
            // lot expired; they were part of what the owners last saw.
            let swept: Credits = self
                .out
                .journal
                .iter()
                .filter(|e| {
                    e.account_id == account.id
                        && e.kind == EntryKind::Expire
                        && e.request_id.is_none()
                })
                .map(|e| -e.amount)
                .sum();
            let before = before.available_at(now) + swept;
            let after = account.available_at(now);
            if before >= threshold && after < threshold && account.status != AccountStatus::Closed {
                crossings.push((account.id.clone(), owners_of(account), after, threshold));
            }
        }
        for (account_id, owners, available, threshold) in crossings {
            self.event(
                Some(&account_id),
                Event::BalanceLow {
                    available,
                    threshold,
                },
            );
            self.email(
                owners,
                Notice::BalanceLow {
                    account_id,
                    available,
                    threshold,
                },
            );
        }
    }
}
