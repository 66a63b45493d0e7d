//! The broker topology of SPEC §4, plus the retry plumbing: one delay queue
//! per step of `RETRY_DELAYS`, whose messages expire back into the worker
//! queue. Declaring is idempotent, so every worker does it at start.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

pub const INBOUND_EXCHANGE: &str = "training-credits.in";
pub const WORKER_QUEUE: &str = "training-credits.worker";
pub const DEAD_QUEUE: &str = "training-credits.dead";
pub const OUTBOUND_EXCHANGE: &str = "training-credits.out";

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

pub async fn declare(channel: &Channel, retry_delays: &[Duration]) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
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
    channel
        .queue_declare(
            WORKER_QUEUE.into(),
            durable_queue,
            arguments(&[("x-queue-type", long_string("quorum"))]),
        )
        .await?;
    channel
        .queue_bind(
            WORKER_QUEUE.into(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(DEAD_QUEUE.into(), durable_queue, FieldTable::default())
        .await?;
    for delay in retry_delays {
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        channel
            .queue_declare(
                retry_queue(*delay).as_str().into(),
                durable_queue,
                arguments(&[
                    ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
                    ("x-dead-letter-exchange", long_string("")),
                    ("x-dead-letter-routing-key", long_string(WORKER_QUEUE)),
                ]),
            )
            .await?;
    }
    Ok(())
}
