//! Purchases and their lots: recording a purchase, extending a lot.

use serde_json::json;

use super::{Flow, PURCHASE_CREDITS_MAX, PURCHASE_CREDITS_MIN, Step, owners_of, retry};
use crate::domain::command::*;
use crate::domain::event::Event;
use crate::domain::ledger::{EntryKind, PurchaseRefund};
use crate::domain::model::*;
use crate::domain::money::Credits;
use crate::domain::notice::Notice;
use crate::domain::outcome::{DeadReason, Outcome, Refusal, RetryReason};

pub(super) fn record_purchase(step: &mut Step, c: &PurchaseCompleted) -> Flow {
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
        return Err(step.refuse(
            InboundType::PurchaseCompleted,
            Some(&account.id),
            Refusal::AccountClosed,
        ));
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
        refunded: Credits::ZERO,
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
        Some(&account.id),
        Event::PurchaseRecorded {
            purchase_id: c.purchase_id.clone(),
            credits: c.credits,
            expires_at,
            available,
        },
    );
    step.email(
        owners_of(&account),
        Notice::PurchaseRecorded {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            purchase_id: c.purchase_id.clone(),
            credits: c.credits,
            price_paid: c
                .price_paid
                .as_ref()
                .map(|p| format!("{} {}", p.amount, p.currency)),
            expires_on: expires_at.date(),
            available,
        },
    );
    step.save_account(account);
    Ok(())
}

/// SPEC §6 rule 11: takes out of the lot what it can still give, up to what
/// the refund asks (by default everything of the purchase not refunded
/// before); the rest is the `shortfall`.
pub(super) fn refund_purchase(step: &mut Step, c: &PurchaseRefunded) -> Flow {
    let mut account = step.known_account(&c.account_id)?;
    let key = (c.account_id.clone(), c.refund_id.clone());
    let done = step
        .out
        .refunds
        .iter()
        .find(|r| r.account_id == key.0 && r.refund_id == key.1)
        .or_else(|| step.ledger.refunds.get(&key));
    if let Some(done) = done {
        return Err(if done.fingerprint == step.ctx.fingerprint {
            Outcome::Duplicate
        } else {
            Outcome::dead(
                DeadReason::IdConflict,
                format!(
                    "refund `{}` of account `{}` was recorded with other fields",
                    c.refund_id, c.account_id
                ),
            )
        });
    }
    let Some(lot) = account.lot(&c.purchase_id) else {
        return Err(retry(
            RetryReason::UnknownPurchase,
            format!(
                "account `{}` has no purchase `{}` (yet)",
                c.account_id, c.purchase_id
            ),
        ));
    };
    // `decode` refuses an amount out of range before any account is looked up.
    assert!(
        c.credits
            .is_none_or(|asked| (PURCHASE_CREDITS_MIN..=PURCHASE_CREDITS_MAX).contains(&asked))
    );
    let now = step.now();
    let asked = c
        .credits
        .unwrap_or(account.lots[lot].credits - account.lots[lot].refunded);
    let refunded = asked.min(account.lots[lot].free_at(now));
    let shortfall = asked - refunded;
    if refunded.is_positive() {
        step.post(
            &mut account,
            lot,
            EntryKind::PurchaseRefund,
            -refunded,
            Credits::ZERO,
            None,
            "refund",
        );
        account.lots[lot].refunded += refunded;
    }
    step.out.refunds.push(PurchaseRefund {
        account_id: account.id.clone(),
        refund_id: c.refund_id.clone(),
        purchase_id: c.purchase_id.clone(),
        refunded,
        shortfall,
        reason: c.reason.clone(),
        refunded_at: c.refunded_at,
        fingerprint: step.ctx.fingerprint.to_owned(),
    });
    let available = account.available_at(now);
    step.event(
        Some(&account.id),
        Event::PurchaseRefunded {
            purchase_id: c.purchase_id.clone(),
            refund_id: c.refund_id.clone(),
            refunded,
            shortfall,
            available,
        },
    );
    step.email(
        owners_of(&account),
        Notice::PurchaseRefunded {
            account_id: account.id.clone(),
            account_name: account.name.clone(),
            purchase_id: c.purchase_id.clone(),
            refunded,
            shortfall,
            available,
        },
    );
    step.save_account(account);
    Ok(())
}

pub(super) fn extend_lot(step: &mut Step, c: &LotExtended) -> Flow {
    step.require_staff(InboundType::LotExtended, Some(&c.account_id))?;
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
        return Err(step.refuse(
            InboundType::LotExtended,
            Some(&account.id),
            Refusal::AccountClosed,
        ));
    }
    if c.expires_at <= step.now() || c.expires_at <= account.lots[lot].expires_at {
        return Err(step.refuse(
            InboundType::LotExtended,
            Some(&account.id),
            Refusal::NotLater,
        ));
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
        Some(&account.id),
        Event::LotExtended {
            purchase_id: c.purchase_id.clone(),
            expires_at: c.expires_at,
            reinstated,
            available,
        },
    );
    step.save_account(account);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::book::*;
    use crate::domain::command::*;
    use crate::domain::event::Event;
    use crate::domain::ledger::EntryKind;
    use crate::domain::model::*;
    use crate::domain::notice::Notice;
    use crate::domain::{DeadReason, Outcome, Refusal, RetryReason, Ts};

    #[test]
    fn a_purchase_adds_a_lot_journals_it_and_tells_every_owner() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        let ran = book.buy("acme", "p1", "120.50", 365);
        assert_eq!(ran.outcome, Outcome::Applied);
        let [entry] = &ran.changes.journal[..] else {
            panic!("one journal entry");
        };
        assert_eq!(
            (entry.kind, entry.amount, entry.balance_after),
            (EntryKind::Purchase, credits("120.50"), credits("120.50"))
        );
        assert!(matches!(
            ran.events()[..],
            [Event::PurchaseRecorded { available, .. }] if *available == credits("120.50")
        ));
        let [(Notice::PurchaseRecorded { expires_on, .. }, to)] = &ran.emails()[..] else {
            panic!("one purchase_recorded email");
        };
        assert_eq!(to, &[OWNER]);
        assert_eq!(expires_on, "2027-03-01");
    }

    #[test]
    fn a_purchase_seen_again_is_a_duplicate_and_one_with_other_fields_a_conflict() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "100", 365);
        let again = book.buy("acme", "p1", "100", 365);
        assert_eq!(again.outcome, Outcome::Duplicate);
        assert!(again.changes.journal.is_empty() && again.changes.effects.is_empty());
        let other = book.buy("acme", "p1", "90", 365);
        assert!(matches!(
            other.outcome,
            Outcome::Dead {
                reason: DeadReason::IdConflict,
                ..
            }
        ));
        assert_eq!(book.available("acme"), credits("100"));
    }

    #[test]
    fn a_purchase_for_an_account_not_known_yet_waits_and_changes_nothing() {
        let mut book = Book::new();
        let ran = book.buy("acme", "p1", "100", 365);
        assert!(matches!(
            ran.outcome,
            Outcome::Retry {
                reason: RetryReason::UnknownAccount,
                ..
            }
        ));
        assert!(ran.changes.journal.is_empty() && ran.changes.effects.is_empty());
    }

    #[test]
    fn an_extension_must_be_later_and_reinstates_what_expired() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Automatic);
        book.buy("acme", "p1", "100", 10);
        book.now = book.now.plus_days(11);
        book.sweep("acme");
        assert_eq!(book.account("acme").lots[0].expired, credits("100"));

        book.staff = true;
        let extend = |expires_at| {
            Command::LotExtended(LotExtended {
                account_id: id("acme"),
                purchase_id: id("p1"),
                expires_at,
                actor: email("staff@example.com"),
                reason: None,
            })
        };
        let earlier = book.now.plus_days(-1);
        let ran = book.run(extend(earlier));
        assert_eq!(ran.outcome, Outcome::Refused(Refusal::NotLater));

        let later = book.now.plus_days(30);
        let ran = book.run(extend(later));
        assert_eq!(ran.outcome, Outcome::Applied);
        assert!(matches!(
            ran.events()[..],
            [Event::LotExtended { reinstated, available, .. }]
                if *reinstated == credits("100") && *available == credits("100")
        ));
        assert_eq!(book.account("acme").lots[0].expired, credits("0"));
    }

    #[test]
    fn a_refund_takes_what_the_lot_can_still_give_and_reports_the_rest() {
        let mut book = Book::new();
        book.open("acme", ApprovalMode::Manual);
        book.buy("acme", "p1", "100", 365);
        book.ask("r1", CODE, "l1", "c1", "30");
        let refund = |refund_id: &str, asked: Option<&str>| {
            Command::PurchaseRefunded(PurchaseRefunded {
                account_id: id("acme"),
                purchase_id: id("p1"),
                refund_id: id(refund_id),
                credits: asked.map(credits),
                reason: None,
                refunded_at: Ts::parse("2026-03-01T09:00:00Z").expect("an instant"),
            })
        };
        let ran = book.run(refund("rf1", Some("50")));
        assert!(matches!(
            ran.events()[..],
            [Event::PurchaseRefunded { refunded, shortfall, available, .. }]
                if *refunded == credits("50") && shortfall.is_zero() && *available == credits("20")
        ));
        let ran = book.run(refund("rf2", None));
        assert!(
            matches!(
                ran.events()[..],
                [Event::PurchaseRefunded { refunded, shortfall, .. }]
                    if *refunded == credits("20") && *shortfall == credits("30")
            ),
            "the rest of the purchase is asked for; the held 30 stay"
        );
        let lot = &book.account("acme").lots[0];
        assert_eq!(
            (lot.remaining, lot.held, lot.refunded),
            (credits("30"), credits("30"), credits("70"))
        );
        assert_eq!(book.run(refund("rf2", None)).outcome, Outcome::Duplicate);
        assert!(matches!(
            book.run(refund("rf2", Some("1"))).outcome,
            Outcome::Dead {
                reason: DeadReason::IdConflict,
                ..
            }
        ));
    }
}
