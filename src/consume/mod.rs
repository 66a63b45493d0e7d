//! Consume: the broker side of the worker. Deliveries are taken from
//! `training-credits.worker` in batches (everything the prefetch window has
//! ready, up to the batch limit), decoded, applied in one transaction, and
//! only then acknowledged with one multiple-ack. Messages that must wait go to
//! a delay queue, messages that never will work go to `training-credits.dead`
//! with their reason; both are confirmed by the broker before the batch is
//! acknowledged, so a crash at any point loses nothing.

use std::mem::take;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::{Fuse, FusedFuture};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use opentelemetry::trace::SpanContext;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::apply::{Applier, Input};
use crate::broker::topology::{DEAD_QUEUE, WORKER_QUEUE, long_string, retry_queue};
use crate::broker::upgrade::{self, UpgradeError};
use crate::broker::{connect, first_publisher, keep_original_routing_key, republished};
use crate::config::{Publishers, redact};
use crate::decode::{Decoded, EventKey, Malformed, Schemas, decode};
use crate::domain::{DeadReason, Id, InboundType, Outcome, RetryReason, Ts};
use crate::ops::{Health, metric};
use crate::store::{Store, StoreError};
use crate::trace::{Trace, trace_id_field};

/// Bounds of the consumer, from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Unacknowledged deliveries the broker may send ahead.
    pub prefetch: u16,
    /// Messages per transaction.
    pub batch_max: usize,
    pub retry_delays: Vec<Duration>,
}

/// Header counting how many delays a message has waited through.
const RETRY_COUNT: &str = "x-retry-count";
/// Longest wait between two attempts to reach the broker or the database.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// First wait before reconnecting to the broker.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// First wait before trying a failed batch again.
const APPLY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Failed batch attempts, for reasons other than an unreachable database,
/// before its messages are applied one by one to find the culprit.
const BATCH_ATTEMPTS_MAX: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused a dead letter or retry")]
    Unconfirmed,
    #[error("the consumer was cancelled by the broker")]
    ConsumerGone,
    #[error("upgrading the worker queue: {0}")]
    Upgrade(#[from] UpgradeError),
}

pub struct Consumer<S> {
    pub applier: Arc<Applier<S>>,
    pub schemas: Arc<Schemas>,
    pub limits: Limits,
    pub trust: Trust,
    pub health: Arc<Health>,
}

/// SPEC §6 rule 13 as this worker applies it.
#[derive(Clone, Debug)]
pub struct Trust {
    /// Who may claim which `source`; `None` trusts every publisher.
    pub publishers: Option<Publishers>,
    /// The broker user this worker connects as: the `user_id` of what it
    /// publishes again (retries, dead letters).
    pub own_user: String,
}

impl Trust {
    /// Why `decoded`, delivered with `properties`, may not be applied, if
    /// its publisher may not claim its `source`.
    fn refuse(&self, decoded: &Decoded, properties: &BasicProperties) -> Option<Malformed> {
        let publishers = self.publishers.as_ref()?;
        let publisher = first_publisher(properties, &self.own_user);
        if publishers.trust(&decoded.key.source, publisher.as_deref()) {
            return None;
        }
        let who = publisher.map_or_else(
            || "a publisher with no user_id".to_owned(),
            |user| format!("broker user `{user}`"),
        );
        Some(Malformed {
            reason: DeadReason::UntrustedSource,
            detail: format!("{who} may not claim source `{}`", decoded.key.source),
            key: Some(decoded.key.clone()),
            type_name: Some(decoded.kind.as_str().to_owned()),
            traceparent: decoded.traceparent.clone().map(Box::new),
        })
    }
}

/// The waits between attempts to reach the broker or the database: doubling
/// from `first` up to [`BACKOFF_MAX`], without end and without jitter. The
/// loops keep their own sleeps, so that cancellation cuts a wait short.
fn backoff(first: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(BACKOFF_MAX)
        .without_max_times()
        .build()
}

/// Deliveries taken together, decoded as they arrive.
#[derive(Default)]
struct Batch {
    deliveries: Vec<Delivery>,
    inputs: Vec<Input>,
    /// Per delivery, the reason it could not be decoded, if any.
    malformed: Vec<Option<Malformed>>,
    /// Per delivery, the worker's span for it.
    spans: Vec<Span>,
}

impl Batch {
    fn len(&self) -> usize {
        self.deliveries.len()
    }

    fn push(&mut self, schemas: &Schemas, trust: &Trust, delivery: Delivery) {
        let decoded = decode(schemas, &delivery.data).and_then(|decoded| {
            match trust.refuse(&decoded, &delivery.properties) {
                Some(untrusted) => Err(untrusted),
                None => Ok(decoded),
            }
        });
        match decoded {
            Ok(decoded) => {
                let span = message_span(
                    Some(&decoded.key),
                    Some(decoded.kind.as_str()),
                    decoded.command.account_id(),
                    decoded.traceparent.as_ref(),
                );
                self.spans.push(span.clone());
                self.inputs.push(Input::within(decoded, span));
                self.malformed.push(None);
            }
            Err(refusal) => {
                let span = message_span(
                    refusal.key.as_ref(),
                    refusal.type_name.as_deref(),
                    None,
                    refusal.traceparent.as_deref(),
                );
                // It causes no event, but its span is still part of its trace.
                let _ = Trace::start(&span, refusal.traceparent.as_deref().cloned());
                self.spans.push(span);
                self.malformed.push(Some(refusal));
            }
        }
        self.deliveries.push(delivery);
    }
}

/// The worker's span for one message, child of its `traceparent` (see
/// [`Trace::start`]): from its decoding to its settling, entered while its
/// rules run and while its outcome is logged and settled, with what it says
/// of itself. At level WARN: a span's fields show on the lines logged within
/// it only if the log filter lets the span itself through, and the default
/// filter (`warn`) must show a message's trace on its warnings.
fn message_span(
    key: Option<&EventKey>,
    type_name: Option<&str>,
    account: Option<&Id>,
    traceparent: Option<&SpanContext>,
) -> Span {
    tracing::warn_span!(
        parent: None,
        "message",
        event_id = key.map(|key| key.id.as_str()),
        r#type = type_name,
        account = account.map(tracing::field::display),
        source = key.map(|key| key.source.as_str()),
        trace_id = trace_id_field(traceparent),
    )
}

/// What is done with one delivery once its batch is applied: acknowledged
/// with the batch, retried later, or dead-lettered.
enum Disposition {
    Done,
    Retry { reason: RetryReason, detail: String },
    Dead { reason: DeadReason, detail: String },
}

impl<S: Store> Consumer<S> {
    /// Consumes until `cancel`, reconnecting with backoff whenever the broker
    /// goes away.
    pub async fn run(&self, amqp_url: &str, cancel: CancellationToken) {
        let mut delays = backoff(RECONNECT_BACKOFF_MIN);
        while !cancel.is_cancelled() {
            let started = Instant::now();
            match self.session(amqp_url, &cancel).await {
                Ok(()) => break,
                Err(ConsumeError::Upgrade(UpgradeError::Busy)) => {
                    tracing::info!("Another worker is upgrading the worker queue; waiting for it.");
                }
                Err(ConsumeError::Upgrade(error @ UpgradeError::InUse { .. })) => {
                    tracing::error!(%error, "The worker queue cannot be upgraded yet; trying again.");
                }
                Err(error) => {
                    tracing::warn!(%error, broker = %redact(amqp_url), "Lost the broker; reconnecting.");
                }
            }
            Health::set(&self.health.broker_connected, false);
            Health::set(&self.health.consumer_running, false);
            // A connection that lasted was a success: the next outage
            // starts again from the shortest wait.
            if started.elapsed() > BACKOFF_MAX {
                delays = backoff(RECONNECT_BACKOFF_MIN);
            }
            let delay = delays.next().unwrap_or(BACKOFF_MAX);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        Health::set(&self.health.consumer_running, false);
    }

    /// One connection's life: declare, upgrade the worker queue if it
    /// predates its delivery limit, consume, and on cancellation stop taking
    /// work, finish the batch in hand and close. Only the worker upgrades:
    /// it alone knows no worker of its own version consumes meanwhile.
    async fn session(
        &self,
        amqp_url: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let (connection, channel) = connect(amqp_url, &self.limits.retry_delays).await?;
        upgrade::ensure(&connection, &self.limits.retry_delays, &self.trust.own_user).await?;
        channel
            .basic_qos(self.limits.prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                WORKER_QUEUE.into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let tag = deliveries.tag();
        Health::set(&self.health.broker_connected, true);
        Health::set(&self.health.consumer_running, true);
        tracing::info!(
            queue = WORKER_QUEUE,
            prefetch = self.limits.prefetch,
            "Consuming."
        );
        // Two batches at a time: one being applied (`in_hand`), the next
        // growing and being decoded as its deliveries arrive, so decoding
        // overlaps the database's work and a batch is as large as what
        // arrived while the one before it was applied.
        let mut next = Batch::default();
        let mut in_hand = pin!(Fuse::terminated());
        let mut stopping = false;
        // A broker failure stops the taking of deliveries, but the batch in
        // hand is finished first: dropped after its commit, its events and
        // emails would never be handed to the dispatcher (they would wait out
        // their lease).
        let mut failure = None;
        loop {
            tokio::select! {
                biased;
                done = &mut in_hand, if !in_hand.is_terminated() => {
                    if !done? {
                        break;
                    }
                }
                // A stop request wins over deliveries already waiting: the
                // batch in hand is finished, no new one is taken.
                _ = cancel.cancelled(), if !stopping => stopping = true,
                delivery = deliveries.next(), if !stopping && next.len() < self.limits.batch_max => {
                    // This delivery, then whatever else has already arrived.
                    let arrived = std::iter::once(delivery.ok_or(ConsumeError::ConsumerGone))
                        .chain(std::iter::from_fn(|| deliveries.next().now_or_never().flatten().map(Ok)));
                    for taken in arrived {
                        match taken.and_then(|taken| taken.map_err(ConsumeError::from)) {
                            Ok(taken) => next.push(&self.schemas, &self.trust, taken),
                            Err(error) => {
                                failure = Some(error);
                                stopping = true;
                                break;
                            }
                        }
                        // Checked before another is taken from the stream:
                        // there would be no room for it.
                        if next.len() >= self.limits.batch_max {
                            break;
                        }
                    }
                }
            }
            if in_hand.is_terminated() {
                if let Some(error) = failure {
                    return Err(error);
                }
                if stopping {
                    break;
                }
                // Nothing waits for more: a lone message is applied at once.
                if next.len() > 0 {
                    in_hand.set(self.handle(&channel, take(&mut next), cancel).fuse());
                }
            }
        }
        Health::set(&self.health.consumer_running, false);
        channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await?;
        let _ = channel.close(200, "shutting down".into()).await;
        let _ = connection.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// Applies one batch and settles every delivery in it. Returns `false`
    /// when it was cancelled while waiting for the database: the batch is left
    /// unacknowledged, for the broker to deliver again.
    async fn handle(
        &self,
        channel: &Channel,
        batch: Batch,
        cancel: &CancellationToken,
    ) -> Result<bool, ConsumeError> {
        let Batch {
            deliveries: batch,
            inputs,
            malformed,
            spans,
        } = batch;
        metrics::histogram!(metric::BATCH_SIZE).record(batch.len() as f64);
        let Some(outcomes) = self.apply(&inputs, cancel).await else {
            return Ok(false);
        };
        let mut applied = inputs.iter().zip(outcomes);
        let mut fates = Vec::with_capacity(batch.len());
        for (refusal, span) in malformed.into_iter().zip(&spans) {
            let _entered = span.enter();
            let fate = match refusal {
                Some(malformed) => {
                    // Only the types this worker knows: a label taken from
                    // whatever a message says would let publishers add series
                    // without end.
                    let type_name = malformed
                        .type_name
                        .as_deref()
                        .and_then(InboundType::parse)
                        .map_or("unknown", InboundType::as_str);
                    metrics::counter!(metric::MESSAGES, "type" => type_name, "outcome" => "dead_letter").increment(1);
                    Disposition::Dead {
                        reason: malformed.reason,
                        detail: malformed.detail,
                    }
                }
                None => {
                    let (input, outcome) = applied.next().expect("one outcome per input");
                    metrics::counter!(metric::MESSAGES, "type" => input.command.type_name(), "outcome" => outcome.label()).increment(1);
                    // The message's span names it.
                    tracing::debug!(outcome = outcome.label(), "Applied.");
                    match outcome {
                        Outcome::Applied
                        | Outcome::Duplicate
                        | Outcome::Rejected(_)
                        | Outcome::Refused(_) => Disposition::Done,
                        Outcome::Retry { reason, detail } => Disposition::Retry { reason, detail },
                        Outcome::Dead { reason, detail } => Disposition::Dead { reason, detail },
                    }
                }
            };
            fates.push(fate);
        }
        let mut confirms = Vec::new();
        for ((delivery, fate), span) in batch.iter().zip(fates).zip(spans) {
            confirms.extend(
                self.settle(channel, delivery, fate)
                    .instrument(span)
                    .await?,
            );
        }
        // A nack (the broker would not take the message) must keep the batch
        // unacknowledged, or the message would be lost.
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                return Err(ConsumeError::Unconfirmed);
            }
        }
        let last = batch.last().expect("a batch has at least one delivery");
        channel
            .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
            .await?;
        Ok(true)
    }

    /// Applies `inputs`, waiting out an unreachable database (consumption
    /// pauses; nothing is dead-lettered for it). A batch that keeps failing
    /// for another reason is split, so only its culprit is retried later.
    /// `None` when cancelled while waiting.
    async fn apply(&self, inputs: &[Input], cancel: &CancellationToken) -> Option<Vec<Outcome>> {
        if inputs.is_empty() {
            return Some(Vec::new());
        }
        let mut delays = backoff(APPLY_BACKOFF_MIN);
        let mut failures = 0;
        loop {
            let started = Instant::now();
            match self.applier.apply(inputs, Ts::now()).await {
                Ok(outcomes) => {
                    metrics::histogram!(metric::APPLY_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    Health::set(&self.health.database_reachable, true);
                    return Some(outcomes);
                }
                Err(error) if error.is_unavailable() => {
                    Health::set(&self.health.database_reachable, false);
                    metrics::counter!(metric::DATABASE_WAITS).increment(1);
                    tracing::warn!(%error, "The database is out of reach; consumption pauses.");
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, messages = inputs.len(), "A batch failed.");
                    if failures >= BATCH_ATTEMPTS_MAX {
                        return Box::pin(self.apply_one_by_one(inputs, cancel)).await;
                    }
                }
            }
            let delay = delays.next().unwrap_or(BACKOFF_MAX);
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn apply_one_by_one(
        &self,
        inputs: &[Input],
        cancel: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(inputs.len());
        for input in inputs {
            let single = std::slice::from_ref(input);
            match self.applier.apply(single, Ts::now()).await {
                Ok(mut outcome) => outcomes.push(outcome.remove(0)),
                Err(error) if error.is_unavailable() => {
                    // The database went away meanwhile: wait for it as usual.
                    let mut outcome = Box::pin(self.apply(single, cancel)).await?;
                    outcomes.push(outcome.remove(0));
                }
                Err(error) => outcomes.push(transient(&error)),
            }
        }
        Some(outcomes)
    }

    /// Sends a delivery that is not done to its delay queue or to the dead
    /// letters; its confirm is awaited with the rest of the batch before the
    /// ack.
    async fn settle(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        fate: Disposition,
    ) -> Result<Option<PublisherConfirm>, ConsumeError> {
        let (queue, headers) = match fate {
            Disposition::Done => return Ok(None),
            Disposition::Retry { reason, detail } => {
                let count = retry_count(delivery);
                match self.limits.retry_delays.get(count) {
                    Some(delay) => {
                        metrics::counter!(metric::RETRIES).increment(1);
                        let mut headers = headers_of(delivery);
                        keep_original_routing_key(&mut headers, delivery);
                        headers.insert(
                            RETRY_COUNT.into(),
                            AMQPValue::LongLongInt(i64::try_from(count + 1).unwrap_or(i64::MAX)),
                        );
                        headers.insert("x-retry-reason".into(), long_string(&detail));
                        (retry_queue(*delay), headers)
                    }
                    None => dead_letter(delivery, reason.exhausted(), &detail),
                }
            }
            Disposition::Dead { reason, detail } => dead_letter(delivery, reason, &detail),
        };
        let properties = republished(delivery, headers, &self.trust.own_user);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await?;
        Ok(Some(confirm))
    }
}

/// A message whose own transaction failed for a reason other than an
/// unreachable database: retried after the configured delays, then
/// dead-lettered `retries_exhausted`.
fn transient(error: &StoreError) -> Outcome {
    Outcome::Retry {
        reason: RetryReason::Transient,
        detail: error.to_string(),
    }
}

fn headers_of(delivery: &Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

fn retry_count(delivery: &Delivery) -> usize {
    let headers = headers_of(delivery);
    match headers.inner().get(RETRY_COUNT) {
        Some(AMQPValue::LongLongInt(n)) => usize::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => usize::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// The dead-letter queue and the headers of a dead letter: the original ones
/// plus the reason, the detail, where it came from and when.
fn dead_letter(delivery: &Delivery, reason: DeadReason, detail: &str) -> (String, FieldTable) {
    metrics::counter!(metric::DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
    // What the body says of itself, where it can be read: the line an
    // operator searches for names the event, its type and its account.
    let body: Option<serde_json::Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |path: &[&str]| {
        let mut value = body.as_ref()?;
        for key in path {
            value = value.get(key)?;
        }
        value.as_str().map(str::to_owned)
    };
    tracing::warn!(
        event_id = field(&["id"]),
        r#type = field(&["type"]),
        account = field(&["data", "account_id"]),
        reason = reason.as_str(),
        detail,
        "Dead-lettered a message."
    );
    let mut headers = headers_of(delivery);
    headers.insert("x-error-reason".into(), long_string(reason.as_str()));
    headers.insert("x-error-detail".into(), long_string(detail));
    keep_original_routing_key(&mut headers, delivery);
    headers.insert(
        "x-dead-lettered-at".into(),
        long_string(&Ts::now().to_string()),
    );
    (DEAD_QUEUE.to_owned(), headers)
}

#[cfg(test)]
mod tests {
    use super::{APPLY_BACKOFF_MIN, RECONNECT_BACKOFF_MIN, backoff};

    #[test]
    fn waits_double_from_the_first_up_to_ten_seconds_and_never_end() {
        let millis = |first| -> Vec<u128> {
            backoff(first)
                .take(10)
                .map(|delay| delay.as_millis())
                .collect()
        };
        assert_eq!(
            millis(RECONNECT_BACKOFF_MIN),
            [
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000
            ]
        );
        assert_eq!(
            millis(APPLY_BACKOFF_MIN),
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert!(backoff(APPLY_BACKOFF_MIN).nth(10_000).is_some());
    }
}
