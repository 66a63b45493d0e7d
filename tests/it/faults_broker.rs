//! Broker faults: `training-credits run` as a child process reaches RabbitMQ
//! through a TCP proxy the test controls (tests/support/proxy.rs), while the
//! test publishes a stream of mixed events (tests/support/stream.rs) and
//! captures what comes out over a connection of its own, straight to the
//! broker. The proxy cuts the worker's connections several times, makes the
//! broker unreachable for a while, and stalls connections without closing
//! them; the worker reconnects and, at the end, every account holds what the
//! events give, `verify` exits 0, nothing is dead-lettered, every expected
//! outbound event arrived under exactly one id and every email exactly once.
//! (A close from the broker's side is tested in tests/it/worker_faults.rs.)
//!
//! A stalled connection tells neither end anything: only heartbeats find
//! it. The worker uses the heartbeat negotiated with the broker: its own
//! default, unless `AMQP_URL` asks for one (`?heartbeat=SECONDS`), and lapin
//! gives a connection up after two heartbeats without a byte from the
//! broker. The stall tests ask for [`HEARTBEAT_SECONDS`] so they finish
//! quickly.

use crate::support as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use training_credits::broker::topology::WORKER_QUEUE;
use training_credits::store::Store;

use common::broker::{Client, SmtpSink, Vhost, eventually, publish_confirmed};
use common::child::{RunningWorker, Site};
use common::proxy::{Mode, Proxy};
use common::stream::{Rng, Stream, seed_from_env};

/// Inbound events in each test's stream.
const EVENTS: usize = 1_500;
/// How long the stream takes to publish: the faults fall within it.
const STREAM_TIME: Duration = Duration::from_secs(10);
/// Events published between two waits for their confirms.
const PUBLISH_WINDOW: usize = 50;
/// Connection cuts in the cut test.
const CUTS: usize = 6;
/// How long the broker is unreachable in the outage test.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long every connection stalls in the stall test.
const STALL: Duration = Duration::from_secs(10);
/// The heartbeat the stall tests ask for in `AMQP_URL`.
const HEARTBEAT_SECONDS: u64 = 2;
/// How long after a stall begins the worker may take to notice it: lapin
/// gives up after two heartbeats without a byte (checked every half
/// heartbeat), plus time for the worker to report it.
const STALL_NOTICED_WITHIN: Duration = Duration::from_secs(4 * HEARTBEAT_SECONDS + 4);

/// One test's world: a vhost, the proxy in front of the broker, an SMTP
/// sink, the test's own client, the worker's site and the stream.
struct Rig {
    vhost: Vhost,
    proxy: Proxy,
    smtp: SmtpSink,
    client: Client,
    site: Site,
    stream: Stream,
    seed: u64,
    published: Arc<AtomicUsize>,
}

impl Rig {
    /// The worker's `AMQP_URL` goes through the proxy, with `query` appended
    /// (`heartbeat=2`, or nothing).
    async fn new(url: &str, name: &str, query: &str) -> Rig {
        let seed = seed_from_env("FAULTS_SEED");
        eprintln!("{name}: seed {seed:#x} (FAULTS_SEED={seed:#x} replays it)");
        let vhost = Vhost::new();
        let proxy = Proxy::start("127.0.0.1:5672").await;
        let smtp = SmtpSink::start_new().await;
        let mut amqp = format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            proxy.port(),
            vhost.name
        );
        if !query.is_empty() {
            amqp = format!("{amqp}?{query}");
        }
        let site = Site::with_amqp_url(url, &amqp)
            .with_env("SMTP_URL", &smtp.url())
            .with_env("RETRY_DELAYS", "1s,2s,5s,10s");
        let client = Client::new(&vhost).await;
        Rig {
            vhost,
            proxy,
            smtp,
            client,
            site,
            stream: Stream::mixed(seed, EVENTS, "ev"),
            seed,
            published: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Starts the worker and has it apply the stream's setup.
    async fn start_worker(&self) -> RunningWorker {
        let mut worker = self.site.start_worker("the worker");
        worker.await_ready().await;
        self.stream.apply_setup(&self.client, &self.vhost).await;
        worker
    }

    /// Publishes the stream over [`STREAM_TIME`], straight to the broker.
    fn publish(&self) -> tokio::task::JoinHandle<()> {
        let channel = self.client.channel.clone();
        let events = self.stream.events.clone();
        let published = self.published.clone();
        let windows = u32::try_from(events.len().div_ceil(PUBLISH_WINDOW)).expect("windows");
        let pause = STREAM_TIME / windows.max(1);
        tokio::spawn(async move {
            for window in events.chunks(PUBLISH_WINDOW) {
                publish_confirmed(&channel, window).await;
                published.fetch_add(window.len(), Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
        })
    }

    fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }

    /// Waits until the whole stream is applied and everything it produced
    /// has arrived, then checks it all: balances, `verify`, no dead letter,
    /// each outbound event once by cause, each email exactly once. Returns
    /// the figures, in words.
    async fn assert_nothing_lost_nothing_doubled<S: Store>(
        &self,
        store: &S,
        publisher: tokio::task::JoinHandle<()>,
    ) -> String {
        publisher.await.expect("the stream is published");
        eventually(
            Duration::from_secs(90),
            "the worker queue to be empty (ready and unacknowledged)",
            || async { self.vhost.queue_messages(WORKER_QUEUE) == Some(0) },
        )
        .await;
        self.stream.check_balances(store).await;
        self.site.assert_verifies(Duration::from_secs(60)).await;
        assert_eq!(
            self.client.dead_letter_count().await,
            0,
            "nothing dead-lettered"
        );
        eventually(
            Duration::from_secs(90),
            "the outbox to be drained and everything to arrive",
            || async {
                store
                    .outbox_backlog()
                    .await
                    .expect("the outbox backlog")
                    .iter()
                    .all(|b| b.rows == 0)
                    && self.client.distinct_outbound_ids() >= self.stream.outbound.len()
                    && self.smtp.received().len() >= self.stream.emails.len()
            },
        )
        .await;
        let outbound = self.stream.check_outbound(&self.client.outbound());
        let mails = self.stream.check_emails(&self.smtp.mails());
        // The broker's faults never touch the SMTP conversation.
        assert_eq!(mails.repeats, 0, "no email was sent twice");
        format!(
            "{} inbound events, {} outbound events ({} repeated deliveries of the same id), {} \
             emails once each",
            self.stream.setup.len() + self.stream.events.len(),
            outbound.events,
            outbound.repeats,
            self.stream.emails.len()
        )
    }
}

/// Waits until the worker says it is not ready (`/readyz`), within `limit`;
/// returns how long that took.
async fn await_not_ready(worker: &RunningWorker, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    eventually(limit, what, || async { !worker.is_ready().await }).await;
    started.elapsed()
}

async fn the_worker_reconnects_after_every_cut_and_loses_and_doubles_nothing<S: Store>(
    store: S,
    url: String,
) {
    let rig = Rig::new(&url, "cuts", "").await;
    let mut worker = rig.start_worker().await;
    let publisher = rig.publish();
    let mut rng = Rng(rig.seed ^ 0xc075);
    let mut reconnected = 0;
    for cut in 1..=CUTS {
        tokio::time::sleep(Duration::from_millis(rng.between(300, 1_400))).await;
        let accepted = rig.proxy.accepted();
        rig.proxy.cut();
        // The consumer's session ends with its connection and starts anew
        // through the proxy.
        eventually(
            Duration::from_secs(30),
            &format!("the worker to reconnect after cut {cut}"),
            || async { rig.proxy.accepted() > accepted && worker.is_ready().await },
        )
        .await;
        reconnected += 1;
        eprintln!(
            "cut {cut}/{CUTS}: {} published, {} outbound events captured; reconnected",
            rig.published(),
            rig.client.outbound().len()
        );
    }
    let figures = rig
        .assert_nothing_lost_nothing_doubled(&store, publisher)
        .await;
    assert!(worker.is_running(), "the worker kept running");
    assert!(
        worker.log().contains("Lost the broker; reconnecting."),
        "the worker said it lost the broker:\n{}",
        worker.log()
    );
    eprintln!(
        "cuts: {CUTS} cuts, {reconnected} reconnections, {} connections through the proxy, \
         {figures}",
        rig.proxy.accepted(),
    );
    worker.stop_with("TERM").await;
}

async fn the_worker_waits_out_an_unreachable_broker_and_resumes<S: Store>(store: S, url: String) {
    let rig = Rig::new(&url, "outage", "").await;
    let mut worker = rig.start_worker().await;
    let publisher = rig.publish();
    tokio::time::sleep(STREAM_TIME / 3).await;
    let published_before = rig.published();
    rig.proxy.set(Mode::Down);
    let down = Instant::now();
    let noticed = await_not_ready(
        &worker,
        Duration::from_secs(10),
        "the worker to report the broker gone",
    )
    .await;
    tokio::time::sleep(OUTAGE.saturating_sub(down.elapsed())).await;
    assert!(
        !worker.is_ready().await,
        "not ready while the broker is out of reach"
    );
    assert!(worker.is_running(), "the worker waits, it does not exit");
    let captured_during = rig.client.outbound().len();
    rig.proxy.set(Mode::Pass);
    let back = Instant::now();
    worker.await_ready().await;
    let recovered = back.elapsed();
    let figures = rig
        .assert_nothing_lost_nothing_doubled(&store, publisher)
        .await;
    eprintln!(
        "outage: broker unreachable for {OUTAGE:?} after {published_before} published \
         ({captured_during} outbound events by then); noticed in {noticed:?}, ready again \
         {recovered:?} after it was back; {figures}"
    );
    worker.stop_with("TERM").await;
}

async fn a_half_open_connection_is_found_by_heartbeats_and_replaced<S: Store>(
    store: S,
    url: String,
) {
    let rig = Rig::new(&url, "half-open", &format!("heartbeat={HEARTBEAT_SECONDS}")).await;
    let worker = rig.start_worker().await;
    let publisher = rig.publish();
    tokio::time::sleep(STREAM_TIME / 3).await;
    let accepted = rig.proxy.accepted();
    let captured = rig.client.outbound().len();
    // The broker's side of the connections open now: the worker's, through
    // the proxy, and the test's own client, which stays.
    let before = rig.vhost.connections();
    // The connections open now go silent for good; new ones pass.
    rig.proxy.stall_open();
    let stalled = Instant::now();
    eventually(
        STALL_NOTICED_WITHIN,
        "the worker to open a new connection in place of the stalled one",
        || async { rig.proxy.accepted() > accepted },
    )
    .await;
    let replaced = stalled.elapsed();
    eventually(
        Duration::from_secs(30),
        "outbound events to flow again",
        || async { rig.client.outbound().len() > captured },
    )
    .await;
    let flowing = stalled.elapsed();
    // The broker gives the stalled connections up by its own heartbeat
    // check; until then it holds their unacknowledged deliveries, which it
    // then delivers again after what the new connection has taken.
    eventually(
        Duration::from_secs(60),
        "the broker to close the stalled connections",
        || async {
            let now = rig.vhost.connections();
            before.iter().filter(|c| now.contains(c)).count() <= 1
        },
    )
    .await;
    let broker_closed = stalled.elapsed();
    let figures = rig
        .assert_nothing_lost_nothing_doubled(&store, publisher)
        .await;
    assert!(
        worker.log().contains("Lost the broker; reconnecting."),
        "the worker said it lost the broker:\n{}",
        worker.log()
    );
    eprintln!(
        "half-open: heartbeat {HEARTBEAT_SECONDS} s; the stalled connection was replaced after \
         {replaced:?}, events flowed again after {flowing:?} (the stall was never lifted), the \
         broker closed its side after about {broker_closed:?}; {figures}"
    );
    worker.stop_with("TERM").await;
}

async fn a_stalled_broker_is_noticed_and_the_worker_resumes_when_it_answers_again<S: Store>(
    store: S,
    url: String,
) {
    let rig = Rig::new(&url, "stall", &format!("heartbeat={HEARTBEAT_SECONDS}")).await;
    let mut worker = rig.start_worker().await;
    let publisher = rig.publish();
    tokio::time::sleep(STREAM_TIME / 3).await;
    rig.proxy.set(Mode::Stall);
    let noticed = await_not_ready(
        &worker,
        STALL_NOTICED_WITHIN,
        "the worker to notice the stalled broker",
    )
    .await;
    let stalled_for = STALL.saturating_sub(noticed);
    tokio::time::sleep(stalled_for).await;
    assert!(
        !worker.is_ready().await,
        "not ready while the broker is silent"
    );
    assert!(worker.is_running(), "the worker waits, it does not exit");
    rig.proxy.set(Mode::Pass);
    let back = Instant::now();
    worker.await_ready().await;
    let recovered = back.elapsed();
    let figures = rig
        .assert_nothing_lost_nothing_doubled(&store, publisher)
        .await;
    eprintln!(
        "stall: heartbeat {HEARTBEAT_SECONDS} s; every connection stalled for {STALL:?}, noticed \
         in {noticed:?}, ready again {recovered:?} after the broker answered again; {figures}"
    );
    worker.stop_with("TERM").await;
}

on_both_stores!(
    the_worker_reconnects_after_every_cut_and_loses_and_doubles_nothing,
    the_worker_waits_out_an_unreachable_broker_and_resumes,
    a_half_open_connection_is_found_by_heartbeats_and_replaced,
    a_stalled_broker_is_noticed_and_the_worker_resumes_when_it_answers_again,
);
