//! SPEC §6 rules 11 and 12: purchase refunds and per-learner limits, through
//! decode and apply on a real store, on SQLite and PostgreSQL.

use crate::support as common;

use common::World;
use serde_json::{Value, json};
use training_credits::domain::command::ReportKind;
use training_credits::domain::{DeadReason, Outcome, Rejection, RetryReason};
use training_credits::store::Store;

use crate::reports::{EVERYTHING, csv_report};

const BOSS: &str = "boss@acme.test";
const CODE: &str = "ACME-1234";

async fn refund<S: Store>(
    w: &mut World<S>,
    refund_id: &str,
    purchase_id: &str,
    credits: Option<&str>,
) -> Outcome {
    let mut data = json!({
        "account_id": "acme",
        "purchase_id": purchase_id,
        "refund_id": refund_id,
        "reason": "chargeback",
        "refunded_at": w.now,
    });
    if let Some(credits) = credits {
        data["credits"] = json!(credits);
    }
    w.send_from("shop", "credits.purchase.refunded", data).await
}

/// The `data` of the last `training-credits.purchase.refunded`.
async fn refunded<S: Store>(w: &World<S>) -> Value {
    w.last_event("training-credits.purchase.refunded").await
}

fn amounts(data: &Value) -> (&str, &str, &str) {
    let text = |name: &str| data[name].as_str().expect("an amount");
    (text("refunded"), text("shortfall"), text("available"))
}

async fn acme<S: Store>(w: &mut World<S>, mode: &str) {
    assert_eq!(w.open("acme", mode, BOSS, CODE).await, Outcome::Applied);
}

async fn a_full_refund_takes_everything_the_lot_still_gives_and_tells_the_owners<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p2", "50").await, Outcome::Applied);
    assert_eq!(refund(&mut w, "rf1", "p1", None).await, Outcome::Applied);
    let data = refunded(&w).await;
    assert_eq!(amounts(&data), ("100.00", "0.00", "50.00"));
    assert_eq!(data["purchase_id"], "p1");
    assert_eq!(data["refund_id"], "rf1");
    assert_eq!(data["account_id"], "acme");
    assert_eq!(w.lot("acme", "p1").await.0, "0.00");

    let emails = w.emails_to(BOSS).await;
    let email = emails.last().expect("the owners are told");
    assert!(email.subject.contains("100.00"), "{}", email.subject);
    assert!(email.text.contains("p1"), "{}", email.text);
    for said in ["Available balance: 50.00", "Shortfall: 0.00"] {
        assert!(email.text.contains(said), "{said}: {}", email.text);
    }
    w.verify_ok().await;
}

async fn partial_refunds_add_up_and_the_second_is_capped_by_what_is_left<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        refund(&mut w, "rf1", "p1", Some("30")).await,
        Outcome::Applied
    );
    assert_eq!(amounts(&refunded(&w).await), ("30.00", "0.00", "70.00"));
    assert_eq!(
        refund(&mut w, "rf2", "p1", Some("80")).await,
        Outcome::Applied
    );
    assert_eq!(amounts(&refunded(&w).await), ("70.00", "10.00", "0.00"));
    // A refund without an amount asks for the rest of the purchase: nothing.
    assert_eq!(refund(&mut w, "rf3", "p1", None).await, Outcome::Applied);
    assert_eq!(amounts(&refunded(&w).await), ("0.00", "0.00", "0.00"));
    let entries: Vec<Value> = w
        .journal()
        .await
        .into_iter()
        .filter(|e| e["entry"] == "purchase_refund")
        .collect();
    let taken: Vec<&Value> = entries.iter().map(|e| &e["amount"]).collect();
    assert_eq!(taken, [&json!("-30.00"), &json!("-70.00")], "{entries:#?}");
    w.verify_ok().await;
}

async fn what_was_spent_held_or_expired_is_the_shortfall_and_the_held_request_can_still_be_approved<
    S: Store,
>(
    mut w: World<S>,
) {
    acme(&mut w, "manual").await;
    assert_eq!(
        w.purchase_expiring("acme", "old", "20", w.now.plus_days(10))
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    // 20 of "old" and 10 of p1 are held by r1; 30 more of p1 by r2, which is
    // approved (spent).
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", CODE, "l2", "c2", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r2", BOSS).await, Outcome::Applied);
    w.advance_days(11);
    // "old" has expired: its held part stays reserved, nothing to give.
    assert_eq!(refund(&mut w, "rf1", "old", None).await, Outcome::Applied);
    assert_eq!(amounts(&refunded(&w).await), ("0.00", "20.00", "60.00"));
    // p1: 30 spent, 10 held, 60 can go.
    assert_eq!(refund(&mut w, "rf2", "p1", None).await, Outcome::Applied);
    assert_eq!(amounts(&refunded(&w).await), ("60.00", "40.00", "0.00"));
    let emails = w.emails_to(BOSS).await;
    let email = emails.last().expect("the owners are told");
    assert!(email.text.contains("Shortfall: 40.00"), "{}", email.text);

    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    assert_eq!(w.status_of("r1").await, "approved");
    w.verify_ok().await;
}

async fn a_refund_is_applied_once_per_refund_id<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    let data = json!({
        "account_id": "acme",
        "purchase_id": "p1",
        "refund_id": "rf1",
        "credits": "10",
        "refunded_at": w.now,
    });
    let event = w.event("shop", "credits.purchase.refunded", data.clone());
    assert_eq!(w.deliver_ok(&event).await, Outcome::Applied);
    assert_eq!(w.deliver_ok(&event).await, Outcome::Duplicate);
    // The same refund, sent again as a new message.
    assert_eq!(
        w.send_from("shop", "credits.purchase.refunded", data.clone())
            .await,
        Outcome::Duplicate
    );
    let mut other = data;
    other["credits"] = json!("20");
    let outcome = w
        .send_from("shop", "credits.purchase.refunded", other)
        .await;
    assert!(
        matches!(
            outcome,
            Outcome::Dead {
                reason: DeadReason::IdConflict,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        w.events_of("training-credits.purchase.refunded")
            .await
            .len(),
        1
    );
    assert_eq!(w.available("acme").await, "90.00");
    w.verify_ok().await;
}

async fn a_refund_that_overtakes_its_purchase_waits_for_it<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic").await;
    let early = refund(&mut w, "rf1", "p1", Some("40")).await;
    assert!(
        matches!(
            early,
            Outcome::Retry {
                reason: RetryReason::UnknownPurchase,
                ..
            }
        ),
        "{early:?}"
    );
    assert_eq!(
        RetryReason::UnknownPurchase.exhausted(),
        DeadReason::UnknownPurchase
    );
    assert_eq!(DeadReason::UnknownPurchase.as_str(), "unknown_purchase");
    assert!(
        w.events_of("training-credits.purchase.refunded")
            .await
            .is_empty()
    );

    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        refund(&mut w, "rf1", "p1", Some("40")).await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "60.00");
    w.verify_ok().await;
}

async fn the_transactions_report_shows_the_refund<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        refund(&mut w, "rf1", "p1", Some("25")).await,
        Outcome::Applied
    );
    let dir = tempfile::tempdir().expect("a directory");
    let (_, records, _) = csv_report(
        &w,
        dir.path(),
        ReportKind::Transactions,
        &EVERYTHING,
        Some(&["entry", "amount", "balance_after", "purchase_id"]),
    )
    .await;
    assert!(
        records.contains(&vec![
            "purchase_refund".to_owned(),
            "-25.00".to_owned(),
            "75.00".to_owned(),
            "p1".to_owned()
        ]),
        "{records:?}"
    );
}

async fn limited(w: &mut World<impl Store>, limit: Option<&str>) -> Outcome {
    w.send(
        "credits.account.updated",
        json!({"account_id": "acme", "actor": BOSS, "learner_limit": limit}),
    )
    .await
}

async fn a_learner_limit_counts_pending_and_approved_requests_and_a_refund_frees_room<S: Store>(
    mut w: World<S>,
) {
    assert_eq!(
        w.send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Boss"}],
                "approval_mode": "manual",
                "code": CODE,
                "learner_limit": "100",
            }),
        )
        .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "1000").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "40").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    assert_eq!(
        w.request("r2", CODE, "l1", "c2", "35").await,
        Outcome::Applied,
        "pending"
    );
    assert_eq!(
        w.request("r3", CODE, "l1", "c3", "25.01").await,
        Outcome::Rejected(Rejection::LearnerLimit),
        "40 approved + 35 pending + 25.01 is over 100"
    );
    let rejected = w.last_event("training-credits.redemption.rejected").await;
    assert_eq!(rejected["reason"], "learner_limit");
    assert_eq!(rejected["available"], "925.00");
    assert_eq!(
        w.request("r4", CODE, "l1", "c4", "25").await,
        Outcome::Applied,
        "exactly reaching the limit is allowed"
    );
    assert_eq!(
        w.request("r5", CODE, "l2", "c5", "100").await,
        Outcome::Applied,
        "another learner has a limit of their own"
    );
    assert_eq!(w.cancel("r4", "l1").await, Outcome::Applied);
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    assert_eq!(w.status_of("r1").await, "refunded");
    assert_eq!(
        w.request("r6", CODE, "l1", "c6", "65").await,
        Outcome::Applied,
        "the refund and the cancellation freed room: 35 pending + 65"
    );
    // A year later the old requests no longer count.
    w.advance_days(366);
    assert_eq!(w.approve("r6", BOSS).await, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p2", "1000").await, Outcome::Applied);
    assert_eq!(
        w.request("r7", CODE, "l1", "c7", "100").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn an_update_sets_and_lifts_the_learner_limit<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic").await;
    assert_eq!(w.purchase("acme", "p1", "1000").await, Outcome::Applied);
    assert_eq!(w.account("acme").await.learner_limit, None);
    assert_eq!(limited(&mut w, Some("50")).await, Outcome::Applied);
    let updated = w.last_event("training-credits.account.updated").await;
    assert_eq!(
        updated["changes"],
        json!([{"field": "learner_limit", "old": null, "new": "50.00"}])
    );
    assert_eq!(
        w.account("acme").await.learner_limit.map(|l| l.to_string()),
        Some("50.00".to_owned())
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "60").await,
        Outcome::Rejected(Rejection::LearnerLimit)
    );
    assert_eq!(limited(&mut w, None).await, Outcome::Applied);
    assert_eq!(w.account("acme").await.learner_limit, None);
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "60").await,
        Outcome::Applied
    );
}

on_both_backends!(
    a_full_refund_takes_everything_the_lot_still_gives_and_tells_the_owners,
    partial_refunds_add_up_and_the_second_is_capped_by_what_is_left,
    what_was_spent_held_or_expired_is_the_shortfall_and_the_held_request_can_still_be_approved,
    a_refund_is_applied_once_per_refund_id,
    a_refund_that_overtakes_its_purchase_waits_for_it,
    the_transactions_report_shows_the_refund,
    a_learner_limit_counts_pending_and_approved_requests_and_a_refund_frees_room,
    an_update_sets_and_lifts_the_learner_limit,
);
