//! Stopping and feeding the real binary: `training-credits run` as a child
//! process, stopped by SIGTERM or SIGINT in the middle of a stream of events
//! and started again, and `training-credits publish FILE`. Each test has its
//! own vhost and database, on SQLite and on PostgreSQL.

use crate::support as common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use training_credits::broker::topology::WORKER_QUEUE;
use training_credits::store::Store;

use common::broker::{Client, TestWorker, Vhost, config, eventually, publish_confirmed};
use common::child::{Site, exit_within, write};
use common::events::{event, purchase};

/// Purchases in the stream that the worker is stopped in the middle of.
const STREAM_PURCHASES: usize = 1_000;
/// The publisher waits for the SIGTERM after this many purchases, so the
/// signal always lands while the stream is still coming in.
const PUBLISHED_BEFORE_SIGTERM_MAX: usize = 500;
/// Purchases published between two waits for their confirms.
const PUBLISH_WINDOW: usize = 25;

fn account_opened(account_id: &str) -> Value {
    event(
        &format!("open-{account_id}"),
        "portal",
        "credits.account.opened",
        json!({
            "account_id": account_id,
            "owners": [{"email": format!("boss@{account_id}.test"), "name": "Bo Boss"}],
            "approval_mode": "automatic",
        }),
    )
}

/// How many lots the ledger holds for `account_id`.
async fn lots_of<S: Store>(store: &S, account_id: &str) -> usize {
    common::account_in(store, account_id)
        .await
        .map_or(0, |account| account.lots.len())
}

/// The `purchase_id`s of every `purchase.recorded` captured so far.
fn recorded_purchases(client: &Client) -> BTreeSet<String> {
    client
        .outbound_of("training-credits.purchase.recorded")
        .iter()
        .filter_map(|e| e["data"]["purchase_id"].as_str().map(str::to_owned))
        .collect()
}

async fn sigterm_during_a_stream_loses_nothing_and_doubles_nothing<S: Store>(
    store: S,
    url: String,
) {
    let vhost = Vhost::new();
    let site = Site::new(&url, &vhost);
    let client = Client::new(&vhost).await;
    let mut first = site.start_worker("the first worker");
    first.await_ready().await;

    client.publish(&account_opened("acme")).await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;

    // The stream: published on a channel of its own, with confirms, while
    // the worker runs, stops and runs again.
    let purchases: Vec<Value> = (1..=STREAM_PURCHASES)
        .map(|n| purchase(&format!("buy-{n:04}"), "acme", &format!("p-{n:04}"), "1.00"))
        .collect();
    let published = Arc::new(AtomicUsize::new(0));
    let (signalled, signal_sent) = tokio::sync::oneshot::channel::<()>();
    let publisher = {
        let channel = client.channel.clone();
        let purchases = purchases.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let mut signal_sent = Some(signal_sent);
            for window in purchases.chunks(PUBLISH_WINDOW) {
                if published.load(Ordering::SeqCst) >= PUBLISHED_BEFORE_SIGTERM_MAX
                    && let Some(sent) = signal_sent.take()
                {
                    let _ = sent.await;
                }
                publish_confirmed(&channel, window).await;
                published.fetch_add(window.len(), Ordering::SeqCst);
            }
        })
    };

    eventually(
        Duration::from_secs(30),
        "100 purchases recorded by the first worker",
        || async {
            client
                .outbound_of("training-credits.purchase.recorded")
                .len()
                >= 100
        },
    )
    .await;
    let published_at_sigterm = published.load(Ordering::SeqCst);
    let recorded_at_sigterm = recorded_purchases(&client).len();
    first.signal("TERM");
    // The rest of the stream comes in while the worker stops.
    let _ = signalled.send(());
    let stop_took = first.await_exit("TERM").await;
    let published_at_exit = published.load(Ordering::SeqCst);
    let applied_by_first = lots_of(&store, "acme").await;
    let backlog_after_first = store.outbox_backlog().await.expect("the outbox backlog");
    assert!(
        published_at_sigterm < STREAM_PURCHASES,
        "the stream was still coming in at SIGTERM"
    );

    let started = Instant::now();
    let mut second = site.start_worker("the second worker");
    second.await_ready().await;
    publisher.await.expect("the stream is published");
    eventually(
        Duration::from_secs(40),
        "every purchase applied and recorded",
        || async {
            recorded_purchases(&client).len() == STREAM_PURCHASES
                && lots_of(&store, "acme").await == STREAM_PURCHASES
        },
    )
    .await;
    let caught_up = started.elapsed();

    // The ledger: exactly one lot of 1.00 per purchase.
    let shown = site
        .output(&["account", "show", "acme"], Duration::from_secs(30))
        .await;
    assert_eq!(shown.code(), Some(0), "account show: {}", shown.stderr);
    let account: Value = serde_json::from_str(&shown.stdout).expect("account show prints JSON");
    assert_eq!(account["balance"], "1000.00");
    assert_eq!(account["available"], "1000.00");
    assert_eq!(account["held"], "0.00");
    let lots = account["lots"].as_array().expect("lots");
    assert_eq!(lots.len(), STREAM_PURCHASES);
    let lot_ids: BTreeSet<&str> = lots
        .iter()
        .map(|lot| {
            assert_eq!(lot["credits"], "1.00", "{lot}");
            assert_eq!(lot["remaining"], "1.00", "{lot}");
            lot["purchase_id"].as_str().expect("a purchase id")
        })
        .collect();
    assert_eq!(lot_ids.len(), STREAM_PURCHASES, "one lot per purchase");
    site.assert_verifies(Duration::from_secs(30)).await;

    // The broker: nothing left to do, nothing dead-lettered.
    eventually(
        Duration::from_secs(30),
        "the worker queue to be empty (ready and unacknowledged)",
        || async { vhost.queue_messages(WORKER_QUEUE) == Some(0) },
    )
    .await;
    assert_eq!(client.dead_letter_count().await, 0, "nothing dead-lettered");

    // The outbound events: at least once, never two ids for one cause.
    let outbound = client.outbound();
    let mut ids_by_cause: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &outbound {
        let cause = e["data"]["causation_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a causation_id in {e}"))
            .to_owned();
        let id = e["id"].as_str().expect("an event id").to_owned();
        ids_by_cause.entry(cause).or_default().insert(id);
    }
    for (cause, ids) in &ids_by_cause {
        assert_eq!(ids.len(), 1, "{cause} caused several events: {ids:?}");
    }
    let recorded = client.outbound_of("training-credits.purchase.recorded");
    let recorded_causes: BTreeSet<&str> = recorded
        .iter()
        .filter_map(|e| e["data"]["causation_id"].as_str())
        .collect();
    for inbound in &purchases {
        let id = inbound["id"].as_str().expect("an id");
        assert!(
            recorded_causes.contains(id),
            "{id} produced no purchase.recorded"
        );
    }
    let repeated = recorded.len() - recorded_causes.len();

    let second_stop_took = second.stop_with("TERM").await;
    assert_eq!(
        client.ready_count(WORKER_QUEUE).await,
        0,
        "nothing was left in the worker queue"
    );
    eprintln!(
        "SIGTERM after {published_at_sigterm} published and {recorded_at_sigterm} recorded; \
         the first worker stopped in {stop_took:?} ({published_at_exit} published by then) \
         having applied {applied_by_first}, \
         outbox backlog then {backlog_after_first:?}; the second caught up in {caught_up:?} \
         and stopped in {second_stop_took:?}; {repeated} purchase.recorded repeated"
    );
}

async fn publish_sends_a_file_of_events_with_confirms<S: Store>(store: S, url: String) {
    let vhost = Vhost::new();
    let site = Site::new(&url, &vhost);
    let mail_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    let worker =
        TestWorker::start(store.clone(), config(&vhost, &url, None, mail_dir.path())).await;

    // JSON Lines, a blank line among them.
    let lines = [
        account_opened("acme"),
        purchase("file-1", "acme", "pf-1", "10"),
        purchase("file-2", "acme", "pf-2", "20.50"),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n\n");
    let jsonl = write(&site.folder.path().join("events.jsonl"), &lines);
    let published = site
        .output(&["publish", &jsonl], Duration::from_secs(30))
        .await;
    assert_eq!(published.code(), Some(0), "publish: {}", published.stderr);
    assert!(
        published.stderr.contains("Published 3 events."),
        "{}",
        published.stderr
    );
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;
    assert_eq!(
        client.outbound_of("training-credits.account.opened").len(),
        1
    );

    // One CloudEvent object, pretty-printed over several lines.
    let single =
        serde_json::to_string_pretty(&purchase("file-3", "acme", "pf-3", "5")).expect("JSON");
    let object = write(&site.folder.path().join("event.json"), &single);
    let published = site
        .output(&["publish", &object], Duration::from_secs(30))
        .await;
    assert_eq!(published.code(), Some(0), "publish: {}", published.stderr);
    let recorded = client
        .await_outbound("training-credits.purchase.recorded", 3)
        .await;
    assert_eq!(
        recorded.last().expect("an event")["data"]["available"],
        "35.50"
    );

    // A line that is not JSON: nothing of the file is published.
    let broken = format!(
        "{}\nnot json at all\n{}\n",
        purchase("bad-1", "acme", "pb-1", "1"),
        purchase("bad-2", "acme", "pb-2", "1"),
    );
    let broken = write(&site.folder.path().join("broken.jsonl"), &broken);
    let refused = site
        .output(&["publish", &broken], Duration::from_secs(30))
        .await;
    assert_eq!(refused.code(), Some(1), "publish of a broken file");
    assert!(refused.stderr.contains("line 2"), "{}", refused.stderr);
    assert_eq!(
        refused.stderr.trim().lines().count(),
        1,
        "{}",
        refused.stderr
    );
    // The queue is first in, first out: once a later purchase is recorded,
    // any purchase of the broken file would have been recorded before it.
    let after = write(
        &site.folder.path().join("after.jsonl"),
        &purchase("file-4", "acme", "pf-4", "1").to_string(),
    );
    let published = site
        .output(&["publish", &after], Duration::from_secs(30))
        .await;
    assert_eq!(published.code(), Some(0), "publish: {}", published.stderr);
    client
        .await_outbound("training-credits.purchase.recorded", 4)
        .await;
    let ids = recorded_purchases(&client);
    assert_eq!(
        ids,
        ["pf-1", "pf-2", "pf-3", "pf-4"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );

    worker.stop().await;
    let problems = store.verify().await.expect("verify runs");
    assert!(problems.is_empty(), "{problems:?}");
}

async fn run_stops_cleanly_on_sigint_too<S: Store>(store: S, url: String) {
    let vhost = Vhost::new();
    let site = Site::new(&url, &vhost);
    let client = Client::new(&vhost).await;
    let mut worker = site.start_worker("the worker");
    worker.await_ready().await;
    client.publish(&account_opened("acme")).await;
    client.publish(&purchase("buy-1", "acme", "p-1", "7")).await;
    client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    worker.stop_with("INT").await;
    assert_eq!(client.ready_count(WORKER_QUEUE).await, 0);
    assert_eq!(lots_of(&store, "acme").await, 1);
}

async fn run_refuses_a_taken_http_port<S: Store>(_store: S, url: String) {
    let vhost = Vhost::new();
    let site = Site::new(&url, &vhost);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
    let address = taken.local_addr().expect("an address").to_string();
    let mut command = site.command(&["run"]);
    command.env("HTTP_ADDR", &address);
    let err = site.folder.path().join("run.err");
    let mut child = command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("a stderr file"))
        .spawn()
        .expect("the binary starts");
    let status = exit_within(&mut child, Duration::from_secs(30)).await;
    let stderr = std::fs::read_to_string(&err).expect("stderr is UTF-8");
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("run on a taken port did not exit:\n{stderr}");
    };
    drop(taken);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("HTTP_ADDR"), "{stderr}");
    assert!(stderr.contains(&address), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// A worker started on a fresh vhost and database, given a message and
/// stopped logs no warning and no error: an alert on such lines fires only
/// for a fault. (Every start asks the broker after the upgrade's holding
/// queues, which are gone; lapin had logged each answer as an error.)
async fn a_clean_start_and_stop_log_no_warning_and_no_error<S: Store>(_store: S, url: String) {
    let vhost = Vhost::new();
    let site = Site::new(&url, &vhost);
    let client = Client::new(&vhost).await;
    let mut worker = site.start_worker_with("the worker", &[("LOG_FORMAT", "json")]);
    worker.await_ready().await;
    client.publish(&account_opened("acme")).await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;
    let log_file = worker.log.clone();
    worker.stop_with("TERM").await;
    let log = std::fs::read_to_string(log_file).expect("the worker's log");
    let levels: Vec<String> = log
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).expect("a JSON log line");
            line["level"].as_str().expect("a level").to_owned()
        })
        .collect();
    assert!(levels.contains(&"INFO".to_owned()), "{log}");
    assert!(
        levels
            .iter()
            .all(|level| level != "WARN" && level != "ERROR"),
        "{log}"
    );
}

on_both_stores!(
    sigterm_during_a_stream_loses_nothing_and_doubles_nothing,
    publish_sends_a_file_of_events_with_confirms,
    run_stops_cleanly_on_sigint_too,
    run_refuses_a_taken_http_port,
    a_clean_start_and_stop_log_no_warning_and_no_error,
);
