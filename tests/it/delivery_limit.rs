//! The worker queue's delivery limit against the real RabbitMQ (SPEC §4): a
//! message redelivered too often ends in `training-credits.dead` with the
//! broker's reason `delivery_limit` instead of looping (3.x) or vanishing
//! (4.x), and a worker queue declared before the limit existed is upgraded by
//! the worker, also when an earlier upgrade was interrupted.
//!
//! The broker states of older deployments are written out here by hand, with
//! the names and arguments the broker holds, not taken from the code under
//! test: they are what a deployment already has.

use crate::support as common;

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use training_credits::config::Config;
use training_credits::store::Store;

use common::broker::{Client, TestWorker, Vhost, config, eventually, header};
use common::events::{opened, purchase};

const INBOUND_EXCHANGE: &str = "training-credits.in";
const WORKER_QUEUE: &str = "training-credits.worker";
/// Where an upgrade keeps the old queue's messages, and what arrives
/// meanwhile.
const BACKLOG_QUEUE: &str = "training-credits.upgrade.backlog";
const ARRIVALS_QUEUE: &str = "training-credits.upgrade.arrivals";
/// The retry step of [`slow_retry_config`]: long enough that a message put
/// in its queue is still there when the worker starts.
const RETRY_QUEUE: &str = "training-credits.retry.60000ms";
/// The delivery limit README promises.
const DELIVERY_LIMIT: usize = 20;

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

/// The arguments of the worker queue before it had a delivery limit.
fn old_worker_queue_arguments() -> FieldTable {
    table(&[("x-queue-type", text("quorum"))])
}

/// The arguments of a protected worker queue, as README lists them.
fn protected_arguments() -> FieldTable {
    table(&[
        ("x-queue-type", text("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(DELIVERY_LIMIT as i64),
        ),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("training-credits.dead")),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ])
}

/// The test configuration with one retry step of a minute.
fn slow_retry_config(vhost: &Vhost, url: &str, mail_dir: &std::path::Path) -> Config {
    let mut config = config(vhost, url, None, mail_dir);
    config.retry_delays = vec![Duration::from_secs(60)];
    config
}

/// A connection of the test's own, with a channel in confirm mode.
async fn open(vhost: &Vhost) -> (Connection, Channel) {
    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("the broker answers");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

async fn declare_queue(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap_or_else(|error| panic!("{queue} is declared: {error}"));
}

async fn bind(channel: &Channel, queue: &str) {
    channel
        .queue_bind(
            queue.into(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bound");
}

/// The topology of a deployment from before the delivery limit: the inbound
/// exchange, the worker queue with `x-queue-type=quorum` only, bound with
/// `#`, and the retry queue of [`slow_retry_config`].
async fn old_topology(channel: &Channel) {
    channel
        .exchange_declare(
            INBOUND_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the inbound exchange");
    declare_queue(channel, WORKER_QUEUE, old_worker_queue_arguments()).await;
    bind(channel, WORKER_QUEUE).await;
    declare_queue(
        channel,
        RETRY_QUEUE,
        table(&[
            ("x-message-ttl", AMQPValue::LongLongInt(60_000)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(WORKER_QUEUE)),
        ]),
    )
    .await;
}

/// Publishes `event` through the default exchange straight into `queue`,
/// confirmed, with `headers`.
async fn publish_to_queue(channel: &Channel, queue: &str, event: &Value, headers: FieldTable) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            event.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/cloudevents+json".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack(), "the broker took the message");
}

/// A message the previous worker sent to its first retry step.
fn retried_headers(routing_key: &str) -> FieldTable {
    table(&[
        ("x-retry-count", AMQPValue::LongLongInt(1)),
        ("x-original-routing-key", text(routing_key)),
    ])
}

/// Publishes one valid message into the worker queue (no worker running) and
/// rejects it with requeue from a consumer of the test's own until the
/// broker stops delivering it; returns how many times it was delivered. The
/// test then finds it in the dead letters.
async fn reject_until_the_broker_gives_up(vhost: &Vhost, client: &Client) -> usize {
    client
        .publish(&opened("poison", "poisoned", &["owner@poisoned.test"]))
        .await;
    let (connection, channel) = open(vhost).await;
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut deliveries = channel
        .basic_consume(
            WORKER_QUEUE.into(),
            "poison-rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consuming the worker queue");
    let mut delivered = 0;
    // A bound well past the limit: without one the message loops for ever.
    while delivered < 3 * DELIVERY_LIMIT {
        let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_secs(2), deliveries.next()).await
        else {
            break;
        };
        let delivery = delivery.expect("a delivery");
        delivered += 1;
        // `basic.reject`, not `basic.nack`: since RabbitMQ 4.3 only a reject
        // counts as a failed delivery attempt.
        delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .expect("rejected");
    }
    let _ = connection.close(200, "done".into()).await;
    delivered
}

/// Waits for the one dead letter of [`reject_until_the_broker_gives_up`] and
/// checks that the broker dead-lettered it for its delivery limit.
async fn assert_dead_lettered_for_its_delivery_limit(
    vhost: &Vhost,
    client: &Client,
    delivered: usize,
) {
    eventually(Duration::from_secs(10), "a dead letter", || async {
        client.dead_letter_count().await >= 1
    })
    .await;
    // What an operator sees: `dlq list` names the reason.
    let site = common::child::Site::new("sqlite://unused.db", vhost);
    let listed = site
        .output(&["dlq", "list", "--json"], Duration::from_secs(30))
        .await;
    assert_eq!(listed.code(), Some(0), "dlq list: {}", listed.stderr);
    let entries: Vec<Value> = listed
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["id"], "poison");
    assert_eq!(entries[0]["x-error-reason"], "delivery_limit");
    let letters = client.dead_letter_deliveries().await;
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0];
    let body: Value = serde_json::from_slice(&letter.data).expect("the body is kept");
    assert_eq!(body["id"], "poison");
    let headers = letter.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        header(&headers, "x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        header(&headers, "x-first-death-queue").as_deref(),
        Some(WORKER_QUEUE)
    );
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("an x-death header: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("an x-death entry: {deaths:?}");
    };
    assert_eq!(header(death, "reason").as_deref(), Some("delivery_limit"));
    // Delivered once, then redelivered up to the limit: the next return is
    // one too many.
    assert_eq!(
        delivered,
        DELIVERY_LIMIT + 1,
        "deliveries before the dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_past_the_limit_ends_in_the_dead_letters() {
    let vhost = Vhost::new();
    // The client declares the topology, as any command of this program does.
    let client = Client::new(&vhost).await;

    let delivered = reject_until_the_broker_gives_up(&vhost, &client).await;

    assert_dead_lettered_for_its_delivery_limit(&vhost, &client, delivered).await;
    assert_eq!(client.ready_count(WORKER_QUEUE).await, 0);
}

/// No holding queue of an upgrade is left.
fn assert_no_holding_queue(vhost: &Vhost) {
    for queue in [BACKLOG_QUEUE, ARRIVALS_QUEUE] {
        assert_eq!(vhost.queue_messages(queue), None, "{queue} is gone");
    }
}

/// Waits until the worker has recorded the opening and `purchases`
/// purchases, then checks that each produced exactly one event.
async fn assert_processed_once(client: &Client, purchases: usize) {
    client
        .await_outbound("training-credits.purchase.recorded", purchases)
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    // Long enough for a duplicate delivery to have produced a second event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client
            .outbound_of("training-credits.purchase.recorded")
            .len(),
        purchases
    );
    assert_eq!(
        client.outbound_of("training-credits.account.opened").len(),
        1
    );
}

async fn a_worker_queue_declared_before_the_limit_is_upgraded_by_the_worker<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let (connection, channel) = open(&vhost).await;
    old_topology(&channel).await;
    // The client's declaration must not trip over the old worker queue.
    let client = Client::new(&vhost).await;
    client
        .publish(&opened("e1", "acme", &["boss@acme.test"]))
        .await;
    client.publish(&purchase("e2", "acme", "p1", "10")).await;
    client.publish(&purchase("e3", "acme", "p2", "20")).await;
    let retried = purchase("e4", "acme", "p3", "30");
    publish_to_queue(
        &channel,
        RETRY_QUEUE,
        &retried,
        retried_headers("credits.purchase.completed"),
    )
    .await;
    let _ = connection.close(200, "done".into()).await;

    let worker = TestWorker::start(
        store.clone(),
        slow_retry_config(&vhost, &url, mail_dir.path()),
    )
    .await;

    assert_processed_once(&client, 3).await;
    assert_no_holding_queue(&vhost);
    assert_eq!(client.ready_count(RETRY_QUEUE).await, 0);
    worker.stop().await;
    // The queue now has its limit: the poison scenario works on it.
    let delivered = reject_until_the_broker_gives_up(&vhost, &client).await;
    assert_dead_lettered_for_its_delivery_limit(&vhost, &client, delivered).await;
    // And the new arguments are those a fresh declaration asks for.
    let (connection, channel) = open(&vhost).await;
    declare_queue(&channel, WORKER_QUEUE, protected_arguments()).await;
    let _ = connection.close(200, "done".into()).await;
}

async fn an_upgrade_interrupted_after_the_old_queue_was_unbound_is_finished<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let (connection, channel) = open(&vhost).await;
    old_topology(&channel).await;
    let client = Client::new(&vhost).await;
    client
        .publish(&opened("e1", "acme", &["boss@acme.test"]))
        .await;
    client.publish(&purchase("e2", "acme", "p1", "10")).await;
    // The state a worker left when it died after declaring the holding
    // queues, binding the arrivals queue and unbinding the old worker queue:
    // what arrives meanwhile lands in the arrivals queue only, the rest still
    // waits in the old queue; one message arrived in both before the
    // unbinding.
    declare_queue(&channel, BACKLOG_QUEUE, protected_arguments()).await;
    declare_queue(&channel, ARRIVALS_QUEUE, protected_arguments()).await;
    bind(&channel, ARRIVALS_QUEUE).await;
    client.publish(&purchase("e3", "acme", "p2", "20")).await;
    channel
        .queue_unbind(
            WORKER_QUEUE.into(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbound");
    client.publish(&purchase("e4", "acme", "p3", "30")).await;
    assert_eq!(client.ready_count(WORKER_QUEUE).await, 3);
    assert_eq!(client.ready_count(ARRIVALS_QUEUE).await, 2);
    let _ = connection.close(200, "done".into()).await;

    let worker = TestWorker::start(
        store.clone(),
        slow_retry_config(&vhost, &url, mail_dir.path()),
    )
    .await;

    assert_processed_once(&client, 3).await;
    assert_no_holding_queue(&vhost);
    worker.stop().await;
    let delivered = reject_until_the_broker_gives_up(&vhost, &client).await;
    assert_dead_lettered_for_its_delivery_limit(&vhost, &client, delivered).await;
}

async fn an_upgrade_interrupted_after_the_old_queue_was_deleted_is_finished<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    // The state a worker left when it died after moving the old queue's
    // messages into the backlog and deleting the old queue, before declaring
    // it anew; one of them had come from a retry queue.
    let (connection, channel) = open(&vhost).await;
    declare_queue(&channel, BACKLOG_QUEUE, protected_arguments()).await;
    declare_queue(&channel, ARRIVALS_QUEUE, protected_arguments()).await;
    bind(&channel, ARRIVALS_QUEUE).await;
    channel
        .queue_delete(WORKER_QUEUE.into(), QueueDeleteOptions::default())
        .await
        .expect("the worker queue is deleted");
    publish_to_queue(
        &channel,
        BACKLOG_QUEUE,
        &opened("e1", "acme", &["boss@acme.test"]),
        FieldTable::default(),
    )
    .await;
    let retried = purchase("e2", "acme", "p1", "10");
    publish_to_queue(
        &channel,
        BACKLOG_QUEUE,
        &retried,
        retried_headers("credits.purchase.completed"),
    )
    .await;
    client.publish(&purchase("e3", "acme", "p2", "20")).await;
    assert_eq!(vhost.queue_messages(WORKER_QUEUE), None);
    assert_eq!(client.ready_count(BACKLOG_QUEUE).await, 2);
    assert_eq!(client.ready_count(ARRIVALS_QUEUE).await, 1);
    let _ = connection.close(200, "done".into()).await;

    let worker = TestWorker::start(
        store.clone(),
        slow_retry_config(&vhost, &url, mail_dir.path()),
    )
    .await;

    assert_processed_once(&client, 2).await;
    assert_no_holding_queue(&vhost);
    // The new worker queue is bound: what is published now is processed.
    client.publish(&purchase("e5", "acme", "p4", "40")).await;
    assert_processed_once(&client, 3).await;
    worker.stop().await;
    let delivered = reject_until_the_broker_gives_up(&vhost, &client).await;
    assert_dead_lettered_for_its_delivery_limit(&vhost, &client, delivered).await;
}

async fn a_worker_queue_still_consumed_by_old_workers_is_upgraded_once_they_stop<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let mail_dir = tempfile::tempdir().expect("a folder");
    let (connection, channel) = open(&vhost).await;
    old_topology(&channel).await;
    let client = Client::new(&vhost).await;
    client
        .publish(&opened("e1", "acme", &["boss@acme.test"]))
        .await;
    client.publish(&purchase("e2", "acme", "p1", "10")).await;
    // A worker of the old version: it consumes and holds what it got.
    let (old_worker, old_channel) = open(&vhost).await;
    let mut held = old_channel
        .basic_consume(
            WORKER_QUEUE.into(),
            "old-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the old worker consumes");
    assert!(
        held.next().await.is_some(),
        "the old worker holds a message"
    );

    let worker = TestWorker::start(
        store.clone(),
        slow_retry_config(&vhost, &url, mail_dir.path()),
    )
    .await;
    // The worker's first attempt comes at once; a second has come by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_no_holding_queue(&vhost);
    // Still the old queue: a declaration with its old arguments is accepted.
    declare_queue(&channel, WORKER_QUEUE, old_worker_queue_arguments()).await;
    assert!(client.outbound().is_empty(), "nothing processed yet");

    // The old worker stops; what it held goes back to the queue.
    let _ = old_worker.close(200, "stopped".into()).await;

    assert_processed_once(&client, 1).await;
    assert_no_holding_queue(&vhost);
    worker.stop().await;
    let _ = connection.close(200, "done".into()).await;
    let delivered = reject_until_the_broker_gives_up(&vhost, &client).await;
    assert_dead_lettered_for_its_delivery_limit(&vhost, &client, delivered).await;
}

on_both_stores!(
    a_worker_queue_declared_before_the_limit_is_upgraded_by_the_worker,
    an_upgrade_interrupted_after_the_old_queue_was_unbound_is_finished,
    an_upgrade_interrupted_after_the_old_queue_was_deleted_is_finished,
    a_worker_queue_still_consumed_by_old_workers_is_upgraded_once_they_stop,
);
