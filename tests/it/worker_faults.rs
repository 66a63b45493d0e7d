//! The worker when things go wrong, against the real RabbitMQ, SQLite and
//! PostgreSQL: malformed messages, messages that overtake their predecessors,
//! redeliveries, an SMTP server that is down, a broker that refuses what the
//! worker sends it or drops its connections, dead letters replayed from the
//! command line, and the ops endpoints. Each test has its own vhost and
//! database; every outcome is waited for on something observable, bounded.

use crate::support as common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};
use training_credits::broker::persistent_cloudevent;
use training_credits::broker::topology::{
    DEAD_QUEUE, INBOUND_EXCHANGE, OUTBOUND_EXCHANGE, long_string, retry_queue,
};
use training_credits::domain::Ts;
use training_credits::notify::Email;
use training_credits::store::{Backlog, OutboxKind, Store};

use common::broker::{
    BrokerConnection, Client, SmtpSink, TestWorker, Vhost, bare_message_id, config, eventually,
    header, http_get, publish_purchases_until,
};
use common::child::{Finished, Site};
use common::events::{event, opened, purchase};
use common::metrics;
use common::{assert_verified, available_now as available};

/// Long enough for anything the worker does at once, on a loaded machine.
const SOON: Duration = Duration::from_secs(15);
/// The test configuration's `RETRY_DELAYS`, summed: the least a message
/// retried through every delay queue waits before its dead letter.
const ALL_RETRY_DELAYS: Duration = Duration::from_millis(200 + 400);

/// A vhost, a client capturing the outbound events, and a worker on them.
struct Rig {
    vhost: Vhost,
    client: Client,
    worker: TestWorker,
    _mail_dir: tempfile::TempDir,
}

async fn rig<S: Store>(store: &S, url: &str, smtp: Option<&SmtpSink>) -> Rig {
    let vhost = Vhost::new();
    let client = Client::new(&vhost).await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let smtp_url = smtp.map(SmtpSink::url);
    let worker = TestWorker::start(
        store.clone(),
        config(&vhost, url, smtp_url.as_deref(), mail_dir.path()),
    )
    .await;
    Rig {
        vhost,
        client,
        worker,
        _mail_dir: mail_dir,
    }
}

/// The emails still waiting in the outbox.
async fn waiting_emails<S: Store>(store: &S) -> Vec<(Email, i64)> {
    store
        .pending_outbox(10_000)
        .await
        .expect("the outbox")
        .into_iter()
        .filter(|row| row.kind == OutboxKind::Email)
        .map(|row| {
            let email = serde_json::from_str(&row.payload).expect("an email row");
            (email, row.attempts)
        })
        .collect()
}

fn text_header(headers: &FieldTable, name: &str) -> String {
    header(headers, name).unwrap_or_else(|| panic!("the header {name} is there"))
}

fn headers_of(delivery: &lapin::message::Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

fn integer_header(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

async fn await_dead_letters(client: &Client, count: u32, limit: Duration) {
    eventually(limit, &format!("{count} dead letters"), || async {
        client.dead_letter_count().await >= count
    })
    .await;
}

// 1. Malformed messages.

async fn malformed_messages_are_dead_lettered_at_once_with_their_reason_and_kept_whole<S: Store>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    client
        .publish(&opened("m-open", "mal", &["boss@mal.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;

    let oversized = event(
        "m-big",
        "portal",
        "credits.account.updated",
        json!({"account_id": "mal", "actor": "boss@mal.test", "notes": "x".repeat(300 * 1024)}),
    );
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "too_large",
            "credits.account.updated",
            oversized.to_string().into_bytes(),
        ),
        ("invalid_json", "none", b"{\"specversion\": \"1.0\", ".to_vec()),
        (
            "invalid_envelope",
            "credits.purchase.completed",
            json!({"id": "m-env", "data": {}}).to_string().into_bytes(),
        ),
        (
            "unknown_type",
            "credits.nonsense.happened",
            event("m-type", "portal", "credits.nonsense.happened", json!({}))
                .to_string()
                .into_bytes(),
        ),
        (
            "schema_violation",
            "credits.purchase.completed",
            event(
                "m-schema",
                "shop",
                "credits.purchase.completed",
                json!({"account_id": "mal", "purchase_id": "p0", "credits": "lots", "purchased_at": Ts::now()}),
            )
            .to_string()
            .into_bytes(),
        ),
        (
            "id_conflict",
            "credits.account.opened",
            opened("m-open", "mal-other", &["other@mal.test"])
                .to_string()
                .into_bytes(),
        ),
    ];
    for (case, routing_key, body) in &cases {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-case"),
            AMQPValue::LongString((*case).into()),
        );
        headers.insert(
            ShortString::from("x-publisher"),
            AMQPValue::LongString("fault-tests".into()),
        );
        let properties = persistent_cloudevent(&format!("msg-{case}")).with_headers(headers);
        client.publish_with(routing_key, body, properties).await;
    }

    await_dead_letters(client, 6, SOON).await;
    let letters = client.dead_letter_deliveries().await;
    assert_eq!(letters.len(), 6, "one dead letter per malformed message");
    for (case, _, body) in &cases {
        let letter = letters
            .iter()
            .find(|d| header(&headers_of(d), "x-case").as_deref() == Some(case))
            .unwrap_or_else(|| panic!("the {case} message is dead-lettered"));
        let headers = headers_of(letter);
        assert_eq!(text_header(&headers, "x-error-reason"), *case);
        assert!(
            !text_header(&headers, "x-error-detail").trim().is_empty(),
            "{case}: x-error-detail says what is wrong"
        );
        assert_eq!(&letter.data, body, "{case}: the body is kept as sent");
        assert_eq!(text_header(&headers, "x-publisher"), "fault-tests");
        assert_eq!(
            letter.properties.message_id().as_ref().map(|m| m.as_str()),
            Some(format!("msg-{case}").as_str()),
            "{case}: the message id is kept"
        );
        assert_eq!(
            letter
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/cloudevents+json")
        );
        assert_eq!(
            integer_header(&headers, "x-retry-count"),
            None,
            "{case}: dead-lettered at once, without a retry"
        );
    }

    // The worker goes on consuming.
    client.publish(&purchase("m-buy", "mal", "p1", "25")).await;
    let recorded = client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    assert_eq!(recorded[0]["data"]["available"], "25.00");
    assert_eq!(
        client
            .outbound_of("training-credits.account.opened")
            .iter()
            .filter(|e| e["data"]["account_id"] == "mal-other")
            .count(),
        0,
        "the conflicting message changed nothing"
    );
    assert_eq!(available(&store, "mal-other").await, None);
    assert_eq!(client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    assert_verified(&store).await;
}

// 2. Messages that refer to what is not known yet.

/// Publishes `message`, which refers to something never known, and checks it
/// goes through every delay queue, then to the dead letters with `reason`.
async fn assert_retried_then_dead(client: &Client, message: &Value, reason: &str) {
    let published = Instant::now();
    client.publish(message).await;
    await_dead_letters(client, 1, SOON).await;
    let waited = published.elapsed();
    assert!(
        waited >= ALL_RETRY_DELAYS,
        "dead-lettered after {waited:?}, before the retry delays had passed"
    );
    let letters = client.dead_letter_deliveries().await;
    assert_eq!(letters.len(), 1);
    let headers = headers_of(&letters[0]);
    assert_eq!(text_header(&headers, "x-error-reason"), reason);
    assert!(!text_header(&headers, "x-error-detail").trim().is_empty());
    assert_eq!(
        integer_header(&headers, "x-retry-count"),
        Some(2),
        "one retry per delay of RETRY_DELAYS"
    );
    assert_eq!(
        text_header(&headers, "x-original-routing-key"),
        message["type"].as_str().expect("a type"),
        "the dead letter names the routing key it was published with"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&letters[0].data).expect("the body is JSON"),
        *message,
        "the body is kept as sent"
    );
}

async fn a_purchase_for_an_unknown_account_is_retried_then_dead_lettered_unknown_account<
    S: Store,
>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    assert_retried_then_dead(
        &rig.client,
        &purchase("u-buy", "nobody", "p1", "10"),
        "unknown_account",
    )
    .await;
    assert!(
        rig.client
            .outbound_of("training-credits.purchase.recorded")
            .is_empty()
    );
    rig.worker.stop().await;
    assert_eq!(available(&store, "nobody").await, None);
    assert_verified(&store).await;
}

async fn a_refund_of_a_purchase_never_recorded_is_retried_then_dead_lettered_unknown_purchase<
    S: Store,
>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    rig.client
        .publish(&opened("r-open", "shop1", &["boss@shop1.test"]))
        .await;
    rig.client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    let refund = event(
        "r-refund",
        "shop",
        "credits.purchase.refunded",
        json!({
            "account_id": "shop1", "purchase_id": "never", "refund_id": "rf1",
            "refunded_at": Ts::now(),
        }),
    );
    assert_retried_then_dead(&rig.client, &refund, "unknown_purchase").await;
    assert!(
        rig.client
            .outbound_of("training-credits.purchase.refunded")
            .is_empty()
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

async fn an_approval_of_an_unknown_request_is_retried_then_dead_lettered_unknown_request<
    S: Store,
>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let approval = event(
        "u-approve",
        "portal",
        "credits.redemption.approved",
        json!({"request_id": "no-such-request", "approver": "boss@nowhere.test"}),
    );
    assert_retried_then_dead(&rig.client, &approval, "unknown_request").await;
    assert!(
        rig.client
            .outbound_of("training-credits.redemption.approved")
            .is_empty()
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

async fn a_purchase_that_overtakes_its_account_opening_is_applied_after_a_retry<S: Store>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    client.publish(&purchase("o-buy", "late", "p1", "40")).await;
    // The purchase waits in a delay queue: the account is not known yet.
    let delay_queues = [
        retry_queue(Duration::from_millis(200)),
        retry_queue(Duration::from_millis(400)),
    ];
    eventually(SOON, "the purchase in a delay queue", || async {
        let mut waiting = 0;
        for queue in &delay_queues {
            waiting += client.ready_in(queue).await;
        }
        waiting == 1
    })
    .await;
    client
        .publish(&opened("o-open", "late", &["boss@late.test"]))
        .await;

    let recorded = client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    assert_eq!(recorded[0]["data"]["purchase_id"], "p1");
    assert_eq!(recorded[0]["data"]["available"], "40.00");
    let order: Vec<Value> = client
        .outbound()
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(
        order,
        [
            "training-credits.account.opened",
            "training-credits.purchase.recorded"
        ],
        "the purchase is applied once, after the opening"
    );
    assert_eq!(client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    assert_eq!(available(&store, "late").await.as_deref(), Some("40.00"));
    assert_verified(&store).await;
}

// 3. Redelivery.

fn mails_about(smtp: &SmtpSink, purchase_id: &str) -> usize {
    let needle = format!("(purchase {purchase_id})");
    smtp.mails()
        .iter()
        .filter(|m| m.text.contains(&needle))
        .count()
}

async fn a_message_delivered_twice_yields_one_event_and_one_email<S: Store>(store: S, url: String) {
    let smtp = SmtpSink::start_new().await;
    let rig = rig(&store, &url, Some(&smtp)).await;
    let client = &rig.client;
    client
        .publish(&opened("d-open", "twice", &["boss@twice.test"]))
        .await;
    let first = purchase("d-buy-1", "twice", "p1", "30");
    // Back to back (most likely in one batch), then once more later (in a
    // batch of its own).
    client.publish(&first).await;
    client.publish(&first).await;
    client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    eventually(SOON, "the purchase email", || async {
        mails_about(&smtp, "p1") >= 1
    })
    .await;
    client.publish(&first).await;

    // A later message: once its event and email are out, and nothing waits
    // in the outbox, whatever the repeats could have caused would be out too.
    client
        .publish(&purchase("d-buy-2", "twice", "p2", "5"))
        .await;
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;
    eventually(SOON, "the second purchase email", || async {
        mails_about(&smtp, "p2") >= 1
    })
    .await;
    eventually(SOON, "an empty outbox", || async {
        store
            .pending_outbox(10)
            .await
            .expect("the outbox")
            .is_empty()
    })
    .await;

    let recorded = client.outbound_of("training-credits.purchase.recorded");
    let purchases: Vec<&Value> = recorded.iter().map(|e| &e["data"]["purchase_id"]).collect();
    assert_eq!(purchases, ["p1", "p2"], "one event per purchase");
    assert_eq!(mails_about(&smtp, "p1"), 1, "one email for the purchase");
    assert_eq!(mails_about(&smtp, "p2"), 1);
    assert_eq!(smtp.received().len(), 2);
    assert_eq!(client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    assert_eq!(available(&store, "twice").await.as_deref(), Some("35.00"));
    assert_verified(&store).await;
}

// 4. SMTP down.

async fn emails_wait_while_the_smtp_server_is_down_and_go_out_once_when_it_is_back<S: Store>(
    store: S,
    url: String,
) {
    let mut smtp = SmtpSink::start_new().await;
    smtp.stop();
    let rig = rig(&store, &url, Some(&smtp)).await;
    let client = &rig.client;
    client
        .publish(&opened(
            "s-open",
            "down",
            &["ann@down.test", "bob@down.test"],
        ))
        .await;
    client
        .publish(&purchase("s-buy-1", "down", "p1", "10"))
        .await;
    client
        .publish(&purchase("s-buy-2", "down", "p2", "20"))
        .await;
    // Outbound events do not wait for the emails.
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;

    // Two purchases, two owners: four emails, each tried and failed twice.
    eventually(SOON, "four emails tried twice and waiting", || async {
        let waiting = waiting_emails(&store).await;
        waiting.len() == 4 && waiting.iter().all(|(_, attempts)| *attempts >= 2)
    })
    .await;
    let expected: BTreeSet<String> = waiting_emails(&store)
        .await
        .iter()
        .map(|(email, _)| bare_message_id(&email.message_id))
        .collect();
    assert_eq!(expected.len(), 4, "each email has its own Message-ID");
    assert!(smtp.received().is_empty());

    smtp.start().await;
    eventually(SOON, "the four emails", || async {
        smtp.received().len() >= 4
    })
    .await;
    eventually(SOON, "no email left waiting", || async {
        waiting_emails(&store).await.is_empty()
    })
    .await;
    let received: Vec<String> = smtp
        .mails()
        .iter()
        .map(|m| bare_message_id(&m.message_id))
        .collect();
    assert_eq!(received.len(), 4, "each email sent once: {received:?}");
    assert_eq!(
        received.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the emails sent are those that waited"
    );
    let mut recipients: Vec<String> = smtp.mails().into_iter().map(|m| m.to).collect();
    recipients.sort();
    assert_eq!(
        recipients,
        [
            "ann@down.test",
            "ann@down.test",
            "bob@down.test",
            "bob@down.test"
        ]
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

/// The broker refuses the outbound events for a moment (their exchange is
/// gone, until the dispatcher declares it again): the emails of the same
/// causes go out regardless, not after the dispatcher's lease runs out.
async fn emails_go_out_while_the_broker_refuses_the_outbound_events<S: Store>(
    store: S,
    url: String,
) {
    let smtp = SmtpSink::start_new().await;
    let rig = rig(&store, &url, Some(&smtp)).await;
    let client = &rig.client;
    client
        .publish(&opened("b-open", "held", &["boss@held.test"]))
        .await;
    // The dispatcher is connected once it has published an event.
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    client
        .channel
        .exchange_delete(
            OUTBOUND_EXCHANGE.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .expect("the outbound exchange deleted");

    client.publish(&purchase("b-buy", "held", "p1", "15")).await;
    eventually(SOON, "the purchase email", || async {
        mails_about(&smtp, "p1") == 1
    })
    .await;
    // The event follows once the dispatcher has declared the exchange again.
    eventually(SOON, "an empty outbox", || async {
        store
            .pending_outbox(10)
            .await
            .expect("the outbox")
            .is_empty()
    })
    .await;
    assert_eq!(mails_about(&smtp, "p1"), 1);
    rig.worker.stop().await;
    assert_eq!(available(&store, "held").await.as_deref(), Some("15.00"));
    assert_verified(&store).await;
}

// 5. `dlq list` and `dlq replay`, the real binary.

async fn cli(vhost: &Vhost, database_url: &str, args: &[&str]) -> std::process::Output {
    let amqp_url = vhost.url();
    let database_url = database_url.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_training-credits"))
            .args(&args)
            .env("AMQP_URL", amqp_url)
            .env("DATABASE_URL", database_url)
            .env("RETRY_DELAYS", "200ms,400ms")
            .env_remove("SMTP_URL")
            .output()
            .expect("the binary runs")
    });
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the command ends in time")
        .expect("the command's thread")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn dlq_replay_sends_dead_letters_back_once_their_cause_is_fixed<S: Store>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    client
        .publish(&purchase("r-buy-a", "acct-a", "pa", "12.50"))
        .await;
    client
        .publish(&purchase("r-buy-b", "acct-b", "pb", "7"))
        .await;
    await_dead_letters(client, 2, SOON).await;

    // `dlq list` names each one and removes nothing.
    let listed = cli(&rig.vhost, &url, &["dlq", "list"]).await;
    assert!(listed.status.success(), "dlq list: {}", stderr(&listed));
    let text = stdout(&listed);
    assert_eq!(text.lines().count(), 2, "{text}");
    for id in ["r-buy-a", "r-buy-b"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{id}\t")))
            .unwrap_or_else(|| panic!("{id} is listed: {text}"));
        assert!(
            line.contains("credits.purchase.completed") && line.contains("unknown_account"),
            "{line}"
        );
    }
    let listed = cli(&rig.vhost, &url, &["dlq", "list", "--json"]).await;
    assert!(
        listed.status.success(),
        "dlq list --json: {}",
        stderr(&listed)
    );
    let entries: Vec<Value> = stdout(&listed)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(entries.len(), 2);
    for entry in &entries {
        assert_eq!(entry["type"], "credits.purchase.completed");
        assert_eq!(entry["x-error-reason"], "unknown_account");
        assert!(
            entry["x-error-detail"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
        assert!(entry["when"].as_str().is_some());
    }
    let mut ids: Vec<&str> = entries.iter().filter_map(|e| e["id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["r-buy-a", "r-buy-b"]);
    assert_eq!(
        client.dead_letter_count().await,
        2,
        "listing removes nothing"
    );

    // Neither ids nor --all: a failure, explained on one line.
    let refused = cli(&rig.vhost, &url, &["dlq", "replay"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused).trim().lines().count(),
        1,
        "{}",
        stderr(&refused)
    );
    assert_eq!(client.dead_letter_count().await, 2);

    // The cause is fixed, then one is replayed by its id.
    client
        .publish(&opened("r-open-a", "acct-a", &["boss@a.test"]))
        .await;
    client
        .publish(&opened("r-open-b", "acct-b", &["boss@b.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 2)
        .await;
    let replayed = cli(&rig.vhost, &url, &["dlq", "replay", "r-buy-a"]).await;
    assert!(
        replayed.status.success(),
        "dlq replay: {}",
        stderr(&replayed)
    );
    let recorded = client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    assert_eq!(recorded[0]["data"]["purchase_id"], "pa");
    assert_eq!(recorded[0]["data"]["available"], "12.50");
    assert_eq!(available(&store, "acct-a").await.as_deref(), Some("12.50"));
    eventually(SOON, "the other dead letter kept", || async {
        client.dead_letter_count().await == 1
    })
    .await;
    let listed = cli(&rig.vhost, &url, &["dlq", "list", "--json"]).await;
    let left: Vec<Value> = stdout(&listed)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], "r-buy-b");

    // --all replays the rest.
    let replayed = cli(&rig.vhost, &url, &["dlq", "replay", "--all"]).await;
    assert!(
        replayed.status.success(),
        "dlq replay --all: {}",
        stderr(&replayed)
    );
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;
    assert_eq!(available(&store, "acct-b").await.as_deref(), Some("7.00"));
    assert_eq!(client.dead_letter_count().await, 0);
    assert_eq!(
        client
            .outbound_of("training-credits.purchase.recorded")
            .len(),
        2,
        "each replayed purchase applied once"
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

/// How long a `dlq` command may take: it handles a handful of letters.
const DLQ_LIMIT: Duration = Duration::from_secs(60);

/// Runs `training-credits dlq ARGS…` on the rig's vhost and `url` to its
/// end, killed (and the test failed) if it has not ended within
/// [`DLQ_LIMIT`].
async fn dlq(rig: &Rig, url: &str, args: &[&str]) -> Finished {
    let args: Vec<&str> = ["dlq"].iter().chain(args).copied().collect();
    Site::new(url, &rig.vhost).output(&args, DLQ_LIMIT).await
}

async fn dlq_replay_all_ends_when_replayed_letters_die_again_and_says_how_many_it_replayed<
    S: Store,
>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    // Letters that die again at once, however often they are replayed.
    for n in 0..3 {
        client
            .publish_bytes(
                "credits.purchase.completed",
                format!("{{broken {n}").as_bytes(),
            )
            .await;
    }
    for n in 0..2 {
        client
            .publish(&event(
                &format!("u-{n}"),
                "portal",
                "credits.bogus",
                json!({}),
            ))
            .await;
    }
    // And one whose cause is then fixed.
    client.publish(&purchase("r-buy", "acct", "p1", "5")).await;
    await_dead_letters(client, 6, SOON).await;
    client
        .publish(&opened("r-open", "acct", &["boss@acct.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;

    let replayed = dlq(&rig, &url, &["replay", "--all"]).await;
    assert_eq!(replayed.code(), Some(0), "{}", replayed.stderr);
    assert!(
        replayed.stderr.contains("Replayed 6 dead letters, left 0."),
        "{}",
        replayed.stderr
    );
    client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    await_dead_letters(client, 5, SOON).await;
    let listed = dlq(&rig, &url, &["list", "--json"]).await;
    assert_eq!(listed.code(), Some(0), "{}", listed.stderr);
    let mut reasons: Vec<String> = listed
        .stdout
        .lines()
        .map(|l| {
            let entry: Value = serde_json::from_str(l).expect("a JSON line");
            entry["x-error-reason"].as_str().unwrap_or("-").to_owned()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "invalid_json",
            "invalid_json",
            "invalid_json",
            "unknown_type",
            "unknown_type"
        ],
        "the letters that died again are kept, once each"
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

/// The entries `dlq list --json ARGS…` prints.
async fn listed(rig: &Rig, url: &str, args: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = ["list", "--json"].iter().chain(args).copied().collect();
    let listed = dlq(rig, url, &args).await;
    assert_eq!(listed.code(), Some(0), "dlq {args:?}: {}", listed.stderr);
    listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The ids of `entries`, sorted.
fn ids_of(entries: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = entries
        .iter()
        .map(|e| e["id"].as_str().unwrap_or("-").to_owned())
        .collect();
    ids.sort();
    ids
}

async fn dlq_list_and_replay_take_only_the_letters_of_the_reason_and_type_given<S: Store>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    client
        .publish(&purchase("r-buy-a", "acct", "pa", "5"))
        .await;
    client
        .publish(&purchase("r-buy-b", "acct", "pb", "7"))
        .await;
    client
        .publish(&event(
            "r-approve",
            "portal",
            "credits.redemption.approved",
            json!({"request_id": "ghost", "approver": "boss@acct.test"}),
        ))
        .await;
    client
        .publish(&event("r-bogus", "portal", "credits.bogus", json!({})))
        .await;
    await_dead_letters(client, 4, SOON).await;

    let by_reason = listed(&rig, &url, &["--reason", "unknown_account"]).await;
    assert_eq!(ids_of(&by_reason), ["r-buy-a", "r-buy-b"]);
    let by_type = listed(&rig, &url, &["--type", "credits.redemption.approved"]).await;
    assert_eq!(ids_of(&by_type), ["r-approve"]);
    assert_eq!(by_type[0]["x-error-reason"], "unknown_request");
    let both = listed(
        &rig,
        &url,
        &["--reason", "unknown_account", "--type", "credits.bogus"],
    )
    .await;
    assert!(both.is_empty(), "{both:?}");
    assert_eq!(
        listed(&rig, &url, &[]).await.len(),
        4,
        "listing removes nothing"
    );

    // By id, narrowed: an id of another reason is not replayed.
    let replayed = dlq(
        &rig,
        &url,
        &[
            "replay",
            "r-approve",
            "r-buy-a",
            "--reason",
            "unknown_account",
        ],
    )
    .await;
    assert_eq!(replayed.code(), Some(0), "{}", replayed.stderr);
    assert!(
        replayed.stderr.contains("Replayed 1 dead letters, left 3."),
        "{}",
        replayed.stderr
    );
    // Replayed before its account exists, it is dead-lettered again.
    eventually(SOON, "r-buy-a dead again", || async {
        ids_of(&listed(&rig, &url, &["--reason", "unknown_account"]).await)
            == ["r-buy-a", "r-buy-b"]
    })
    .await;

    // --all, narrowed by both, once the cause is fixed.
    client
        .publish(&opened("r-open", "acct", &["boss@acct.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    let replayed = dlq(
        &rig,
        &url,
        &[
            "replay",
            "--all",
            "--reason",
            "unknown_account",
            "--type",
            "credits.purchase.completed",
        ],
    )
    .await;
    assert_eq!(replayed.code(), Some(0), "{}", replayed.stderr);
    assert!(
        replayed.stderr.contains("Replayed 2 dead letters, left 2."),
        "{}",
        replayed.stderr
    );
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;
    assert_eq!(available(&store, "acct").await.as_deref(), Some("12.00"));
    assert_eq!(
        ids_of(&listed(&rig, &url, &[]).await),
        ["r-approve", "r-bogus"],
        "the others are kept"
    );
    rig.worker.stop().await;
    assert_verified(&store).await;
}

/// Publishes `event` straight to `queue`, then gives it back as a consumer
/// until the broker dead-letters it: requeued (as by a worker that keeps
/// crashing on it) until it goes over the queue's delivery limit, or
/// refused outright.
async fn dead_letter_by_rejecting(client: &Client, queue: &str, event: &Value, requeue: bool) {
    let channel = &client.channel;
    let dead = client.dead_letter_count().await;
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            event.to_string().as_bytes(),
            persistent_cloudevent(event["id"].as_str().unwrap_or_default()),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack());
    eventually(SOON, "the broker dead-letters it", || async {
        if let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            channel
                .basic_reject(
                    message.delivery.delivery_tag,
                    BasicRejectOptions { requeue },
                )
                .await
                .expect("basic.reject");
        }
        client.dead_letter_count().await > dead
    })
    .await;
}

async fn a_letter_the_broker_dead_lettered_at_its_delivery_limit_is_listed_as_such_and_replays<
    S: Store,
>(
    store: S,
    url: String,
) {
    const LIMITED_QUEUE: &str = "test.limited";
    const DELIVERY_LIMIT: i64 = 2;
    let rig = rig(&store, &url, None).await;
    let channel = &rig.client.channel;
    // A quorum queue with a delivery limit and a dead-letter path into
    // the dead-letter queue, as the worker queue may have.
    let mut arguments = FieldTable::default();
    for (name, value) in [
        ("x-queue-type", long_string("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", long_string("")),
        ("x-dead-letter-routing-key", long_string(DEAD_QUEUE)),
    ] {
        arguments.insert(ShortString::from(name), value);
    }
    channel
        .queue_declare(
            LIMITED_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("the limited queue");
    let body = opened("r-open", "acct", &["boss@acct.test"]);
    dead_letter_by_rejecting(&rig.client, LIMITED_QUEUE, &body, true).await;

    let entries = listed(&rig, &url, &[]).await;
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["id"], "r-open");
    assert_eq!(entry["type"], "credits.account.opened");
    assert_eq!(entry["x-error-reason"], "delivery_limit");
    assert_eq!(
        entry["x-error-detail"],
        format!("redelivered more than the delivery limit of {LIMITED_QUEUE}")
    );
    let when = Ts::parse(entry["when"].as_str().expect("when is text")).expect("RFC 3339");
    assert!(when <= Ts::now() && when.plus_days(1) > Ts::now(), "{when}");
    assert_eq!(
        ids_of(&listed(&rig, &url, &["--reason", "delivery_limit"]).await),
        ["r-open"]
    );
    assert!(
        listed(&rig, &url, &["--reason", "unknown_account"])
            .await
            .is_empty()
    );
    // One the broker dead-lettered for another reason says which.
    let refused = event("r-refused", "portal", "credits.bogus", json!({}));
    dead_letter_by_rejecting(&rig.client, LIMITED_QUEUE, &refused, false).await;
    let refused = listed(&rig, &url, &["--reason", "rejected"]).await;
    assert_eq!(ids_of(&refused), ["r-refused"]);
    assert_eq!(
        refused[0]["x-error-detail"],
        format!("dead-lettered by the broker from {LIMITED_QUEUE}: rejected")
    );

    // Replayed, it reaches the worker without the broker's death headers.
    let replays = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a queue for the replays");
    channel
        .queue_bind(
            replays.name().clone(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bound to the inbound exchange");
    let replayed = dlq(
        &rig,
        &url,
        &["replay", "--all", "--reason", "delivery_limit"],
    )
    .await;
    assert_eq!(replayed.code(), Some(0), "{}", replayed.stderr);
    assert!(
        replayed.stderr.contains("Replayed 1 dead letters, left 1."),
        "{}",
        replayed.stderr
    );
    rig.client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    assert_eq!(ids_of(&listed(&rig, &url, &[]).await), ["r-refused"]);
    let copy = channel
        .basic_get(replays.name().clone(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("the replayed message");
    let headers = headers_of(&copy.delivery);
    let names: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
    assert!(
        !names.iter().any(|name| name.starts_with("x-")),
        "no death header is replayed: {names:?}"
    );
    assert_eq!(copy.delivery.data, body.to_string().as_bytes());
    rig.worker.stop().await;
    assert_verified(&store).await;
}

// 6. The broker drops the worker's connection.

async fn the_worker_reconnects_when_the_broker_closes_its_connection_and_applies_each_message_once<
    S: Store,
>(
    store: S,
    url: String,
) {
    /// Purchases published at most: a bound, should the worker never recover.
    const PURCHASES_MAX: usize = 5_000;
    /// Purchases recorded before each close, and after the last one.
    const PROGRESS: usize = 10;
    let vhost = Vhost::new();
    let client = Arc::new(Client::new(&vhost).await);
    // The client's own connection is the only one before the worker starts.
    let mut keep: Vec<BrokerConnection> = Vec::new();
    eventually(SOON, "the client's connection listed", || {
        keep = tokio::task::block_in_place(|| vhost.connections());
        let listed = keep.len() == 1;
        async move { listed }
    })
    .await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let worker =
        TestWorker::start(store.clone(), config(&vhost, &url, None, mail_dir.path())).await;
    client
        .publish(&opened("c-open", "flow", &["boss@flow.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;

    // Purchases of one credit each flow until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_purchases_until(
        client.clone(),
        stop.clone(),
        ("c", "flow"),
        PURCHASES_MAX,
        Duration::from_millis(10),
    );
    let distinct_recorded = |client: &Client| {
        client
            .outbound_of("training-credits.purchase.recorded")
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect::<BTreeSet<_>>()
            .len()
    };
    // What the ledger holds shows the consumer at work (the outbound events
    // may lag behind: the dispatcher shares the database with it).
    let applied = |store: &S| {
        let store = store.clone();
        async move {
            available(&store, "flow")
                .await
                .and_then(|a| a.split('.').next()?.parse::<usize>().ok())
                .unwrap_or(0)
        }
    };
    // Twice while the purchases flow, each time once the consumer has shown
    // it consumes again.
    let mut applied_before = 0;
    for round in 1..=2 {
        let wanted = applied_before + PROGRESS;
        eventually(SOON, &format!("{wanted} purchases applied"), || async {
            applied(&store).await >= wanted
        })
        .await;
        // rabbitmqctl blocks; the worker's tasks go on on the other thread.
        let closed = tokio::task::block_in_place(|| vhost.close_connections_except(&keep));
        assert!(
            closed >= 1,
            "round {round}: the worker's connections closed"
        );
        applied_before = applied(&store).await;
    }
    let wanted = applied_before + PROGRESS;
    eventually(SOON, "purchases applied after the last close", || async {
        applied(&store).await >= wanted
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let purchases = publisher.await.expect("the purchases published");
    assert!(purchases < PURCHASES_MAX, "the flow was stopped");

    let total = format!("{purchases}.00");
    eventually(SOON, "every purchase applied", || async {
        available(&store, "flow").await.as_deref() == Some(total.as_str())
    })
    .await;
    eventually(SOON, "every purchase event out", || {
        let done = distinct_recorded(&client) >= purchases;
        async move { done }
    })
    .await;
    // At least once on the wire, exactly once in the ledger: a repeated
    // event is the same event (same id), never a second purchase.
    let mut by_purchase: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in client.outbound_of("training-credits.purchase.recorded") {
        by_purchase
            .entry(
                e["data"]["purchase_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .insert(e["id"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(by_purchase.len(), purchases);
    assert!(
        by_purchase.values().all(|ids| ids.len() == 1),
        "one event per purchase"
    );
    let addr = worker.http_addr;
    eventually(SOON, "the worker ready again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(client.dead_letter_count().await, 0);
    worker.stop().await;
    assert_eq!(available(&store, "flow").await, Some(total));
    assert_verified(&store).await;
}

// 6b. The broker refuses a dead letter.

async fn a_dead_letter_the_broker_refuses_is_kept_until_the_dead_letter_queue_takes_it<S: Store>(
    store: S,
    url: String,
) {
    let rig = rig(&store, &url, None).await;
    let client = &rig.client;
    // A full dead-letter queue that refuses what comes (publisher confirm nack).
    tokio::task::block_in_place(|| {
        rig.vhost.set_policy(
            "dead-full",
            r"^training-credits\.dead$",
            r#"{"max-length": 0, "overflow": "reject-publish"}"#,
        );
    });
    eventually(SOON, "the dead-letter queue refusing messages", || async {
        let confirm = client
            .channel
            .basic_publish(
                "".into(),
                DEAD_QUEUE.into(),
                BasicPublishOptions::default(),
                b"probe",
                BasicProperties::default(),
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
        if confirm.is_ack() {
            // Taken before the policy was in force: not a dead letter.
            client.dead_letter_deliveries().await;
        }
        confirm.is_nack()
    })
    .await;

    let body = b"{\"not\": \"closed\"".to_vec();
    client
        .publish_with("none", &body, persistent_cloudevent("refused-1"))
        .await;
    // The outage lasts a while; the worker meets it at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| rig.vhost.clear_policy("dead-full"));

    await_dead_letters(client, 1, SOON).await;
    let letters = client.dead_letter_deliveries().await;
    assert_eq!(letters.len(), 1, "one dead letter, not lost, not doubled");
    let headers = headers_of(&letters[0]);
    assert_eq!(text_header(&headers, "x-error-reason"), "invalid_json");
    assert_eq!(letters[0].data, body);
    assert!(
        integer_header(&headers, "x-delivery-count").is_some_and(|n| n >= 1),
        "the message was refused and delivered again: {headers:?}"
    );

    // The worker goes on.
    client
        .publish(&opened("f-open", "after", &["boss@after.test"]))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    assert_eq!(client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    assert_verified(&store).await;
}

// 7. Ops HTTP.

async fn health_readiness_and_metrics_are_served_over_http<S: Store>(store: S, url: String) {
    let rig = rig(&store, &url, None).await;
    let addr = rig.worker.http_addr;

    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");

    eventually(SOON, "the worker ready", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let readiness: Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    assert_eq!(
        readiness,
        json!({"ready": true, "database_reachable": true, "broker_connected": true, "consumer_running": true})
    );

    a_little_traffic(&rig.client, "ops").await;

    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let applied = metrics.lines().any(|line| {
        line.starts_with("training_credits_messages_total{")
            && line.contains("type=\"credits.account.opened\"")
            && line.contains("outcome=\"applied\"")
    });
    assert!(applied, "messages by type and outcome:\n{metrics}");
    let dead = metrics.lines().any(|line| {
        line.starts_with("training_credits_messages_total{")
            && line.contains("outcome=\"dead_letter\"")
    });
    assert!(dead, "dead-lettered messages counted:\n{metrics}");
    let dead_letters = metrics.lines().any(|line| {
        line.starts_with("training_credits_dead_letters_total{")
            && line.contains("reason=\"invalid_json\"")
    });
    assert!(dead_letters, "dead letters by reason:\n{metrics}");
    rig.worker.stop().await;
}

/// The prefix of every metric of this crate (`ops::metric`).
const METRIC_PREFIX: &str = "training_credits_";

/// Every string under a key `expr`, however deep: the queries of a Grafana
/// dashboard's panels, the expressions of Prometheus rules.
fn exprs(value: &Value) -> Vec<&str> {
    match value {
        Value::Object(fields) => fields
            .iter()
            .flat_map(|(key, value)| match (key.as_str(), value) {
                ("expr", Value::String(expr)) => vec![expr.as_str()],
                _ => exprs(value),
            })
            .collect(),
        Value::Array(values) => values.iter().flat_map(exprs).collect(),
        _ => Vec::new(),
    }
}

/// The metric names a PromQL expression uses, by a plain tokenisation:
/// every word (a run of letters, digits, `_` and `:`) that starts with
/// [`METRIC_PREFIX`]. Functions, label names, label values, durations and
/// Grafana's `$variables` never start with it.
fn metric_names(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with(METRIC_PREFIX))
}

/// A misspelt metric in the dashboard or the alert rules shows an empty
/// panel or an alert that can never fire, and nothing else says so: every
/// metric they name must be on a live `/metrics` after a little traffic (a
/// histogram's `_bucket`, `_sum` and `_count` as the histogram's).
async fn every_metric_the_dashboard_and_the_alert_rules_name_is_on_metrics<S: Store>(
    store: S,
    url: String,
) {
    let read = |path: &str| {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let dashboard: Value =
        serde_json::from_str(&read("ops/grafana/dashboard.json")).expect("the dashboard is JSON");
    let rules: Value =
        serde_saphyr::from_str(&read("ops/prometheus/alerts.yml")).expect("the rules are YAML");
    let named: BTreeMap<&str, BTreeSet<&str>> = [
        ("ops/grafana/dashboard.json", &dashboard),
        ("ops/prometheus/alerts.yml", &rules),
    ]
    .into_iter()
    .map(|(file, document)| {
        let names: BTreeSet<&str> = exprs(document).into_iter().flat_map(metric_names).collect();
        assert!(!names.is_empty(), "{file} names no metric");
        (file, names)
    })
    .collect();

    let rig = rig(&store, &url, None).await;
    a_little_traffic(&rig.client, "names").await;
    let (status, body) = http_get(rig.worker.http_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    rig.worker.stop().await;

    let samples = metrics::samples(&body);
    let exposed: BTreeSet<&str> = samples.iter().map(|s| s.metric.as_str()).collect();
    let histograms: BTreeSet<&str> = samples
        .iter()
        .filter(|s| matches!(s.value, prometheus_parse::Value::Histogram(_)))
        .map(|s| s.metric.as_str())
        .collect();
    let on_metrics = |name: &str| {
        exposed.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|histogram| histograms.contains(histogram))
            })
    };
    let missing: Vec<String> = named
        .iter()
        .flat_map(|(file, names)| {
            names
                .iter()
                .filter(|name| !on_metrics(name))
                .map(move |name| format!("{name} (in {file})"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "named but not on /metrics: {missing:?}\non /metrics: {exposed:?}"
    );
}

/// What `/metrics` shows of the outbox: rows not dispatched yet by kind,
/// and when the oldest of each kind was written.
async fn the_outbox_backlog_counts_unsent_rows_by_kind_with_the_oldest<S: Store>(
    store: S,
    _url: String,
) {
    let at = |text: &str| Ts::parse(text).expect("an instant");
    let row = |id: &str, kind, written| {
        training_credits::store::OutboxRow::new(id.to_owned(), kind, "{}".to_owned(), at(written))
    };
    assert_eq!(store.outbox_backlog().await.expect("the backlog"), vec![]);
    store
        .enqueue_outbox(&[
            row("e1", OutboxKind::Email, "2026-03-01T10:00:00Z"),
            row("e2", OutboxKind::Email, "2026-03-01T09:00:00Z"),
            row("e3", OutboxKind::Email, "2026-03-01T08:00:00Z"),
            row("v1", OutboxKind::Event, "2026-03-01T11:00:00Z"),
        ])
        .await
        .expect("rows written");
    store
        .outbox_complete("e3", &[], at("2026-03-01T12:00:00Z"))
        .await
        .expect("one sent");
    let mut backlog = store.outbox_backlog().await.expect("the backlog");
    backlog.sort_by_key(|b| b.kind.as_str());
    assert_eq!(
        backlog,
        vec![
            Backlog {
                kind: OutboxKind::Email,
                rows: 2,
                oldest: at("2026-03-01T09:00:00Z"),
            },
            Backlog {
                kind: OutboxKind::Event,
                rows: 1,
                oldest: at("2026-03-01T11:00:00Z"),
            },
        ],
        "the sent row counts no more; no report waits"
    );
}

on_both_stores!(
    malformed_messages_are_dead_lettered_at_once_with_their_reason_and_kept_whole,
    a_purchase_for_an_unknown_account_is_retried_then_dead_lettered_unknown_account,
    a_refund_of_a_purchase_never_recorded_is_retried_then_dead_lettered_unknown_purchase,
    an_approval_of_an_unknown_request_is_retried_then_dead_lettered_unknown_request,
    a_purchase_that_overtakes_its_account_opening_is_applied_after_a_retry,
    a_message_delivered_twice_yields_one_event_and_one_email,
    emails_wait_while_the_smtp_server_is_down_and_go_out_once_when_it_is_back,
    emails_go_out_while_the_broker_refuses_the_outbound_events,
    dlq_replay_sends_dead_letters_back_once_their_cause_is_fixed,
    dlq_replay_all_ends_when_replayed_letters_die_again_and_says_how_many_it_replayed,
    dlq_list_and_replay_take_only_the_letters_of_the_reason_and_type_given,
    a_letter_the_broker_dead_lettered_at_its_delivery_limit_is_listed_as_such_and_replays,
    the_worker_reconnects_when_the_broker_closes_its_connection_and_applies_each_message_once,
    a_dead_letter_the_broker_refuses_is_kept_until_the_dead_letter_queue_takes_it,
    health_readiness_and_metrics_are_served_over_http,
    every_metric_the_dashboard_and_the_alert_rules_name_is_on_metrics,
    the_outbox_backlog_counts_unsent_rows_by_kind_with_the_oldest,
);

/// One account opened (its event out) and one message dead-lettered, so
/// that `/metrics` has a sample of each kind of series.
async fn a_little_traffic(client: &Client, account: &str) {
    let owner = format!("boss@{account}.test");
    client
        .publish(&opened(
            &format!("{account}-open"),
            account,
            &[owner.as_str()],
        ))
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    client.publish_bytes("none", b"not json at all").await;
    await_dead_letters(client, 1, SOON).await;
}
