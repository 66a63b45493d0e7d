//! `training-credits dlq list` and `dlq replay`: the dead letters, read
//! without removing them, and sent back for processing once their cause is
//! fixed. Each command handles the letters that were in
//! `training-credits.dead` when it started, and no more: a replayed letter
//! that dies again lands behind them, so `replay` always ends. A message is
//! removed only after the broker confirmed its replay.

use std::process::ExitCode;

use anyhow::{Context, bail};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, DeliveryTag, FieldTable};
use lapin::{Channel, Connection};
use serde_json::{Value, json};

use super::DlqFilter;
use crate::broker::topology::{DEAD_QUEUE, INBOUND_EXCHANGE};
use crate::broker::{broker_user, connect, header_text, resent};
use crate::config::Config;
use crate::domain::Ts;

/// Dead letters read per command, at most: a bound on memory and time.
const DEAD_LETTERS_MAX: u32 = 100_000;

fn header(delivery: &Delivery, name: &str) -> Option<String> {
    header_text(delivery.properties.headers().as_ref()?, name)
}

/// The broker's record of the letter's latest death, for a letter the
/// broker dead-lettered itself (a quorum queue's delivery limit), which has
/// no `x-error-*` headers. RabbitMQ keeps one `x-death` entry per queue and
/// reason, the latest first, so this is the death that put it here.
fn last_death(delivery: &Delivery) -> Option<&FieldTable> {
    let headers = delivery.properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(death) => Some(death),
        _ => None,
    }
}

/// What an operator reads of a death the broker recorded. The delivery
/// limit itself is a queue argument, which AMQP cannot read back and the
/// broker does not copy into the letter, so the detail names the queue.
fn death_detail(death: &FieldTable) -> String {
    let reason = header_text(death, "reason").unwrap_or_default();
    let queue = header_text(death, "queue").unwrap_or_default();
    if reason == "delivery_limit" {
        format!("redelivered more than the delivery limit of {queue}")
    } else {
        format!("dead-lettered by the broker from {queue}: {reason}")
    }
}

/// When the broker recorded a death: `time`, in whole seconds.
fn death_time(death: &FieldTable) -> Option<String> {
    let AMQPValue::Timestamp(seconds) = death.inner().get("time")? else {
        return None;
    };
    let micros = i64::try_from(*seconds).ok()?.checked_mul(1_000_000)?;
    Ts::from_micros(micros).map(|t| t.to_string())
}

/// One dead letter as `dlq list` shows it: what the worker wrote in its
/// `x-error-*` headers or, for a letter the broker dead-lettered, what the
/// broker recorded in `x-death`.
pub fn describe(delivery: &Delivery) -> Value {
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let id = field("id").or_else(|| {
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
    });
    let death = last_death(delivery);
    json!({
        "id": id,
        "type": field("type").or_else(|| header(delivery, "x-original-routing-key")),
        "x-error-reason": header(delivery, "x-error-reason")
            .or_else(|| death.and_then(|d| header_text(d, "reason"))),
        "x-error-detail": header(delivery, "x-error-detail")
            .or_else(|| death.map(death_detail)),
        "when": header(delivery, "x-dead-lettered-at").or_else(|| death.and_then(death_time)),
    })
}

impl DlqFilter {
    /// Whether `--reason` and `--type` keep this dead letter.
    fn keeps(&self, entry: &Value) -> bool {
        let is = |wanted: &Option<String>, name: &str| {
            wanted
                .as_deref()
                .is_none_or(|wanted| entry[name].as_str() == Some(wanted))
        };
        is(&self.reason, "x-error-reason") && is(&self.type_name, "type")
    }
}

/// Headers the worker or the broker added when the letter died. A replay
/// sends the message afresh: the worker counts its retries, and the broker
/// its deliveries and deaths, from zero again.
fn is_death_header(name: &str) -> bool {
    name.starts_with("x-error-")
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || matches!(
            name,
            "x-death"
                | "x-delivery-count"
                | "x-dead-lettered-at"
                | "x-retry-count"
                | "x-retry-reason"
                | "x-original-routing-key"
        )
}

fn line(entry: &Value) -> String {
    let text = |name: &str| entry[name].as_str().unwrap_or("-").to_owned();
    format!(
        "{}\t{}\t{}\t{}\t{}",
        text("id"),
        text("type"),
        text("x-error-reason"),
        text("x-error-detail"),
        text("when")
    )
}

/// The dead-letter queue as one command sees it: the letters that were in
/// it when the command started, read one at a time. Letters kept stay
/// unacknowledged, so none is read twice, and go back at the end in order.
struct DeadLetters {
    connection: Connection,
    channel: Channel,
    /// How many were in the queue at the start.
    at_start: u32,
    /// How many this command reads: those, up to [`DEAD_LETTERS_MAX`].
    to_read: u32,
    read: u32,
    kept: u32,
    /// The broker user this command publishes as.
    user: String,
    last_kept: Option<DeliveryTag>,
}

impl DeadLetters {
    async fn open(config: &Config) -> anyhow::Result<DeadLetters> {
        let (connection, channel) = connect(&config.amqp_url, &config.retry_delays)
            .await
            .context("cannot reach the broker")?;
        let queue = channel
            .queue_declare(
                DEAD_QUEUE.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(DeadLetters {
            connection,
            channel,
            at_start: queue.message_count(),
            to_read: queue.message_count().min(DEAD_LETTERS_MAX),
            read: 0,
            kept: 0,
            last_kept: None,
            user: broker_user(&config.amqp_url),
        })
    }

    /// The next of the letters there at the start, if any is left.
    async fn next(&mut self) -> anyhow::Result<Option<Delivery>> {
        if self.read == self.to_read {
            return Ok(None);
        }
        let message = self
            .channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions::default())
            .await?;
        self.read += 1;
        Ok(message.map(|m| m.delivery))
    }

    fn keep(&mut self, delivery: &Delivery) {
        self.kept += 1;
        self.last_kept = Some(delivery.delivery_tag);
    }

    /// How many letters this command leaves in the queue: those it kept and
    /// those beyond [`DEAD_LETTERS_MAX`].
    fn left(&self) -> u32 {
        self.kept + (self.at_start - self.to_read)
    }

    /// Puts every kept letter back, in order, and closes the connection.
    async fn close(self) -> anyhow::Result<()> {
        // The letters acknowledged (replayed) are gone already, so
        // everything unacknowledged up to the last kept one is what was kept.
        if let Some(tag) = self.last_kept {
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await?;
        }
        let _ = self.connection.close(200, "done".into()).await;
        Ok(())
    }
}

pub async fn list(
    config: &Config,
    json_lines: bool,
    filter: &DlqFilter,
) -> anyhow::Result<ExitCode> {
    let mut letters = DeadLetters::open(config).await?;
    while let Some(delivery) = letters.next().await? {
        let entry = describe(&delivery);
        if filter.keeps(&entry) {
            println!(
                "{}",
                if json_lines {
                    entry.to_string()
                } else {
                    line(&entry)
                }
            );
        }
        letters.keep(&delivery);
    }
    letters.close().await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(
    config: &Config,
    all: bool,
    ids: &[String],
    filter: &DlqFilter,
) -> anyhow::Result<ExitCode> {
    if !all && ids.is_empty() {
        bail!("name the dead letters to replay by id, or give --all");
    }
    let mut letters = DeadLetters::open(config).await?;
    let progress = super::progress(
        usize::try_from(letters.to_read).unwrap_or(usize::MAX),
        "dead letters",
    );
    let mut replayed = 0_u32;
    while let Some(delivery) = letters.next().await? {
        progress.inc(1);
        let entry = describe(&delivery);
        let chosen = filter.keeps(&entry)
            && (all
                || entry["id"]
                    .as_str()
                    .is_some_and(|id| ids.iter().any(|i| i == id)));
        if !chosen {
            letters.keep(&delivery);
            continue;
        }
        let mut headers = FieldTable::default();
        if let Some(original) = delivery.properties.headers() {
            for (name, value) in original {
                if !is_death_header(name.as_str()) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        let routing_key = entry["type"].as_str().unwrap_or_default();
        let confirm = letters
            .channel
            .basic_publish(
                INBOUND_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &delivery.data,
                resent(&delivery, &headers, &letters.user),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("the broker refused a replayed message");
        }
        letters
            .channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed += 1;
    }
    progress.finish_and_clear();
    let left = letters.left();
    letters.close().await?;
    eprintln!("Replayed {replayed} dead letters, left {left}.");
    Ok(ExitCode::SUCCESS)
}
