//! One worker run (steps 2, 3 and 4; step 5 on a ledger with history).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use lapin::Channel;
use training_credits::broker::connect;
use training_credits::broker::topology::{DEAD_QUEUE, INBOUND_EXCHANGE, WORKER_QUEUE};
use training_credits::config::Config;

use crate::*;

/// Times from publish to arrival, in milliseconds.
#[derive(Default)]
pub struct Times {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub measured: usize,
}

impl Times {
    /// The time from each message's publish (`sent`, by id) to its arrival
    /// (`arrivals`: the id it answers, and when).
    pub fn between<'a>(
        sent: &HashMap<&str, Instant>,
        arrivals: impl Iterator<Item = (&'a str, Instant)>,
    ) -> Times {
        Times::of(
            arrivals
                .filter_map(|(id, at)| {
                    sent.get(id)
                        .map(|sent| at.duration_since(*sent).as_secs_f64() * 1000.0)
                })
                .collect(),
        )
    }

    /// The quantiles of `millis`.
    pub fn of(mut millis: Vec<f64>) -> Times {
        millis.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            if millis.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * millis.len() as f64).ceil() as usize).clamp(1, millis.len());
            millis[rank - 1]
        };
        Times {
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            max_ms: millis.last().copied().unwrap_or(f64::NAN),
            measured: millis.len(),
        }
    }
}

impl std::fmt::Display for Times {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

#[derive(Default)]
pub struct Latency {
    pub times: Times,
    pub achieved_rate: f64,
    /// Batches the worker applied during this step, their mean size and
    /// mean apply+commit time.
    pub batches: f64,
    pub mean_batch: f64,
    pub apply_ms_per_batch: f64,
    /// Outbox backlog when the last event had been published.
    pub backlog_after_publishing: BTreeMap<String, f64>,
    /// Where the CPU went while they were published and taken.
    pub cpu: CpuSplit,
}

#[derive(Default)]
pub struct Run {
    pub events_per_second: f64,
    pub seconds: f64,
    pub startup_seconds: f64,
    /// Where the CPU went from the worker's start to the run's end.
    pub cpu: CpuSplit,
    /// When /metrics first showed every message applied (seconds from start).
    pub applied_at: Option<f64>,
    pub outbound_at: f64,
    /// When the whole outbox (emails included) was sent.
    pub drained_at: Option<f64>,
    pub backlog_when_applied: BTreeMap<String, f64>,
    pub metrics: Metrics,
    pub latency: Option<Latency>,
    pub peak_mib: f64,
    pub verify_ok: bool,
    pub outbound_ok: bool,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub async fn worker_run(
    label: &str,
    vhost: &Vhost,
    database: &Database,
    workload: &Workload,
    steady: Option<(&Workload, u32)>,
) -> BenchResult<Run> {
    let mut run = Run::default();
    let retry_delays = Config::from_vars(|_| None)
        .map_err(fail("default configuration"))?
        .retry_delays;
    let (connection, channel) = connect(&vhost.url(), &retry_delays)
        .await
        .map_err(fail("the broker"))?;
    let capture = Capture::start(&connection, &channel).await?;
    publish_all(&channel, INBOUND_EXCHANGE, None, &workload.messages).await?;
    let loaded = ready_in(&channel, WORKER_QUEUE).await?;
    if loaded as usize != workload.messages.len() {
        return Err(format!(
            "{loaded} messages in the worker queue, {} published",
            workload.messages.len()
        ));
    }
    let total = workload.messages.len() as f64;
    let expected = workload.expected.len();
    eprintln!(
        "  {label}: {} messages loaded into {WORKER_QUEUE}; starting the worker",
        workload.messages.len()
    );

    let started = Instant::now();
    let mut worker = Worker::start(&database.url, &vhost.url(), &[])?;
    let cpu_at_start = CpuReading::take(worker.child.id());
    worker.ready().await?;
    run.startup_seconds = started.elapsed().as_secs_f64();

    // Until every expected outbound event has arrived.
    let mut last_progress = (Instant::now(), 0usize, 0.0f64);
    let mut next_scrape = Instant::now();
    let mut latest = Metrics::default();
    let events_done = loop {
        {
            let arrivals = capture.arrivals.lock().expect("capture lock");
            if arrivals.len() >= expected {
                break arrivals[expected - 1].at;
            }
        }
        let now = Instant::now();
        if now >= next_scrape {
            next_scrape = now + Duration::from_millis(250);
            if let Some(metrics) = worker.metrics().await {
                if run.applied_at.is_none() && metrics.messages >= total {
                    run.applied_at = Some(started.elapsed().as_secs_f64());
                    run.backlog_when_applied = metrics.backlog.clone();
                }
                latest = metrics;
            }
        }
        let count = capture.len();
        let applied = latest.messages;
        if count != last_progress.1 || applied != last_progress.2 {
            last_progress = (now, count, applied);
        } else if now.duration_since(last_progress.0) > STALL_LIMIT {
            let metrics = latest;
            let (_, _, _, tail) = worker.stop().await;
            return Err(format!(
                "no progress for {} s: {count} of {expected} outbound events, {} of {total} messages applied \
                 (outcomes {:?}, retries {}); worker log: {tail}",
                STALL_LIMIT.as_secs(),
                metrics.messages,
                metrics.outcomes,
                metrics.retries
            ));
        }
        if let Ok(Some(status)) = worker.child.try_wait() {
            return Err(format!(
                "the worker exited ({status}): {}",
                worker.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Every message taken off the worker queue (ready = 0)…
    let mut queue_done = Instant::now();
    loop {
        if ready_in(&channel, WORKER_QUEUE).await? == 0 {
            break;
        }
        queue_done = Instant::now();
        if queue_done.duration_since(events_done) > STALL_LIMIT {
            return Err("the worker queue kept ready messages".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = events_done.max(queue_done);
    run.seconds = end.duration_since(started).as_secs_f64();
    run.outbound_at = events_done.duration_since(started).as_secs_f64();
    run.cpu = cpu_at_start.until(&CpuReading::take(worker.child.id()));
    run.events_per_second = total / run.seconds;
    // …and acknowledged (ready + unacked = 0), checked with rabbitmqctl
    // outside the timing: each call starts an Erlang VM.
    let mut acknowledged = false;
    for _ in 0..60 {
        if vhost.try_queue_messages(WORKER_QUEUE).ok().flatten() == Some(0) {
            acknowledged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !acknowledged {
        run.problems.push(format!(
            "{WORKER_QUEUE} still holds unacknowledged messages after the run"
        ));
    }
    run.metrics = worker.metrics().await.unwrap_or_default();
    // The emails the run produced (not part of the timing): when the whole
    // outbox is sent the worker is idle.
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match worker.metrics().await {
            Some(metrics) if metrics.backlog.values().all(|rows| *rows == 0.0) => {
                run.drained_at = Some(started.elapsed().as_secs_f64());
                run.metrics.emails_sent = metrics.emails_sent;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    if run.drained_at.is_none() {
        run.problems
            .push("the outbox was not drained within 10 minutes".to_owned());
    }

    // Step 3: latency at a steady rate, on the idle worker.
    if let Some((steady, rate)) = steady {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = worker.metrics().await.unwrap_or_default();
        let cpu_at_start = CpuReading::take(worker.child.id());
        let mut measured = latency(&channel, &capture, &worker, steady, rate).await?;
        measured.cpu = cpu_at_start.until(&CpuReading::take(worker.child.id()));
        let after = worker.metrics().await.unwrap_or_default();
        measured.batches = after.batch_count - before.batch_count;
        if measured.batches > 0.0 {
            measured.mean_batch = (after.batch_sum - before.batch_sum) / measured.batches;
            measured.apply_ms_per_batch =
                1000.0 * (after.apply_sum - before.apply_sum) / measured.batches;
        }
        run.latency = Some(measured);
    }

    let (peak_kib, clean, warnings, _) = worker.stop().await;
    run.peak_mib = peak_kib as f64 / 1024.0;
    if !clean {
        run.problems
            .push("the worker did not stop cleanly on SIGTERM".to_owned());
    }
    if !warnings.is_empty() {
        run.notes.push(format!("worker log: {warnings}"));
    }

    // Exactly the expected outbound events, no more (a late duplicate would
    // show here), none missing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut wanted: HashMap<&str, usize> = workload
        .expected
        .iter()
        .map(|id| (id.as_str(), 1))
        .collect();
    if let Some((steady, _)) = steady {
        wanted.extend(steady.expected.iter().map(|id| (id.as_str(), 1)));
    }
    let wanted_total = wanted.len();
    let mut unexpected = 0;
    let received = {
        let arrivals = capture.arrivals.lock().expect("capture lock");
        for arrival in arrivals.iter() {
            match wanted.get_mut(arrival.causation.as_str()) {
                Some(left) if *left > 0 => *left -= 1,
                _ => unexpected += 1,
            }
        }
        arrivals.len()
    };
    let missing: usize = wanted.values().sum();
    run.outbound_ok = missing == 0 && unexpected == 0;
    if !run.outbound_ok {
        run.problems.push(format!(
            "outbound events: {received} received, {wanted_total} expected ({missing} missing, {unexpected} unexpected); by type {:?}, expected {:?}",
            capture.types.lock().expect("capture lock"),
            workload.expected_types
        ));
    }
    let dead = ready_in(&channel, DEAD_QUEUE).await?;
    if dead as usize != workload.malformed {
        run.problems.push(format!(
            "{dead} dead letters, {} malformed messages published",
            workload.malformed
        ));
    }
    let _ = connection.close(200, "done".into()).await;

    match run_command(&["verify"], &database.url) {
        Ok(_) => run.verify_ok = true,
        Err(error) => run.problems.push(format!("verify: {error}")),
    }
    Ok(run)
}

/// Publishes `steady` at `rate` per second and measures, per event, the time
/// from just before its publish to the arrival of its outbound event.
pub async fn latency(
    channel: &Channel,
    capture: &Capture,
    worker: &Worker,
    steady: &Workload,
    rate: u32,
) -> BenchResult<Latency> {
    let before = capture.len();
    let (sent, confirms, publishing) =
        publish_steadily(channel, INBOUND_EXCHANGE, None, &steady.messages, rate).await?;
    let backlog_after_publishing = worker
        .metrics()
        .await
        .map(|metrics| metrics.backlog)
        .unwrap_or_default();
    all_acked(confirms).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while capture.len() < before + steady.expected.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let times = Times::between(
        &sent,
        capture.arrivals.lock().expect("capture lock")[before..]
            .iter()
            .map(|arrival| (arrival.causation.as_str(), arrival.at)),
    );
    Ok(Latency {
        times,
        achieved_rate: steady.messages.len() as f64 / publishing,
        backlog_after_publishing,
        ..Latency::default()
    })
}
