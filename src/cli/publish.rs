//! `training-credits publish FILE`: events from a file (one CloudEvent JSON
//! object, or JSON Lines) to `training-credits.in`, routing key = `type`,
//! with publisher confirms.

use std::process::ExitCode;

use anyhow::{Context, bail};
use lapin::options::BasicPublishOptions;
use serde_json::Value;

use crate::broker::topology::INBOUND_EXCHANGE;
use crate::broker::{Head, broker_user, connect};
use crate::config::Config;

/// Publishes at most this many events before waiting for their confirms.
const IN_FLIGHT_MAX: usize = 1_000;

/// The events of a file: one JSON object, or one per line.
pub fn read_events(text: &str) -> anyhow::Result<Vec<Value>> {
    if let Ok(Value::Object(single)) = serde_json::from_str::<Value>(text) {
        return Ok(vec![Value::Object(single)]);
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).with_context(|| format!("line {} is not JSON", n + 1))
        })
        .collect()
}

pub async fn run(config: &Config, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let events = read_events(&text)?;
    let (connection, channel) = connect(&config.amqp_url, &config.retry_delays)
        .await
        .context("cannot reach the broker")?;
    // Sent as this command's broker user, which `PUBLISHERS` judges.
    let user = broker_user(&config.amqp_url);
    let progress = super::progress(events.len(), "publishing");
    for chunk in events.chunks(IN_FLIGHT_MAX) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for event in chunk {
            let body = serde_json::to_vec(event).context("an event serialises")?;
            let head = Head::read(&body);
            confirms.push(
                channel
                    .basic_publish(
                        INBOUND_EXCHANGE.into(),
                        head.routing_key().into(),
                        BasicPublishOptions::default(),
                        &body,
                        head.properties().with_user_id(user.as_str().into()),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                bail!("the broker refused an event");
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let _ = connection.close(200, "done".into()).await;
    eprintln!("Published {} events.", events.len());
    Ok(ExitCode::SUCCESS)
}
