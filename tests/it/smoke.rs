//! A first walk through the ledger on both backends.

use crate::support as common;

use common::World;
use training_credits::domain::Outcome;
use training_credits::store::Store;

async fn a_manual_request_holds_then_approval_deducts<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "acme 1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "70.00");
    let pending = w.last_event("training-credits.redemption.pending").await;
    assert_eq!(pending["cost"], "30.00");
    assert_eq!(w.approve("r1", "boss@acme.test").await, Outcome::Applied);
    let account = w.account("acme").await;
    assert_eq!(account.lots[0].remaining.to_string(), "70.00");
    assert_eq!(account.lots[0].held.to_string(), "0.00");
    let approved = w.emails_to("l1@learners.test").await;
    assert!(approved[0].text.contains(
        "Hello Learner l1, Your request to redeem 30.00 training credits for Course c1 has been approved."
    ));
    w.verify_ok().await;
}

on_both_backends!(a_manual_request_holds_then_approval_deducts);
