//! Step 1, the broker alone: its ceiling through a quorum queue, and a
//! relay in the bench on the worker's path.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use training_credits::config::Config;

use crate::*;

pub struct Ceiling {
    pub publish_per_second: f64,
    pub consume_per_second: f64,
    /// Where the CPU went while the scratch queue was filled, and while it
    /// was consumed.
    pub publish_cpu: CpuSplit,
    pub consume_cpu: CpuSplit,
    /// The broker alone on the worker's path ([`Relay`]): the workload
    /// relayed, messages per second, and where the CPU went.
    pub relay_per_second: f64,
    pub relay_cpu: CpuSplit,
    /// Step 3's latency with the broker alone, when step 3 runs, and where
    /// the CPU went meanwhile.
    pub latency: Option<(Times, CpuSplit)>,
}

/// Step 1: the workload's bodies through a durable quorum queue (the kind
/// the worker consumes), with the worker's prefetch and multiple-acks.
pub async fn broker_ceiling(
    vhost: &Vhost,
    messages: &[Message],
    steady: Option<(&Workload, u32)>,
) -> BenchResult<Ceiling> {
    const QUEUE: &str = "bench.ceiling";
    let connection = connection(&vhost.url()).await?;
    let channel = publisher_to_quorum_queue(&connection, QUEUE).await?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    publish_all(&channel, "", Some(QUEUE), messages).await?;
    let publish = started.elapsed();
    let publish_cpu = cpu_at_start.until(&CpuReading::take(0));
    let consumer_channel = connection.create_channel().await.map_err(fail("channel"))?;
    consumer_channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(fail("basic.qos"))?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    let mut deliveries = consumer_channel
        .basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail("basic.consume"))?;
    let mut received = 0;
    while received < messages.len() {
        let first = tokio::time::timeout(Duration::from_secs(60), deliveries.next())
            .await
            .map_err(|_| format!("the scratch queue stopped delivering after {received}"))?
            .ok_or("the scratch consumer ended")?
            .map_err(fail("delivery"))?;
        let mut last = first.delivery_tag;
        let mut batch = 1;
        received += 1;
        while batch < 500 {
            match deliveries.next().now_or_never() {
                Some(Some(Ok(delivery))) => {
                    last = delivery.delivery_tag;
                    batch += 1;
                    received += 1;
                }
                _ => break,
            }
        }
        consumer_channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(fail("basic.ack"))?;
    }
    let consume = started.elapsed();
    let consume_cpu = cpu_at_start.until(&CpuReading::take(0));
    let _ = channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let (relay_per_second, relay_cpu) = broker_relay_throughput(&vhost.url(), messages).await?;
    let latency = match steady {
        Some((steady, rate)) => Some(broker_latency(&vhost.url(), steady, rate).await?),
        None => None,
    };
    let _ = connection.close(200, "done".into()).await;
    let n = messages.len() as f64;
    Ok(Ceiling {
        publish_per_second: n / publish.as_secs_f64(),
        consume_per_second: n / consume.as_secs_f64(),
        publish_cpu,
        consume_cpu,
        relay_per_second,
        relay_cpu,
        latency,
    })
}

/// The broker alone on the worker's path: a durable quorum queue, a relay in
/// this process that does what the worker does with a batch, less the
/// database and the rules, and an exclusive queue like the worker run's
/// capture, whose arrivals are recorded. The relay consumes with the
/// worker's prefetch, takes what has arrived (up to the worker's batch
/// size), publishes one persistent message per delivery with confirms, the
/// batch's publishes started together, waits for them and acknowledges the
/// batch with one multiple-ack; it does so on one connection of its own
/// (the worker uses two, and overlaps a batch's confirms with the next
/// batch: on two busy cores that cost more CPU than it saved, see
/// BENCHMARKS). The bench's own publishes and capture use another
/// connection, as in a worker run. Everything is closed when it finishes.
pub struct Relay {
    pub url: String,
    pub connections: Vec<Connection>,
    pub queue: &'static str,
    /// Publishes to `queue`, with confirms.
    pub channel: Channel,
    pub capture: ShortString,
    /// Message id and arrival instant of each message relayed.
    pub arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    pub capturing: tokio::task::JoinHandle<()>,
    pub relaying: Option<tokio::task::JoinHandle<BenchResult<()>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.capturing.abort();
        if let Some(relaying) = &self.relaying {
            relaying.abort();
        }
    }
}

pub async fn connection(url: &str) -> BenchResult<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(fail("connect"))
}

impl Relay {
    /// Declares the queues and starts taking arrivals; the relay itself
    /// starts with [`Relay::start`].
    pub async fn declare(url: &str, queue: &'static str) -> BenchResult<Relay> {
        let bench = connection(url).await?;
        let channel = publisher_to_quorum_queue(&bench, queue).await?;
        let capture = exclusive_queue(&channel).await?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sink = arrivals.clone();
        let capturing = take_arrivals(&bench, capture.clone(), move |delivery, at| {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map_or(String::new(), |id| id.as_str().to_owned());
            sink.lock().expect("arrivals lock").push((id, at));
        })
        .await?;
        Ok(Relay {
            url: url.to_owned(),
            connections: vec![bench],
            queue,
            channel,
            capture,
            arrivals,
            capturing,
            relaying: None,
        })
    }

    pub async fn start(&mut self) -> BenchResult<()> {
        // The worker's own prefetch and batch size (the defaults, or what
        // the environment passes on to it).
        let config = Config::from_vars(|name| {
            PASSED_ON
                .contains(&name)
                .then(|| std::env::var(name).ok())
                .flatten()
        })
        .map_err(fail("PREFETCH or BATCH_SIZE"))?;
        let worker = connection(&self.url).await?;
        let relay_in = worker.create_channel().await.map_err(fail("channel"))?;
        relay_in
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(fail("basic.qos"))?;
        let relay_out = worker.create_channel().await.map_err(fail("channel"))?;
        relay_out
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(fail("confirm.select"))?;
        let mut deliveries = relay_in
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("consume the relay queue"))?;
        self.connections.push(worker);
        let capture = self.capture.clone();
        let batch_max = config.batch_size;
        self.relaying = Some(tokio::spawn(async move {
            while let Some(first) = deliveries.next().await {
                let mut batch = vec![first.map_err(fail("relay delivery"))?];
                while batch.len() < batch_max {
                    match deliveries.next().now_or_never() {
                        Some(Some(delivery)) => {
                            batch.push(delivery.map_err(fail("relay delivery"))?)
                        }
                        _ => break,
                    }
                }
                let confirms = futures_util::future::try_join_all(batch.iter().map(|delivery| {
                    relay_out.basic_publish(
                        "".into(),
                        capture.clone(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                }))
                .await
                .map_err(fail("relay publish"))?;
                all_acked(confirms).await?;
                let last = batch.last().map_or(0, |delivery| delivery.delivery_tag);
                relay_in
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await
                    .map_err(fail("relay ack"))?;
            }
            BenchResult::Ok(())
        }));
        Ok(())
    }

    pub fn arrived(&self) -> usize {
        self.arrivals.lock().expect("arrivals lock").len()
    }

    /// Waits until `count` messages have arrived, the relay or the capture
    /// has stopped, or none has arrived for [`STALL_LIMIT`].
    pub async fn wait_for(&self, count: usize) {
        let mut arrived = self.arrived();
        let mut progress_at = Instant::now();
        while arrived < count
            && progress_at.elapsed() < STALL_LIMIT
            && !self.capturing.is_finished()
            && !self.relaying.as_ref().is_some_and(|r| r.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.arrived();
            if now > arrived {
                (arrived, progress_at) = (now, Instant::now());
            }
        }
    }

    /// Stops the relay, deletes its queue, closes its connections and
    /// returns the arrivals; fails when the relay failed or fewer than
    /// `expected` arrived.
    pub async fn finish(mut self, expected: usize) -> BenchResult<Vec<(String, Instant)>> {
        self.capturing.abort();
        if let Some(relaying) = self.relaying.take() {
            relaying.abort();
            if let Ok(Ok(Err(error))) = tokio::time::timeout(Duration::from_secs(1), relaying).await
            {
                return Err(format!("the relay failed: {error}"));
            }
        }
        let _ = self
            .channel
            .queue_delete(self.queue.into(), QueueDeleteOptions::default())
            .await;
        for connection in &self.connections {
            let _ = connection.close(200, "done".into()).await;
        }
        let arrivals = std::mem::take(&mut *self.arrivals.lock().expect("arrivals lock"));
        if arrivals.len() < expected {
            return Err(format!(
                "the relay delivered {} of {expected} messages in time",
                arrivals.len()
            ));
        }
        Ok(arrivals)
    }
}

/// Step 2 without the worker (part of step 1): the workload's bodies loaded
/// into the relay's queue, then the relay started and timed until all of
/// them have arrived. About what a worker could reach on this machine if its
/// own work cost nothing; messages per second and where the CPU went.
pub async fn broker_relay_throughput(
    url: &str,
    messages: &[Message],
) -> BenchResult<(f64, CpuSplit)> {
    let mut relay = Relay::declare(url, "bench.relay.loaded").await?;
    publish_all(&relay.channel, "", Some(relay.queue), messages).await?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    relay.start().await?;
    relay.wait_for(messages.len()).await;
    let cpu = cpu_at_start.until(&CpuReading::take(0));
    let arrivals = relay.finish(messages.len()).await?;
    let last = arrivals.iter().map(|(_, at)| *at).max().unwrap_or(started);
    let seconds = last.duration_since(started).as_secs_f64();
    Ok((messages.len() as f64 / seconds, cpu))
}

/// Step 3 without the worker (part of step 1): the same steady publishes
/// through the relay. What the broker and this machine take of the latency
/// budget.
pub async fn broker_latency(
    url: &str,
    steady: &Workload,
    rate: u32,
) -> BenchResult<(Times, CpuSplit)> {
    let mut relay = Relay::declare(url, "bench.relay").await?;
    relay.start().await?;
    let cpu_at_start = CpuReading::take(0);
    let (sent, confirms, _) = publish_steadily(
        &relay.channel,
        "",
        Some(relay.queue),
        &steady.messages,
        rate,
    )
    .await?;
    all_acked(confirms).await?;
    relay.wait_for(steady.messages.len()).await;
    let cpu = cpu_at_start.until(&CpuReading::take(0));
    let arrivals = relay.finish(steady.messages.len()).await?;
    let times = Times::between(&sent, arrivals.iter().map(|(id, at)| (id.as_str(), *at)));
    Ok((times, cpu))
}
