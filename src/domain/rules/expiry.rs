//! The scheduled jobs for one account: pending requests time out, expired
//! lots are written off, owners are reminded of what is about to expire.

use super::{Flow, Step, learner_of, owners_of};
use crate::domain::event::Event;
use crate::domain::ids::Id;
use crate::domain::ledger::EntryKind;
use crate::domain::model::*;
use crate::domain::money::Credits;
use crate::domain::notice::Notice;

/// The scheduled jobs for one account as of `now`: pending requests time
/// out, expired lots are written off, owners are reminded of what expires.
pub(super) fn sweep(step: &mut Step, account_id: &Id) -> Flow {
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
            Some(&account.id),
            Event::RedemptionExpired {
                request_id: request.request_id.clone(),
                available,
            },
        );
        step.email(
            learner_of(&request),
            Notice::RedemptionExpired {
                title: request.item.title.clone(),
                cost: request.cost,
                reason: format!("the account owners did not answer within {timeout_days} days"),
            },
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
                Some(&account.id),
                Event::LotExpired {
                    purchase_id: purchase_id.clone(),
                    expired: unreserved,
                    available,
                },
            );
            step.email(
                owners_of(&account),
                Notice::LotExpired {
                    account_id: account.id.clone(),
                    account_name: account.name.clone(),
                    purchase_id,
                    expired: unreserved,
                    expired_on: expires_at.date(),
                    available,
                },
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
            Some(&account.id),
            Event::LotExpiring {
                purchase_id: purchase_id.clone(),
                expires_at,
                remaining,
                stage,
                days_left,
            },
        );
        step.email(
            owners_of(&account),
            Notice::LotExpiring {
                account_id: account.id.clone(),
                account_name: account.name.clone(),
                purchase_id,
                remaining,
                expires_on: expires_at.date(),
                days_left,
            },
        );
    }
    if step.out.journal.is_empty() && step.out.effects.is_empty() {
        return Ok(());
    }
    step.save_account(account);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::book::*;
    use crate::domain::Credits;
    use crate::domain::event::Event;
    use crate::domain::model::*;
    use crate::domain::notice::Notice;

    #[test]
    fn an_expired_lot_loses_its_unreserved_remainder_once() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "100", 10);
        book.ask("r1", CODE, "l1", "c1", "30");
        book.now = book.now.plus_days(10);
        let ran = book.sweep("acme");
        assert!(ran.events().iter().any(|e| matches!(
            e,
            Event::LotExpired { expired, .. } if *expired == credits("70")
        )));
        assert!(
            ran.emails()
                .iter()
                .any(|(notice, to)| matches!(notice, Notice::LotExpired { .. }) && to == &[OWNER])
        );
        let lot = &book.account("acme").lots[0];
        assert_eq!((lot.remaining, lot.held), (credits("30"), credits("30")));

        let again = book.sweep("acme");
        assert!(again.changes.journal.is_empty() && again.changes.effects.is_empty());
    }

    #[test]
    fn owners_are_reminded_once_per_stage_and_only_of_the_nearest_one_passed() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "100", 40);
        book.now = book.now.plus_days(35);
        let ran = book.sweep("acme");
        assert!(matches!(
            ran.events()[..],
            [Event::LotExpiring {
                stage: 7,
                days_left: 5,
                ..
            }]
        ));
        assert!(
            book.sweep("acme").changes.effects.is_empty(),
            "once per stage"
        );
        book.now = book.now.plus_days(4);
        assert!(matches!(
            book.sweep("acme").events()[..],
            [Event::LotExpiring {
                stage: 1,
                days_left: 1,
                ..
            }]
        ));
    }

    #[test]
    fn a_request_left_pending_too_long_expires_and_gives_its_hold_back() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "100", 365);
        book.ask("r1", CODE, "l1", "c1", "30");
        book.now = book.now.plus_days(book.policy.pending_timeout_days - 1);
        assert!(book.sweep("acme").changes.effects.is_empty());
        book.now = book.now.plus_days(1);
        let ran = book.sweep("acme");
        assert!(matches!(
            ran.events()[..],
            [Event::RedemptionExpired { available, .. }] if *available == credits("100")
        ));
        assert!(matches!(
            ran.emails()[..],
            [(Notice::RedemptionExpired { .. }, ref to)] if to == &["l1@example.com"]
        ));
        assert_eq!(book.request("r1").status, RedemptionStatus::Expired);
        assert_eq!(book.account("acme").lots[0].held, Credits::ZERO);
    }
}
