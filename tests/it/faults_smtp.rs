//! The worker against an SMTP server that misbehaves (issue 6, item 4): one
//! that refuses (at the greeting, or the message after its DATA, for a
//! while or for good), one that stalls in the middle of a conversation
//! (after `MAIL FROM`, in the middle of DATA, or after the end of DATA with
//! the message kept), and one that disappears while emails flow and comes
//! back. In every case the emails wait in the outbox, the outbound events do
//! not wait for them, and once the server takes mail again each email is
//! delivered once, counted by `Message-ID` and by recipient and subject.
//!
//! The SMTP side does not depend on the ledger's backend; these run on
//! SQLite. The worker runs in this process, on its own vhost, with the
//! sink's URL carrying `timeout=2s`, so a stalled conversation costs two
//! seconds instead of the default thirty.

use crate::support as common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use training_credits::notify::Email;
use training_credits::store::SqliteStore;

use common::broker::{
    Client, SmtpFault, SmtpSink, TestWorker, Vhost, bare_message_id, config, eventually,
    publish_purchases_until,
};
use common::events::{opened, purchase};
use common::{assert_verified, available_now as available};

/// Long enough for anything the worker does at once, on a loaded machine.
const SOON: Duration = Duration::from_secs(20);
/// How long the worker waits for the SMTP server in these tests (the
/// `timeout` of `SMTP_URL`).
const SMTP_TIMEOUT: &str = "2s";

/// A SQLite ledger, a vhost, a client capturing the outbound events, and a
/// worker sending its emails to `smtp`.
struct Rig {
    store: SqliteStore,
    url: String,
    client: Arc<Client>,
    worker: TestWorker,
    _vhost: Vhost,
    _mail_dir: tempfile::TempDir,
    _keep: common::Keep,
}

async fn rig(smtp: &SmtpSink) -> Rig {
    let (store, url, keep) = common::sqlite_store().await;
    let vhost = Vhost::new();
    let client = Arc::new(Client::new(&vhost).await);
    let mail_dir = tempfile::tempdir().expect("a folder");
    let smtp_url = format!("{}?timeout={SMTP_TIMEOUT}", smtp.url());
    let worker = TestWorker::start(
        store.clone(),
        config(&vhost, &url, Some(&smtp_url), mail_dir.path()),
    )
    .await;
    Rig {
        store,
        url,
        client,
        worker,
        _vhost: vhost,
        _mail_dir: mail_dir,
        _keep: keep,
    }
}

/// One email row of the outbox, dispatched or not.
#[derive(Debug)]
struct EmailRow {
    email: Email,
    attempts: i64,
    dispatched: bool,
}

/// Every email the ledger ever put in its outbox, oldest first.
async fn outbox_emails(url: &str) -> Vec<EmailRow> {
    use sqlx::Row;
    let pool = sqlx::SqlitePool::connect(url).await.expect("SQLite opens");
    let rows = sqlx::query(
        "SELECT payload, attempts, dispatched_at IS NOT NULL AS dispatched \
         FROM outbox WHERE kind = 'email' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .expect("the outbox");
    pool.close().await;
    rows.iter()
        .map(|row| EmailRow {
            email: serde_json::from_str(&row.get::<String, _>("payload")).expect("an email row"),
            attempts: row.get("attempts"),
            dispatched: row.get::<bool, _>("dispatched"),
        })
        .collect()
}

/// How many times each item occurs.
fn tally<T: Ord>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts
}

/// What the sink received against what the outbox holds: each `Message-ID`
/// of the outbox received `copies` times and nothing else; the same by
/// recipient and subject.
fn assert_each_received(smtp: &SmtpSink, outbox: &[EmailRow], copies: usize) {
    let expected_ids = tally(
        outbox
            .iter()
            .flat_map(|row| std::iter::repeat_n(bare_message_id(&row.email.message_id), copies)),
    );
    let received_ids = tally(smtp.mails().iter().map(|m| bare_message_id(&m.message_id)));
    assert_eq!(received_ids, expected_ids, "emails received, by Message-ID");
    let expected_pairs = tally(outbox.iter().flat_map(|row| {
        std::iter::repeat_n(
            (row.email.to_email.clone(), row.email.subject.clone()),
            copies,
        )
    }));
    let received_pairs = tally(smtp.mails().into_iter().map(|m| (m.to, m.subject)));
    assert_eq!(
        received_pairs, expected_pairs,
        "emails received, by recipient and subject"
    );
}

/// Waits until the outbox holds `count` emails, all dispatched.
async fn await_all_dispatched(url: &str, count: usize) {
    eventually(SOON, &format!("{count} emails dispatched"), || async {
        let rows = outbox_emails(url).await;
        rows.len() == count && rows.iter().all(|row| row.dispatched)
    })
    .await;
}

/// Two purchases on an account of two owners: four emails. The sink meets
/// `fault` (in the first `times` conversations, or until healed); every
/// email is tried and fails at least once, then the sink is healed (unless
/// the fault was for a number of conversations only) and each email arrives
/// `copies` times. Returns the outbox's emails.
async fn emails_outlast(fault: SmtpFault, times: Option<u64>, copies: usize) -> Vec<EmailRow> {
    let smtp = SmtpSink::start_new().await;
    smtp.inject(fault, times);
    let rig = rig(&smtp).await;
    let client = &rig.client;
    client
        .publish(&opened(
            "f-open",
            "faulty",
            &["ann@faulty.test", "bob@faulty.test"],
        ))
        .await;
    client
        .publish(&purchase("f-buy-1", "faulty", "p1", "10"))
        .await;
    client
        .publish(&purchase("f-buy-2", "faulty", "p2", "20"))
        .await;
    // The outbound events do not wait for the emails.
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;

    if times.is_none() {
        eventually(SOON, "four emails tried, none delivered", || async {
            let rows = outbox_emails(&rig.url).await;
            rows.len() == 4 && rows.iter().all(|row| row.attempts >= 1 && !row.dispatched)
        })
        .await;
        assert!(smtp.received().is_empty(), "nothing was accepted");
        smtp.heal();
    }
    await_all_dispatched(&rig.url, 4).await;
    let outbox = outbox_emails(&rig.url).await;
    assert!(
        smtp.faults_injected() >= 1,
        "the fault was met: {} conversations",
        smtp.conversations()
    );
    assert!(
        outbox.iter().any(|row| row.attempts >= 1),
        "an email failed before it went: {outbox:#?}"
    );
    assert_each_received(&smtp, &outbox, copies);

    assert_eq!(rig.client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    // Stopped: nothing more can arrive; what was counted is all there is.
    assert_each_received(&smtp, &outbox, copies);
    assert_eq!(
        rig.client
            .outbound_of("training-credits.purchase.recorded")
            .len(),
        2
    );
    assert_eq!(
        available(&rig.store, "faulty").await.as_deref(),
        Some("30.00")
    );
    assert_verified(&rig.store).await;
    outbox
}

// 1. Refusals.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_refused_at_the_greeting_with_421_wait_and_go_out_once_when_the_server_is_back() {
    let outbox = emails_outlast(SmtpFault::Greeting(421), None, 1).await;
    assert!(outbox.iter().all(|row| row.attempts >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_refused_with_451_after_their_data_wait_and_go_out_once_when_accepted() {
    let outbox = emails_outlast(SmtpFault::RejectData(451), None, 1).await;
    assert!(outbox.iter().all(|row| row.attempts >= 1));
}

/// A permanent refusal is not a reason to drop an email either: it waits,
/// tried with backoff, until the server takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_refused_with_554_after_their_data_are_kept_and_go_out_once_when_accepted() {
    let outbox = emails_outlast(SmtpFault::RejectData(554), None, 1).await;
    assert!(outbox.iter().all(|row| row.attempts >= 1));
}

// 2. Stalls: the first conversation hangs; the worker gives up on it after
// its timeout, on a fresh connection the email goes out, and so do the
// others (a stalled connection is never used again).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_after_mail_from_delays_one_email_which_then_goes_out_once() {
    let outbox = emails_outlast(SmtpFault::StallAfterMailFrom, Some(1), 1).await;
    assert_eq!(
        outbox.iter().filter(|row| row.attempts >= 1).count(),
        1,
        "only the email in the stalled conversation was tried twice: {outbox:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_in_the_middle_of_data_delays_one_email_which_then_goes_out_once() {
    let outbox = emails_outlast(SmtpFault::StallInData, Some(1), 1).await;
    assert_eq!(
        outbox.iter().filter(|row| row.attempts >= 1).count(),
        1,
        "only the email in the stalled conversation was tried twice: {outbox:#?}"
    );
}

/// The one duplicate SMTP cannot rule out: the server kept the message but
/// its `250` never came. The worker cannot know, so the email is sent again
/// — with the same `Message-ID`, which is what lets a receiver drop the
/// copy. Every other email arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_kept_but_never_acknowledged_is_sent_again_with_the_same_message_id() {
    let smtp = SmtpSink::start_new().await;
    smtp.inject(SmtpFault::StallAfterData, Some(1));
    let rig = rig(&smtp).await;
    let client = &rig.client;
    client
        .publish(&opened(
            "k-open",
            "kept",
            &["ann@kept.test", "bob@kept.test"],
        ))
        .await;
    client.publish(&purchase("k-buy", "kept", "p1", "10")).await;
    await_all_dispatched(&rig.url, 2).await;
    rig.worker.stop().await;

    let outbox = outbox_emails(&rig.url).await;
    let retried: Vec<&EmailRow> = outbox.iter().filter(|row| row.attempts >= 1).collect();
    assert_eq!(retried.len(), 1, "one email met the stall: {outbox:#?}");
    let twice = bare_message_id(&retried[0].email.message_id);
    let received = tally(smtp.mails().iter().map(|m| bare_message_id(&m.message_id)));
    let expected: BTreeMap<String, usize> = outbox
        .iter()
        .map(|row| {
            let id = bare_message_id(&row.email.message_id);
            let copies = if id == twice { 2 } else { 1 };
            (id, copies)
        })
        .collect();
    assert_eq!(
        received, expected,
        "the unacknowledged email twice under one Message-ID, the other once"
    );
    assert_verified(&rig.store).await;
}

// 3. The server disappears while emails flow, and comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_wait_when_the_server_disappears_mid_stream_and_each_goes_out_once_when_it_is_back()
{
    /// Purchases published at most: a bound, should the worker never recover.
    const PURCHASES_MAX: usize = 400;
    let mut smtp = SmtpSink::start_new().await;
    let rig = rig(&smtp).await;
    let client = rig.client.clone();
    client
        .publish(&opened(
            "g-open",
            "gone",
            &["ann@gone.test", "bob@gone.test"],
        ))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = publish_purchases_until(
        client.clone(),
        stop.clone(),
        ("g", "gone"),
        PURCHASES_MAX,
        Duration::from_millis(50),
    );
    // Emails flow, over a connection lettre keeps open between them.
    eventually(SOON, "ten emails delivered", || async {
        smtp.received().len() >= 10
    })
    .await;
    smtp.stop();
    let delivered_before = smtp.received().len();
    eventually(SOON, "emails failing while the server is gone", || async {
        outbox_emails(&rig.url)
            .await
            .iter()
            .filter(|row| !row.dispatched && row.attempts >= 1)
            .count()
            >= 6
    })
    .await;
    smtp.start().await;
    eventually(SOON, "emails delivered again", || async {
        smtp.received().len() >= delivered_before + 10
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let purchases = publisher.await.expect("the purchases published");
    assert!(purchases < PURCHASES_MAX, "the flow was stopped");

    await_all_dispatched(&rig.url, 2 * purchases).await;
    client
        .await_outbound("training-credits.purchase.recorded", purchases)
        .await;
    assert_eq!(client.dead_letter_count().await, 0);
    rig.worker.stop().await;
    let outbox = outbox_emails(&rig.url).await;
    assert_eq!(outbox.len(), 2 * purchases, "two owners, one email each");
    let failed = outbox.iter().filter(|row| row.attempts >= 1).count();
    assert!(failed >= 6, "emails failed while the server was gone");
    assert_each_received(&smtp, &outbox, 1);
    assert_eq!(
        available(&rig.store, "gone").await,
        Some(format!("{purchases}.00"))
    );
    assert_verified(&rig.store).await;
    println!(
        "{purchases} purchases, {} emails each delivered once, {failed} of them after failing",
        outbox.len()
    );
}
