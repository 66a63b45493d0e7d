//! The broker topology of SPEC §4, plus the retry plumbing: one delay queue
//! per step of `RETRY_DELAYS`, whose messages expire back into the worker
//! queue. Declaring is idempotent, so every worker does it at start, and so
//! do the commands that publish.
//!
//! The worker queue is a quorum queue with a delivery limit and a dead-letter
//! route to `training-credits.dead`: RabbitMQ 4.x drops a message redelivered
//! more than its limit (20 by default) unless the queue has a dead-letter
//! target. A worker queue declared before it had them cannot be declared
//! with them (the broker answers PRECONDITION_FAILED); [`declare`] leaves such
//! a queue as it is and says so, and the worker replaces it
//! ([`super::upgrade`]).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

pub const INBOUND_EXCHANGE: &str = "training-credits.in";
pub const WORKER_QUEUE: &str = "training-credits.worker";
pub const DEAD_QUEUE: &str = "training-credits.dead";
pub const OUTBOUND_EXCHANGE: &str = "training-credits.out";

/// Deliveries of one message the worker queue allows before it dead-letters
/// it with reason `delivery_limit`: a message that keeps crashing the worker
/// (or its connection) would otherwise be redelivered for ever on 3.x and
/// dropped on 4.x. 20 is 4.x's own default, so the limit is the same on every
/// broker; a healthy message is returned only when a worker stops or loses
/// its connection with it in hand, far fewer times than that.
pub const DELIVERY_LIMIT: i64 = 20;

/// The delay queue for one retry step. The delay is in the name: a changed
/// `RETRY_DELAYS` declares new queues instead of clashing with old ones.
pub fn retry_queue(delay: Duration) -> String {
    format!("training-credits.retry.{}ms", delay.as_millis())
}

pub fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

fn arguments(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

/// What [`declare`] found of the worker queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerQueue {
    /// Declared with its delivery limit and dead-letter route, and bound.
    Protected,
    /// A queue of that name exists with other arguments (a deployment from
    /// before the delivery limit); it is left as it is, bindings included.
    Outdated,
}

/// Declares the topology on channels of its own (a refused declaration
/// closes the channel it was made on). An outdated worker queue keeps no
/// one from the rest.
pub async fn declare(
    connection: &Connection,
    retry_delays: &[Duration],
) -> Result<WorkerQueue, lapin::Error> {
    let worker_queue = declare_protected(connection, WORKER_QUEUE).await?;
    let channel = connection.create_channel().await?;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in [INBOUND_EXCHANGE, OUTBOUND_EXCHANGE] {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    if worker_queue == WorkerQueue::Protected {
        bind_inbound(&channel, WORKER_QUEUE).await?;
    }
    channel
        .queue_declare(
            DEAD_QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    for delay in retry_delays {
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        channel
            .queue_declare(
                retry_queue(*delay).as_str().into(),
                QueueDeclareOptions::durable(),
                arguments(&[
                    ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
                    ("x-dead-letter-exchange", long_string("")),
                    ("x-dead-letter-routing-key", long_string(WORKER_QUEUE)),
                ]),
            )
            .await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(worker_queue)
}

/// Declares `queue` as a queue of inbound messages (the worker queue, or a
/// holding queue of an upgrade) with the delivery limit and the dead-letter
/// route, on a channel of its own, closed when done; `Outdated` when a queue
/// of that name has other arguments.
///
/// Dead-lettering is `at-least-once`: the broker keeps a message until the
/// dead-letter queue has confirmed it (SPEC: nothing is ever dropped). That
/// strategy requires `x-overflow=reject-publish`, which changes nothing
/// here: the queue has no length limit to overflow.
pub(crate) async fn declare_protected(
    connection: &Connection,
    queue: &str,
) -> Result<WorkerQueue, lapin::Error> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            arguments(&[
                ("x-queue-type", long_string("quorum")),
                ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ("x-dead-letter-exchange", long_string("")),
                ("x-dead-letter-routing-key", long_string(DEAD_QUEUE)),
                ("x-dead-letter-strategy", long_string("at-least-once")),
                ("x-overflow", long_string("reject-publish")),
            ]),
        )
        .await;
    match declared {
        Ok(_) => {}
        Err(error) if is_refusal(&error, AMQPSoftError::PRECONDITIONFAILED) => {
            return Ok(WorkerQueue::Outdated);
        }
        Err(error) => return Err(error),
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(WorkerQueue::Protected)
}

/// Binds `queue` to the inbound exchange with `#`: every inbound event.
pub(crate) async fn bind_inbound(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Whether `error` is the broker closing the channel with `code`.
pub(crate) fn is_refusal(error: &lapin::Error, code: AMQPSoftError) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(code))
}
