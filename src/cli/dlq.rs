//! `training-credits dlq list` and `dlq replay`: the dead letters, read
//! without removing them, and sent back for processing once their cause is
//! fixed. A message is removed from `training-credits.dead` only after the
//! broker confirmed its replay.

use std::process::ExitCode;

use anyhow::{Context, bail};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use crate::config::Config;
use crate::consume::connect;
use crate::consume::topology::{DEAD_QUEUE, INBOUND_EXCHANGE};

/// Dead letters read per command, at most: a bound on memory and time.
const DEAD_LETTERS_MAX: usize = 100_000;

fn header(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// One dead letter as `dlq list` shows it.
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
    json!({
        "id": id,
        "type": field("type").or_else(|| header(delivery, "x-original-routing-key")),
        "x-error-reason": header(delivery, "x-error-reason"),
        "x-error-detail": header(delivery, "x-error-detail"),
        "when": header(delivery, "x-dead-lettered-at"),
    })
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

pub async fn list(config: &Config, json_lines: bool) -> anyhow::Result<ExitCode> {
    let (connection, channel) = connect(&config.amqp_url, &config.retry_delays)
        .await
        .context("cannot reach the broker")?;
    let mut last_tag = None;
    for _ in 0..DEAD_LETTERS_MAX {
        let Some(message) = channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let entry = describe(&message.delivery);
        println!(
            "{}",
            if json_lines {
                entry.to_string()
            } else {
                line(&entry)
            }
        );
        last_tag = Some(message.delivery.delivery_tag);
    }
    // Everything read goes back, in order: listing removes nothing.
    if let Some(tag) = last_tag {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(ExitCode::SUCCESS)
}

pub async fn replay(config: &Config, all: bool, ids: &[String]) -> anyhow::Result<ExitCode> {
    if !all && ids.is_empty() {
        bail!("name the dead letters to replay by id, or give --all");
    }
    let (connection, channel) = connect(&config.amqp_url, &config.retry_delays)
        .await
        .context("cannot reach the broker")?;
    let mut kept = Vec::new();
    let mut replayed = 0_usize;
    for _ in 0..DEAD_LETTERS_MAX {
        let Some(message) = channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions::default())
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let entry = describe(&delivery);
        let chosen = all
            || entry["id"]
                .as_str()
                .is_some_and(|id| ids.iter().any(|i| i == id));
        if !chosen {
            kept.push(delivery.delivery_tag);
            continue;
        }
        let mut headers = FieldTable::default();
        if let Some(original) = delivery.properties.headers() {
            for (key, value) in original.inner() {
                if !key.as_str().starts_with("x-error-")
                    && !matches!(
                        key.as_str(),
                        "x-dead-lettered-at"
                            | "x-retry-count"
                            | "x-retry-reason"
                            | "x-original-routing-key"
                    )
                {
                    headers.insert(key.clone(), value.clone());
                }
            }
        }
        let routing_key = entry["type"].as_str().unwrap_or_default().to_owned();
        let confirm = channel
            .basic_publish(
                INBOUND_EXCHANGE.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone().with_headers(headers),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("the broker refused a replayed message");
        }
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed += 1;
    }
    for tag in kept {
        channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
    }
    let _ = connection.close(200, "done".into()).await;
    eprintln!("Replayed {replayed} dead letters.");
    Ok(ExitCode::SUCCESS)
}
