//! Crash safety: `training-credits run` as a child process under a stream of
//! mixed events (tests/support/stream.rs), killed with SIGKILL at random
//! moments and started again each time; at the end every account holds
//! what the events give by plain sums, `verify` exits 0, nothing was
//! dead-lettered, and no outbound event and no email was lost or produced
//! twice (by cause; see tests/support/stream.rs for the exact definition).
//! On SQLite and on PostgreSQL.
//!
//! The moments are drawn from a seeded generator; the seed is printed and
//! `CRASH_SEED=0x…` replays a run. The defaults ([`EVENTS`], [`KILLS`]) fit
//! CI; a longer soak:
//!
//! ```text
//! CRASH_SOAK_EVENTS=50000 CRASH_SOAK_KILLS=100 cargo test --test it crash:: -- --nocapture
//! ```
//!
//! A killed worker leaves the outbox rows it had leased; the next worker
//! finds their holder gone and sends them at once, instead of after the
//! lease (`dispatch::EVENT_LEASE`, half a minute, for events;
//! `dispatch::LEASE`, a minute, for emails): a second test kills a worker
//! whose events and emails are stuck and checks that its successor sends
//! them all within [`RESTART_SENDS_WITHIN`].

use crate::support as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use training_credits::broker::topology::WORKER_QUEUE;
use training_credits::dispatch::UNMARKED_MAX;
use training_credits::outbox::handoff::{CLAIM_ROWS_MAX, EMAILS_PER_ROUND, LEASE};
use training_credits::store::{OutboxKind, Store};

use common::broker::{Client, SmtpFault, SmtpSink, Vhost, eventually, publish_confirmed};
use common::child::Site;
use common::events::{opened, purchase};
use common::proxy::{Mode, Proxy};
use common::stream::{Rng, Stream, count_from_env, seed_from_env};

/// Inbound events in a run (`CRASH_SOAK_EVENTS` overrides).
const EVENTS: usize = 5_000;
/// SIGKILLs in a run (`CRASH_SOAK_KILLS` overrides).
const KILLS: usize = 12;
/// How long, on average, a worker lives between two kills: the stream is
/// paced to last about `KILLS` times this.
const LIFE_MEAN: Duration = Duration::from_millis(1_300);
/// A worker is killed before it is ready one time in this many percent.
const KILLED_STARTING_PERCENT: u64 = 20;
/// Events published between two waits for their confirms.
const PUBLISH_WINDOW: usize = 50;
/// Generous delays: a message that overtook its predecessor in a redelivery
/// must not run out of retries while a worker is down.
const RETRY_DELAYS: &str = "1s,2s,5s,10s";
/// How long the last worker may take to send what the killed ones left
/// leased, after the stream is applied.
const DRAIN_LIMIT: Duration = Duration::from_secs(LEASE.as_secs() + 60);

async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing<S: Store>(
    store: S,
    url: String,
) {
    let events = count_from_env("CRASH_SOAK_EVENTS", EVENTS);
    let kills = count_from_env("CRASH_SOAK_KILLS", KILLS);
    let seed = seed_from_env("CRASH_SEED");
    let backend = if url.starts_with("sqlite:") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    eprintln!(
        "crash on {backend}: seed {seed:#x} (CRASH_SEED={seed:#x} replays it), {events} events, {kills} kills"
    );
    let stream = Stream::mixed(seed, events, "ev");
    let started = Instant::now();

    let vhost = Vhost::new();
    let smtp = SmtpSink::start_new().await;
    let site = Site::new(&url, &vhost)
        .with_env("SMTP_URL", &smtp.url())
        .with_env("RETRY_DELAYS", RETRY_DELAYS);
    // The client declares the topology and binds its capture queue before
    // anything is published.
    let client = Client::new(&vhost).await;

    // The stream, paced to last about as long as the kills, once the setup
    // is applied.
    let published = Arc::new(AtomicUsize::new(0));
    let (go, setup_applied) = tokio::sync::oneshot::channel::<()>();
    let publishing = {
        let channel = client.channel.clone();
        let events = stream.events.clone();
        let published = published.clone();
        let windows = events.len().div_ceil(PUBLISH_WINDOW).max(1);
        let pause = LIFE_MEAN * u32::try_from(kills).expect("a count of kills")
            / u32::try_from(windows).expect("a count of windows");
        tokio::spawn(async move {
            setup_applied.await.expect("the setup is applied");
            for window in events.chunks(PUBLISH_WINDOW) {
                publish_confirmed(&channel, window).await;
                published.fetch_add(window.len(), Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
        })
    };
    let mut go = Some(go);

    let mut rng = Rng(seed ^ 0x6b11_1ed5);
    let mut killed_starting = 0;
    for k in 1..=kills {
        let mut worker = site.start_worker(&format!("worker {k}"));
        let born = Instant::now();
        if k == 1 {
            // The accounts learners redeem from exist before the first kill.
            worker.await_ready().await;
            stream.apply_setup(&client, &vhost).await;
            let go = go.take().expect("the stream starts once");
            go.send(()).expect("the publisher waits for the setup");
        }
        let ready = if rng.chance(KILLED_STARTING_PERCENT) {
            tokio::time::sleep(Duration::from_millis(rng.between(20, 600))).await;
            worker.is_ready().await
        } else {
            worker.await_ready().await;
            tokio::time::sleep(Duration::from_millis(rng.between(50, 2_000))).await;
            true
        };
        if !ready {
            killed_starting += 1;
        }
        let status = worker.kill();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "worker {k} died of SIGKILL"
        );
        eprintln!(
            "kill {k}/{kills} after {:?}{}: {} published, {} outbound events captured, {} emails received",
            born.elapsed(),
            if ready { "" } else { " (before it was ready)" },
            published.load(Ordering::SeqCst),
            client.outbound().len(),
            smtp.received().len(),
        );
    }

    let mut last = site.start_worker("the last worker");
    last.await_ready().await;
    publishing.await.expect("the stream is published");
    let published_at = started.elapsed();
    eventually(
        Duration::from_secs(120),
        "the worker queue to be empty (ready and unacknowledged)",
        || async { vhost.queue_messages(WORKER_QUEUE) == Some(0) },
    )
    .await;
    let applied_at = started.elapsed();

    // The ledger: what the events give, and consistent.
    stream.check_balances(&store).await;
    site.assert_verifies(Duration::from_secs(60)).await;
    assert_eq!(client.dead_letter_count().await, 0, "nothing dead-lettered");

    // The outbox: everything sent, once per cause.
    eventually(DRAIN_LIMIT, "the outbox to be drained", || async {
        store
            .outbox_backlog()
            .await
            .expect("the outbox backlog")
            .iter()
            .all(|b| b.rows == 0)
    })
    .await;
    let drained_at = started.elapsed();
    eventually(
        Duration::from_secs(30),
        "every outbound event and email to arrive",
        || async {
            client.distinct_outbound_ids() >= stream.outbound.len()
                && distinct_message_ids(&smtp) >= stream.emails.len()
        },
    )
    .await;
    let outbound = stream.check_outbound(&client.outbound());
    let mails = stream.check_emails(&smtp.mails());
    // Only a send cut short by a kill may repeat. Emails: a lane marks what
    // waits to be marked sent before sending more once UNMARKED_MAX rows
    // wait (a round may have been added on top, and another be on its way);
    // a batch may hold as many taken to be marked with its commit. Events:
    // once per claimed round.
    assert!(
        mails.repeats <= kills * (2 * (UNMARKED_MAX + EMAILS_PER_ROUND) + EMAILS_PER_ROUND),
        "{} emails repeated over {kills} kills",
        mails.repeats
    );
    assert!(
        outbound.repeats <= kills * usize::try_from(CLAIM_ROWS_MAX).expect("a small bound"),
        "{} outbound events repeated over {kills} kills",
        outbound.repeats
    );

    last.stop_with("TERM").await;
    eprintln!(
        "crash on {backend} (seed {seed:#x}): {kills} SIGKILLs survived ({killed_starting} before ready), \
         {} inbound events ({} setup, then {:?}), {} accounts right; published by {published_at:?}, \
         applied by {applied_at:?}, outbox drained by {drained_at:?}; {} outbound events ({} \
         repeated deliveries of the same id), {} emails ({} repeated sends of the same \
         Message-ID); nothing lost, nothing produced twice by cause",
        stream.setup.len() + stream.events.len(),
        stream.setup.len(),
        stream.kinds,
        stream.accounts.len(),
        outbound.events,
        outbound.repeats,
        mails.emails,
        mails.repeats,
    );
}

/// Distinct `Message-ID` headers received, read off the raw messages (cheap
/// enough to poll).
fn distinct_message_ids(smtp: &SmtpSink) -> usize {
    smtp.received()
        .iter()
        .filter_map(|raw| {
            raw.lines()
                .find(|line| line.to_ascii_lowercase().starts_with("message-id:"))
                .map(str::to_owned)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

on_both_stores!(sigkill_at_random_moments_loses_nothing_and_doubles_nothing);

/// Purchases whose events and emails the killed worker leaves behind.
const STUCK_PURCHASES: usize = 120;
/// How soon after its start a worker must have sent what a killed one left
/// (SPEC §5: within seconds, not after a lease).
const RESTART_SENDS_WITHIN: Duration = Duration::from_secs(5);

/// A worker whose broker connections stall mid-stream (its events published
/// into the void, never confirmed) and whose SMTP server stalls (its emails
/// in a conversation that never ends) holds leased rows when it is killed;
/// the worker started after it sends every event and email of every
/// committed message within [`RESTART_SENDS_WITHIN`] of its start.
async fn a_restarted_worker_sends_what_a_killed_one_left_within_seconds<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let client = Client::new(&vhost).await;
    let smtp = SmtpSink::start_new().await;
    smtp.inject(SmtpFault::StallAfterMailFrom, None);
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let killed_site = Site::with_amqp_url(
        &url,
        &format!("amqp://guest:guest@{}/{}", proxy.address(), vhost.name),
    )
    .with_env("SMTP_URL", &format!("{}?timeout=300s", smtp.url()))
    .with_env("BATCH_SIZE", "2");

    // Everything waits in the queue before the worker starts, so that it
    // takes the whole stream at once and applies it batch after batch.
    let mut stream = vec![opened("open", "acme", &["boss@acme.test"])];
    stream.extend(
        (0..STUCK_PURCHASES).map(|n| purchase(&format!("buy-{n}"), "acme", &format!("p{n}"), "1")),
    );
    publish_confirmed(&client.channel, &stream).await;
    let mut killed = killed_site.start_worker("the worker killed");
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.outbound().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the worker sent nothing:\n{}",
            killed.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Mid-stream: what it applies from now on cannot leave.
    proxy.set(Mode::Stall);
    tokio::time::sleep(Duration::from_secs(1)).await;
    killed.kill();
    // Its connections close, as a killed process's do: the broker gives
    // what it had not acknowledged to the next consumer.
    proxy.set(Mode::Down);
    let sent_before = client.distinct_outbound_ids();
    let leased = store
        .pending_outbox(10_000)
        .await
        .expect("the outbox")
        .into_iter()
        .filter(|row| {
            row.leased_by.is_some() && row.next_attempt_at > training_credits::domain::Ts::now()
        })
        .fold((0, 0), |(events, emails), row| match row.kind {
            OutboxKind::Event => (events + 1, emails),
            _ => (events, emails + 1),
        });
    assert!(
        leased.0 > 0 && leased.1 > 0,
        "the killed worker held leased events and emails ({leased:?}; {sent_before} events had left)"
    );
    smtp.heal();

    let site = Site::new(&url, &vhost).with_env("SMTP_URL", &smtp.url());
    let restarted = Instant::now();
    let mut successor = site.start_worker("its successor");
    eventually(
        RESTART_SENDS_WITHIN,
        "every event and email of the stream, sent by the successor",
        || async {
            client.distinct_outbound_ids() > STUCK_PURCHASES
                && distinct_message_ids(&smtp) >= STUCK_PURCHASES
        },
    )
    .await;
    eprintln!(
        "The successor sent what the killed worker left ({} events, {} emails leased) within {:?} of its start.",
        leased.0,
        leased.1,
        restarted.elapsed()
    );
    successor.await_ready().await;
    site.assert_verifies(Duration::from_secs(60)).await;
    successor.stop_with("TERM").await;
}

on_both_stores!(
    mod restart_on_sqlite, restart_on_postgres;
    a_restarted_worker_sends_what_a_killed_one_left_within_seconds
);
