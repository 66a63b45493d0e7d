//! The broker side shared by every part of this program that speaks AMQP:
//! connections (with a heartbeat and publisher confirms), the topology of
//! SPEC §4 ([`topology`]), the worker queue's upgrade to its delivery limit
//! ([`upgrade`]), and the properties of the CloudEvents this program
//! publishes.

pub mod topology;
pub mod upgrade;

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use lapin::message::Delivery;
use lapin::types::FieldTable;

use topology::{WORKER_QUEUE, long_string};

/// Header naming the routing key a message was first published with.
const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";

/// Heartbeat asked of the broker when `AMQP_URL` names none.
pub const HEARTBEAT_DEFAULT: Duration = Duration::from_secs(10);

/// A connection and a channel with publisher confirms on, the topology
/// declared: what every publisher of this program starts from. A worker
/// queue that predates its delivery limit is left as it is (publishers
/// still reach it through the inbound exchange); the worker upgrades it.
pub async fn connect(
    amqp_url: &str,
    retry_delays: &[Duration],
) -> Result<(Connection, Channel), lapin::Error> {
    let url = with_default_heartbeat(amqp_url);
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    if topology::declare(&connection, retry_delays).await? == topology::WorkerQueue::Outdated {
        tracing::debug!(
            queue = WORKER_QUEUE,
            "The worker queue predates its delivery limit; the worker upgrades it."
        );
    }
    let channel = confirm_channel(&connection).await?;
    Ok((connection, channel))
}

/// A new channel of `connection` with publisher confirms on.
pub(crate) async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// `amqp_url` with `heartbeat=10` unless it names a heartbeat itself: with
/// the broker's default (60 s) a half-open connection went unnoticed for two
/// minutes, with the consumer and the dispatcher waiting on it.
fn with_default_heartbeat(amqp_url: &str) -> String {
    match url::Url::parse(amqp_url) {
        Ok(mut url) if !url.query_pairs().any(|(key, _)| key == "heartbeat") => {
            url.query_pairs_mut()
                .append_pair("heartbeat", &HEARTBEAT_DEFAULT.as_secs().to_string());
            url.to_string()
        }
        _ => amqp_url.to_owned(),
    }
}

/// Properties of a CloudEvent published by this program (outbound events,
/// `publish`, `dlq replay`): structured mode, persistent, with its id.
pub fn persistent_cloudevent(message_id: &str) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_delivery_mode(2);
    if message_id.is_empty() {
        properties
    } else {
        properties.with_message_id(message_id.into())
    }
}

/// Notes the routing key the message was published with, the first time it
/// leaves the worker queue: a message back from a delay queue arrives with
/// the worker queue's name as its routing key instead.
pub(crate) fn keep_original_routing_key(headers: &mut FieldTable, delivery: &Delivery) {
    if !headers.inner().contains_key(ORIGINAL_ROUTING_KEY) {
        headers.insert(
            ORIGINAL_ROUTING_KEY.into(),
            long_string(delivery.routing_key.as_str()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::with_default_heartbeat;

    #[test]
    fn a_heartbeat_is_asked_for_unless_the_url_names_one() {
        assert_eq!(
            with_default_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_default_heartbeat("amqp://h/vh?heartbeat=3"),
            "amqp://h/vh?heartbeat=3"
        );
        assert_eq!(
            with_default_heartbeat("amqps://h/vh?channel_max=5"),
            "amqps://h/vh?channel_max=5&heartbeat=10"
        );
    }
}
