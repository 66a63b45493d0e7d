//! The worker against the real RabbitMQ, SQLite and PostgreSQL, and an SMTP
//! server on a local socket: each test has its own vhost and database.

use crate::support as common;

use std::time::Duration;

use serde_json::{Value, json};
use training_credits::domain::Ts;
use training_credits::store::Store;

use common::broker::{Client, SmtpSink, TestWorker, Vhost, config, eventually, publish_confirmed};
use common::events::{event, opened, purchase};

fn request(id: &str, code: &str, learner: &str, item: &str, cost: &str) -> Value {
    event(
        &format!("ev-{id}"),
        "lms",
        "credits.redemption.requested",
        json!({
            "request_id": id, "code": code,
            "learner": {"id": learner, "email": format!("{learner}@learners.test"), "name": format!("Learner {learner}")},
            "item": {"id": item, "kind": "course", "title": format!("Course {item}")},
            "cost": cost, "requested_at": "2026-11-21T10:00:00Z",
        }),
    )
}

async fn a_whole_account_life_cycle_yields_its_events_and_emails<S: Store>(store: S, url: String) {
    let vhost = Vhost::new();
    let smtp = SmtpSink::start_new().await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    let worker = TestWorker::start(
        store.clone(),
        config(&vhost, &url, Some(&smtp.url()), mail_dir.path()),
    )
    .await;

    let now = training_credits::domain::Ts::now();
    for message in [
        event(
            "e1",
            "portal",
            "credits.account.opened",
            json!({
                "account_id": "acme", "owners": [{"email": "boss@acme.test", "name": "Bo Boss"}],
                "approval_mode": "manual", "code": "ACME-0001",
            }),
        ),
        event(
            "e2",
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": "acme", "purchase_id": "p1", "credits": "100", "purchased_at": now,
                "price_paid": {"amount": "95.00", "currency": "USD"},
            }),
        ),
        request("r1", "acme 0001", "l1", "c1", "20"),
        event(
            "e3",
            "portal",
            "credits.redemption.approved",
            json!({"request_id": "r1", "approver": "boss@acme.test"}),
        ),
        request("r2", "ACME0001", "l2", "c2", "10"),
        event(
            "e4",
            "portal",
            "credits.redemption.denied",
            json!({"request_id": "r2", "approver": "boss@acme.test", "reason": "budget"}),
        ),
        request("r3", "ACME0001", "l3", "c3", "5"),
        event(
            "e5",
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": "r3", "learner_id": "l3"}),
        ),
        event(
            "e6",
            "portal",
            "credits.account.updated",
            json!({"account_id": "acme", "actor": "boss@acme.test", "approval_mode": "automatic"}),
        ),
        request("r4", "ACME0001", "l4", "c4", "30"),
        event(
            "e7",
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": "r4", "unenrolled_at": now}),
        ),
    ] {
        client.publish(&message).await;
    }

    client
        .await_outbound("training-credits.redemption.refunded", 1)
        .await;
    for (type_name, count) in [
        ("training-credits.account.opened", 1),
        ("training-credits.purchase.recorded", 1),
        ("training-credits.redemption.pending", 3),
        ("training-credits.redemption.approved", 2),
        ("training-credits.redemption.denied", 1),
        ("training-credits.redemption.cancelled", 1),
        ("training-credits.account.updated", 1),
        ("training-credits.redemption.refunded", 1),
    ] {
        assert_eq!(client.outbound_of(type_name).len(), count, "{type_name}");
    }
    let refunded = &client.outbound_of("training-credits.redemption.refunded")[0];
    assert_eq!(refunded["data"]["refunded"], "30.00");
    assert_eq!(refunded["data"]["available"], "80.00");
    assert_eq!(refunded["subject"], "acme");
    assert_eq!(refunded["datacontenttype"], "application/json");
    // SPEC §5: what the AMQP properties of every outbound message repeat.
    for message in client.captured() {
        let (event, properties) = (&message.event, &message.properties);
        let text = |value: &Option<lapin::types::ShortString>| {
            value.as_ref().map(|v| v.as_str().to_owned())
        };
        assert_eq!(
            text(properties.message_id()).as_deref(),
            event["id"].as_str()
        );
        assert_eq!(text(properties.kind()).as_deref(), event["type"].as_str());
        assert_eq!(message.routing_key, event["type"]);
        assert_eq!(
            text(properties.app_id()).as_deref(),
            Some("training-credits")
        );
        assert_eq!(
            text(properties.content_type()).as_deref(),
            Some("application/cloudevents+json")
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
        let time = Ts::parse(event["time"].as_str().expect("a time")).expect("RFC 3339");
        assert_eq!(*properties.timestamp(), Some(time.utc().timestamp() as u64));
    }

    eventually(Duration::from_secs(30), "the emails", || async {
        smtp.received().len() >= 6
    })
    .await;
    let mails = smtp.mails();
    let approval = mails
        .iter()
        .find(|m| m.to == "l1@learners.test")
        .expect("the learner's approval email");
    assert!(approval.text.contains("Hello Learner l1, Your request to redeem 20.00 training credits for Course c1 has been approved."));
    assert!(!approval.html.is_empty() && !approval.message_id.is_empty());
    let pending = mails
        .iter()
        .find(|m| m.text.contains("http://portal.test/requests/r2"))
        .expect("the pending email links to the request");
    assert_eq!(pending.to, "boss@acme.test");
    assert!(
        pending.text.contains("Learner l2")
            && pending.text.contains("l2@learners.test")
            && pending.text.contains("10.00")
    );
    assert!(
        mails.iter().any(|m| m.text.contains("95.00 USD")),
        "the purchase email names the price paid"
    );
    assert!(
        mails
            .iter()
            .any(|m| m.to == "l2@learners.test" && m.text.contains("budget")),
        "the denial email gives the reason"
    );
    worker.stop().await;
    let problems = store.verify().await.expect("verify runs");
    assert!(problems.is_empty(), "{problems:?}");
}

/// The events lane starts a round's publishes together (lapin finishes each
/// only once its I/O thread has written it); they must still leave in the
/// order their messages were applied. The 300 purchases wait in the queue
/// before the worker starts, so its batches after the first are large: far
/// more than the 30 futures `join_all` polls without a queue of its own.
async fn outbound_events_leave_in_the_order_their_messages_were_applied<S: Store>(
    store: S,
    url: String,
) {
    const PURCHASES: usize = 300;
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    let mut messages = vec![opened("e-open", "acme", &["boss@acme.test"])];
    messages.extend(
        (0..PURCHASES).map(|n| purchase(&format!("e-buy-{n}"), "acme", &format!("p{n}"), "1")),
    );
    // All waiting before the worker starts, so its batches are large.
    publish_confirmed(&client.channel, &messages).await;
    let worker = TestWorker::start(store, config(&vhost, &url, None, mail_dir.path())).await;

    let recorded = client
        .await_outbound("training-credits.purchase.recorded", PURCHASES)
        .await;
    let order: Vec<&str> = recorded
        .iter()
        .map(|event| event["data"]["purchase_id"].as_str().unwrap_or("?"))
        .collect();
    let expected: Vec<String> = (0..PURCHASES).map(|n| format!("p{n}")).collect();
    assert_eq!(order, expected);
    assert_eq!(client.distinct_outbound_ids(), PURCHASES + 1);
    worker.stop().await;
}

on_both_stores!(
    a_whole_account_life_cycle_yields_its_events_and_emails,
    outbound_events_leave_in_the_order_their_messages_were_applied
);

/// The dispatcher's marks ride with the next batch, on the ledger alone.
mod marks {
    use super::common;
    use chrono::Duration;
    use common::World;
    use training_credits::domain::Outcome;
    use training_credits::store::{HolderId, OutboxKind, OutboxRow, Store};

    const KINDS: [OutboxKind; 2] = [OutboxKind::Event, OutboxKind::Email];

    /// Opens an account, claims its rows (leased for a minute, a day on) and
    /// adds them to the store's marks, as a lane does once they are sent.
    async fn sent_rows_of_an_opening<S: Store>(w: &mut World<S>) -> Vec<OutboxRow> {
        assert_eq!(
            w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
                .await,
            Outcome::Applied
        );
        let later = w.now.plus(Duration::days(1));
        let sent = w
            .store()
            .claim_outbox(
                &KINDS,
                later,
                later.plus(Duration::minutes(1)),
                100,
                HolderId::random(),
            )
            .await
            .expect("the opening's rows are claimed");
        assert!(!sent.is_empty(), "the opening has an event and emails");
        w.store()
            .sent_marks()
            .add(sent.iter().map(|row| row.id.clone()));
        sent
    }

    /// The rows not marked sent, once the claim's lease has run out.
    async fn due_after_the_lease<S: Store>(w: &World<S>) -> Vec<OutboxRow> {
        let after_the_lease = w.now.plus(Duration::days(1) + Duration::hours(1));
        w.store()
            .claim_outbox(
                &KINDS,
                after_the_lease,
                after_the_lease,
                100,
                HolderId::random(),
            )
            .await
            .expect("what is due is claimed")
    }

    /// Rows sent and waiting in the store's [`SentMarks`] are marked sent by
    /// the next batch's transaction, with its own writes: nothing of them is
    /// due again, the batch's own rows are, and nothing waits any more.
    async fn rows_sent_are_marked_by_the_next_batch_s_transaction<S: Store>(mut w: World<S>) {
        let sent = sent_rows_of_an_opening(&mut w).await;
        assert_eq!(w.purchase("acme", "p1", "100.00").await, Outcome::Applied);
        assert!(w.store().sent_marks().is_empty(), "the batch took them");
        let due = due_after_the_lease(&w).await;
        assert!(!due.is_empty(), "the purchase's own rows are not sent");
        for row in &due {
            assert!(
                sent.iter().all(|marked| marked.id != row.id),
                "{} was marked sent by the purchase's batch",
                row.id
            );
        }
        // Nothing waits: no write at all.
        w.store().outbox_mark_sent().await.expect("nothing to mark");
        w.verify_ok().await;
    }

    /// With no batch to ride, a lane's own write marks what waits
    /// (`outbox_mark_sent`): those rows are never due again, and nothing
    /// waits any more.
    async fn rows_sent_are_marked_by_a_write_of_their_own_when_no_batch_comes<S: Store>(
        mut w: World<S>,
    ) {
        sent_rows_of_an_opening(&mut w).await;
        w.store()
            .outbox_mark_sent()
            .await
            .expect("the marks are written");
        assert!(w.store().sent_marks().is_empty(), "nothing waits");
        let due = due_after_the_lease(&w).await;
        assert!(due.is_empty(), "every row sent was marked: {due:?}");
        w.verify_ok().await;
    }

    on_both_backends!(
        rows_sent_are_marked_by_the_next_batch_s_transaction,
        rows_sent_are_marked_by_a_write_of_their_own_when_no_batch_comes
    );
}

/// Leases of workers that died: a worker that starts makes them due at once
/// instead of leaving them to wait out their lease, and on PostgreSQL, where
/// workers share the outbox, it leaves a live worker's leases alone.
mod holders {
    use super::common;
    use chrono::Duration;
    use common::World;
    use training_credits::domain::Outcome;
    use training_credits::store::{HolderId, Outbox, OutboxKind, OutboxRow, Store};

    const KINDS: [OutboxKind; 2] = [OutboxKind::Event, OutboxKind::Email];

    /// Opens an account and leases its rows to `holder` for an hour.
    async fn leased_rows_of_an_opening<S: Store>(
        w: &mut World<S>,
        holder: HolderId,
    ) -> Vec<OutboxRow> {
        assert_eq!(
            w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
                .await,
            Outcome::Applied
        );
        let leased = w
            .store()
            .claim_outbox(&KINDS, w.now, w.now.plus(Duration::hours(1)), 100, holder)
            .await
            .expect("the opening's rows are claimed");
        assert!(!leased.is_empty(), "the opening has an event and emails");
        assert!(leased.iter().all(|row| row.leased_by == Some(holder)));
        leased
    }

    /// The ids of the rows due at the test's instant, claimed by `holder`.
    async fn due_now<S: Store>(w: &World<S>, holder: HolderId) -> Vec<String> {
        let due = w
            .store()
            .claim_outbox(&KINDS, w.now, w.now.plus(Duration::hours(1)), 100, holder)
            .await
            .expect("what is due is claimed");
        due.into_iter().map(|row| row.id).collect()
    }

    fn ids(rows: &[OutboxRow]) -> Vec<String> {
        rows.iter().map(|row| row.id.clone()).collect()
    }

    async fn the_rows_of_a_holder_that_is_gone_are_due_at_once<S: Store>(mut w: World<S>) {
        let dead = w.store().register_holder().await.expect("a holder");
        let leased = leased_rows_of_an_opening(&mut w, dead.id).await;
        drop(dead);
        let me = w.store().register_holder().await.expect("a holder");
        assert!(due_now(&w, me.id).await.is_empty(), "leased: nothing due");
        // On PostgreSQL the dead holder's session ends a moment after it
        // is dropped.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let released = loop {
            let released = w
                .store()
                .release_dead_holders(me.id, w.now)
                .await
                .expect("the dead holder's rows are given back");
            if released > 0 || tokio::time::Instant::now() > deadline {
                break released;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(released, leased.len() as u64);
        assert_eq!(due_now(&w, me.id).await, ids(&leased), "due at once");
        assert_eq!(
            w.store()
                .release_dead_holders(me.id, w.now)
                .await
                .expect("nothing else to give back"),
            0,
            "the rows claimed again are the live holder's own"
        );
        w.verify_ok().await;
    }

    on_both_backends!(the_rows_of_a_holder_that_is_gone_are_due_at_once);

    #[tokio::test]
    async fn on_postgres_the_rows_of_a_live_holder_are_left_alone() {
        let mut w = common::pg_world().await;
        let alive = w.store().register_holder().await.expect("a holder");
        let leased = leased_rows_of_an_opening(&mut w, alive.id).await;
        let me = w.store().register_holder().await.expect("another holder");
        assert_ne!(me.id, alive.id);
        for _ in 0..3 {
            assert_eq!(
                w.store()
                    .release_dead_holders(me.id, w.now)
                    .await
                    .expect("looked at"),
                0,
                "the live holder keeps its rows"
            );
        }
        assert!(due_now(&w, me.id).await.is_empty(), "still leased");
        let pending = w.store().pending_outbox(100).await.expect("the outbox");
        for row in pending.iter().filter(|row| ids(&leased).contains(&row.id)) {
            assert_eq!(row.leased_by, Some(alive.id), "{} is still leased", row.id);
        }
        drop(alive);
    }
}
