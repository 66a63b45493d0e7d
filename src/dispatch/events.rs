//! The events lane's side of the broker: publishing outbound events with
//! confirms, and taking the broker's answers. The lane does not wait for a
//! round's confirms before it sends the next round; an event is marked sent
//! only once its confirm is in, and one whose channel closed first is
//! published again later, with the same id.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation, Connection, PublisherConfirm};

use super::{DispatchError, Dispatcher, Outstanding};
use crate::broker::topology::OUTBOUND_EXCHANGE;
use crate::broker::{Head, connect};
use crate::config::redact;
use crate::ops::metric;
use crate::store::{OutboxRow, Store, StoreError};

/// How often a lane waiting for confirms checks that the channel they are
/// owed on is still open (lapin fails them when it closes; this is the
/// guard should an answer never come).
pub(super) const CHANNEL_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// An outbound event published, with the broker's answer once it comes.
pub(super) type Answer = (OutboxRow, Result<Confirmation, lapin::Error>);

impl Outstanding {
    /// The broker's answer for the oldest event awaiting one.
    pub(super) async fn next_confirm(&mut self) -> Option<Answer> {
        let (_, confirm) = self.confirming.front_mut()?;
        let answer = confirm.await;
        let (row, _) = self.confirming.pop_front()?;
        Some((row, answer))
    }

    /// The answers already in, without waiting.
    fn ready_confirms(&mut self) -> Vec<Answer> {
        std::iter::from_fn(|| self.next_confirm().now_or_never().flatten()).collect()
    }
}

/// Whether a lane's connection and channel are still open.
pub(super) fn is_open((_, channel): &(Connection, Channel)) -> bool {
    channel.status().connected()
}

/// Publishes `events`, their confirms joining `confirming` (taken by
/// [`Dispatcher::confirmed`]): the broker works through them all at once, and
/// the lane does not wait for them. On a failure, the events that did not go
/// out.
///
/// The publishes are started together: lapin finishes one only once its
/// I/O thread has written it, and awaiting them one by one cost two thread
/// wake-ups per event. Each takes its confirm's number and queues its frames
/// in one step of its first poll, and `join_all` first polls them in order,
/// so the events still leave in outbox order.
pub(super) async fn publish(
    channel: &Channel,
    events: &[OutboxRow],
    confirming: &mut VecDeque<(OutboxRow, PublisherConfirm)>,
) -> Result<(), (Vec<OutboxRow>, DispatchError)> {
    let publishes = events.iter().map(|row| {
        let head = Head::read(row.payload.as_bytes());
        async move {
            channel
                .basic_publish(
                    OUTBOUND_EXCHANGE.into(),
                    head.routing_key().into(),
                    BasicPublishOptions::default(),
                    row.payload.as_bytes(),
                    head.properties(),
                )
                .await
        }
    });
    let mut unsent = Vec::new();
    let mut failure = None;
    for (row, published) in events.iter().zip(join_all(publishes).await) {
        match published {
            Ok(confirm) => confirming.push_back((row.clone(), confirm)),
            Err(error) => {
                unsent.push(row.clone());
                failure.get_or_insert(error);
            }
        }
    }
    match failure {
        None => Ok(()),
        Some(error) => Err((unsent, error.into())),
    }
}

impl<S: Store> Dispatcher<S> {
    /// The lane's channel, opened anew if it is not open (the confirms the
    /// old one owes are settled first).
    pub(super) async fn open_channel<'c>(
        &self,
        channel: &'c mut Option<(Connection, Channel)>,
        outstanding: &mut Outstanding,
    ) -> Result<&'c Channel, DispatchError> {
        let pair = match channel.take().filter(is_open) {
            Some(pair) => pair,
            None => {
                self.abandon_confirms(outstanding).await?;
                self.connect().await?
            }
        };
        Ok(&channel.insert(pair).1)
    }

    async fn connect(&self) -> Result<(Connection, Channel), DispatchError> {
        Ok(connect(&self.amqp_url, &self.retry_delays)
            .await
            .inspect_err(|error| tracing::warn!(%error, broker = %redact(&self.amqp_url), "Cannot reach the broker to publish."))?)
    }

    /// Takes the broker's `answer` and any others already in: confirmed
    /// events wait to be marked sent, refused or lost ones are tried again
    /// later.
    pub(super) async fn confirmed(
        &self,
        outstanding: &mut Outstanding,
        answer: Answer,
    ) -> Result<(), StoreError> {
        let mut answers = vec![answer];
        answers.extend(outstanding.ready_confirms());
        for (row, answer) in answers {
            let failure = match answer {
                Ok(confirmation) if confirmation.is_ack() => {
                    metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "ack").increment(1);
                    self.store.sent_marks().add([row.id]);
                    continue;
                }
                Ok(_) => {
                    metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "nack").increment(1);
                    "the broker refused the event".to_owned()
                }
                Err(error) => error.to_string(),
            };
            self.reschedule(std::slice::from_ref(&row), &failure)
                .await?;
        }
        Ok(())
    }

    /// Takes every confirm owed, waiting for them while their `channel` is
    /// open; once it is not, those it still owes are tried again later.
    pub(super) async fn take_confirms(
        &self,
        outstanding: &mut Outstanding,
        channel: &Option<(Connection, Channel)>,
    ) -> Result<(), StoreError> {
        while !outstanding.confirming.is_empty() {
            match tokio::time::timeout(CHANNEL_CHECK_INTERVAL, outstanding.next_confirm()).await {
                Ok(Some(answer)) => self.confirmed(outstanding, answer).await?,
                Ok(None) => break,
                Err(_) if channel.as_ref().is_some_and(is_open) => {}
                Err(_) => return self.abandon_confirms(outstanding).await,
            }
        }
        Ok(())
    }

    /// Settles the confirms of a channel given up: the answers already in
    /// are taken; the events still awaiting one are tried again later (the
    /// broker may have them: at least once, with the same ids).
    pub(super) async fn abandon_confirms(
        &self,
        outstanding: &mut Outstanding,
    ) -> Result<(), StoreError> {
        if let Some(answer) = outstanding.next_confirm().now_or_never().flatten() {
            self.confirmed(outstanding, answer).await?;
        }
        let owed: Vec<OutboxRow> = outstanding
            .confirming
            .drain(..)
            .map(|(row, _)| row)
            .collect();
        self.reschedule(
            &owed,
            "the channel closed before the broker confirmed the event",
        )
        .await
    }
}
