//! Upgrade: how the worker replaces a worker queue declared before it had a
//! delivery limit and a dead-letter route ([`super::topology`]), before it
//! consumes, without losing a message, without reordering the backlog, and
//! without an operator's hand.
//!
//! A queue's arguments cannot change: declaring it with others fails with
//! PRECONDITION_FAILED, and a quorum queue cannot be deleted "if empty" or
//! "if unused". So the worker moves the messages out, deletes the queue,
//! declares it anew and moves them back, speaking only AMQP. Two holding
//! queues keep the order: the backlog (what the old queue and the retry
//! queues held) goes back before what arrived during the upgrade.
//!
//! 0. Declare the worker queue with its protection. If that works and no
//!    holding queue is left from an interrupted upgrade, there is nothing to
//!    do (every start after the upgrade stops here).
//! 1. Take the upgrade lock: the exclusive queue `training-credits.upgrade.lock`.
//!    RESOURCE_LOCKED means another worker holds it: this one waits and starts
//!    over. The broker deletes the lock with the connection that holds it, so
//!    a worker that dies does not keep it. Under the lock the state is read
//!    again: another worker may have finished meanwhile.
//! 2. If the old worker queue has consumers (workers of the old version still
//!    run), stop here, release the lock and try again later: the queue is
//!    theirs until they are stopped.
//! 3. Declare the holding queues, protected like the worker queue:
//!    `training-credits.upgrade.backlog`, unbound, and
//!    `training-credits.upgrade.arrivals`, bound to `training-credits.in`
//!    with `#`.
//! 4. Unbind the old worker queue. What is routed between 3 and 4 lands in
//!    both queues: a duplicate, which the idempotency key (`id` + `source`)
//!    absorbs.
//! 5. Move every message of the old queue, then of the retry queues, into
//!    the backlog. The retry queues dead-letter into the worker queue by
//!    name: while it is absent (step 6), their expiring messages would be
//!    dropped. Then, if the old queue has a consumer again, stop as in 2
//!    (what arrives meanwhile waits in the arrivals queue); if it has
//!    messages again (a retry expired into it meanwhile), move again.
//! 6. Delete the old worker queue and declare it with its protection,
//!    unbound for now.
//! 7. Move the backlog, then the arrivals, into the worker queue; bind it;
//!    unbind the arrivals queue and move what reached it meanwhile (those
//!    routed between the bind and the unbind are duplicates again); delete
//!    both holding queues and release the lock.
//!
//! Every step is safe to repeat, so a worker that dies anywhere is followed
//! by one that redoes the upgrade from what the broker holds: a move
//! publishes with confirms before it acknowledges (a crash leaves a
//! duplicate, never a loss); an absent worker queue is declared and bound by
//! step 0 (and by any command that connects), after which the holding queues
//! left behind send the next worker to step 7 (in that case what arrives
//! once it is bound may overtake the backlog: the worker retries a message
//! that overtook its predecessor).
//!
//! What this does not cover: retry queues of delays no longer in
//! `RETRY_DELAYS` are not known to the worker, so a message expiring from one
//! in the instant between step 6's delete and declare is dropped; change
//! `RETRY_DELAYS` in another deployment than this upgrade. A worker of the
//! old version started during the upgrade sees the old queue again (until
//! step 6 its declaration succeeds and binds it, which only duplicates what
//! the arrivals queue gets); the consumer checks of steps 2 and 5 keep its
//! messages from being deleted under it, except in the instant between the
//! last check and the delete.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Queue};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

use super::topology::{
    INBOUND_EXCHANGE, WORKER_QUEUE, WorkerQueue, bind_inbound, declare_protected, is_refusal,
    retry_queue,
};
use super::{confirm_channel, keep_original_routing_key, republished};

/// Holds the messages of the old worker queue and of the retry queues while
/// the worker queue is replaced.
pub const BACKLOG_QUEUE: &str = "training-credits.upgrade.backlog";
/// Holds what is published while the worker queue is replaced.
pub const ARRIVALS_QUEUE: &str = "training-credits.upgrade.arrivals";
/// Exists while a worker upgrades; exclusive to that worker's connection.
pub const LOCK_QUEUE: &str = "training-credits.upgrade.lock";
/// Messages moved before their confirms are awaited and their acks sent.
const MOVE_BATCH_MAX: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("another worker is upgrading the worker queue")]
    Busy,
    #[error(
        "the worker queue {WORKER_QUEUE} predates its delivery limit and still has {consumers} consumer(s), workers of an older version: stop them and this worker upgrades the queue"
    )]
    InUse { consumers: u32 },
    #[error("the queue {0} exists with other arguments than this version declares")]
    Mismatch(&'static str),
    #[error("the broker refused a message moved to {0}")]
    Unconfirmed(&'static str),
}

/// Makes sure the worker queue is protected and no upgrade is left half
/// done, upgrading it if needed (steps 0 and 1 of the module's list).
pub async fn ensure(
    connection: &Connection,
    retry_delays: &[Duration],
    own_user: &str,
) -> Result<(), UpgradeError> {
    if declare_protected(connection, WORKER_QUEUE).await? == WorkerQueue::Protected
        && !holding_queues_left(connection).await?
    {
        return Ok(());
    }
    let lock = connection.create_channel().await?;
    match lock
        .queue_declare(
            LOCK_QUEUE.into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => {}
        Err(error) if is_refusal(&error, AMQPSoftError::RESOURCELOCKED) => {
            return Err(UpgradeError::Busy);
        }
        Err(error) => return Err(error.into()),
    }
    let upgraded = upgrade(connection, retry_delays, own_user).await;
    // Released at once, failed or not: the connection lives on to consume
    // (or, if it is broken, the broker deletes the lock with it).
    let _ = lock
        .queue_delete(LOCK_QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let _ = lock.close(200, "upgrade done".into()).await;
    upgraded
}

async fn holding_queues_left(connection: &Connection) -> Result<bool, lapin::Error> {
    Ok(inspect(connection, BACKLOG_QUEUE).await?.is_some()
        || inspect(connection, ARRIVALS_QUEUE).await?.is_some())
}

/// Steps 2 to 7, under the lock, from the state the broker holds now.
async fn upgrade(
    connection: &Connection,
    retry_delays: &[Duration],
    own_user: &str,
) -> Result<(), UpgradeError> {
    if declare_protected(connection, WORKER_QUEUE).await? == WorkerQueue::Outdated {
        tracing::info!(
            queue = WORKER_QUEUE,
            "The worker queue predates its delivery limit; replacing it."
        );
        replace_worker_queue(connection, retry_delays, own_user).await?;
    }
    if holding_queues_left(connection).await? {
        empty_holding_queues(connection, own_user).await?;
        tracing::info!(
            queue = WORKER_QUEUE,
            "The worker queue has its delivery limit and dead-letter route."
        );
    }
    Ok(())
}

/// Steps 2 to 6.
async fn replace_worker_queue(
    connection: &Connection,
    retry_delays: &[Duration],
    own_user: &str,
) -> Result<(), UpgradeError> {
    if unused_old_queue(connection).await?.is_none() {
        // Deleted meanwhile: step 0 of the next start declares it.
        return Ok(());
    }
    for holding in [BACKLOG_QUEUE, ARRIVALS_QUEUE] {
        if declare_protected(connection, holding).await? == WorkerQueue::Outdated {
            return Err(UpgradeError::Mismatch(holding));
        }
    }
    let channel = confirm_channel(connection).await?;
    bind_inbound(&channel, ARRIVALS_QUEUE).await?;
    unbind_inbound(&channel, WORKER_QUEUE).await?;
    loop {
        move_all(&channel, WORKER_QUEUE, BACKLOG_QUEUE, own_user).await?;
        for delay in retry_delays {
            move_all(&channel, &retry_queue(*delay), BACKLOG_QUEUE, own_user).await?;
        }
        match unused_old_queue(connection).await? {
            Some(old) if old.message_count() > 0 => continue,
            _ => break,
        }
    }
    channel
        .queue_delete(WORKER_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    let _ = channel.close(200, "replaced".into()).await;
    if declare_protected(connection, WORKER_QUEUE).await? == WorkerQueue::Outdated {
        return Err(UpgradeError::Mismatch(WORKER_QUEUE));
    }
    Ok(())
}

/// Step 7. A holding queue already gone (deleted before a crash) is skipped.
async fn empty_holding_queues(connection: &Connection, own_user: &str) -> Result<(), UpgradeError> {
    let backlog = inspect(connection, BACKLOG_QUEUE).await?.is_some();
    let arrivals = inspect(connection, ARRIVALS_QUEUE).await?.is_some();
    let channel = confirm_channel(connection).await?;
    if backlog {
        move_all(&channel, BACKLOG_QUEUE, WORKER_QUEUE, own_user).await?;
    }
    if arrivals {
        move_all(&channel, ARRIVALS_QUEUE, WORKER_QUEUE, own_user).await?;
    }
    bind_inbound(&channel, WORKER_QUEUE).await?;
    if arrivals {
        unbind_inbound(&channel, ARRIVALS_QUEUE).await?;
        move_all(&channel, ARRIVALS_QUEUE, WORKER_QUEUE, own_user).await?;
        channel
            .queue_delete(ARRIVALS_QUEUE.into(), QueueDeleteOptions::default())
            .await?;
    }
    if backlog {
        channel
            .queue_delete(BACKLOG_QUEUE.into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = channel.close(200, "upgraded".into()).await;
    Ok(())
}

async fn unbind_inbound(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_unbind(
            queue.into(),
            INBOUND_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
}

/// The old worker queue, if it still exists, provided no one consumes it.
async fn unused_old_queue(connection: &Connection) -> Result<Option<Queue>, UpgradeError> {
    match inspect(connection, WORKER_QUEUE).await? {
        Some(old) if old.consumer_count() > 0 => Err(UpgradeError::InUse {
            consumers: old.consumer_count(),
        }),
        found => Ok(found),
    }
}

/// The counts of `queue`, `None` when there is no such queue; asked on a
/// channel of its own, which the broker closes when there is not.
async fn inspect(connection: &Connection, queue: &str) -> Result<Option<Queue>, lapin::Error> {
    let channel = connection.create_channel().await?;
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
    {
        Ok(found) => {
            let _ = channel.close(200, "inspected".into()).await;
            Ok(Some(found))
        }
        Err(error) if is_refusal(&error, AMQPSoftError::NOTFOUND) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Keeps lapin's own `ERROR` line for a channel the broker closed out of the
/// log when it only answers [`inspect`]: `404` to a passive `queue.declare`
/// (class 50, method 10), the sole way AMQP has to ask whether a queue
/// exists. Every start asks after the holding queues, which are normally
/// gone, and the answer is handled there; any other close stays logged.
pub struct ProbeRefusals;

/// It passes every level, so beside the log's level filter it keeps the
/// most verbose level that filter lets through (without the hint the pair
/// would claim every level, and each `debug!` or `trace!` anywhere would ask
/// the filters). Its callsites stay "sometimes", the default: with "always"
/// tracing-subscriber does not reset what a refused event leaves behind.
impl<S> Filter<S> for ProbeRefusals {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        if event.metadata().target() != "lapin::channel" {
            return true;
        }
        let mut method = CloseMethod(String::new());
        event.record(&mut method);
        !(method.0.contains("reply_code: 404,") && method.0.contains("class_id: 50, method_id: 10"))
    }
}

/// The `method` field of lapin's line for a closed channel, as text.
struct CloseMethod(String);

impl Visit for CloseMethod {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "method" {
            self.0 = format!("{value:?}");
        }
    }
}

/// Moves every message of `from` into `to` through the default exchange,
/// with its properties and headers; the routing key it was published with
/// and its first publisher are kept in headers, as for a retry. Each batch is confirmed by the
/// broker before it is acknowledged: a crash leaves a message in both
/// queues, never in neither. `x-delivery-count` is left behind: the queue a
/// message enters counts its deliveries anew.
async fn move_all(
    channel: &Channel,
    from: &str,
    to: &'static str,
    own_user: &str,
) -> Result<(), UpgradeError> {
    loop {
        let mut confirms = Vec::new();
        let mut last_tag = None;
        while confirms.len() < MOVE_BATCH_MAX {
            let Some(message) = channel
                .basic_get(from.into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            let delivery = message.delivery;
            let mut headers = FieldTable::default();
            for (key, value) in delivery
                .properties
                .headers()
                .as_ref()
                .map(FieldTable::inner)
                .into_iter()
                .flatten()
            {
                if key.as_str() != "x-delivery-count" {
                    headers.insert(key.clone(), value.clone());
                }
            }
            keep_original_routing_key(&mut headers, &delivery);
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        to.into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        republished(&delivery, headers, own_user),
                    )
                    .await?,
            );
            last_tag = Some(delivery.delivery_tag);
        }
        let Some(last_tag) = last_tag else {
            return Ok(());
        };
        let moved = confirms.len();
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                return Err(UpgradeError::Unconfirmed(to));
            }
        }
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
        tracing::info!(from, to, moved, "Moved messages.");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use lapin::protocol::channel::Close;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the events that reach it.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// How many of lapin's lines for a channel closed with `close` pass.
    fn logged(close: Close) -> usize {
        let count = Arc::new(AtomicUsize::new(0));
        let subscriber =
            tracing_subscriber::registry().with(Count(count.clone()).with_filter(ProbeRefusals));
        tracing::subscriber::with_default(subscriber, || {
            // As lapin's `on_channel_close_received` logs it.
            tracing::error!(target: "lapin::channel", channel = 5, method = ?close, "Channel closed");
        });
        count.load(Ordering::SeqCst)
    }

    fn close(reply_code: u16, class_id: u16, method_id: u16) -> Close {
        Close {
            reply_code,
            reply_text: format!("{reply_code} - no queue '{BACKLOG_QUEUE}' in vhost 'v'").into(),
            class_id,
            method_id,
        }
    }

    #[test]
    fn beside_the_level_filter_it_keeps_the_most_verbose_level_that_filter_allows() {
        use tracing_subscriber::filter::{EnvFilter, FilterExt};
        use tracing_subscriber::registry::Registry;
        let log = EnvFilter::new("warn").and(ProbeRefusals);
        assert_eq!(
            Filter::<Registry>::max_level_hint(&log),
            Some(LevelFilter::WARN)
        );
    }

    #[test]
    fn only_the_refusal_of_a_passive_queue_declare_is_kept_out_of_the_log() {
        assert_eq!(logged(close(404, 50, 10)), 0, "queue.declare, 404");
        assert_eq!(logged(close(406, 50, 10)), 1, "queue.declare, 406");
        assert_eq!(logged(close(404, 60, 20)), 1, "basic.consume, 404");
        assert_eq!(logged(close(404, 40, 10)), 1, "exchange.declare, 404");
    }
}
