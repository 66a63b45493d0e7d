//! RabbitMQ: loading a queue, publishing at a steady rate, capturing
//! outbound events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, PublisherConfirm};
use serde_json::Value;
use training_credits::broker::persistent_cloudevent;
use training_credits::broker::topology::{OUTBOUND_EXCHANGE, long_string};

use crate::*;

/// Publishes every message to `exchange` (routing key = the message's, or
/// `queue` on the default exchange), persistent, confirms awaited per window.
pub async fn publish_all(
    channel: &Channel,
    exchange: &str,
    queue: Option<&str>,
    messages: &[Message],
) -> BenchResult<()> {
    for window in messages.chunks(CONFIRM_WINDOW) {
        let mut confirms = Vec::with_capacity(window.len());
        for message in window {
            let routing_key = queue.unwrap_or(&message.routing_key);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &message.body,
                        persistent_cloudevent(&message.id),
                    )
                    .await
                    .map_err(fail("publish"))?,
            );
        }
        all_acked(confirms).await?;
    }
    Ok(())
}

/// Waits for every confirm; a nack is a failure of the bench.
pub async fn all_acked(confirms: Vec<PublisherConfirm>) -> BenchResult<()> {
    for confirm in confirms {
        if !confirm.await.map_err(fail("confirm"))?.is_ack() {
            return Err("the broker nacked a message".to_owned());
        }
    }
    Ok(())
}

/// Publishes `messages` at `rate` per second (to `queue` if given, else by
/// their routing keys) and returns when each was published, their confirms
/// (not awaited) and the seconds the publishing took.
pub async fn publish_steadily<'m>(
    channel: &Channel,
    exchange: &str,
    queue: Option<&str>,
    messages: &'m [Message],
    rate: u32,
) -> BenchResult<(HashMap<&'m str, Instant>, Vec<PublisherConfirm>, f64)> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut sent = HashMap::with_capacity(messages.len());
    let mut confirms = Vec::with_capacity(messages.len());
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let wall = Instant::now();
    for (i, message) in messages.iter().enumerate() {
        tokio::time::sleep_until(start + period * u32::try_from(i).unwrap_or(u32::MAX)).await;
        sent.insert(message.id.as_str(), Instant::now());
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    queue.unwrap_or(&message.routing_key).into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    persistent_cloudevent(&message.id),
                )
                .await
                .map_err(fail("publish"))?,
        );
    }
    Ok((sent, confirms, wall.elapsed().as_secs_f64()))
}

pub async fn ready_in(channel: &Channel, queue: &str) -> BenchResult<u32> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("passive queue.declare"))?
        .message_count())
}

/// A channel with publisher confirms, and `queue` declared a durable
/// quorum queue (the kind the worker consumes).
pub async fn publisher_to_quorum_queue(
    connection: &Connection,
    queue: &str,
) -> BenchResult<Channel> {
    let channel = connection.create_channel().await.map_err(fail("channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail("confirm.select"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
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
        .map_err(fail("declare a quorum queue"))?;
    Ok(channel)
}

/// A queue of this connection's alone, named by the broker, gone with it.
pub async fn exclusive_queue(channel: &Channel) -> BenchResult<ShortString> {
    Ok(channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("declare a capture queue"))?
        .name()
        .clone())
}

/// Consumes `queue` (no acks) on a channel of its own and hands each
/// delivery to `record` with the instant it arrived, until the task is
/// aborted or the connection closes.
pub async fn take_arrivals(
    connection: &Connection,
    queue: ShortString,
    mut record: impl FnMut(Delivery, Instant) + Send + 'static,
) -> BenchResult<tokio::task::JoinHandle<()>> {
    let channel = connection.create_channel().await.map_err(fail("channel"))?;
    let mut deliveries = channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("consume a capture queue"))?;
    Ok(tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(delivery)) = deliveries.next().await {
            record(delivery, Instant::now());
        }
    }))
}

pub struct Arrival {
    pub causation: String,
    pub at: Instant,
}

/// Every outbound event the worker publishes, with its arrival instant.
#[derive(Default)]
pub struct Capture {
    pub arrivals: Mutex<Vec<Arrival>>,
    pub types: Mutex<BTreeMap<String, usize>>,
}

impl Capture {
    pub async fn start(connection: &Connection, channel: &Channel) -> BenchResult<Arc<Capture>> {
        let queue = exclusive_queue(channel).await?;
        channel
            .queue_bind(
                queue.clone(),
                OUTBOUND_EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("bind the capture queue"))?;
        let capture = Arc::new(Capture::default());
        let sink = capture.clone();
        take_arrivals(connection, queue, move |delivery, at| {
            let event: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
            let causation = event["data"]["causation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let kind = event["type"].as_str().unwrap_or("(unreadable)").to_owned();
            *sink
                .types
                .lock()
                .expect("capture lock")
                .entry(kind)
                .or_default() += 1;
            sink.arrivals
                .lock()
                .expect("capture lock")
                .push(Arrival { causation, at });
        })
        .await?;
        Ok(capture)
    }

    pub fn len(&self) -> usize {
        self.arrivals.lock().expect("capture lock").len()
    }
}
