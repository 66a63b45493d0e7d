//! SPEC §6: the ledger rules, in one place and without I/O. [`handle`] takes
//! the ledger a batch loaded and one command, and answers with the outcome and
//! every change, journal entry and effect that command causes.

use chrono::Duration;
use serde_json::{Value, json};

use super::command::*;
use super::ids::{Code, Email, Id};
use super::ledger::{AuditEntry, Changes, Effect, EntryKind, JournalEntry, Ledger, Recipient};
use super::model::*;
use super::money::Credits;
use super::outcome::{DeadReason, Outcome, Refusal, Rejection, RetryReason};
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
        Command::AccountOpened(c) => open_account(&mut step, c),
        Command::AccountUpdated(c) => update_account(&mut step, c),
        Command::OwnerAdded(c) => add_owner(&mut step, c),
        Command::OwnerRemoved(c) => remove_owner(&mut step, c),
        Command::CodeRotated(c) => rotate_code(&mut step, c),
        Command::AccountClosed(c) => close_account(&mut step, c),
        Command::PurchaseCompleted(c) => record_purchase(&mut step, c),
        Command::LotExtended(c) => extend_lot(&mut step, c),
        Command::RedemptionRequested(c) => request_redemption(&mut step, c),
        Command::RedemptionApproved(c) => approve(&mut step, c),
        Command::RedemptionDenied(c) => deny(&mut step, c),
        Command::RedemptionCancelled(c) => cancel(&mut step, c),
        Command::Unenrolled(c) => unenroll(&mut step, c),
        Command::ReportRequested(c) => request_report(&mut step, c),
        Command::Sweep { account_id } => sweep(&mut step, account_id),
    };
    match result {
        Ok(()) => {
            step.announce_low_balances();
            (Outcome::Applied, step.out)
        }
        Err(outcome @ (Outcome::Refused(_) | Outcome::Duplicate)) => (outcome, step.out),
        Err(outcome) => (outcome, Changes::default()),
    }
}

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

fn owner_emails(account: &Account) -> Value {
    json!(account.owners.iter().map(|o| &o.email).collect::<Vec<_>>())
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
    fn known_request(&mut self, command: &'static str, id: &Id) -> Result<Redemption, Outcome> {
        match self.request(id) {
            Some(r) if r.status != RedemptionStatus::Rejected => Ok(r),
            Some(r) => Err(self.refuse(command, r.account_id.as_ref(), Refusal::NotPending)),
            None => Err(retry(
                RetryReason::UnknownRequest,
                format!("request `{id}` is not known (yet)"),
            )),
        }
    }

    fn refused_now(&self, reason: Refusal) -> Outcome {
        Outcome::Refused(reason.as_str())
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

    fn event(&mut self, kind: &'static str, account: Option<&Id>, data: Value) {
        self.out.effects.push(Effect::Event {
            kind,
            account_id: account.cloned(),
            data,
        });
    }

    fn email(&mut self, to: Vec<Recipient>, template: &'static str, vars: Value) {
        self.out.effects.push(Effect::Email { to, template, vars });
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
    fn refuse(&mut self, command: &'static str, account: Option<&Id>, reason: Refusal) -> Outcome {
        self.event(
            "training-credits.command.refused",
            account,
            json!({
                "command_id": self.ctx.event_id,
                "command_type": command,
                "reason": reason.as_str(),
            }),
        );
        self.refused_now(reason)
    }

    /// Owners may run owner commands; staff sources may run them on any account.
    fn authorize(
        &mut self,
        command: &'static str,
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

    fn require_staff(&mut self, command: &'static str, account: Option<&Id>) -> Flow {
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
        for (id, owners, available, threshold) in crossings {
            self.event(
                "training-credits.balance.low",
                Some(&id),
                json!({"available": available, "threshold": threshold}),
            );
            self.email(
                owners,
                "balance_low",
                json!({"account_id": id, "available": available, "threshold": threshold}),
            );
        }
    }
}

const OPENED: &str = "credits.account.opened";
const UPDATED: &str = "credits.account.updated";
const OWNER_ADDED: &str = "credits.account.owner_added";
const OWNER_REMOVED: &str = "credits.account.owner_removed";
const CODE_ROTATED: &str = "credits.account.code_rotated";
const CLOSED: &str = "credits.account.closed";
const PURCHASE: &str = "credits.purchase.completed";
const EXTENDED: &str = "credits.lot.extended";
const APPROVED: &str = "credits.redemption.approved";
const DENIED: &str = "credits.redemption.denied";
const CANCELLED: &str = "credits.redemption.cancelled";
const UNENROLLED: &str = "credits.enrollment.unenrolled";
const REPORT: &str = "credits.report.requested";

fn open_account(step: &mut Step, c: &AccountOpened) -> Flow {
    if step.account(&c.account_id).is_some() {
        return Err(step.refuse(OPENED, Some(&c.account_id), Refusal::AccountExists));
    }
    let mut owners: Vec<Owner> = Vec::with_capacity(c.owners.len());
    for owner in &c.owners {
        if !owners.iter().any(|o| o.email == owner.email) {
            owners.push(owner.clone());
        }
    }
    if owners
        .iter()
        .any(|o| step.owns_other(&o.email, &c.account_id))
    {
        return Err(step.refuse(OPENED, Some(&c.account_id), Refusal::OwnerOfOtherAccount));
    }
    let code = c
        .code
        .clone()
        .unwrap_or_else(|| step.ctx.fresh_code.clone());
    if step.code_taken(&code, &c.account_id) {
        return Err(step.refuse(OPENED, Some(&c.account_id), Refusal::CodeTaken));
    }
    let name = c.name.clone().unwrap_or_else(|| owners[0].name.clone());
    let account = Account {
        id: c.account_id.clone(),
        name: name.clone(),
        status: AccountStatus::Active,
        approval_mode: c.approval_mode,
        owners,
        code,
        scope: c.scope.clone().unwrap_or(Scope::All),
        low_balance_threshold: c.low_balance_threshold,
        notes: c.notes.clone(),
        created_at: step.now(),
        lots: Vec::new(),
    };
    step.audit(
        &account.id,
        account.owners[0].email.as_str(),
        "status",
        Value::Null,
        json!("active"),
    );
    step.event(
        "training-credits.account.opened",
        Some(&account.id),
        json!({
            "name": name,
            "code": account.code,
            "approval_mode": account.approval_mode,
            "owners": account.owners,
        }),
    );
    step.save_account(account);
    Ok(())
}

/// Records a field change: audit row and `changes` entry.
fn change(
    step: &mut Step,
    changes: &mut Vec<Value>,
    account: &Id,
    actor: &str,
    field: &str,
    old: Value,
    new: Value,
) {
    if old != new {
        step.audit(account, actor, field, old.clone(), new.clone());
        changes.push(json!({"field": field, "old": old, "new": new}));
    }
}

fn announce_update(step: &mut Step, account: &Id, changes: Vec<Value>) {
    if !changes.is_empty() {
        step.event(
            "training-credits.account.updated",
            Some(account),
            json!({ "changes": changes }),
        );
    }
}

fn update_account(step: &mut Step, c: &AccountUpdated) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    step.authorize(UPDATED, &account, &c.actor)?;
    let actor = c.actor.as_str();
    let id = account.id.clone();
    let mut changes = Vec::new();
    if let Some(name) = &c.name {
        change(
            step,
            &mut changes,
            &id,
            actor,
            "name",
            json!(account.name),
            json!(name),
        );
        account.name = name.clone();
    }
    if let Some(mode) = c.approval_mode {
        change(
            step,
            &mut changes,
            &id,
            actor,
            "approval_mode",
            json!(account.approval_mode),
            json!(mode),
        );
        account.approval_mode = mode;
    }
    if let Some(ids) = &c.scope_ids {
        // The scope's kind never changes; an account open to everything has
        // no ids to change.
        let new_scope = match &account.scope {
            Scope::All => Scope::All,
            Scope::Activity { .. } => Scope::Activity { ids: ids.clone() },
            Scope::Group { .. } => Scope::Group { ids: ids.clone() },
        };
        change(
            step,
            &mut changes,
            &id,
            actor,
            "scope",
            json!(account.scope),
            json!(new_scope),
        );
        account.scope = new_scope;
    }
    if let Some(status) = c.status {
        let status = match status {
            SettableStatus::Active => AccountStatus::Active,
            SettableStatus::Inactive => AccountStatus::Inactive,
        };
        change(
            step,
            &mut changes,
            &id,
            actor,
            "status",
            json!(account.status),
            json!(status),
        );
        account.status = status;
    }
    if let Some(new) = c.low_balance_threshold.value() {
        change(
            step,
            &mut changes,
            &id,
            actor,
            "low_balance_threshold",
            json!(account.low_balance_threshold),
            json!(new),
        );
        account.low_balance_threshold = new;
    }
    if let Some(new) = c.notes.value() {
        change(
            step,
            &mut changes,
            &id,
            actor,
            "notes",
            json!(account.notes),
            json!(new),
        );
        account.notes = new;
    }
    announce_update(step, &id, changes);
    step.save_account(account);
    Ok(())
}

fn add_owner(step: &mut Step, c: &OwnerAdded) -> Flow {
    let account = step.known_account(&c.account_id)?;
    step.authorize(OWNER_ADDED, &account, &c.actor)?;
    if account.is_owner(&c.owner.email) {
        return Ok(());
    }
    if step.owns_other(&c.owner.email, &account.id) {
        return Err(step.refuse(OWNER_ADDED, Some(&account.id), Refusal::OwnerOfOtherAccount));
    }
    let owner = c.owner.clone();
    edit_owners(
        step,
        account,
        &c.actor,
        |owners| owners.push(owner),
        "owner_added",
        json!({"owner": c.owner}),
    );
    Ok(())
}

fn remove_owner(step: &mut Step, c: &OwnerRemoved) -> Flow {
    let account = step.known_account(&c.account_id)?;
    step.authorize(OWNER_REMOVED, &account, &c.actor)?;
    if !account.is_owner(&c.email) {
        return Err(step.refuse(OWNER_REMOVED, Some(&account.id), Refusal::NotAnOwner));
    }
    if account.owners.len() == 1 {
        return Err(step.refuse(OWNER_REMOVED, Some(&account.id), Refusal::LastOwner));
    }
    edit_owners(
        step,
        account,
        &c.actor,
        |owners| owners.retain(|o| o.email != c.email),
        "owner_removed",
        json!({"email": c.email}),
    );
    Ok(())
}

/// Changes the owner list: audits it, announces `account.updated`, and
/// emails everyone who is or was an owner (the removed one hears of it too).
fn edit_owners(
    step: &mut Step,
    mut account: Account,
    actor: &Email,
    edit: impl FnOnce(&mut Vec<Owner>),
    template: &'static str,
    extra: Value,
) {
    let old = owner_emails(&account);
    let mut told = owners_of(&account);
    edit(&mut account.owners);
    for recipient in owners_of(&account) {
        if !told.contains(&recipient) {
            told.push(recipient);
        }
    }
    let id = account.id.clone();
    let mut changes = Vec::new();
    change(
        step,
        &mut changes,
        &id,
        actor.as_str(),
        "owners",
        old,
        owner_emails(&account),
    );
    announce_update(step, &id, changes);
    let mut vars = json!({"account_id": id, "account_name": account.name, "actor": actor});
    if let (Some(vars), Value::Object(extra)) = (vars.as_object_mut(), extra) {
        vars.extend(extra);
    }
    step.email(told, template, vars);
    step.save_account(account);
}

fn rotate_code(step: &mut Step, c: &CodeRotated) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    step.authorize(CODE_ROTATED, &account, &c.actor)?;
    let code = c
        .code
        .clone()
        .unwrap_or_else(|| step.ctx.fresh_code.clone());
    if step.code_taken(&code, &account.id) {
        return Err(step.refuse(CODE_ROTATED, Some(&account.id), Refusal::CodeTaken));
    }
    let id = account.id.clone();
    let mut changes = Vec::new();
    change(
        step,
        &mut changes,
        &id,
        c.actor.as_str(),
        "code",
        json!(account.code),
        json!(code),
    );
    if changes.is_empty() {
        return Ok(());
    }
    account.code = code;
    announce_update(step, &id, changes);
    step.email(
        owners_of(&account),
        "code_rotated",
        json!({"account_id": id, "account_name": account.name, "actor": c.actor, "code": account.code}),
    );
    step.save_account(account);
    Ok(())
}

fn close_account(step: &mut Step, c: &AccountClosed) -> Flow {
    step.require_staff(CLOSED, Some(&c.account_id))?;
    let mut account = step.known_account(&c.account_id)?;
    if account.status == AccountStatus::Closed {
        return Err(step.refuse(CLOSED, Some(&account.id), Refusal::AccountClosed));
    }
    let actor = c.actor.as_str();
    let mut pending: Vec<Redemption> = step
        .ledger
        .requests
        .values()
        .filter(|r| {
            r.account_id.as_ref() == Some(&account.id) && r.status == RedemptionStatus::Pending
        })
        .cloned()
        .collect();
    pending.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let old_status = account.status;
    account.status = AccountStatus::Closed;
    for request in &pending {
        step.release_holds(&mut account, request, actor);
    }
    for lot in 0..account.lots.len() {
        let rest = account.lots[lot].remaining;
        if rest.is_positive() {
            step.post(
                &mut account,
                lot,
                EntryKind::Forfeit,
                -rest,
                Credits::ZERO,
                None,
                actor,
            );
        }
    }
    // Announced once everything is forfeited: `available` is what can be
    // spent now, and a closed account can spend nothing.
    for mut request in pending {
        request.status = RedemptionStatus::Denied;
        request.reason = Some(Rejection::AccountClosed.as_str().to_owned());
        request.decided_by = Some(actor.to_owned());
        request.decided_at = Some(step.now());
        let available = account.available_at(step.now());
        step.event(
            "training-credits.redemption.denied",
            Some(&account.id),
            json!({
                "request_id": request.request_id,
                "decided_by": actor,
                "reason": Rejection::AccountClosed.as_str(),
                "available": available,
            }),
        );
        step.email(
            learner_of(&request),
            "redemption_denied",
            json!({"title": request.item.title, "cost": request.cost, "reason": Rejection::AccountClosed.explain()}),
        );
        step.save_request(request);
    }
    let id = account.id.clone();
    let mut changes = Vec::new();
    change(
        step,
        &mut changes,
        &id,
        actor,
        "status",
        json!(old_status),
        json!(account.status),
    );
    announce_update(step, &id, changes);
    step.email(
        owners_of(&account),
        "account_closed",
        json!({"account_id": id, "account_name": account.name, "actor": actor, "reason": c.reason}),
    );
    step.save_account(account);
    Ok(())
}

fn record_purchase(step: &mut Step, c: &PurchaseCompleted) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    if let Some(lot) = account.lot(&c.purchase_id) {
        return Err(if account.lots[lot].fingerprint == step.ctx.fingerprint {
            Outcome::Duplicate
        } else {
            Outcome::dead(
                DeadReason::IdConflict,
                format!(
                    "purchase `{}` was recorded with other fields",
                    c.purchase_id
                ),
            )
        });
    }
    let expires_at = c
        .expires_at
        .unwrap_or_else(|| c.purchased_at.plus_one_year());
    // `decode` refuses these before any account is looked up.
    assert!((PURCHASE_CREDITS_MIN..=PURCHASE_CREDITS_MAX).contains(&c.credits));
    assert!(expires_at > c.purchased_at);
    if account.status == AccountStatus::Closed {
        return Err(step.refuse(PURCHASE, Some(&account.id), Refusal::AccountClosed));
    }
    account.lots.push(Lot {
        purchase_id: c.purchase_id.clone(),
        credits: c.credits,
        remaining: Credits::ZERO,
        held: Credits::ZERO,
        expired: Credits::ZERO,
        purchased_at: c.purchased_at,
        expires_at,
        price_paid: c.price_paid.clone(),
        channel: c
            .channel
            .map(|ch| json!(ch).as_str().unwrap_or_default().to_owned()),
        reminded_stage: None,
        fingerprint: step.ctx.fingerprint.to_owned(),
    });
    account.sort_lots();
    let lot = account.lot(&c.purchase_id).expect("the lot was just added");
    step.post(
        &mut account,
        lot,
        EntryKind::Purchase,
        c.credits,
        Credits::ZERO,
        None,
        "purchase",
    );
    let available = account.available_at(step.now());
    step.event(
        "training-credits.purchase.recorded",
        Some(&account.id),
        json!({
            "purchase_id": c.purchase_id,
            "credits": c.credits,
            "expires_at": expires_at,
            "available": available,
        }),
    );
    step.email(
        owners_of(&account),
        "purchase_recorded",
        json!({
            "account_id": account.id,
            "account_name": account.name,
            "purchase_id": c.purchase_id,
            "credits": c.credits,
            "price_paid": c.price_paid.as_ref().map(|p| format!("{} {}", p.amount, p.currency)),
            "expires_on": expires_at.date(),
            "available": available,
        }),
    );
    step.save_account(account);
    Ok(())
}

fn extend_lot(step: &mut Step, c: &LotExtended) -> Flow {
    step.require_staff(EXTENDED, Some(&c.account_id))?;
    let mut account = step.known_account(&c.account_id)?;
    let Some(lot) = account.lot(&c.purchase_id) else {
        return Err(retry(
            RetryReason::UnknownAccount,
            format!(
                "account `{}` has no lot `{}` (yet)",
                c.account_id, c.purchase_id
            ),
        ));
    };
    if account.status == AccountStatus::Closed {
        return Err(step.refuse(EXTENDED, Some(&account.id), Refusal::AccountClosed));
    }
    if c.expires_at <= step.now() || c.expires_at <= account.lots[lot].expires_at {
        return Err(step.refuse(EXTENDED, Some(&account.id), Refusal::NotLater));
    }
    // What counts again: credits the sweep (or a refund) wrote off, and the
    // unreserved remainder of a lot past its expiry that the sweep has not
    // reached yet, which could no longer be spent either (SPEC §6 rule 4).
    let written_off = account.lots[lot].expired;
    let unswept = if account.lots[lot].is_expired_at(step.now()) {
        account.lots[lot].remaining - account.lots[lot].held
    } else {
        Credits::ZERO
    };
    let reinstated = written_off + unswept;
    if written_off.is_positive() {
        step.post(
            &mut account,
            lot,
            EntryKind::Reinstate,
            written_off,
            Credits::ZERO,
            None,
            c.actor.as_str(),
        );
    }
    let old = account.lots[lot].expires_at;
    account.lots[lot].expires_at = c.expires_at;
    account.lots[lot].reminded_stage = None;
    account.sort_lots();
    step.audit(
        &account.id,
        c.actor.as_str(),
        &format!("lot:{}:expires_at", c.purchase_id),
        json!(old),
        json!(c.expires_at),
    );
    let available = account.available_at(step.now());
    step.event(
        "training-credits.lot.extended",
        Some(&account.id),
        json!({
            "purchase_id": c.purchase_id,
            "expires_at": c.expires_at,
            "reinstated": reinstated,
            "available": available,
        }),
    );
    step.save_account(account);
    Ok(())
}

fn reject(
    step: &mut Step,
    c: &RedemptionRequested,
    account: Option<&Account>,
    reason: Rejection,
) -> Outcome {
    let mut data = json!({
        "request_id": c.request_id,
        "learner_id": c.learner.id,
        "item_id": c.item.id,
        "reason": reason.as_str(),
    });
    if let Some(account) = account {
        data["available"] = json!(account.available_at(step.now()));
    }
    step.event(
        "training-credits.redemption.rejected",
        account.map(|a| &a.id),
        data,
    );
    let request = Redemption {
        request_id: c.request_id.clone(),
        account_id: account.map(|a| a.id.clone()),
        learner: c.learner.clone(),
        item: c.item.clone(),
        cost: c.cost,
        status: RedemptionStatus::Rejected,
        reason: Some(reason.as_str().to_owned()),
        requested_at: c.requested_at,
        created_at: step.now(),
        decided_by: Some("system".to_owned()),
        decided_at: Some(step.now()),
        allocations: Vec::new(),
        refunded: Credits::ZERO,
        fingerprint: step.ctx.fingerprint.to_owned(),
    };
    step.email(
        learner_of(&request),
        "redemption_rejected",
        json!({"title": c.item.title, "cost": c.cost, "reason": reason.explain()}),
    );
    step.save_request(request);
    if reason == Rejection::InvalidCode {
        step.out.attempts.push((c.learner.id.clone(), step.now()));
    }
    Outcome::Refused(reason.as_str())
}

fn request_redemption(step: &mut Step, c: &RedemptionRequested) -> Flow {
    if let Some(existing) = step.request(&c.request_id) {
        return Err(if existing.fingerprint == step.ctx.fingerprint {
            Outcome::Duplicate
        } else {
            Outcome::dead(
                DeadReason::IdConflict,
                format!("request `{}` was made with other fields", c.request_id),
            )
        });
    }
    // `decode` refuses an out-of-range cost before any account is looked up.
    assert!((REDEMPTION_COST_MIN..=REDEMPTION_COST_MAX).contains(&c.cost));
    let now = step.now();
    let window_start = now.plus(-Duration::minutes(INVALID_CODE_WINDOW_MINUTES));
    let recent_failures = step
        .ledger
        .attempts
        .get(&c.learner.id)
        .map_or(0, |ats| ats.iter().filter(|at| **at > window_start).count());
    if recent_failures >= INVALID_CODE_ATTEMPTS_MAX {
        return Err(reject(step, c, None, Rejection::TooManyAttempts));
    }
    let key = super::ids::CodeKey::of(&c.code);
    let Some(mut account) = step.ledger.codes.get(&key).and_then(|id| step.account(id)) else {
        return Err(reject(step, c, None, Rejection::InvalidCode));
    };
    if account.code.key() != key {
        return Err(reject(step, c, None, Rejection::InvalidCode));
    }
    let refusal = match account.status {
        AccountStatus::Closed => Some(Rejection::AccountClosed),
        AccountStatus::Inactive => Some(Rejection::AccountInactive),
        AccountStatus::Active if !account.scope.covers(&c.item) => Some(Rejection::OutOfScope),
        AccountStatus::Active
            if step
                .ledger
                .active
                .contains_key(&(c.learner.id.clone(), c.item.id.clone())) =>
        {
            Some(Rejection::AlreadyRedeemed)
        }
        AccountStatus::Active => None,
    };
    if let Some(reason) = refusal {
        return Err(reject(step, c, Some(&account), reason));
    }
    let Some(allocations) = account.allocate(c.cost, now) else {
        return Err(reject(
            step,
            c,
            Some(&account),
            Rejection::InsufficientBalance,
        ));
    };
    let manual = account.approval_mode == ApprovalMode::Manual;
    for allocation in &allocations {
        let lot = account
            .lot(&allocation.purchase_id)
            .expect("allocated from this account");
        let (kind, amount, held) = if manual {
            (EntryKind::Hold, Credits::ZERO, allocation.amount)
        } else {
            (EntryKind::Redeem, -allocation.amount, Credits::ZERO)
        };
        step.post(
            &mut account,
            lot,
            kind,
            amount,
            held,
            Some(&c.request_id),
            c.learner.email.as_str(),
        );
    }
    let request = Redemption {
        request_id: c.request_id.clone(),
        account_id: Some(account.id.clone()),
        learner: c.learner.clone(),
        item: c.item.clone(),
        cost: c.cost,
        status: if manual {
            RedemptionStatus::Pending
        } else {
            RedemptionStatus::Approved
        },
        reason: None,
        requested_at: c.requested_at,
        created_at: now,
        decided_by: (!manual).then(|| "system".to_owned()),
        decided_at: (!manual).then_some(now),
        allocations,
        refunded: Credits::ZERO,
        fingerprint: step.ctx.fingerprint.to_owned(),
    };
    let available = account.available_at(now);
    if manual {
        step.event(
            "training-credits.redemption.pending",
            Some(&account.id),
            json!({
                "request_id": c.request_id,
                "learner_id": c.learner.id,
                "item_id": c.item.id,
                "cost": c.cost,
                "available": available,
            }),
        );
        step.email(
            owners_of(&account),
            "redemption_pending",
            json!({
                "request_id": c.request_id,
                "learner_name": c.learner.name,
                "learner_email": c.learner.email,
                "title": c.item.title,
                "cost": c.cost,
                "available": available,
            }),
        );
    } else {
        announce_approval(step, &account, &request, available);
    }
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

fn announce_approval(step: &mut Step, account: &Account, request: &Redemption, available: Credits) {
    step.event(
        "training-credits.redemption.approved",
        Some(&account.id),
        json!({
            "request_id": request.request_id,
            "learner_id": request.learner.id,
            "item_id": request.item.id,
            "cost": request.cost,
            "decided_by": request.decided_by,
            "available": available,
        }),
    );
    step.email(
        learner_of(request),
        "redemption_approved",
        json!({"title": request.item.title, "cost": request.cost}),
    );
}

/// The request an owner decides on, and its account, if the owner may.
fn decision(
    step: &mut Step,
    command: &'static str,
    c: &RedemptionDecided,
) -> Result<(Redemption, Account), Outcome> {
    let request = step.known_request(command, &c.request_id)?;
    let account_id = request
        .account_id
        .clone()
        .expect("only rejected requests lack an account");
    let account = step.known_account(&account_id)?;
    if !(step.ctx.staff || account.is_owner(&c.approver)) {
        return Err(step.refuse(command, Some(&account.id), Refusal::NotAnOwner));
    }
    if request.status != RedemptionStatus::Pending {
        return Err(step.refuse(command, Some(&account.id), Refusal::NotPending));
    }
    Ok((request, account))
}

fn approve(step: &mut Step, c: &RedemptionDecided) -> Flow {
    let (mut request, mut account) = decision(step, APPROVED, c)?;
    for allocation in &request.allocations {
        let lot = account
            .lot(&allocation.purchase_id)
            .expect("held on this account");
        step.post(
            &mut account,
            lot,
            EntryKind::Redeem,
            -allocation.amount,
            -allocation.amount,
            Some(&request.request_id),
            c.approver.as_str(),
        );
    }
    request.status = RedemptionStatus::Approved;
    request.decided_by = Some(c.approver.to_string());
    request.decided_at = Some(step.now());
    let available = account.available_at(step.now());
    announce_approval(step, &account, &request, available);
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

fn deny(step: &mut Step, c: &RedemptionDecided) -> Flow {
    let (mut request, mut account) = decision(step, DENIED, c)?;
    step.release_holds(&mut account, &request, c.approver.as_str());
    let reason = c
        .reason
        .clone()
        .unwrap_or_else(|| "denied by an account owner".to_owned());
    request.status = RedemptionStatus::Denied;
    request.reason = Some(reason.clone());
    request.decided_by = Some(c.approver.to_string());
    request.decided_at = Some(step.now());
    let available = account.available_at(step.now());
    step.event(
        "training-credits.redemption.denied",
        Some(&account.id),
        json!({
            "request_id": request.request_id,
            "decided_by": c.approver,
            "reason": reason,
            "available": available,
        }),
    );
    step.email(
        learner_of(&request),
        "redemption_denied",
        json!({"title": request.item.title, "cost": request.cost, "reason": reason}),
    );
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

/// Withdraws a pending request: its holds go back, the LMS hears of it.
fn withdraw(step: &mut Step, mut request: Redemption, mut account: Account, actor: &str) {
    step.release_holds(&mut account, &request, actor);
    request.status = RedemptionStatus::Cancelled;
    request.decided_by = Some(actor.to_owned());
    request.decided_at = Some(step.now());
    let available = account.available_at(step.now());
    step.event(
        "training-credits.redemption.cancelled",
        Some(&account.id),
        json!({"request_id": request.request_id, "available": available}),
    );
    step.save_request(request);
    step.save_account(account);
}

fn request_and_account(
    step: &mut Step,
    command: &'static str,
    id: &Id,
) -> Result<(Redemption, Account), Outcome> {
    let request = step.known_request(command, id)?;
    let account_id = request
        .account_id
        .clone()
        .expect("only rejected requests lack an account");
    let account = step.known_account(&account_id)?;
    Ok((request, account))
}

fn cancel(step: &mut Step, c: &RedemptionCancelled) -> Flow {
    let (request, account) = request_and_account(step, CANCELLED, &c.request_id)?;
    if request.learner.id != c.learner_id {
        return Err(step.refuse(CANCELLED, Some(&account.id), Refusal::NotRequester));
    }
    if request.status != RedemptionStatus::Pending {
        return Err(step.refuse(CANCELLED, Some(&account.id), Refusal::NotPending));
    }
    withdraw(step, request, account, c.learner_id.as_str());
    Ok(())
}

fn unenroll(step: &mut Step, c: &Unenrolled) -> Flow {
    let (mut request, mut account) = request_and_account(step, UNENROLLED, &c.request_id)?;
    let actor = request.learner.id.to_string();
    match request.status {
        RedemptionStatus::Pending => {
            withdraw(step, request, account, &actor);
            return Ok(());
        }
        RedemptionStatus::Approved => {}
        _ => return Err(step.refuse(UNENROLLED, Some(&account.id), Refusal::NotPending)),
    }
    let approved_at = request
        .decided_at
        .expect("an approved request has its decision time");
    let window_end = approved_at.plus_days(step.ctx.policy.refund_window_days);
    if c.unenrolled_at > window_end {
        request.status = RedemptionStatus::Unenrolled;
        request.reason = Some("refund_window_closed".to_owned());
        step.event(
            "training-credits.redemption.unenrolled",
            Some(&account.id),
            json!({"request_id": request.request_id, "reason": "refund_window_closed"}),
        );
    } else {
        let mut expired_on_refund = Credits::ZERO;
        for allocation in &request.allocations {
            let lot = account
                .lot(&allocation.purchase_id)
                .expect("spent from this account");
            step.post(
                &mut account,
                lot,
                EntryKind::Refund,
                allocation.amount,
                Credits::ZERO,
                Some(&request.request_id),
                &actor,
            );
            expired_on_refund += step.write_off_if_dead(
                &mut account,
                lot,
                allocation.amount,
                &request.request_id,
                &actor,
            );
        }
        request.status = RedemptionStatus::Refunded;
        request.refunded = request.allocated();
        let available = account.available_at(step.now());
        step.event(
            "training-credits.redemption.refunded",
            Some(&account.id),
            json!({
                "request_id": request.request_id,
                "refunded": request.refunded,
                "expired_on_refund": expired_on_refund,
                "available": available,
            }),
        );
    }
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

fn request_report(step: &mut Step, c: &ReportRequested) -> Flow {
    if let Some(columns) = &c.columns {
        let known = c.report.columns();
        if let Some(bad) = columns.iter().find(|col| !known.contains(&col.as_str())) {
            return Err(Outcome::dead(
                DeadReason::SchemaViolation,
                format!("`{bad}` is not a column of the {:?} report", c.report),
            ));
        }
    }
    match &c.account_id {
        Some(id) => {
            let account = step.known_account(id)?;
            if !(step.ctx.staff || account.is_owner(&c.recipient)) {
                return Err(step.refuse(REPORT, Some(id), Refusal::NotAnOwner));
            }
        }
        None => step.require_staff(REPORT, None)?,
    }
    step.out.effects.push(Effect::Report(c.clone()));
    Ok(())
}

/// The scheduled jobs for one account as of `now`: pending requests time
/// out, expired lots are written off, owners are reminded of what expires.
fn sweep(step: &mut Step, account_id: &Id) -> Flow {
    let Some(mut account) = step.account(account_id) else {
        return Ok(());
    };
    let now = step.now();
    let timeout_days = step.ctx.policy.pending_timeout_days;
    let mut overdue: Vec<Redemption> = step
        .ledger
        .requests
        .values()
        .filter(|r| {
            r.account_id.as_ref() == Some(account_id)
                && r.status == RedemptionStatus::Pending
                && r.created_at.plus_days(timeout_days) <= now
        })
        .cloned()
        .collect();
    overdue.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    for mut request in overdue {
        step.release_holds(&mut account, &request, "system");
        request.status = RedemptionStatus::Expired;
        request.reason = Some("pending_timeout".to_owned());
        request.decided_by = Some("system".to_owned());
        request.decided_at = Some(now);
        let available = account.available_at(now);
        step.event(
            "training-credits.redemption.expired",
            Some(&account.id),
            json!({"request_id": request.request_id, "available": available}),
        );
        step.email(
            learner_of(&request),
            "redemption_expired",
            json!({
                "title": request.item.title,
                "cost": request.cost,
                "reason": format!("the account owners did not answer within {timeout_days} days"),
            }),
        );
        step.save_request(request);
    }
    for lot in 0..account.lots.len() {
        let unreserved = account.lots[lot].remaining - account.lots[lot].held;
        if !unreserved.is_positive() {
            continue;
        }
        let expires_at = account.lots[lot].expires_at;
        if expires_at <= now {
            step.post(
                &mut account,
                lot,
                EntryKind::Expire,
                -unreserved,
                Credits::ZERO,
                None,
                "system",
            );
            let available = account.available_at(now);
            let purchase_id = account.lots[lot].purchase_id.clone();
            step.event(
                "training-credits.lot.expired",
                Some(&account.id),
                json!({"purchase_id": purchase_id, "expired": unreserved, "available": available}),
            );
            step.email(
                owners_of(&account),
                "lot_expired",
                json!({
                    "account_id": account.id,
                    "account_name": account.name,
                    "purchase_id": purchase_id,
                    "expired": unreserved,
                    "expired_on": expires_at.date(),
                    "available": available,
                }),
            );
            continue;
        }
        let days_left = now.whole_days_until(expires_at);
        let reached = step
            .ctx
            .policy
            .reminder_stages
            .iter()
            .copied()
            .filter(|stage| expires_at.plus_days(-i64::from(*stage)) <= now)
            .min();
        let Some(stage) = reached else { continue };
        if account.lots[lot]
            .reminded_stage
            .is_some_and(|sent| sent <= stage)
        {
            continue;
        }
        account.lots[lot].reminded_stage = Some(stage);
        let purchase_id = account.lots[lot].purchase_id.clone();
        let remaining = account.lots[lot].remaining;
        step.event(
            "training-credits.lot.expiring",
            Some(&account.id),
            json!({
                "purchase_id": purchase_id,
                "expires_at": expires_at,
                "remaining": remaining,
                "stage": stage,
                "days_left": days_left,
            }),
        );
        step.email(
            owners_of(&account),
            "lot_expiring",
            json!({
                "account_id": account.id,
                "account_name": account.name,
                "purchase_id": purchase_id,
                "remaining": remaining,
                "expires_on": expires_at.date(),
                "days_left": days_left,
            }),
        );
    }
    if step.out.journal.is_empty() && step.out.effects.is_empty() {
        return Ok(());
    }
    step.save_account(account);
    Ok(())
}
