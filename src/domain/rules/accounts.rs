//! Accounts and their owners: opening, changes, owners, codes, closing,
//! and who may ask for an account's reports.

use serde::Serialize;
use serde_json::{Value, json};

use super::{Flow, Step, learner_of, owners_of};
use crate::domain::command::*;
use crate::domain::event::{Event, FieldChange};
use crate::domain::ids::{Email, Id};
use crate::domain::ledger::{Effect, EntryKind};
use crate::domain::model::*;
use crate::domain::money::Credits;
use crate::domain::notice::Notice;
use crate::domain::outcome::{DeadReason, Outcome, Refusal, Rejection};

pub(super) fn open_account(step: &mut Step, c: &AccountOpened) -> Flow {
    if step.account(&c.account_id).is_some() {
        return Err(step.refuse(
            InboundType::AccountOpened,
            Some(&c.account_id),
            Refusal::AccountExists,
        ));
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
        return Err(step.refuse(
            InboundType::AccountOpened,
            Some(&c.account_id),
            Refusal::OwnerOfOtherAccount,
        ));
    }
    let code = c
        .code
        .clone()
        .unwrap_or_else(|| step.ctx.fresh_code.clone());
    if step.code_taken(&code, &c.account_id) {
        return Err(step.refuse(
            InboundType::AccountOpened,
            Some(&c.account_id),
            Refusal::CodeTaken,
        ));
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
        learner_limit: c.learner_limit,
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
        Some(&account.id),
        Event::AccountOpened {
            name,
            code: account.code.clone(),
            approval_mode: account.approval_mode,
            owners: account.owners.clone(),
        },
    );
    step.save_account(account);
    Ok(())
}

/// What one command changes of an account's own fields: each change is
/// audited, and together they are announced by one `account.updated`.
struct Edits {
    account: Id,
    actor: String,
    changes: Vec<FieldChange>,
}

impl Edits {
    fn of(account: &Account, actor: &str) -> Edits {
        Edits {
            account: account.id.clone(),
            actor: actor.to_owned(),
            changes: Vec::new(),
        }
    }

    /// Records `field` going from `old` to `new`, if it does.
    fn record(&mut self, step: &mut Step, field: &'static str, old: Value, new: Value) {
        if old != new {
            step.audit(&self.account, &self.actor, field, old.clone(), new.clone());
            self.changes.push(FieldChange { field, old, new });
        }
    }

    /// Sets `slot` to `new`, recording the change.
    fn set<T: Serialize>(&mut self, step: &mut Step, field: &'static str, slot: &mut T, new: T) {
        self.record(step, field, json!(slot), json!(new));
        *slot = new;
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn announce(self, step: &mut Step) {
        if !self.changes.is_empty() {
            step.event(
                Some(&self.account),
                Event::AccountUpdated {
                    changes: self.changes,
                },
            );
        }
    }
}

pub(super) fn update_account(step: &mut Step, c: &AccountUpdated) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    step.authorize(InboundType::AccountUpdated, &account, &c.actor)?;
    let mut edits = Edits::of(&account, c.actor.as_str());
    if let Some(name) = &c.name {
        edits.set(step, "name", &mut account.name, name.clone());
    }
    if let Some(mode) = c.approval_mode {
        edits.set(step, "approval_mode", &mut account.approval_mode, mode);
    }
    if let Some(ids) = &c.scope_ids {
        // The scope's kind never changes; an account open to everything has
        // no ids to change.
        let scope = match &account.scope {
            Scope::All => Scope::All,
            Scope::Activity { .. } => Scope::Activity { ids: ids.clone() },
            Scope::Group { .. } => Scope::Group { ids: ids.clone() },
        };
        edits.set(step, "scope", &mut account.scope, scope);
    }
    if let Some(status) = c.status {
        let status = match status {
            SettableStatus::Active => AccountStatus::Active,
            SettableStatus::Inactive => AccountStatus::Inactive,
        };
        edits.set(step, "status", &mut account.status, status);
    }
    if let Some(threshold) = c.low_balance_threshold.value() {
        let slot = &mut account.low_balance_threshold;
        edits.set(step, "low_balance_threshold", slot, threshold);
    }
    if let Some(limit) = c.learner_limit.value() {
        edits.set(step, "learner_limit", &mut account.learner_limit, limit);
    }
    if let Some(notes) = c.notes.value() {
        edits.set(step, "notes", &mut account.notes, notes);
    }
    edits.announce(step);
    step.save_account(account);
    Ok(())
}

pub(super) fn add_owner(step: &mut Step, c: &OwnerAdded) -> Flow {
    let account = step.known_account(&c.account_id)?;
    step.authorize(InboundType::OwnerAdded, &account, &c.actor)?;
    if account.is_owner(&c.owner.email) {
        return Ok(());
    }
    if step.owns_other(&c.owner.email, &account.id) {
        return Err(step.refuse(
            InboundType::OwnerAdded,
            Some(&account.id),
            Refusal::OwnerOfOtherAccount,
        ));
    }
    edit_owners(
        step,
        account,
        &c.actor,
        |owners| owners.push(c.owner.clone()),
        |account| Notice::OwnerAdded {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            actor: c.actor.clone(),
            owner: c.owner.clone(),
        },
    );
    Ok(())
}

pub(super) fn remove_owner(step: &mut Step, c: &OwnerRemoved) -> Flow {
    let account = step.known_account(&c.account_id)?;
    step.authorize(InboundType::OwnerRemoved, &account, &c.actor)?;
    if !account.is_owner(&c.email) {
        return Err(step.refuse(
            InboundType::OwnerRemoved,
            Some(&account.id),
            Refusal::NotAnOwner,
        ));
    }
    if account.owners.len() == 1 {
        return Err(step.refuse(
            InboundType::OwnerRemoved,
            Some(&account.id),
            Refusal::LastOwner,
        ));
    }
    edit_owners(
        step,
        account,
        &c.actor,
        |owners| owners.retain(|o| o.email != c.email),
        |account| Notice::OwnerRemoved {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            actor: c.actor.clone(),
            email: c.email.clone(),
        },
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
    notice: impl FnOnce(&Account) -> Notice,
) {
    let old = owner_emails(&account);
    let mut told = owners_of(&account);
    edit(&mut account.owners);
    for recipient in owners_of(&account) {
        if !told.contains(&recipient) {
            told.push(recipient);
        }
    }
    let mut edits = Edits::of(&account, actor.as_str());
    edits.record(step, "owners", old, owner_emails(&account));
    edits.announce(step);
    step.email(told, notice(&account));
    step.save_account(account);
}

pub(super) fn rotate_code(step: &mut Step, c: &CodeRotated) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    step.authorize(InboundType::CodeRotated, &account, &c.actor)?;
    let code = c
        .code
        .clone()
        .unwrap_or_else(|| step.ctx.fresh_code.clone());
    if step.code_taken(&code, &account.id) {
        return Err(step.refuse(
            InboundType::CodeRotated,
            Some(&account.id),
            Refusal::CodeTaken,
        ));
    }
    let id = account.id.clone();
    let mut edits = Edits::of(&account, c.actor.as_str());
    edits.set(step, "code", &mut account.code, code);
    if edits.is_empty() {
        return Ok(());
    }
    edits.announce(step);
    step.email(
        owners_of(&account),
        Notice::CodeRotated {
            account_id: id,
            account_name: account.name.clone(),
            actor: c.actor.clone(),
            code: account.code.clone(),
        },
    );
    step.save_account(account);
    Ok(())
}

pub(super) fn close_account(step: &mut Step, c: &AccountClosed) -> Flow {
    step.require_staff(InboundType::AccountClosed, Some(&c.account_id))?;
    let mut account = step.known_account(&c.account_id)?;
    if account.status == AccountStatus::Closed {
        return Err(step.refuse(
            InboundType::AccountClosed,
            Some(&account.id),
            Refusal::AccountClosed,
        ));
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
            Some(&account.id),
            Event::RedemptionDenied {
                request_id: request.request_id.clone(),
                decided_by: actor.to_owned(),
                reason: Rejection::AccountClosed.as_str().to_owned(),
                available,
            },
        );
        step.email(
            learner_of(&request),
            Notice::RedemptionDenied {
                title: request.item.title.clone(),
                cost: request.cost,
                reason: Rejection::AccountClosed.explain().to_owned(),
            },
        );
        step.save_request(request);
    }
    let id = account.id.clone();
    let mut edits = Edits::of(&account, actor);
    edits.record(step, "status", json!(old_status), json!(account.status));
    edits.announce(step);
    step.email(
        owners_of(&account),
        Notice::AccountClosed {
            account_id: id,
            account_name: account.name.clone(),
            actor: actor.to_owned(),
            reason: c.reason.clone(),
        },
    );
    step.save_account(account);
    Ok(())
}

pub(super) fn request_report(step: &mut Step, c: &ReportRequested) -> Flow {
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
                return Err(step.refuse(
                    InboundType::ReportRequested,
                    Some(id),
                    Refusal::NotAnOwner,
                ));
            }
        }
        None => step.require_staff(InboundType::ReportRequested, None)?,
    }
    step.out.effects.push(Effect::Report(c.clone()));
    Ok(())
}

fn owner_emails(account: &Account) -> Value {
    json!(account.owners.iter().map(|o| &o.email).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::super::book::*;
    use crate::domain::command::*;
    use crate::domain::event::Event;
    use crate::domain::ledger::EntryKind;
    use crate::domain::model::*;
    use crate::domain::notice::Notice;
    use crate::domain::{Credits, InboundType, Outcome, Refusal, Rejection};

    fn refusal(ran: &Ran) -> (InboundType, Refusal) {
        match ran.events()[..] {
            [
                Event::CommandRefused {
                    command_type,
                    reason,
                    ..
                },
            ] => (*command_type, *reason),
            ref other => panic!("one command.refused, not {other:?}"),
        }
    }

    #[test]
    fn an_account_opens_once_and_a_second_opening_is_refused() {
        let mut book = Book::new();
        let ran = book.open("acme", ApprovalMode::Manual);
        assert_eq!(ran.outcome, Outcome::Applied);
        assert!(matches!(
            ran.events()[..],
            [Event::AccountOpened {
                approval_mode: ApprovalMode::Manual,
                ..
            }]
        ));
        assert_eq!(book.account("acme").status, AccountStatus::Active);

        let ran = book.open("acme", ApprovalMode::Automatic);
        assert_eq!(ran.outcome, Outcome::Refused(Refusal::AccountExists));
        assert_eq!(
            refusal(&ran),
            (InboundType::AccountOpened, Refusal::AccountExists)
        );
        assert_eq!(book.account("acme").approval_mode, ApprovalMode::Manual);
    }

    #[test]
    fn owners_change_only_by_an_owner_and_never_to_none() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        let add = |actor: &str| {
            Command::OwnerAdded(OwnerAdded {
                account_id: id("acme"),
                actor: email(actor),
                owner: Owner {
                    email: email("bob@example.com"),
                    name: "Bob".to_owned(),
                },
            })
        };
        let ran = book.run(add(STRANGER));
        assert_eq!(
            refusal(&ran),
            (InboundType::OwnerAdded, Refusal::NotAnOwner)
        );

        let ran = book.run(add(OWNER));
        assert_eq!(ran.outcome, Outcome::Applied);
        let [(Notice::OwnerAdded { .. }, to)] = &ran.emails()[..] else {
            panic!("one owner_added email");
        };
        assert_eq!(
            to,
            &[OWNER, "bob@example.com"],
            "old and new owners hear of it"
        );

        let remove = |email_: &str| {
            Command::OwnerRemoved(OwnerRemoved {
                account_id: id("acme"),
                actor: email(OWNER),
                email: email(email_),
            })
        };
        assert_eq!(
            book.run(remove("bob@example.com")).outcome,
            Outcome::Applied
        );
        let ran = book.run(remove(OWNER));
        assert_eq!(
            refusal(&ran),
            (InboundType::OwnerRemoved, Refusal::LastOwner)
        );
        assert_eq!(book.account("acme").owners.len(), 1);
    }

    #[test]
    fn closing_takes_staff_forfeits_the_remainder_and_denies_pending_requests() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "100", 365);
        book.ask("r1", CODE, "l1", "c1", "30");
        let close = Command::AccountClosed(AccountClosed {
            account_id: id("acme"),
            actor: email("staff@example.com"),
            reason: None,
        });
        let ran = book.run(close.clone());
        assert_eq!(
            refusal(&ran),
            (InboundType::AccountClosed, Refusal::NotStaff)
        );

        book.staff = true;
        let ran = book.run(close);
        assert_eq!(ran.outcome, Outcome::Applied);
        let forfeited: Credits = ran
            .changes
            .journal
            .iter()
            .filter(|e| e.kind == EntryKind::Forfeit)
            .map(|e| -e.amount)
            .sum();
        assert_eq!(forfeited, credits("100"), "the hold comes back first");
        assert!(ran.events().iter().any(|e| matches!(
            e,
            Event::RedemptionDenied { reason, available, .. }
                if reason == Rejection::AccountClosed.as_str() && available.is_zero()
        )));
        assert_eq!(book.request("r1").status, RedemptionStatus::Denied);
        assert_eq!(book.account("acme").status, AccountStatus::Closed);
        assert_eq!(book.available("acme"), Credits::ZERO);
    }

    #[test]
    fn a_code_another_account_holds_is_refused() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.run(Command::AccountOpened(AccountOpened {
            account_id: id("beta"),
            name: None,
            owners: vec![Owner {
                email: email("bea@example.com"),
                name: "Bea".to_owned(),
            }],
            approval_mode: ApprovalMode::Automatic,
            code: Some("BETA-CODE-1".parse().expect("a code")),
            scope: None,
            low_balance_threshold: None,
            learner_limit: None,
            notes: None,
        }));
        let ran = book.run(Command::CodeRotated(CodeRotated {
            account_id: id("beta"),
            actor: email("bea@example.com"),
            code: Some(CODE.to_lowercase().parse().expect("a code")),
        }));
        assert_eq!(
            refusal(&ran),
            (InboundType::CodeRotated, Refusal::CodeTaken)
        );
        assert_eq!(book.account("beta").code.to_string(), "BETA-CODE-1");
    }
}
