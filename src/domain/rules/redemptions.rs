//! Redemption requests: asked, approved or denied, cancelled, unenrolled
//! from with or without a refund.

use chrono::Duration;

use super::{
    Flow, INVALID_CODE_ATTEMPTS_MAX, INVALID_CODE_WINDOW_MINUTES, LEARNER_LIMIT_DAYS,
    REDEMPTION_COST_MAX, REDEMPTION_COST_MIN, Step, learner_of, owners_of,
};
use crate::domain::command::*;
use crate::domain::event::Event;
use crate::domain::ids::{CodeKey, Id};
use crate::domain::ledger::EntryKind;
use crate::domain::model::*;
use crate::domain::money::Credits;
use crate::domain::notice::Notice;
use crate::domain::outcome::{DeadReason, NoRefund, Outcome, Refusal, Rejection};

fn reject(
    step: &mut Step,
    c: &RedemptionRequested,
    account: Option<&Account>,
    reason: Rejection,
) -> Outcome {
    step.event(
        account.map(|a| &a.id),
        Event::RedemptionRejected {
            request_id: c.request_id.clone(),
            learner_id: c.learner.id.clone(),
            item_id: c.item.id.clone(),
            reason,
            available: account.map(|a| a.available_at(step.now())),
        },
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
        Notice::RedemptionRejected {
            title: c.item.title.clone(),
            cost: c.cost,
            reason: reason.explain().to_owned(),
        },
    );
    step.save_request(request);
    if reason == Rejection::InvalidCode {
        step.out.attempts.push((c.learner.id.clone(), step.now()));
    }
    Outcome::Rejected(reason)
}

pub(super) fn request_redemption(step: &mut Step, c: &RedemptionRequested) -> Flow {
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
    let key = CodeKey::of(&c.code);
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
    if account
        .learner_limit
        .is_some_and(|limit| spent_by(step, &c.learner.id, &account.id) + c.cost > limit)
    {
        return Err(reject(step, c, Some(&account), Rejection::LearnerLimit));
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
            Some(&account.id),
            Event::RedemptionPending {
                request_id: c.request_id.clone(),
                learner_id: c.learner.id.clone(),
                item_id: c.item.id.clone(),
                cost: c.cost,
                available,
            },
        );
        step.email(
            owners_of(&account),
            Notice::RedemptionPending {
                request_id: c.request_id.clone(),
                learner_name: c.learner.name.clone(),
                learner_email: c.learner.email.clone(),
                title: c.item.title.clone(),
                cost: c.cost,
                available,
            },
        );
    } else {
        announce_approval(step, &account, &request, available);
    }
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

/// SPEC §6 rule 12: what a learner's pending and approved requests on an
/// account, recorded within the last [`LEARNER_LIMIT_DAYS`], add up to.
fn spent_by(step: &Step, learner: &Id, account: &Id) -> Credits {
    let since = step.now().plus_days(-LEARNER_LIMIT_DAYS);
    let changed = step.out.requests.values();
    let unchanged = step
        .ledger
        .requests
        .values()
        .filter(|r| !step.out.requests.contains_key(&r.request_id));
    changed
        .chain(unchanged)
        .filter(|r| {
            r.learner.id == *learner
                && r.account_id.as_ref() == Some(account)
                && r.status.is_active()
                && r.created_at > since
        })
        .map(|r| r.cost)
        .sum()
}

fn announce_approval(step: &mut Step, account: &Account, request: &Redemption, available: Credits) {
    step.event(
        Some(&account.id),
        Event::RedemptionApproved {
            request_id: request.request_id.clone(),
            learner_id: request.learner.id.clone(),
            item_id: request.item.id.clone(),
            cost: request.cost,
            decided_by: request
                .decided_by
                .clone()
                .expect("an approved request names who decided"),
            available,
        },
    );
    step.email(
        learner_of(request),
        Notice::RedemptionApproved {
            title: request.item.title.clone(),
            cost: request.cost,
        },
    );
}

/// The request an owner decides on, and its account, if the owner may.
fn decision(
    step: &mut Step,
    command: InboundType,
    c: &RedemptionDecided,
) -> Result<(Redemption, Account), Outcome> {
    let (request, account) = request_and_account(step, command, &c.request_id)?;
    if !(step.ctx.staff || account.is_owner(&c.approver)) {
        return Err(step.refuse(command, Some(&account.id), Refusal::NotAnOwner));
    }
    if request.status != RedemptionStatus::Pending {
        return Err(step.refuse(command, Some(&account.id), Refusal::NotPending));
    }
    Ok((request, account))
}

/// The request a command names, and its account.
fn request_and_account(
    step: &mut Step,
    command: InboundType,
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

pub(super) fn approve(step: &mut Step, c: &RedemptionDecided) -> Flow {
    let (mut request, mut account) = decision(step, InboundType::RedemptionApproved, c)?;
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

pub(super) fn deny(step: &mut Step, c: &RedemptionDecided) -> Flow {
    let (mut request, mut account) = decision(step, InboundType::RedemptionDenied, c)?;
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
        Some(&account.id),
        Event::RedemptionDenied {
            request_id: request.request_id.clone(),
            decided_by: c.approver.to_string(),
            reason: reason.clone(),
            available,
        },
    );
    step.email(
        learner_of(&request),
        Notice::RedemptionDenied {
            title: request.item.title.clone(),
            cost: request.cost,
            reason,
        },
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
        Some(&account.id),
        Event::RedemptionCancelled {
            request_id: request.request_id.clone(),
            available,
        },
    );
    step.save_request(request);
    step.save_account(account);
}

pub(super) fn cancel(step: &mut Step, c: &RedemptionCancelled) -> Flow {
    let (request, account) =
        request_and_account(step, InboundType::RedemptionCancelled, &c.request_id)?;
    if request.learner.id != c.learner_id {
        return Err(step.refuse(
            InboundType::RedemptionCancelled,
            Some(&account.id),
            Refusal::NotRequester,
        ));
    }
    if request.status != RedemptionStatus::Pending {
        return Err(step.refuse(
            InboundType::RedemptionCancelled,
            Some(&account.id),
            Refusal::NotPending,
        ));
    }
    withdraw(step, request, account, c.learner_id.as_str());
    Ok(())
}

pub(super) fn unenroll(step: &mut Step, c: &Unenrolled) -> Flow {
    let (mut request, mut account) =
        request_and_account(step, InboundType::Unenrolled, &c.request_id)?;
    let actor = request.learner.id.to_string();
    match request.status {
        RedemptionStatus::Pending => {
            withdraw(step, request, account, &actor);
            return Ok(());
        }
        RedemptionStatus::Approved => {}
        _ => {
            return Err(step.refuse(
                InboundType::Unenrolled,
                Some(&account.id),
                Refusal::NotPending,
            ));
        }
    }
    let approved_at = request
        .decided_at
        .expect("an approved request has its decision time");
    let window_end = approved_at.plus_days(step.ctx.policy.refund_window_days);
    if c.unenrolled_at > window_end {
        request.status = RedemptionStatus::Unenrolled;
        let reason = NoRefund::RefundWindowClosed;
        request.reason = Some(reason.as_str().to_owned());
        step.event(
            Some(&account.id),
            Event::RedemptionUnenrolled {
                request_id: request.request_id.clone(),
                reason,
            },
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
            Some(&account.id),
            Event::RedemptionRefunded {
                request_id: request.request_id.clone(),
                refunded: request.refunded,
                expired_on_refund,
                available,
            },
        );
    }
    step.save_request(request);
    step.save_account(account);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::book::*;
    use super::super::{
        INVALID_CODE_ATTEMPTS_MAX, INVALID_CODE_WINDOW_MINUTES, LEARNER_LIMIT_DAYS,
    };
    use crate::domain::command::*;
    use crate::domain::event::Event;
    use crate::domain::ledger::EntryKind;
    use crate::domain::model::*;
    use crate::domain::notice::Notice;
    use crate::domain::outcome::NoRefund;
    use crate::domain::{Credits, Outcome, Refusal, Rejection};

    fn decide(request: &str, approver: &str) -> RedemptionDecided {
        RedemptionDecided {
            request_id: id(request),
            approver: email(approver),
            note: None,
            reason: None,
        }
    }

    #[test]
    fn automatic_mode_pays_at_once_from_the_lot_that_expires_first() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "late", "50", 300);
        book.buy("acme", "soon", "20", 30);
        let ran = book.ask("r1", CODE, "l1", "c1", "30");
        assert_eq!(ran.outcome, Outcome::Applied);
        let taken: Vec<(String, Credits)> = ran
            .changes
            .journal
            .iter()
            .map(|e| {
                assert_eq!(e.kind, EntryKind::Redeem);
                (e.purchase_id.to_string(), -e.amount)
            })
            .collect();
        assert_eq!(
            taken,
            [
                ("soon".to_owned(), credits("20")),
                ("late".to_owned(), credits("10"))
            ]
        );
        assert!(matches!(
            &ran.events()[..],
            [Event::RedemptionApproved { decided_by, available, .. }]
                if decided_by == "system" && *available == credits("40")
        ));
        assert!(matches!(
            ran.emails()[..],
            [(Notice::RedemptionApproved { .. }, ref to)] if to == &["l1@example.com"]
        ));
    }

    #[test]
    fn manual_mode_holds_until_an_owner_decides() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "100", 365);
        let ran = book.ask("r1", CODE, "l1", "c1", "30");
        assert!(matches!(
            ran.events()[..],
            [Event::RedemptionPending { .. }]
        ));
        assert_eq!(book.account("acme").lots[0].held, credits("30"));
        assert_eq!(book.available("acme"), credits("70"));

        let ran = book.run(Command::RedemptionApproved(decide("r1", STRANGER)));
        assert_eq!(ran.outcome, Outcome::Refused(Refusal::NotAnOwner));

        let ran = book.run(Command::RedemptionDenied(decide("r1", OWNER)));
        assert_eq!(ran.outcome, Outcome::Applied);
        assert_eq!(book.request("r1").status, RedemptionStatus::Denied);
        assert_eq!(book.account("acme").lots[0].held, Credits::ZERO);
        assert_eq!(book.available("acme"), credits("100"));

        let ran = book.run(Command::RedemptionApproved(decide("r1", OWNER)));
        assert_eq!(ran.outcome, Outcome::Refused(Refusal::NotPending));
    }

    #[test]
    fn wrong_codes_are_rejected_and_too_many_block_the_learner_for_a_while() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "100", 365);
        for n in 0..INVALID_CODE_ATTEMPTS_MAX {
            let ran = book.ask(&format!("w{n}"), "NOPE", "l1", "c1", "10");
            assert_eq!(ran.outcome, Outcome::Rejected(Rejection::InvalidCode));
            assert!(matches!(
                ran.events()[..],
                [Event::RedemptionRejected {
                    available: None,
                    ..
                }]
            ));
        }
        let ran = book.ask("r1", CODE, "l1", "c1", "10");
        assert_eq!(ran.outcome, Outcome::Rejected(Rejection::TooManyAttempts));
        assert_eq!(
            book.ask("r2", CODE, "l2", "c1", "10").outcome,
            Outcome::Applied,
            "another learner is not blocked"
        );

        book.now = book
            .now
            .plus(chrono::Duration::minutes(INVALID_CODE_WINDOW_MINUTES));
        assert_eq!(
            book.ask("r3", CODE, "l1", "c1", "10").outcome,
            Outcome::Applied
        );
    }

    #[test]
    fn a_request_beyond_the_balance_is_rejected_with_what_is_available() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "25", 365);
        let ran = book.ask("r1", CODE, "l1", "c1", "30");
        assert_eq!(
            ran.outcome,
            Outcome::Rejected(Rejection::InsufficientBalance)
        );
        assert!(matches!(
            ran.events()[..],
            [Event::RedemptionRejected { available: Some(available), .. }]
                if *available == credits("25")
        ));
        assert!(ran.changes.journal.is_empty());
        assert_eq!(book.request("r1").status, RedemptionStatus::Rejected);
    }

    #[test]
    fn unenrolling_refunds_within_the_window_and_not_after_it() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "100", 365);
        book.ask("r1", CODE, "l1", "c1", "30");
        book.ask("r2", CODE, "l1", "c2", "20");
        let unenroll = |request: &str, at| {
            Command::Unenrolled(Unenrolled {
                request_id: id(request),
                unenrolled_at: at,
                reason: None,
            })
        };
        let window = book.policy.refund_window_days;
        let ran = book.run(unenroll("r1", book.now.plus_days(window)));
        assert!(matches!(
            ran.events()[..],
            [Event::RedemptionRefunded { refunded, available, .. }]
                if *refunded == credits("30") && *available == credits("80")
        ));
        assert_eq!(book.request("r1").status, RedemptionStatus::Refunded);

        let ran = book.run(unenroll("r2", book.now.plus_days(window + 1)));
        assert!(matches!(
            ran.events()[..],
            [Event::RedemptionUnenrolled {
                reason: NoRefund::RefundWindowClosed,
                ..
            }]
        ));
        assert!(ran.changes.journal.is_empty());
        assert_eq!(book.available("acme"), credits("80"));
    }

    #[test]
    fn a_learner_limit_counts_the_year_s_pending_and_approved_requests() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "1000", 900);
        book.run(Command::AccountUpdated(AccountUpdated {
            account_id: id("acme"),
            actor: email(OWNER),
            name: None,
            approval_mode: None,
            scope_ids: None,
            status: None,
            low_balance_threshold: Patch::Keep,
            learner_limit: Patch::Set(credits("50")),
            notes: Patch::Keep,
        }));
        assert_eq!(
            book.ask("r1", CODE, "l1", "c1", "30").outcome,
            Outcome::Applied
        );
        assert_eq!(
            book.ask("r2", CODE, "l1", "c2", "20.01").outcome,
            Outcome::Rejected(Rejection::LearnerLimit)
        );
        assert_eq!(
            book.ask("r3", CODE, "l1", "c3", "20").outcome,
            Outcome::Applied,
            "up to the limit"
        );
        assert_eq!(
            book.ask("r4", CODE, "l2", "c1", "50").outcome,
            Outcome::Applied,
            "per learner"
        );
        book.now = book.now.plus_days(LEARNER_LIMIT_DAYS);
        book.buy("acme", "p2", "1000", 900);
        assert_eq!(
            book.ask("r5", CODE, "l1", "c4", "50").outcome,
            Outcome::Applied,
            "a year on"
        );
    }
}
