//! The broker side shared by every part of this program that speaks AMQP:
//! connections (with a heartbeat and publisher confirms), the topology of
//! SPEC §4 ([`topology`]), the worker queue's upgrade to its delivery limit
//! ([`upgrade`]), and the properties of the CloudEvents this program
//! publishes.

pub mod topology;
pub mod upgrade;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

use serde::Deserialize;
use topology::{WORKER_QUEUE, long_string};

use crate::domain::Ts;

/// Header naming the routing key a message was first published with.
const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";

/// Header of a message this program publishes again (a retry, a dead
/// letter, a queue upgrade): the broker user that first published it, `""`
/// when it named none. RabbitMQ refuses a `user_id` other than the
/// publishing connection's own, so the message itself then carries ours.
const FIRST_PUBLISHER: &str = "x-first-publisher";

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

/// What the AMQP properties of a CloudEvent repeat of its JSON (SPEC §5),
/// read without building the rest of it. Whatever is missing or malformed
/// is left out: a property is never a reason not to publish.
#[derive(Debug, Default, Deserialize)]
pub struct Head<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    pub id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default, deserialize_with = "text")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub source: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub time: Option<Cow<'a, str>>,
}

/// A string attribute; any other value counts as missing.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Attribute<'a> {
        Text(#[serde(borrow)] Cow<'a, str>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Attribute::deserialize(d)? {
        Attribute::Text(text) => Some(text),
        Attribute::Other(_) => None,
    })
}

impl<'a> Head<'a> {
    pub fn read(json: &'a [u8]) -> Head<'a> {
        serde_json::from_slice(json).unwrap_or_default()
    }

    /// The routing key: the event's `type`.
    pub fn routing_key(&self) -> &str {
        self.kind.as_deref().unwrap_or_default()
    }

    /// [`persistent_cloudevent`] with the event's `type`, its `time` (whole
    /// seconds, as AMQP keeps them) and its `source` as the `app_id`.
    pub fn properties(&self) -> BasicProperties {
        let mut properties = persistent_cloudevent(self.id.as_deref().unwrap_or_default());
        if let Some(kind) = &self.kind {
            properties = properties.with_type(kind.as_ref().into());
        }
        if let Some(source) = &self.source {
            properties = properties.with_app_id(source.as_ref().into());
        }
        let seconds = self.time.as_deref().and_then(|t| Ts::parse(t).ok());
        if let Some(seconds) = seconds.and_then(|t| u64::try_from(t.utc().timestamp()).ok()) {
            properties = properties.with_timestamp(seconds);
        }
        properties
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

/// The broker user an AMQP URL logs in as (`guest` when it names none):
/// RabbitMQ checks the `user_id` of what that connection publishes against
/// it.
pub fn broker_user(amqp_url: &str) -> String {
    url::Url::parse(amqp_url)
        .ok()
        .map(|url| {
            percent_encoding::percent_decode_str(url.username())
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "guest".to_owned())
}

/// A header's text, if `table` has it.
pub fn header_text(table: &FieldTable, name: &str) -> Option<String> {
    match table.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Who published a message (SPEC §6 rule 13): its `user_id`, which the
/// broker checked; for one `own_user` published again, the first publisher
/// its header names. A header from anyone else is ignored: only a connection
/// of `own_user` can send a message whose `user_id` is `own_user`.
pub fn first_publisher(properties: &BasicProperties, own_user: &str) -> Option<String> {
    let user_id = properties.user_id().as_ref().map(|u| u.as_str().to_owned());
    if user_id.as_deref() == Some(own_user)
        && let Some(first) = properties
            .headers()
            .as_ref()
            .and_then(|headers| header_text(headers, FIRST_PUBLISHER))
    {
        return Some(first).filter(|first| !first.is_empty());
    }
    user_id
}

/// The properties of `delivery` published again by `own_user` with
/// `headers`: persistent, its first publisher kept in a header.
pub fn republished(
    delivery: &Delivery,
    mut headers: FieldTable,
    own_user: &str,
) -> BasicProperties {
    let first = first_publisher(&delivery.properties, own_user).unwrap_or_default();
    headers.insert(FIRST_PUBLISHER.into(), long_string(&first));
    delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_user_id(own_user.into())
}

/// The properties of `delivery` sent anew by `own_user` as its own (`dlq
/// replay`): judged by who sends it now, not by who sent it first.
pub fn resent(delivery: &Delivery, headers: &FieldTable, own_user: &str) -> BasicProperties {
    let headers: BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(name, _)| name.as_str() != FIRST_PUBLISHER)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_user_id(own_user.into())
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
    use super::{Head, with_default_heartbeat};

    #[test]
    fn a_cloudevent_gives_its_properties_and_a_malformed_one_what_it_can() {
        let event = br#"{"id":"e1","type":"training-credits.purchase.recorded","source":"tc","time":"2026-12-07T10:00:00.5+01:00","data":{}}"#;
        let head = Head::read(event);
        let properties = head.properties();
        assert_eq!(head.routing_key(), "training-credits.purchase.recorded");
        assert_eq!(
            properties.message_id().as_ref().map(|v| v.as_str()),
            Some("e1")
        );
        assert_eq!(
            properties.kind().as_ref().map(|v| v.as_str()),
            Some("training-credits.purchase.recorded")
        );
        assert_eq!(properties.app_id().as_ref().map(|v| v.as_str()), Some("tc"));
        assert_eq!(*properties.timestamp(), Some(1_796_634_000));
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(|v| v.as_str()),
            Some("application/cloudevents+json")
        );

        let odd = Head::read(br#"{"id":7,"type":"credits.x","time":"yesterday","source":null}"#);
        assert_eq!(odd.routing_key(), "credits.x");
        let properties = odd.properties();
        assert_eq!(*properties.message_id(), None);
        assert_eq!(*properties.timestamp(), None);
        assert_eq!(*properties.app_id(), None);
        assert_eq!(Head::read(b"[1, 2]").routing_key(), "");
    }

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
