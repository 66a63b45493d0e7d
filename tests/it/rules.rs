//! SPEC §6 (the ledger rules 1–10) and every refusal of SPEC §5.2, on both
//! backends. Each refusal is checked for its outcome, its outbound event and
//! for changing nothing else.

use crate::support as common;

use chrono::Duration;
use serde_json::{Value, json};
use training_credits::domain::model::Account;
use training_credits::domain::{Outcome, Refusal, Rejection};
use training_credits::notify::Email;
use training_credits::store::Store;

use common::World;

const BOSS: &str = "boss@acme.test";
const CO: &str = "co@acme.test";
const STRANGER: &str = "stranger@elsewhere.test";
const OTHER: &str = "other@beta.test";
const STAFF_ACTOR: &str = "staff@admin.test";
const CODE: &str = "ACME-1234";
const BETA_CODE: &str = "BETA-5678";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn learner_email(learner: &str) -> String {
    format!("{learner}@learners.test")
}

/// Opens `acme` (owner BOSS, code CODE) in `mode` with one purchase `p1`.
async fn acme<S: Store>(w: &mut World<S>, mode: &str, credits: &str) {
    assert_eq!(w.open("acme", mode, BOSS, CODE).await, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p1", credits).await, Outcome::Applied);
}

/// Opens `acme` with two owners, BOSS and CO.
async fn acme_with_two_owners<S: Store>(w: &mut World<S>, mode: &str) {
    let outcome = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Bea Boss"}, {"email": CO, "name": "Cory Co"}],
                "approval_mode": mode,
                "code": CODE,
            }),
        )
        .await;
    assert_eq!(outcome, Outcome::Applied);
}

async fn update<S: Store>(w: &mut World<S>, actor: &str, changes: Value) -> Outcome {
    let mut data = json!({"account_id": "acme", "actor": actor});
    for (key, value) in changes.as_object().expect("an object of changes") {
        data[key] = value.clone();
    }
    w.send("credits.account.updated", data).await
}

async fn last_email_to<S: Store>(w: &World<S>, address: &str) -> Email {
    w.emails_to(address)
        .await
        .pop()
        .unwrap_or_else(|| panic!("an email was sent to {address}"))
}

/// Plain words each rejection reason must be explained with in the
/// learner's email.
fn plain_words(reason: &str) -> &'static str {
    match reason {
        "invalid_code" => "does not match any training credit account",
        "account_inactive" => "not active",
        "account_closed" => "has been closed",
        "out_of_scope" => "cannot be used for this item",
        "insufficient_balance" => "does not have enough training credits",
        "already_redeemed" => "already have a pending or approved redemption",
        "too_many_attempts" => "too many invalid codes",
        other => panic!("unknown rejection reason {other}"),
    }
}

/// What the ledger looked like before a refused command, to show that the
/// command changed nothing but announce itself.
struct Before {
    accounts: Vec<(String, Option<Account>)>,
    events: usize,
    emails: usize,
    journal: usize,
}

async fn before<S: Store>(w: &World<S>, accounts: &[&str]) -> Before {
    let mut kept = Vec::new();
    for id in accounts {
        kept.push(((*id).to_owned(), w.find_account(id).await));
    }
    Before {
        accounts: kept,
        events: w.events().await.len(),
        emails: w.emails().await.len(),
        journal: w.journal().await.len(),
    }
}

impl Before {
    /// Balances, lots, owners, code and settings of every account named are
    /// exactly as before, and the journal did not grow.
    async fn assert_unchanged<S: Store>(&self, w: &World<S>) {
        for (id, account) in &self.accounts {
            assert_eq!(
                &w.find_account(id).await,
                account,
                "account {id} changed although the command was refused"
            );
        }
        assert_eq!(
            w.journal().await.len(),
            self.journal,
            "the journal grew although the command was refused"
        );
    }

    async fn new_events<S: Store>(&self, w: &World<S>) -> Vec<Value> {
        w.events().await[self.events..].to_vec()
    }

    /// A `command.refused` with `reason` for the last event sent, and
    /// nothing else.
    async fn assert_refused<S: Store>(
        &self,
        w: &World<S>,
        outcome: Outcome,
        command_type: &str,
        reason: Refusal,
        account: Option<&str>,
    ) {
        assert_eq!(outcome, Outcome::Refused(reason));
        let events = self.new_events(w).await;
        assert_eq!(
            events.len(),
            1,
            "a refusal announces itself and nothing else: {events:#?}"
        );
        let event = &events[0];
        assert_eq!(event["type"], "training-credits.command.refused");
        let data = &event["data"];
        assert_eq!(data["reason"], reason.as_str());
        assert_eq!(data["command_type"], command_type);
        assert_eq!(data["command_id"], w.last_event_id());
        assert_eq!(data["causation_id"], w.last_event_id());
        assert_eq!(data["account_id"], json!(account));
        match account {
            Some(id) => assert_eq!(event["subject"], id),
            None => assert!(event.get("subject").is_none()),
        }
        assert_eq!(
            w.emails().await.len(),
            self.emails,
            "a refused command sends no email"
        );
        self.assert_unchanged(w).await;
    }

    /// A `redemption.rejected` with `reason` for `request_id`, an email
    /// telling the learner why, and nothing else. `account` is the account
    /// found and its `available`, if one was.
    async fn assert_rejected<S: Store>(
        &self,
        w: &World<S>,
        outcome: Outcome,
        reason: Rejection,
        request_id: &str,
        account: Option<(&str, &str)>,
    ) {
        assert_eq!(outcome, Outcome::Rejected(reason));
        let request = w
            .find_request(request_id)
            .await
            .expect("a rejected request is kept");
        assert_eq!(request.status.as_str(), "rejected");
        let events = self.new_events(w).await;
        assert_eq!(
            events.len(),
            1,
            "a rejection announces itself and nothing else: {events:#?}"
        );
        let event = &events[0];
        assert_eq!(event["type"], "training-credits.redemption.rejected");
        let data = &event["data"];
        assert_eq!(data["reason"], reason.as_str());
        assert_eq!(data["request_id"], request_id);
        assert_eq!(data["learner_id"], request.learner.id.as_str());
        assert_eq!(data["item_id"], request.item.id.as_str());
        assert_eq!(data["causation_id"], w.last_event_id());
        match account {
            Some((id, available)) => {
                assert_eq!(data["account_id"], id);
                assert_eq!(data["available"], available);
                assert_eq!(event["subject"], id);
            }
            None => {
                assert_eq!(data["account_id"], Value::Null);
                assert!(data.get("available").is_none());
            }
        }
        let emails = w.emails().await;
        assert_eq!(
            emails.len(),
            self.emails + 1,
            "a rejection emails the learner, and only the learner"
        );
        let email = emails.last().expect("the rejection email");
        assert_eq!(email.to_email, request.learner.email.as_str());
        assert!(
            email.text.contains(&request.item.title),
            "the email names the item: {}",
            email.text
        );
        assert!(
            email.text.contains(plain_words(reason.as_str())),
            "the email explains {reason:?} in plain words: {}",
            email.text
        );
        self.assert_unchanged(w).await;
    }
}

// ---------------------------------------------------------------------------
// redemption.rejected: every reason
// ---------------------------------------------------------------------------

async fn a_code_that_matches_no_account_is_rejected_invalid_code<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", "ACME-9999", "l1", "c1", "10").await;
    b.assert_rejected(&w, outcome, Rejection::InvalidCode, "r1", None)
        .await;
    // Case, spaces and dashes do not matter, anything else does.
    assert_eq!(
        w.request("r2", " acme 12-34 ", "l1", "c1", "10").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn an_inactive_account_rejects_redemptions_until_it_is_active_again<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic", "100").await;
    assert_eq!(
        update(&mut w, BOSS, json!({"status": "inactive"})).await,
        Outcome::Applied
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", CODE, "l1", "c1", "10").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::AccountInactive,
        "r1",
        Some(("acme", "100.00")),
    )
    .await;
    assert_eq!(
        update(&mut w, BOSS, json!({"status": "active"})).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "90.00");
    w.verify_ok().await;
}

async fn a_closed_account_rejects_redemptions_account_closed<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic", "100").await;
    assert_eq!(w.close("acme").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", CODE, "l1", "c1", "10").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::AccountClosed,
        "r1",
        Some(("acme", "0.00")),
    )
    .await;
    w.verify_ok().await;
}

async fn an_item_outside_an_activity_scope_is_rejected_out_of_scope<S: Store>(mut w: World<S>) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Bea Boss"}],
                "approval_mode": "automatic",
                "code": CODE,
                "scope": {"kind": "activity", "ids": ["a1", "a2"]},
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .request_item(
            "r1",
            CODE,
            "l1",
            json!({"id": "a3", "kind": "activity", "title": "Workshop a3"}),
            "10",
        )
        .await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::OutOfScope,
        "r1",
        Some(("acme", "100.00")),
    )
    .await;
    let inside = w
        .request_item(
            "r2",
            CODE,
            "l1",
            json!({"id": "a2", "kind": "activity", "title": "Workshop a2"}),
            "10",
        )
        .await;
    assert_eq!(inside, Outcome::Applied);
    // The ids of the scope can change; its kind cannot.
    assert_eq!(
        update(&mut w, BOSS, json!({"scope_ids": ["a3"]})).await,
        Outcome::Applied
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .request_item(
            "r3",
            CODE,
            "l2",
            json!({"id": "a1", "kind": "activity", "title": "Workshop a1"}),
            "10",
        )
        .await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::OutOfScope,
        "r3",
        Some(("acme", "90.00")),
    )
    .await;
    let now_inside = w
        .request_item(
            "r4",
            CODE,
            "l2",
            json!({"id": "a3", "kind": "activity", "title": "Workshop a3"}),
            "10",
        )
        .await;
    assert_eq!(now_inside, Outcome::Applied);
    w.verify_ok().await;
}

async fn an_item_outside_a_group_scope_is_rejected_out_of_scope<S: Store>(mut w: World<S>) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Bea Boss"}],
                "approval_mode": "automatic",
                "code": CODE,
                "scope": {"kind": "group", "ids": ["g1"]},
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .request_item(
            "r1",
            CODE,
            "l1",
            json!({"id": "c1", "kind": "course", "title": "Course c1", "group_ids": ["g2"]}),
            "10",
        )
        .await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::OutOfScope,
        "r1",
        Some(("acme", "100.00")),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .request_item(
            "r2",
            CODE,
            "l1",
            json!({"id": "c2", "kind": "course", "title": "Course c2"}),
            "10",
        )
        .await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::OutOfScope,
        "r2",
        Some(("acme", "100.00")),
    )
    .await;
    let inside = w
        .request_item(
            "r3",
            CODE,
            "l1",
            json!({"id": "c3", "kind": "path", "title": "Path c3", "group_ids": ["g2", "g1"]}),
            "10",
        )
        .await;
    assert_eq!(inside, Outcome::Applied);
    assert_eq!(w.available("acme").await, "90.00");
    w.verify_ok().await;
}

async fn a_cost_above_available_is_rejected_without_partial_payment<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "50").await, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p2", "30").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", CODE, "l1", "c1", "80.01").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::InsufficientBalance,
        "r1",
        Some(("acme", "80.00")),
    )
    .await;
    assert_eq!(w.lot("acme", "p1").await, ("50.00".into(), "0.00".into()));
    assert_eq!(w.lot("acme", "p2").await, ("30.00".into(), "0.00".into()));
    // Exactly what is available can be spent.
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "80").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

async fn two_pending_requests_never_hold_the_same_credits<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "60").await,
        Outcome::Applied
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r2", CODE, "l2", "c1", "50").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::InsufficientBalance,
        "r2",
        Some(("acme", "40.00")),
    )
    .await;
    assert_eq!(
        w.request("r3", CODE, "l2", "c1", "40").await,
        Outcome::Applied
    );
    assert_eq!(
        w.lot("acme", "p1").await,
        ("100.00".into(), "100.00".into())
    );
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

async fn a_learner_cannot_redeem_an_item_while_a_pending_or_approved_redemption_exists<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r2", CODE, "l1", "c1", "10").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::AlreadyRedeemed,
        "r2",
        Some(("acme", "90.00")),
    )
    .await;
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r3", CODE, "l1", "c1", "10").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::AlreadyRedeemed,
        "r3",
        Some(("acme", "90.00")),
    )
    .await;
    // Another item, or another learner, is no repeat.
    assert_eq!(
        w.request("r4", CODE, "l1", "c2", "10").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r5", CODE, "l2", "c1", "10").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn after_a_refund_or_an_unenrollment_the_learner_can_redeem_the_item_again<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    w.advance_days(1);
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    assert_eq!(w.status_of("r1").await, "refunded");
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.status_of("r2").await, "approved");
    w.advance_days(15);
    assert_eq!(w.unenroll("r2").await, Outcome::Applied);
    assert_eq!(w.status_of("r2").await, "unenrolled");
    assert_eq!(
        w.request("r3", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.status_of("r3").await, "approved");
    assert_eq!(w.available("acme").await, "80.00");
    w.verify_ok().await;
}

async fn five_invalid_codes_within_fifteen_minutes_block_the_learner_until_the_window_passes<
    S: Store,
>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic", "100").await;
    for attempt in 1..=5 {
        let request = format!("bad{attempt}");
        let b = before(&w, &["acme"]).await;
        let outcome = w.request(&request, "WRONG-0000", "l1", "c1", "10").await;
        b.assert_rejected(&w, outcome, Rejection::InvalidCode, &request, None)
            .await;
        w.advance(Duration::minutes(1));
    }
    // Even the right code is refused now, and another wrong one does not
    // count as an invalid code.
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", CODE, "l1", "c1", "10").await;
    b.assert_rejected(&w, outcome, Rejection::TooManyAttempts, "r1", None)
        .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r2", "WRONG-0000", "l1", "c1", "10").await;
    b.assert_rejected(&w, outcome, Rejection::TooManyAttempts, "r2", None)
        .await;
    // Other learners are not blocked.
    assert_eq!(
        w.request("r3", CODE, "l2", "c1", "10").await,
        Outcome::Applied
    );
    w.advance(Duration::minutes(16));
    assert_eq!(
        w.request("r4", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "80.00");
    w.verify_ok().await;
}

async fn four_invalid_codes_do_not_block_the_learner<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic", "100").await;
    for attempt in 1..=4 {
        let outcome = w
            .request(&format!("bad{attempt}"), "WRONG-0000", "l1", "c1", "10")
            .await;
        assert_eq!(outcome, Outcome::Rejected(Rejection::InvalidCode));
    }
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// command.refused: every reason
// ---------------------------------------------------------------------------

async fn only_an_owner_may_approve_or_deny_a_request<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.open("beta", "manual", OTHER, BETA_CODE).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    let b = before(&w, &["acme", "beta"]).await;
    let outcome = w.approve("r1", STRANGER).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    // The owner of another account is a stranger here too.
    let b = before(&w, &["acme", "beta"]).await;
    let outcome = w.deny("r1", OTHER).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.denied",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    assert_eq!(w.status_of("r1").await, "pending");
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    w.verify_ok().await;
}

async fn only_an_owner_may_change_the_account_its_owners_or_its_code<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = update(&mut w, STRANGER, json!({"name": "Hijacked"})).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.updated",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.owner_added",
            json!({"account_id": "acme", "actor": STRANGER, "owner": {"email": STRANGER, "name": "Mallory"}}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.owner_added",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": STRANGER, "email": BOSS}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.owner_removed",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.code_rotated",
            json!({"account_id": "acme", "actor": STRANGER, "code": "MINE-0001"}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.code_rotated",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    assert_eq!(w.account("acme").await.name, "Owner");
    w.verify_ok().await;
}

async fn only_an_owner_may_ask_for_the_reports_of_an_account<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.report.requested",
            json!({"report": "transactions", "format": "csv", "recipient": STRANGER, "account_id": "acme"}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.report.requested",
        Refusal::NotAnOwner,
        Some("acme"),
    )
    .await;
    let outcome = w
        .send(
            "credits.report.requested",
            json!({"report": "transactions", "format": "csv", "recipient": BOSS, "account_id": "acme"}),
        )
        .await;
    assert_eq!(outcome, Outcome::Applied);
    w.verify_ok().await;
}

async fn closing_an_account_needs_a_staff_source<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    // Not even an owner may close it from the portal.
    let outcome = w
        .send(
            "credits.account.closed",
            json!({"account_id": "acme", "actor": BOSS}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.closed",
        Refusal::NotStaff,
        Some("acme"),
    )
    .await;
    assert_eq!(w.available("acme").await, "100.00");
    w.verify_ok().await;
}

async fn extending_a_lot_needs_a_staff_source<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let later = w.now.plus_days(800);
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.lot.extended",
            json!({"account_id": "acme", "purchase_id": "p1", "expires_at": later, "actor": BOSS}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.lot.extended",
        Refusal::NotStaff,
        Some("acme"),
    )
    .await;
    w.verify_ok().await;
}

async fn an_all_accounts_report_needs_a_staff_source<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.report.requested",
            json!({"report": "balances", "format": "csv", "recipient": BOSS}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.report.requested",
        Refusal::NotStaff,
        None,
    )
    .await;
    let outcome = w
        .send_staff(
            "credits.report.requested",
            json!({"report": "balances", "format": "xlsx", "recipient": STAFF_ACTOR}),
        )
        .await;
    assert_eq!(outcome, Outcome::Applied);
    w.verify_ok().await;
}

async fn approving_or_denying_a_decided_request_is_refused_not_pending<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.approve("r1", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.deny("r1", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.denied",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    assert_eq!(w.status_of("r1").await, "approved");
    assert_eq!(w.available("acme").await, "70.00");
    w.verify_ok().await;
}

async fn a_learner_may_cancel_and_ask_for_the_same_item_again_in_one_batch<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r9", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    // The new request's id sorts before the cancelled one's: the batch must
    // not write it while the old one still counts as pending.
    let cancel = w.cancel_event("r9", "l1");
    let again = w.request_event("r1", CODE, "l1", "c1", "30");
    assert_eq!(
        w.deliver_batch(&[cancel, again]).await,
        [Ok(Outcome::Applied), Ok(Outcome::Applied)]
    );
    assert_eq!(w.status_of("r9").await, "cancelled");
    assert_eq!(w.status_of("r1").await, "pending");
    assert_eq!(w.available("acme").await, "70.00");
    w.verify_ok().await;
}

/// A batch with hundreds of rows for a table: on SQLite they go in prepared
/// chunks of a power of two (here 256 and 128) and a rest. Every row lands,
/// and a row finds the rows it refers to (a lot, its account opened by the
/// same batch).
async fn a_batch_of_hundreds_of_rows_per_table_writes_every_row<S: Store>(mut w: World<S>) {
    const ACCOUNTS: usize = 400;
    let now = w.now;
    let mut events = Vec::new();
    for i in 0..ACCOUNTS {
        events.push(w.event(
            "portal",
            "credits.account.opened",
            json!({
                "account_id": format!("bulk{i}"),
                "owners": [{"email": format!("owner{i}@bulk.test"), "name": "Owner"}],
                "approval_mode": "automatic",
            }),
        ));
        events.push(w.event(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": format!("bulk{i}"),
                "purchase_id": format!("p{i}"),
                "credits": (i + 1).to_string(),
                "purchased_at": now,
            }),
        ));
    }
    let outcomes = w.deliver_batch(&events).await;
    assert!(
        outcomes.iter().all(|o| *o == Ok(Outcome::Applied)),
        "{outcomes:?}"
    );
    for i in 0..ACCOUNTS {
        assert_eq!(
            w.available(&format!("bulk{i}")).await,
            format!("{}.00", i + 1)
        );
    }
    w.verify_ok().await;
}

async fn an_account_changed_by_several_messages_of_one_batch_keeps_every_change<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    // Each change is written though a later message of the batch leaves its
    // part of the account as it was: what is written is what differs from
    // the account as the batch loaded it.
    let now = w.now;
    let purchase = w.event(
        "shop",
        "credits.purchase.completed",
        json!({"account_id": "acme", "purchase_id": "p2", "credits": "50", "purchased_at": now}),
    );
    let rename = w.event(
        "portal",
        "credits.account.updated",
        json!({"account_id": "acme", "actor": BOSS, "name": "Acme Two"}),
    );
    let owner = w.event(
        "portal",
        "credits.account.owner_added",
        json!({"account_id": "acme", "actor": BOSS, "owner": {"email": CO, "name": "Cory Co"}}),
    );
    let request = w.request_event("r1", CODE, "l1", "c1", "30");
    assert_eq!(
        w.deliver_batch(&[purchase, rename, owner, request]).await,
        [
            Ok(Outcome::Applied),
            Ok(Outcome::Applied),
            Ok(Outcome::Applied),
            Ok(Outcome::Applied)
        ]
    );
    let account = w.account("acme").await;
    assert_eq!(account.name, "Acme Two");
    assert!(account.is_owner(&CO.parse().expect("an email")));
    assert_eq!(account.lots.len(), 2);
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "30.00".into()));
    assert_eq!(w.lot("acme", "p2").await, ("50.00".into(), "0.00".into()));
    assert_eq!(w.available("acme").await, "120.00");
    w.verify_ok().await;
}

async fn only_the_requesting_learner_may_cancel<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.cancel("r1", "l2").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.cancelled",
        Refusal::NotRequester,
        Some("acme"),
    )
    .await;
    assert_eq!(w.status_of("r1").await, "pending");
    assert_eq!(w.cancel("r1", "l1").await, Outcome::Applied);
    let cancelled = w.last_event("training-credits.redemption.cancelled").await;
    assert_eq!(cancelled["request_id"], "r1");
    assert_eq!(cancelled["available"], "100.00");
    assert_eq!(w.status_of("r1").await, "cancelled");
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "0.00".into()));
    w.verify_ok().await;
}

async fn the_last_owner_of_an_account_cannot_be_removed<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": BOSS, "email": BOSS}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.owner_removed",
        Refusal::LastOwner,
        Some("acme"),
    )
    .await;
    let added = w
        .send(
            "credits.account.owner_added",
            json!({"account_id": "acme", "actor": BOSS, "owner": {"email": CO, "name": "Cory Co"}}),
        )
        .await;
    assert_eq!(added, Outcome::Applied);
    let removed = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": CO, "email": BOSS}),
        )
        .await;
    assert_eq!(removed, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": CO, "email": CO}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.owner_removed",
        Refusal::LastOwner,
        Some("acme"),
    )
    .await;
    let owners: Vec<String> = w
        .account("acme")
        .await
        .owners
        .iter()
        .map(|o| o.email.to_string())
        .collect();
    assert_eq!(owners, [CO]);
    w.verify_ok().await;
}

async fn an_email_owns_at_most_one_account<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme", "beta"]).await;
    // Emails are compared without regard to case.
    let outcome = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "beta",
                "owners": [{"email": OTHER, "name": "Otto"}, {"email": "Boss@ACME.test", "name": "Bea"}],
                "approval_mode": "manual",
                "code": BETA_CODE,
            }),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.opened",
        Refusal::OwnerOfOtherAccount,
        Some("beta"),
    )
    .await;
    assert!(w.find_account("beta").await.is_none());
    assert_eq!(
        w.open("beta", "manual", OTHER, BETA_CODE).await,
        Outcome::Applied
    );
    let b = before(&w, &["acme", "beta"]).await;
    let outcome = w
        .send(
            "credits.account.owner_added",
            json!({"account_id": "beta", "actor": OTHER, "owner": {"email": BOSS, "name": "Bea"}}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.owner_added",
        Refusal::OwnerOfOtherAccount,
        Some("beta"),
    )
    .await;
    w.verify_ok().await;
}

async fn codes_are_unique_without_regard_to_case_spaces_or_dashes<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme", "beta"]).await;
    let outcome = w.open("beta", "manual", OTHER, "acme 1234").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.opened",
        Refusal::CodeTaken,
        Some("beta"),
    )
    .await;
    assert!(w.find_account("beta").await.is_none());
    assert_eq!(
        w.open("beta", "manual", OTHER, BETA_CODE).await,
        Outcome::Applied
    );
    let b = before(&w, &["acme", "beta"]).await;
    let outcome = w
        .send(
            "credits.account.code_rotated",
            json!({"account_id": "beta", "actor": OTHER, "code": "a-c-m-e 1-2-3-4"}),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.code_rotated",
        Refusal::CodeTaken,
        Some("beta"),
    )
    .await;
    assert_eq!(w.account("beta").await.code.as_str(), BETA_CODE);
    // Both codes still lead to their own accounts.
    assert_eq!(
        w.request("r1", "acme1234", "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(
        w.last_event("training-credits.redemption.pending").await["account_id"],
        "acme"
    );
    w.verify_ok().await;
}

async fn opening_an_account_that_exists_is_refused_account_exists<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    let b = before(&w, &["acme"]).await;
    let outcome = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": OTHER, "name": "Otto"}],
                "approval_mode": "automatic",
                "code": "OTHER-0001",
            }),
        )
        .await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.opened",
        Refusal::AccountExists,
        Some("acme"),
    )
    .await;
    w.verify_ok().await;
}

async fn a_closed_account_accepts_no_purchase_and_no_change<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(w.close("acme").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.purchase("acme", "p2", "50").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.purchase.completed",
        Refusal::AccountClosed,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = update(&mut w, BOSS, json!({"status": "active"})).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.updated",
        Refusal::AccountClosed,
        Some("acme"),
    )
    .await;
    let later = w.now.plus_days(800);
    let b = before(&w, &["acme"]).await;
    let outcome = w.extend("acme", "p1", later).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.lot.extended",
        Refusal::AccountClosed,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.close("acme").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.account.closed",
        Refusal::AccountClosed,
        Some("acme"),
    )
    .await;
    assert_eq!(w.account("acme").await.lots.len(), 1);
    w.verify_ok().await;
}

async fn a_lot_can_only_be_extended_to_a_later_date_in_the_future<S: Store>(mut w: World<S>) {
    assert_eq!(w.open("acme", "manual", BOSS, CODE).await, Outcome::Applied);
    let expiry = w.now.plus_days(100);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "100", expiry).await,
        Outcome::Applied
    );
    for earlier in [w.now.plus_days(50), expiry] {
        let b = before(&w, &["acme"]).await;
        let outcome = w.extend("acme", "p1", earlier).await;
        b.assert_refused(
            &w,
            outcome,
            "credits.lot.extended",
            Refusal::NotLater,
            Some("acme"),
        )
        .await;
    }
    // Later than the lot's expiry, but already past.
    w.advance_days(120);
    let b = before(&w, &["acme"]).await;
    let outcome = w.extend("acme", "p1", expiry.plus_days(10)).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.lot.extended",
        Refusal::NotLater,
        Some("acme"),
    )
    .await;
    let outcome = w.extend("acme", "p1", w.now.plus_days(10)).await;
    assert_eq!(outcome, Outcome::Applied);
    assert_eq!(w.available("acme").await, "100.00");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 1: the journal
// ---------------------------------------------------------------------------

async fn every_change_is_a_journal_entry_naming_who_caused_it<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    w.advance_days(1);
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    let journal = w.journal().await;
    let lines: Vec<(String, String, String, Option<String>)> = journal
        .iter()
        .map(|e| {
            (
                e["entry"].as_str().unwrap().to_owned(),
                e["amount"].as_str().unwrap().to_owned(),
                e["held_delta"].as_str().unwrap().to_owned(),
                e["request_id"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let r1 = Some("r1".to_owned());
    assert_eq!(
        lines,
        [
            ("purchase".into(), "100.00".into(), "0.00".into(), None),
            ("hold".into(), "0.00".into(), "30.00".into(), r1.clone()),
            (
                "redeem".into(),
                "-30.00".into(),
                "-30.00".into(),
                r1.clone()
            ),
            ("refund".into(), "30.00".into(), "0.00".into(), r1),
        ]
    );
    assert!(journal.iter().all(|e| e["purchase_id"] == "p1"));
    assert!(
        journal
            .iter()
            .all(|e| !e["actor"].as_str().unwrap().is_empty())
    );
    assert_eq!(journal[1]["actor"], learner_email("l1"));
    assert_eq!(journal[2]["actor"], BOSS);
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 3: which lots pay
// ---------------------------------------------------------------------------

async fn credits_are_taken_from_the_soonest_expiring_lot_first<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let (late, soon) = (w.now.plus_days(300), w.now.plus_days(60));
    assert_eq!(
        w.purchase_expiring("acme", "p-late", "100", late).await,
        Outcome::Applied
    );
    w.advance_days(1);
    assert_eq!(
        w.purchase_expiring("acme", "p-soon", "50", soon).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "70").await,
        Outcome::Applied
    );
    assert_eq!(
        w.lot("acme", "p-soon").await,
        ("0.00".into(), "0.00".into())
    );
    assert_eq!(
        w.lot("acme", "p-late").await,
        ("80.00".into(), "0.00".into())
    );
    let request = w.find_request("r1").await.unwrap();
    let spent: Vec<(String, String)> = request
        .allocations
        .iter()
        .map(|a| (a.purchase_id.to_string(), a.amount.to_string()))
        .collect();
    assert_eq!(
        spent,
        [
            ("p-soon".to_owned(), "50.00".to_owned()),
            ("p-late".to_owned(), "20.00".to_owned())
        ]
    );
    assert_eq!(w.available("acme").await, "80.00");
    w.verify_ok().await;
}

async fn lots_expiring_together_are_spent_oldest_purchase_first<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let expiry = w.now.plus_days(200);
    // The older purchase has the later name: order is by purchase time.
    assert_eq!(
        w.purchase_expiring("acme", "z-old", "40", expiry).await,
        Outcome::Applied
    );
    w.advance_days(2);
    assert_eq!(
        w.purchase_expiring("acme", "a-new", "40", expiry).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "50").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "z-old").await, ("0.00".into(), "0.00".into()));
    assert_eq!(
        w.lot("acme", "a-new").await,
        ("30.00".into(), "0.00".into())
    );
    w.verify_ok().await;
}

async fn a_hold_reserves_specific_lots_and_approval_deducts_exactly_those<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "60").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "60.00".into()));
    // A newer lot that expires sooner arrives while r1 waits.
    let soon = w.now.plus_days(30);
    assert_eq!(
        w.purchase_expiring("acme", "p2", "50", soon).await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "90.00");
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    assert_eq!(w.lot("acme", "p1").await, ("40.00".into(), "0.00".into()));
    assert_eq!(w.lot("acme", "p2").await, ("50.00".into(), "0.00".into()));
    let approved = w.last_event("training-credits.redemption.approved").await;
    assert_eq!(approved["cost"], "60.00");
    assert_eq!(approved["available"], "90.00");
    // A new request takes the sooner lot first.
    assert_eq!(
        w.request("r2", CODE, "l2", "c1", "55").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "p2").await, ("50.00".into(), "50.00".into()));
    assert_eq!(w.lot("acme", "p1").await, ("40.00".into(), "5.00".into()));
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 4: expiry
// ---------------------------------------------------------------------------

async fn a_lot_past_its_expiry_cannot_be_spent_even_before_the_sweep<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let expiry = w.now.plus_days(10);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "50", expiry).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p2", "30").await, Outcome::Applied);
    assert_eq!(w.available("acme").await, "80.00");
    w.advance_days(10);
    assert_eq!(w.available("acme").await, "30.00");
    let b = before(&w, &["acme"]).await;
    let outcome = w.request("r1", CODE, "l1", "c1", "40").await;
    b.assert_rejected(
        &w,
        outcome,
        Rejection::InsufficientBalance,
        "r1",
        Some(("acme", "30.00")),
    )
    .await;
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "p1").await, ("50.00".into(), "0.00".into()));
    assert_eq!(w.lot("acme", "p2").await, ("0.00".into(), "0.00".into()));
    w.verify_ok().await;
    w.sweep().await;
    let expired = w.last_event("training-credits.lot.expired").await;
    assert_eq!(expired["purchase_id"], "p1");
    assert_eq!(expired["expired"], "50.00");
    assert_eq!(expired["available"], "0.00");
    w.verify_ok().await;
}

async fn the_sweep_expires_only_the_unreserved_remainder<S: Store>(mut w: World<S>) {
    assert_eq!(w.open("acme", "manual", BOSS, CODE).await, Outcome::Applied);
    let expiry = w.now.plus_days(10);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "100", expiry).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    w.advance_days(11);
    w.sweep().await;
    let expired = w.events_of("training-credits.lot.expired").await;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["purchase_id"], "p1");
    assert_eq!(expired[0]["expired"], "70.00");
    assert_eq!(expired[0]["available"], "0.00");
    assert_eq!(w.lot("acme", "p1").await, ("30.00".into(), "30.00".into()));
    let balances = w.account("acme").await.balances_at(w.now);
    assert_eq!(balances.balance.to_string(), "30.00");
    assert_eq!(balances.held.to_string(), "30.00");
    // The held part stays reserved until its request is decided: approval
    // still spends it.
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    assert_eq!(w.lot("acme", "p1").await, ("0.00".into(), "0.00".into()));
    assert_eq!(w.status_of("r1").await, "approved");
    w.verify_ok().await;
}

async fn a_hold_released_from_an_expired_lot_expires_at_once<S: Store>(mut w: World<S>) {
    assert_eq!(w.open("acme", "manual", BOSS, CODE).await, Outcome::Applied);
    let expiry = w.now.plus_days(10);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "100", expiry).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p2", "20").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "30.00".into()));
    w.advance_days(11);
    w.sweep().await;
    assert_eq!(w.deny("r1", BOSS).await, Outcome::Applied);
    let denied = w.last_event("training-credits.redemption.denied").await;
    assert_eq!(denied["available"], "20.00");
    assert_eq!(w.lot("acme", "p1").await, ("0.00".into(), "0.00".into()));
    assert_eq!(
        w.account("acme").await.lots[0].expired.to_string(),
        "100.00"
    );
    assert_eq!(w.available("acme").await, "20.00");
    let journal = w.journal().await;
    let last = journal.last().unwrap();
    assert_eq!(last["entry"], "expire");
    assert_eq!(last["amount"], "-30.00");
    assert_eq!(last["request_id"], "r1");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 7: refunds
// ---------------------------------------------------------------------------

async fn an_unenrollment_within_the_refund_window_returns_exactly_what_was_deducted_once<
    S: Store,
>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let soon = w.now.plus_days(60);
    assert_eq!(
        w.purchase_expiring("acme", "p-soon", "50", soon).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p-late", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "70").await,
        Outcome::Applied
    );
    // Spent from both lots; another spend moves the lots on meanwhile.
    assert_eq!(
        w.request("r2", CODE, "l2", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(
        w.lot("acme", "p-late").await,
        ("70.00".into(), "0.00".into())
    );
    // The last day of the window still counts.
    w.advance_days(14);
    let event = w.event(
        "lms",
        "credits.enrollment.unenrolled",
        json!({"request_id": "r1", "unenrolled_at": w.now}),
    );
    let bytes = event.to_string();
    assert_eq!(w.deliver(bytes.as_bytes()).await, Ok(Outcome::Applied));
    let refunded = w.last_event("training-credits.redemption.refunded").await;
    assert_eq!(refunded["request_id"], "r1");
    assert_eq!(refunded["refunded"], "70.00");
    assert_eq!(refunded["expired_on_refund"], "0.00");
    assert_eq!(refunded["available"], "140.00");
    assert_eq!(
        w.lot("acme", "p-soon").await,
        ("50.00".into(), "0.00".into())
    );
    assert_eq!(
        w.lot("acme", "p-late").await,
        ("90.00".into(), "0.00".into())
    );
    let request = w.find_request("r1").await.unwrap();
    assert_eq!(request.status.as_str(), "refunded");
    assert_eq!(request.refunded.to_string(), "70.00");
    // Once: the same message again changes nothing, and another
    // unenrollment is refused.
    let b = before(&w, &["acme"]).await;
    assert_eq!(w.deliver(bytes.as_bytes()).await, Ok(Outcome::Duplicate));
    assert_eq!(w.events().await.len(), b.events);
    b.assert_unchanged(&w).await;
    let outcome = w.unenroll("r1").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.enrollment.unenrolled",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    assert_eq!(
        w.events_of("training-credits.redemption.refunded")
            .await
            .len(),
        1
    );
    w.verify_ok().await;
}

async fn a_refund_into_an_expired_lot_expires_at_once_and_is_reported<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let expiry = w.now.plus_days(5);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "50", expiry).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p2", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "70").await,
        Outcome::Applied
    );
    w.advance_days(6);
    w.sweep().await;
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    let refunded = w.last_event("training-credits.redemption.refunded").await;
    assert_eq!(refunded["refunded"], "70.00");
    assert_eq!(refunded["expired_on_refund"], "50.00");
    assert_eq!(refunded["available"], "100.00");
    assert_eq!(w.lot("acme", "p1").await, ("0.00".into(), "0.00".into()));
    assert_eq!(w.lot("acme", "p2").await, ("100.00".into(), "0.00".into()));
    assert_eq!(w.account("acme").await.lots[0].expired.to_string(), "50.00");
    w.verify_ok().await;
}

async fn an_unenrollment_after_the_refund_window_is_not_refunded<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    // The window counts from the approval, not from the request.
    w.advance_days(3);
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    w.advance_days(15);
    let b = before(&w, &["acme"]).await;
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    let unenrolled = w.last_event("training-credits.redemption.unenrolled").await;
    assert_eq!(unenrolled["request_id"], "r1");
    assert_eq!(unenrolled["reason"], "refund_window_closed");
    assert!(
        w.events_of("training-credits.redemption.refunded")
            .await
            .is_empty()
    );
    b.assert_unchanged(&w).await;
    assert_eq!(w.available("acme").await, "70.00");
    assert_eq!(w.status_of("r1").await, "unenrolled");
    w.verify_ok().await;
}

async fn the_refund_window_counts_from_the_approval<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    w.advance_days(10);
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    w.advance_days(13);
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    assert_eq!(w.status_of("r1").await, "refunded");
    assert_eq!(w.available("acme").await, "100.00");
    w.verify_ok().await;
}

async fn unenrolling_a_pending_request_cancels_it<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.available("acme").await, "70.00");
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    let cancelled = w.last_event("training-credits.redemption.cancelled").await;
    assert_eq!(cancelled["request_id"], "r1");
    assert_eq!(cancelled["available"], "100.00");
    assert_eq!(w.status_of("r1").await, "cancelled");
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "0.00".into()));
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 6: the redemption states
// ---------------------------------------------------------------------------

async fn a_redemption_moves_only_along_the_allowed_transitions<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    // approved: cannot be cancelled, denied or approved again.
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.cancel("r1", "l1").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.cancelled",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    // denied: cannot be approved, cancelled or unenrolled.
    assert_eq!(
        w.request("r2", CODE, "l1", "c2", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.deny("r2", BOSS).await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.approve("r2", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.cancel("r2", "l1").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.cancelled",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.unenroll("r2").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.enrollment.unenrolled",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    // cancelled: cannot be approved or denied.
    assert_eq!(
        w.request("r3", CODE, "l1", "c3", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.cancel("r3", "l1").await, Outcome::Applied);
    let b = before(&w, &["acme"]).await;
    let outcome = w.approve("r3", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    let b = before(&w, &["acme"]).await;
    let outcome = w.deny("r3", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.denied",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    // unenrolled (after the window): cannot be unenrolled again.
    w.advance_days(20);
    assert_eq!(w.unenroll("r1").await, Outcome::Applied);
    assert_eq!(w.status_of("r1").await, "unenrolled");
    let b = before(&w, &["acme"]).await;
    let outcome = w.unenroll("r1").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.enrollment.unenrolled",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    // expired: cannot be approved.
    assert_eq!(
        w.request("r4", CODE, "l1", "c4", "10").await,
        Outcome::Applied
    );
    w.advance_days(14);
    w.sweep().await;
    assert_eq!(w.status_of("r4").await, "expired");
    let b = before(&w, &["acme"]).await;
    let outcome = w.approve("r4", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    assert_eq!(w.status_of("r1").await, "unenrolled");
    assert_eq!(w.status_of("r2").await, "denied");
    assert_eq!(w.status_of("r3").await, "cancelled");
    assert_eq!(w.available("acme").await, "90.00");
    w.verify_ok().await;
}

async fn deciding_a_rejected_request_is_refused_and_announced<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "500").await,
        Outcome::Rejected(Rejection::InsufficientBalance)
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.approve("r1", BOSS).await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.approved",
        Refusal::NotPending,
        Some("acme"),
    )
    .await;
    // A request rejected before any account was found names none.
    assert_eq!(
        w.request("r2", "NOPE-0000", "l1", "c1", "5").await,
        Outcome::Rejected(Rejection::InvalidCode)
    );
    let b = before(&w, &["acme"]).await;
    let outcome = w.cancel("r2", "l1").await;
    b.assert_refused(
        &w,
        outcome,
        "credits.redemption.cancelled",
        Refusal::NotPending,
        None,
    )
    .await;
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// lot.extended
// ---------------------------------------------------------------------------

async fn extending_a_lot_reinstates_expired_credits_and_resets_reminders<S: Store>(
    mut w: World<S>,
) {
    assert_eq!(
        w.open("acme", "automatic", BOSS, CODE).await,
        Outcome::Applied
    );
    let expiry = w.now.plus_days(40);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "100", expiry).await,
        Outcome::Applied
    );
    w.advance_days(10);
    w.sweep().await;
    assert_eq!(
        w.events_of("training-credits.lot.expiring").await.len(),
        1,
        "stage 30 was announced"
    );
    w.advance_days(31);
    w.sweep().await;
    assert_eq!(
        w.last_event("training-credits.lot.expired").await["expired"],
        "100.00"
    );
    assert_eq!(w.available("acme").await, "0.00");
    let new_expiry = w.now.plus_days(60);
    assert_eq!(w.extend("acme", "p1", new_expiry).await, Outcome::Applied);
    let extended = w.last_event("training-credits.lot.extended").await;
    assert_eq!(extended["purchase_id"], "p1");
    assert_eq!(extended["expires_at"], json!(new_expiry));
    assert_eq!(extended["reinstated"], "100.00");
    assert_eq!(extended["available"], "100.00");
    let lot = w.account("acme").await.lots[0].clone();
    assert_eq!(lot.remaining.to_string(), "100.00");
    assert_eq!(lot.expired.to_string(), "0.00");
    assert_eq!(lot.expires_at, new_expiry);
    assert_eq!(lot.reminded_stage, None);
    assert_eq!(w.journal().await.last().unwrap()["entry"], "reinstate");
    // The reminders start over for the new date.
    w.advance_days(30);
    w.sweep().await;
    let reminders = w.events_of("training-credits.lot.expiring").await;
    assert_eq!(reminders.len(), 2);
    assert_eq!(reminders[1]["stage"], 30);
    assert_eq!(reminders[1]["expires_at"], json!(new_expiry));
    // And the credits can be spent again.
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "100").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn extending_a_lot_that_has_not_expired_reinstates_nothing<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic", "100").await;
    let later = w.now.plus_days(800);
    assert_eq!(w.extend("acme", "p1", later).await, Outcome::Applied);
    let extended = w.last_event("training-credits.lot.extended").await;
    assert_eq!(extended["reinstated"], "0.00");
    assert_eq!(extended["available"], "100.00");
    w.verify_ok().await;
}

async fn extending_a_lot_past_its_expiry_before_the_sweep_reinstates_its_credits<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "automatic", "100").await;
    let expiry = w.now.plus_days(10);
    assert_eq!(
        w.purchase_expiring("acme", "p2", "40", expiry).await,
        Outcome::Applied
    );
    w.advance_days(11);
    assert_eq!(w.available("acme").await, "100.00");
    let later = w.now.plus_days(30);
    assert_eq!(w.extend("acme", "p2", later).await, Outcome::Applied);
    let extended = w.last_event("training-credits.lot.extended").await;
    assert_eq!(extended["reinstated"], "40.00");
    assert_eq!(extended["available"], "140.00");
    w.sweep().await;
    assert!(w.events_of("training-credits.lot.expired").await.is_empty());
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Rule 10: closing
// ---------------------------------------------------------------------------

async fn closing_an_account_forfeits_the_remainder_denies_pending_requests_and_keeps_history<
    S: Store,
>(
    mut w: World<S>,
) {
    acme_with_two_owners(&mut w, "manual").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p2", "50").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", CODE, "l2", "c2", "20").await,
        Outcome::Applied
    );
    assert_eq!(w.approve("r2", BOSS).await, Outcome::Applied);
    let history = w.journal().await;
    let events_before = w.events().await.len();
    assert_eq!(w.close("acme").await, Outcome::Applied);

    let account = w.account("acme").await;
    assert_eq!(json!(account.status), "closed");
    for lot in &account.lots {
        assert_eq!(lot.remaining.to_string(), "0.00");
        assert_eq!(lot.held.to_string(), "0.00");
    }
    let balances = account.balances_at(w.now);
    assert_eq!(balances.balance.to_string(), "0.00");
    // History kept: the journal only grew, by forfeit entries (and the
    // release of r1's hold).
    let journal = w.journal().await;
    assert_eq!(&journal[..history.len()], &history[..]);
    let added: Vec<&str> = journal[history.len()..]
        .iter()
        .map(|e| e["entry"].as_str().unwrap())
        .collect();
    assert!(added.contains(&"release"));
    assert!(added.contains(&"forfeit"));
    assert!(added.iter().all(|e| matches!(*e, "release" | "forfeit")));
    let forfeited: i64 = journal[history.len()..]
        .iter()
        .filter(|e| e["entry"] == "forfeit")
        .map(|e| {
            let amount: f64 = e["amount"].as_str().unwrap().parse().unwrap();
            (amount * 100.0).round() as i64
        })
        .sum();
    assert_eq!(forfeited, -13_000, "the 130.00 left were forfeited");

    // The pending request was denied with reason account_closed.
    let r1 = w.find_request("r1").await.unwrap();
    assert_eq!(r1.status.as_str(), "denied");
    assert_eq!(r1.reason.as_deref(), Some("account_closed"));
    assert_eq!(w.status_of("r2").await, "approved");
    let events = w.events().await[events_before..].to_vec();
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "training-credits.redemption.denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["data"]["request_id"], "r1");
    assert_eq!(denied[0]["data"]["reason"], "account_closed");
    assert_eq!(denied[0]["data"]["decided_by"], STAFF_ACTOR);
    assert_eq!(denied[0]["data"]["available"], "0.00");
    let updated: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "training-credits.account.updated")
        .collect();
    assert_eq!(
        updated[0]["data"]["changes"],
        json!([{"field": "status", "old": "active", "new": "closed"}])
    );
    let learner = last_email_to(&w, &learner_email("l1")).await;
    assert!(learner.text.contains("Course c1"));
    assert!(learner.text.contains("has been closed"));

    // Nothing can be bought or redeemed any more.
    assert_eq!(
        w.purchase("acme", "p3", "10").await,
        Outcome::Refused(Refusal::AccountClosed)
    );
    assert_eq!(
        w.request("r3", CODE, "l3", "c3", "1").await,
        Outcome::Rejected(Rejection::AccountClosed)
    );
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// balance.low
// ---------------------------------------------------------------------------

async fn balance_low_is_announced_once_each_time_available_falls_below_the_threshold<S: Store>(
    mut w: World<S>,
) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Bea Boss"}, {"email": CO, "name": "Cory Co"}],
                "approval_mode": "automatic",
                "code": CODE,
                "low_balance_threshold": "50",
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "50").await,
        Outcome::Applied
    );
    assert!(
        w.events_of("training-credits.balance.low").await.is_empty(),
        "exactly the threshold is not below it"
    );
    assert_eq!(
        w.request("r2", CODE, "l1", "c2", "0.01").await,
        Outcome::Applied
    );
    let low = w.events_of("training-credits.balance.low").await;
    assert_eq!(low.len(), 1);
    assert_eq!(low[0]["available"], "49.99");
    assert_eq!(low[0]["threshold"], "50.00");
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        assert!(email.text.contains("49.99"), "{}", email.text);
        assert!(email.text.contains("50.00"), "{}", email.text);
    }
    // Further spending below the threshold says nothing new.
    assert_eq!(
        w.request("r3", CODE, "l1", "c3", "20").await,
        Outcome::Applied
    );
    assert_eq!(w.events_of("training-credits.balance.low").await.len(), 1);
    // Back above it, then below again: a new crossing.
    assert_eq!(w.purchase("acme", "p2", "100").await, Outcome::Applied);
    assert_eq!(w.events_of("training-credits.balance.low").await.len(), 1);
    assert_eq!(
        w.request("r4", CODE, "l1", "c4", "90").await,
        Outcome::Applied
    );
    let low = w.events_of("training-credits.balance.low").await;
    assert_eq!(low.len(), 2);
    assert_eq!(low[1]["available"], "39.99");
    w.verify_ok().await;
}

async fn balance_low_is_announced_when_a_hold_or_the_sweep_takes_available_below_it<S: Store>(
    mut w: World<S>,
) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "owners": [{"email": BOSS, "name": "Bea Boss"}],
                "approval_mode": "manual",
                "code": CODE,
                "low_balance_threshold": "50",
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    let expiry = w.now.plus_days(10);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "40", expiry).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p2", "40").await, Outcome::Applied);
    w.advance_days(11);
    w.sweep().await;
    let low = w.events_of("training-credits.balance.low").await;
    assert_eq!(low.len(), 1, "the sweep took available from 80 to 40");
    assert_eq!(low[0]["available"], "40.00");
    w.advance_days(1);
    w.sweep().await;
    assert_eq!(w.events_of("training-credits.balance.low").await.len(), 1);
    assert_eq!(w.purchase("acme", "p3", "20").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "15").await,
        Outcome::Applied
    );
    let low = w.events_of("training-credits.balance.low").await;
    assert_eq!(low.len(), 2, "the hold took available from 60 to 45");
    assert_eq!(low[1]["available"], "45.00");
    // Approving spends what was held: available does not move.
    assert_eq!(w.approve("r1", BOSS).await, Outcome::Applied);
    assert_eq!(w.events_of("training-credits.balance.low").await.len(), 2);
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Expiry reminders
// ---------------------------------------------------------------------------

async fn expiry_reminders_are_sent_once_per_stage_per_lot<S: Store>(mut w: World<S>) {
    acme_with_two_owners(&mut w, "automatic").await;
    let expiry = w.now.plus_days(100);
    assert_eq!(
        w.purchase_expiring("acme", "p1", "100", expiry).await,
        Outcome::Applied
    );
    assert_eq!(
        w.purchase_expiring("acme", "p2", "10", w.now.plus_days(200))
            .await,
        Outcome::Applied
    );
    let start = w.now;
    let reminders = |events: Vec<Value>| -> Vec<(String, i64, i64)> {
        events
            .iter()
            .map(|e| {
                (
                    e["purchase_id"].as_str().unwrap().to_owned(),
                    e["stage"].as_i64().unwrap(),
                    e["days_left"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    w.now = start.plus_days(60);
    w.sweep().await;
    assert!(
        w.events_of("training-credits.lot.expiring")
            .await
            .is_empty()
    );
    w.now = start.plus_days(70);
    w.sweep().await;
    w.sweep().await;
    w.now = start.plus_days(75);
    w.sweep().await;
    assert_eq!(
        reminders(w.events_of("training-credits.lot.expiring").await),
        [("p1".to_owned(), 30, 30)]
    );
    let first = w.last_event("training-credits.lot.expiring").await;
    assert_eq!(first["expires_at"], json!(expiry));
    assert_eq!(first["remaining"], "100.00");
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        assert!(email.text.contains("100.00"), "{}", email.text);
        assert!(email.text.contains(&expiry.date()), "{}", email.text);
    }
    w.now = start.plus_days(93);
    w.sweep().await;
    w.now = start.plus_days(99);
    w.sweep().await;
    w.now = start.plus_days(99).plus(Duration::hours(12));
    w.sweep().await;
    w.now = start.plus_days(170);
    w.sweep().await;
    w.sweep().await;
    assert_eq!(
        reminders(w.events_of("training-credits.lot.expiring").await),
        [
            ("p1".to_owned(), 30, 30),
            ("p1".to_owned(), 7, 7),
            ("p1".to_owned(), 1, 1),
            ("p2".to_owned(), 30, 30),
        ]
    );
    w.verify_ok().await;
}

async fn only_the_nearest_passed_reminder_stage_is_announced<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic", "10").await;
    let expiry = w.now.plus_days(100);
    assert_eq!(
        w.purchase_expiring("acme", "p2", "100", expiry).await,
        Outcome::Applied
    );
    // Nothing ran for a long time: 2½ days are left, stages 30 and 7 have
    // both passed, and only stage 7 is announced, with 2 whole days left.
    w.now = expiry.plus(-Duration::hours(60));
    w.sweep().await;
    let reminders = w.events_of("training-credits.lot.expiring").await;
    assert_eq!(reminders.len(), 1);
    assert_eq!(reminders[0]["purchase_id"], "p2");
    assert_eq!(reminders[0]["stage"], 7);
    assert_eq!(reminders[0]["days_left"], 2);
    w.now = expiry.plus(-Duration::hours(20));
    w.sweep().await;
    let reminders = w.events_of("training-credits.lot.expiring").await;
    assert_eq!(reminders.len(), 2);
    assert_eq!(reminders[1]["stage"], 1);
    assert_eq!(reminders[1]["days_left"], 0);
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Pending timeout and the sweep
// ---------------------------------------------------------------------------

async fn a_pending_request_expires_after_the_timeout_and_its_hold_is_released<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    w.advance_days(13);
    w.sweep().await;
    assert_eq!(w.status_of("r1").await, "pending");
    w.advance_days(1);
    w.sweep().await;
    let expired = w.last_event("training-credits.redemption.expired").await;
    assert_eq!(expired["request_id"], "r1");
    assert_eq!(expired["available"], "100.00");
    assert_eq!(expired["account_id"], "acme");
    let request = w.find_request("r1").await.unwrap();
    assert_eq!(request.status.as_str(), "expired");
    assert_eq!(request.decided_by.as_deref(), Some("system"));
    assert_eq!(w.lot("acme", "p1").await, ("100.00".into(), "0.00".into()));
    let email = last_email_to(&w, &learner_email("l1")).await;
    assert!(email.text.contains("Course c1"), "{}", email.text);
    assert!(email.text.contains("did not answer"), "{}", email.text);
    // The learner may ask again.
    assert_eq!(
        w.request("r2", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn the_sweep_is_idempotent<S: Store>(mut w: World<S>) {
    assert_eq!(w.open("acme", "manual", BOSS, CODE).await, Outcome::Applied);
    let start = w.now;
    assert_eq!(
        w.purchase_expiring("acme", "p1", "50", start.plus_days(15))
            .await,
        Outcome::Applied
    );
    assert_eq!(
        w.purchase_expiring("acme", "p2", "50", start.plus_days(40))
            .await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    w.now = start.plus_days(20);
    let report = w.sweep().await;
    assert_eq!(report.accounts_examined, 1);
    let types: Vec<String> = w
        .events()
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .filter(|t| {
            t.ends_with("lot.expired")
                || t.ends_with("lot.expiring")
                || t.ends_with("redemption.expired")
        })
        .collect();
    assert_eq!(types.len(), 3, "{types:?}");
    let b = before(&w, &["acme"]).await;
    w.sweep().await;
    assert_eq!(w.events().await.len(), b.events);
    assert_eq!(w.emails().await.len(), b.emails);
    b.assert_unchanged(&w).await;
    w.advance(Duration::hours(6));
    w.sweep().await;
    assert_eq!(w.events().await.len(), b.events);
    assert_eq!(w.emails().await.len(), b.emails);
    b.assert_unchanged(&w).await;
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Codes, updates, approval modes
// ---------------------------------------------------------------------------

async fn a_code_is_generated_when_none_is_given<S: Store>(mut w: World<S>) {
    for (account, owner) in [("acme", BOSS), ("beta", OTHER)] {
        let outcome = w
            .send(
                "credits.account.opened",
                json!({
                    "account_id": account,
                    "owners": [{"email": owner, "name": "Owner"}],
                    "approval_mode": "automatic",
                }),
            )
            .await;
        assert_eq!(outcome, Outcome::Applied);
    }
    let opened = w.events_of("training-credits.account.opened").await;
    let codes: Vec<String> = opened
        .iter()
        .map(|e| e["code"].as_str().unwrap().to_owned())
        .collect();
    assert_ne!(codes[0], codes[1]);
    for code in &codes {
        // 16 characters of a 32-letter alphabet: 80 bits.
        let key: String = code.chars().filter(|c| *c != '-' && *c != ' ').collect();
        assert_eq!(key.len(), 16, "{code}");
        assert!(
            key.chars()
                .all(|c| "0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(c)),
            "{code}"
        );
    }
    assert_eq!(w.account("acme").await.code.as_str(), codes[0]);
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    let typed = codes[0].to_lowercase().replace('-', " ");
    assert_eq!(
        w.request("r1", &typed, "l1", "c1", "10").await,
        Outcome::Applied
    );
    // Rotating without a code generates a new one; the old one stops working.
    let rotated = w
        .send(
            "credits.account.code_rotated",
            json!({"account_id": "acme", "actor": BOSS}),
        )
        .await;
    assert_eq!(rotated, Outcome::Applied);
    let new_code = w.account("acme").await.code.to_string();
    assert_ne!(new_code, codes[0]);
    assert_eq!(new_code.replace('-', "").len(), 16);
    let updated = w.last_event("training-credits.account.updated").await;
    assert_eq!(
        updated["changes"],
        json!([{"field": "code", "old": codes[0], "new": new_code}])
    );
    assert_eq!(
        w.request("r2", &codes[0], "l2", "c1", "10").await,
        Outcome::Rejected(Rejection::InvalidCode)
    );
    assert_eq!(
        w.request("r3", &new_code, "l2", "c1", "10").await,
        Outcome::Applied
    );
    w.verify_ok().await;
}

async fn account_updated_lists_each_changed_field_with_its_old_and_new_value<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    let outcome = update(
        &mut w,
        BOSS,
        json!({
            "name": "Acme Learning",
            "approval_mode": "automatic",
            "low_balance_threshold": "25",
            "notes": "renewed in March",
        }),
    )
    .await;
    assert_eq!(outcome, Outcome::Applied);
    let updated = w.last_event("training-credits.account.updated").await;
    assert_eq!(updated["account_id"], "acme");
    assert_eq!(
        updated["changes"],
        json!([
            {"field": "name", "old": "Owner", "new": "Acme Learning"},
            {"field": "approval_mode", "old": "manual", "new": "automatic"},
            {"field": "low_balance_threshold", "old": null, "new": "25.00"},
            {"field": "notes", "old": null, "new": "renewed in March"},
        ])
    );
    let account = w.account("acme").await;
    assert_eq!(account.name, "Acme Learning");
    assert_eq!(json!(account.approval_mode), "automatic");
    // Clearing, and a status change.
    let outcome = update(
        &mut w,
        BOSS,
        json!({"notes": null, "status": "inactive", "name": "Acme Learning"}),
    )
    .await;
    assert_eq!(outcome, Outcome::Applied);
    let updated = w.last_event("training-credits.account.updated").await;
    assert_eq!(
        updated["changes"],
        json!([
            {"field": "status", "old": "active", "new": "inactive"},
            {"field": "notes", "old": "renewed in March", "new": null},
        ])
    );
    // A change to nothing announces nothing.
    let count = w.events_of("training-credits.account.updated").await.len();
    assert_eq!(
        update(&mut w, BOSS, json!({"name": "Acme Learning"})).await,
        Outcome::Applied
    );
    assert_eq!(
        w.events_of("training-credits.account.updated").await.len(),
        count
    );
    // The new mode applies: automatic approval.
    assert_eq!(
        update(&mut w, BOSS, json!({"status": "active"})).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "10").await,
        Outcome::Applied
    );
    assert_eq!(w.status_of("r1").await, "approved");
    w.verify_ok().await;
}

async fn automatic_mode_approves_at_once_by_the_system<S: Store>(mut w: World<S>) {
    acme(&mut w, "automatic", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert!(
        w.events_of("training-credits.redemption.pending")
            .await
            .is_empty()
    );
    let approved = w.last_event("training-credits.redemption.approved").await;
    assert_eq!(approved["request_id"], "r1");
    assert_eq!(approved["learner_id"], "l1");
    assert_eq!(approved["item_id"], "c1");
    assert_eq!(approved["cost"], "30.00");
    assert_eq!(approved["decided_by"], "system");
    assert_eq!(approved["available"], "70.00");
    let request = w.find_request("r1").await.unwrap();
    assert_eq!(request.status.as_str(), "approved");
    assert_eq!(request.decided_by.as_deref(), Some("system"));
    assert_eq!(w.lot("acme", "p1").await, ("70.00".into(), "0.00".into()));
    assert!(
        w.emails_to(BOSS).await.len() == 1,
        "only the purchase email"
    );
    let email = last_email_to(&w, &learner_email("l1")).await;
    assert!(email.text.contains(
        "Hello Learner l1, Your request to redeem 30.00 training credits for Course c1 has been approved."
    ));
    w.verify_ok().await;
}

async fn staff_may_approve_deny_and_update_any_account<S: Store>(mut w: World<S>) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", CODE, "l2", "c1", "20").await,
        Outcome::Applied
    );
    let approved = w
        .send_staff(
            "credits.redemption.approved",
            json!({"request_id": "r1", "approver": STAFF_ACTOR}),
        )
        .await;
    assert_eq!(approved, Outcome::Applied);
    assert_eq!(
        w.last_event("training-credits.redemption.approved").await["decided_by"],
        STAFF_ACTOR
    );
    let denied = w
        .send_staff(
            "credits.redemption.denied",
            json!({"request_id": "r2", "approver": STAFF_ACTOR}),
        )
        .await;
    assert_eq!(denied, Outcome::Applied);
    assert_eq!(
        w.last_event("training-credits.redemption.denied").await["decided_by"],
        STAFF_ACTOR
    );
    let updated = w
        .send_staff(
            "credits.account.updated",
            json!({"account_id": "acme", "actor": STAFF_ACTOR, "name": "Renamed by staff"}),
        )
        .await;
    assert_eq!(updated, Outcome::Applied);
    assert_eq!(w.account("acme").await.name, "Renamed by staff");
    assert_eq!(w.available("acme").await, "70.00");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// Emails
// ---------------------------------------------------------------------------

async fn a_pending_request_emails_every_owner_with_the_details_and_a_link<S: Store>(
    mut w: World<S>,
) {
    acme_with_two_owners(&mut w, "manual").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    let pending = w.last_event("training-credits.redemption.pending").await;
    assert_eq!(pending["request_id"], "r1");
    assert_eq!(pending["learner_id"], "l1");
    assert_eq!(pending["item_id"], "c1");
    assert_eq!(pending["available"], "70.00");
    for (owner, name) in [(BOSS, "Bea Boss"), (CO, "Cory Co")] {
        let email = last_email_to(&w, owner).await;
        assert_eq!(email.to_name.as_deref(), Some(name));
        for needed in [
            name,
            "Learner l1",
            "l1@learners.test",
            "Course c1",
            "30.00",
            "http://portal.test/requests/r1",
        ] {
            assert!(
                email.text.contains(needed),
                "the email to {owner} lacks {needed}: {}",
                email.text
            );
        }
        // HTML escapes `/` as `&#x2f;`, which a browser reads back as `/`.
        let html = email.html.replace("&#x2f;", "/");
        assert!(
            html.contains("href=\"http://portal.test/requests/r1\""),
            "{}",
            email.html
        );
    }
    assert!(w.emails_to(&learner_email("l1")).await.is_empty());
    w.verify_ok().await;
}

async fn an_approval_emails_the_learner_the_contract_sentence<S: Store>(mut w: World<S>) {
    acme_with_two_owners(&mut w, "manual").await;
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "19.5").await,
        Outcome::Applied
    );
    let owner_emails = w.emails_to(BOSS).await.len();
    assert_eq!(w.approve("r1", CO).await, Outcome::Applied);
    let approved = w.last_event("training-credits.redemption.approved").await;
    assert_eq!(approved["decided_by"], CO);
    let learner = w.emails_to(&learner_email("l1")).await;
    assert_eq!(learner.len(), 1);
    assert_eq!(learner[0].to_name.as_deref(), Some("Learner l1"));
    assert!(learner[0].text.contains(
        "Hello Learner l1, Your request to redeem 19.50 training credits for Course c1 has been approved."
    ));
    assert_eq!(w.emails_to(BOSS).await.len(), owner_emails);
    w.verify_ok().await;
}

async fn denied_expired_and_rejected_requests_email_the_learner_the_title_and_reason<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(w.deny("r1", BOSS).await, Outcome::Applied);
    let denied = w.last_event("training-credits.redemption.denied").await;
    assert_eq!(denied["request_id"], "r1");
    assert_eq!(denied["decided_by"], BOSS);
    assert_eq!(denied["reason"], "not this quarter");
    assert_eq!(denied["available"], "100.00");
    let email = last_email_to(&w, &learner_email("l1")).await;
    assert!(email.text.contains("Course c1"), "{}", email.text);
    assert!(email.text.contains("not this quarter"), "{}", email.text);
    assert!(email.text.contains("denied"), "{}", email.text);

    assert_eq!(
        w.request("r2", CODE, "l2", "c2", "30").await,
        Outcome::Applied
    );
    w.advance_days(14);
    w.sweep().await;
    let email = last_email_to(&w, &learner_email("l2")).await;
    assert!(email.text.contains("Course c2"), "{}", email.text);
    assert!(email.text.contains("expired"), "{}", email.text);
    assert!(
        email.text.contains("did not answer within 14 days"),
        "{}",
        email.text
    );

    assert_eq!(
        w.request("r3", CODE, "l3", "c3", "1000").await,
        Outcome::Rejected(Rejection::InsufficientBalance)
    );
    let email = last_email_to(&w, &learner_email("l3")).await;
    assert!(email.text.contains("Course c3"), "{}", email.text);
    assert!(
        email.text.contains("does not have enough training credits"),
        "{}",
        email.text
    );
    assert!(
        !email.text.contains("insufficient_balance"),
        "plain words, not a code"
    );
    w.verify_ok().await;
}

async fn a_recorded_purchase_emails_every_owner<S: Store>(mut w: World<S>) {
    acme_with_two_owners(&mut w, "manual").await;
    let purchased_at = w.now;
    let outcome = w
        .send_from(
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": "acme",
                "purchase_id": "p1",
                "credits": "100",
                "price_paid": {"amount": "90", "currency": "USD"},
                "channel": "card",
                "purchased_at": purchased_at,
            }),
        )
        .await;
    assert_eq!(outcome, Outcome::Applied);
    let recorded = w.last_event("training-credits.purchase.recorded").await;
    assert_eq!(recorded["purchase_id"], "p1");
    assert_eq!(recorded["credits"], "100.00");
    assert_eq!(recorded["expires_at"], "2027-01-01T09:00:00Z");
    assert_eq!(recorded["available"], "100.00");
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        for needed in ["100.00", "90.00 USD", "2027-01-01"] {
            assert!(
                email.text.contains(needed),
                "the email to {owner} lacks {needed}: {}",
                email.text
            );
        }
    }
    w.verify_ok().await;
}

async fn owner_changes_code_rotation_and_closing_email_the_owners_with_who_did_it<S: Store>(
    mut w: World<S>,
) {
    acme(&mut w, "manual", "100").await;
    let added = w
        .send(
            "credits.account.owner_added",
            json!({"account_id": "acme", "actor": BOSS, "owner": {"email": CO, "name": "Cory Co"}}),
        )
        .await;
    assert_eq!(added, Outcome::Applied);
    assert_eq!(
        w.last_event("training-credits.account.updated").await["changes"],
        json!([{"field": "owners", "old": [BOSS], "new": [BOSS, CO]}])
    );
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        assert!(email.subject.contains("New owner"), "{}", email.subject);
        assert!(email.text.contains(BOSS), "{}", email.text);
        assert!(email.text.contains(CO), "{}", email.text);
    }

    let rotated = w
        .send(
            "credits.account.code_rotated",
            json!({"account_id": "acme", "actor": CO, "code": "NEW-CODE-42"}),
        )
        .await;
    assert_eq!(rotated, Outcome::Applied);
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        assert!(
            email.subject.contains("redemption code"),
            "{}",
            email.subject
        );
        assert!(email.text.contains(CO), "{}", email.text);
        assert!(email.text.contains("NEW-CODE-42"), "{}", email.text);
    }

    let removed = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": CO, "email": BOSS}),
        )
        .await;
    assert_eq!(removed, Outcome::Applied);
    assert_eq!(
        w.last_event("training-credits.account.updated").await["changes"],
        json!([{"field": "owners", "old": [BOSS, CO], "new": [CO]}])
    );
    // The removed owner hears of it too.
    for owner in [BOSS, CO] {
        let email = last_email_to(&w, owner).await;
        assert!(email.subject.contains("removed"), "{}", email.subject);
        assert!(email.text.contains(CO), "{}", email.text);
        assert!(email.text.contains(BOSS), "{}", email.text);
    }
    let boss_emails = w.emails_to(BOSS).await.len();

    assert_eq!(w.close("acme").await, Outcome::Applied);
    let email = last_email_to(&w, CO).await;
    assert!(email.subject.contains("closed"), "{}", email.subject);
    assert!(email.text.contains(STAFF_ACTOR), "{}", email.text);
    assert_eq!(
        w.emails_to(BOSS).await.len(),
        boss_emails,
        "a former owner is not told of the closing"
    );
    w.verify_ok().await;
}

on_both_backends!(
    a_code_that_matches_no_account_is_rejected_invalid_code,
    a_batch_of_hundreds_of_rows_per_table_writes_every_row,
    an_inactive_account_rejects_redemptions_until_it_is_active_again,
    a_closed_account_rejects_redemptions_account_closed,
    an_item_outside_an_activity_scope_is_rejected_out_of_scope,
    an_item_outside_a_group_scope_is_rejected_out_of_scope,
    a_cost_above_available_is_rejected_without_partial_payment,
    two_pending_requests_never_hold_the_same_credits,
    a_learner_cannot_redeem_an_item_while_a_pending_or_approved_redemption_exists,
    after_a_refund_or_an_unenrollment_the_learner_can_redeem_the_item_again,
    five_invalid_codes_within_fifteen_minutes_block_the_learner_until_the_window_passes,
    four_invalid_codes_do_not_block_the_learner,
    only_an_owner_may_approve_or_deny_a_request,
    only_an_owner_may_change_the_account_its_owners_or_its_code,
    only_an_owner_may_ask_for_the_reports_of_an_account,
    closing_an_account_needs_a_staff_source,
    extending_a_lot_needs_a_staff_source,
    an_all_accounts_report_needs_a_staff_source,
    approving_or_denying_a_decided_request_is_refused_not_pending,
    only_the_requesting_learner_may_cancel,
    a_learner_may_cancel_and_ask_for_the_same_item_again_in_one_batch,
    an_account_changed_by_several_messages_of_one_batch_keeps_every_change,
    the_last_owner_of_an_account_cannot_be_removed,
    an_email_owns_at_most_one_account,
    codes_are_unique_without_regard_to_case_spaces_or_dashes,
    opening_an_account_that_exists_is_refused_account_exists,
    a_closed_account_accepts_no_purchase_and_no_change,
    a_lot_can_only_be_extended_to_a_later_date_in_the_future,
    every_change_is_a_journal_entry_naming_who_caused_it,
    credits_are_taken_from_the_soonest_expiring_lot_first,
    lots_expiring_together_are_spent_oldest_purchase_first,
    a_hold_reserves_specific_lots_and_approval_deducts_exactly_those,
    a_lot_past_its_expiry_cannot_be_spent_even_before_the_sweep,
    the_sweep_expires_only_the_unreserved_remainder,
    a_hold_released_from_an_expired_lot_expires_at_once,
    an_unenrollment_within_the_refund_window_returns_exactly_what_was_deducted_once,
    a_refund_into_an_expired_lot_expires_at_once_and_is_reported,
    an_unenrollment_after_the_refund_window_is_not_refunded,
    the_refund_window_counts_from_the_approval,
    unenrolling_a_pending_request_cancels_it,
    a_redemption_moves_only_along_the_allowed_transitions,
    deciding_a_rejected_request_is_refused_and_announced,
    extending_a_lot_reinstates_expired_credits_and_resets_reminders,
    extending_a_lot_that_has_not_expired_reinstates_nothing,
    extending_a_lot_past_its_expiry_before_the_sweep_reinstates_its_credits,
    closing_an_account_forfeits_the_remainder_denies_pending_requests_and_keeps_history,
    balance_low_is_announced_once_each_time_available_falls_below_the_threshold,
    balance_low_is_announced_when_a_hold_or_the_sweep_takes_available_below_it,
    expiry_reminders_are_sent_once_per_stage_per_lot,
    only_the_nearest_passed_reminder_stage_is_announced,
    a_pending_request_expires_after_the_timeout_and_its_hold_is_released,
    the_sweep_is_idempotent,
    a_code_is_generated_when_none_is_given,
    account_updated_lists_each_changed_field_with_its_old_and_new_value,
    automatic_mode_approves_at_once_by_the_system,
    staff_may_approve_deny_and_update_any_account,
    a_pending_request_emails_every_owner_with_the_details_and_a_link,
    an_approval_emails_the_learner_the_contract_sentence,
    denied_expired_and_rejected_requests_email_the_learner_the_title_and_reason,
    a_recorded_purchase_emails_every_owner,
    owner_changes_code_rotation_and_closing_email_the_owners_with_who_did_it,
);
