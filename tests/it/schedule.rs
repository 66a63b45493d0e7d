//! The scheduler (SPEC §2 `*_CRON`, §3 `sweep`, §6 rules 4 and 6) driven
//! with controlled time: every test calls [`Scheduler::tick`] at the instants
//! it chooses, never sleeping through real minutes. Reminders once per stage,
//! the sweep idempotent, the pending timeout, the statements on the 1st, the
//! daily reports, catch-up after downtime, a failed job given back, and two
//! workers on one PostgreSQL database running each firing exactly once.

use crate::support as common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mail_parser::MimeHeaders;
use serde_json::{Value, json};
use training_credits::apply::Applier;
use training_credits::config::Config;
use training_credits::domain::command::{ReportFormat, ReportKind};
use training_credits::domain::{Outcome, Rejection, Ts};
use training_credits::report::ReportJob;
use training_credits::schedule::{Job, ScheduleError, Scheduler};
use training_credits::store::{OutboxKind, PgStore, Store};

use common::broker::{SmtpSink, TestWorker, Vhost, config, eventually};
use common::{World, execute_sql, ts};

// ---------------------------------------------------------------------------
// Helpers.

/// The default schedules of SPEC §2.
const SWEEP_CRON: &str = "0 */5 * * * *";
const STATEMENT_CRON: &str = "0 0 6 1 * *";
const REPORT_CRON: &str = "0 0 2 * * *";

const EXPIRING: &str = "training-credits.lot.expiring";
const EXPIRED: &str = "training-credits.lot.expired";
const TIMED_OUT: &str = "training-credits.redemption.expired";

/// A scheduler with the default schedules over `store`, writing the daily
/// reports into `reports_dir`.
fn scheduler<S: Store>(store: &S, reports_dir: &Path) -> Scheduler<S> {
    Scheduler::new(
        Arc::new(Applier::new(store.clone(), common::settings())),
        [
            (Job::Sweep, SWEEP_CRON),
            (Job::Statements, STATEMENT_CRON),
            (Job::DailyReports, REPORT_CRON),
        ],
        reports_dir.to_owned(),
    )
    .expect("the default schedules parse")
}

/// Ticks at `at` and returns the firings that ran.
async fn tick<S: Store>(scheduler: &Scheduler<S>, at: &str) -> Vec<(Job, Ts)> {
    scheduler
        .tick(ts(at))
        .await
        .unwrap_or_else(|e| panic!("the tick at {at} succeeds: {e}"))
}

/// The latest firing of `job` done, as `/metrics` shows it.
async fn last_done<S: Store>(w: &World<S>, job: &str) -> Option<Ts> {
    w.store().last_done_firing(job).await.expect("the firings")
}

/// Ticks at `at` and returns the jobs of the firings that ran.
async fn jobs_at<S: Store>(scheduler: &Scheduler<S>, at: &str) -> Vec<Job> {
    tick(scheduler, at)
        .await
        .into_iter()
        .map(|(job, _)| job)
        .collect()
}

fn applied(outcome: Outcome, what: &str) {
    assert_eq!(outcome, Outcome::Applied, "{what}");
}

/// Opens an account with the given owners.
async fn open<S: Store>(
    w: &mut World<S>,
    account_id: &str,
    mode: &str,
    owners: &[&str],
    code: &str,
) {
    let owners: Vec<Value> = owners
        .iter()
        .enumerate()
        .map(|(i, email)| json!({"email": email, "name": format!("Owner {i}")}))
        .collect();
    let outcome = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": account_id,
                "name": format!("{account_id} Ltd"),
                "owners": owners,
                "approval_mode": mode,
                "code": code,
            }),
        )
        .await;
    applied(outcome, &format!("{account_id} opened"));
}

/// Buys a lot expiring at `expires_at`, as of the world's clock.
async fn buy<S: Store>(
    w: &mut World<S>,
    account_id: &str,
    purchase_id: &str,
    credits: &str,
    expires_at: &str,
) {
    let outcome = w
        .purchase_expiring(account_id, purchase_id, credits, ts(expires_at))
        .await;
    applied(outcome, &format!("purchase {purchase_id}"));
}

/// The report jobs queued in the outbox, by id.
async fn report_jobs<S: Store>(store: &S) -> BTreeMap<String, ReportJob> {
    store
        .pending_outbox(1_000_000)
        .await
        .expect("the outbox")
        .into_iter()
        .filter(|row| row.kind == OutboxKind::Report)
        .map(|row| {
            let job: ReportJob = serde_json::from_str(&row.payload).expect("a report job");
            (row.id, job)
        })
        .collect()
}

/// The rows of a CSV text, each as column name → cell.
fn csv_rows(text: &str) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().expect("a header line").clone();
    reader
        .records()
        .map(|record| {
            let record = record.expect("a CSV record");
            headers
                .iter()
                .zip(record.iter())
                .map(|(name, cell)| (name.to_owned(), cell.to_owned()))
                .collect()
        })
        .collect()
}

/// The chosen columns of every row, in order.
fn pick(rows: &[HashMap<String, String>], columns: &[&str]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    row.get(*c)
                        .unwrap_or_else(|| panic!("a column {c}"))
                        .clone()
                })
                .collect()
        })
        .collect()
}

fn strings(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| row.iter().map(|s| (*s).to_owned()).collect())
        .collect()
}

/// The names of the files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| {
                e.expect("a folder entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// How many firings of `job` are claimed, baseline included.
async fn firings(url: &str, job: &str) -> u64 {
    // A no-op update counts the rows on either backend.
    execute_sql(
        url,
        &format!("UPDATE job_firings SET job = job WHERE job = '{job}'"),
    )
    .await
}

// ---------------------------------------------------------------------------
// 1. Baseline, occurrences, claims.

async fn the_first_tick_only_marks_the_baseline_and_each_later_occurrence_runs_once<S: Store>(
    w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());

    assert_eq!(
        tick(&s, "2026-01-01T09:02:30Z").await,
        vec![],
        "the first tick runs nothing"
    );
    assert_eq!(
        w.store()
            .last_firing("sweep", ts("2026-01-01T09:02:30Z"))
            .await
            .expect("the firings"),
        Some(ts("2026-01-01T09:00:00Z")),
        "the baseline is the latest occurrence before the first tick"
    );
    assert_eq!(
        last_done(&w, "sweep").await,
        Some(ts("2026-01-01T09:00:00Z")),
        "before its first run a job counts from its baseline (/metrics)"
    );
    assert_eq!(
        files_in(dir.path()),
        Vec::<String>::new(),
        "no report written by the baseline"
    );

    assert_eq!(
        tick(&s, "2026-01-01T09:04:59Z").await,
        vec![],
        "nothing is due before the next occurrence"
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:05:00Z").await,
        vec![(Job::Sweep, ts("2026-01-01T09:05:00Z"))],
        "the next occurrence runs the sweep"
    );
    assert_eq!(
        last_done(&w, "sweep").await,
        Some(ts("2026-01-01T09:05:00Z"))
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:05:00Z").await,
        vec![],
        "a second tick at the same instant finds the firing claimed"
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:07:00Z").await,
        vec![],
        "between occurrences: nothing"
    );

    // A restarted worker (a new scheduler on the same database) keeps the
    // schedule where the database has it: no second baseline, no rerun.
    let restarted = scheduler(w.store(), dir.path());
    assert_eq!(tick(&restarted, "2026-01-01T09:08:00Z").await, vec![]);
    assert_eq!(
        tick(&restarted, "2026-01-01T09:10:00Z").await,
        vec![(Job::Sweep, ts("2026-01-01T09:10:00Z"))]
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:10:00Z").await,
        vec![],
        "the other scheduler sees the claim"
    );
    assert_eq!(
        firings(&w.url, "sweep").await,
        3,
        "the baseline and two firings"
    );
}

/// The worker's clock has microseconds, and every schedule's trigger calls
/// `tick` (two of them at 02:00): ticks a few milliseconds apart on the same
/// occurrence must name the same firing.
async fn ticks_milliseconds_apart_on_one_occurrence_run_it_once<S: Store>(w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());

    assert_eq!(tick(&s, "2026-01-01T09:00:00.250Z").await, vec![]);
    assert_eq!(
        tick(&s, "2026-01-01T09:05:00.003Z").await,
        vec![(Job::Sweep, ts("2026-01-01T09:05:00Z"))],
        "a firing is the whole second of its occurrence"
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:05:00.007Z").await,
        vec![],
        "the same firing, 4 ms later"
    );
    assert_eq!(
        tick(&s, "2026-01-01T09:06:30.900Z").await,
        vec![],
        "the same firing, later still"
    );
    assert_eq!(
        tick(&s, "2026-01-02T02:00:00.011Z").await,
        vec![
            (Job::Sweep, ts("2026-01-02T02:00:00Z")),
            (Job::DailyReports, ts("2026-01-02T02:00:00Z")),
        ]
    );
    assert_eq!(tick(&s, "2026-01-02T02:00:00.012Z").await, vec![]);
    assert_eq!(firings(&w.url, "sweep").await, 3);
    assert_eq!(firings(&w.url, "daily_reports").await, 2);
}

// ---------------------------------------------------------------------------
// 2. Expiry reminders once per stage; the sweep idempotent; rule 4.

async fn expiry_reminders_go_out_once_per_stage_and_the_lot_expires_once<S: Store>(
    mut w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    w.now = ts("2026-01-01T09:00:00Z");
    open(
        &mut w,
        "acme",
        "automatic",
        &["boss@acme.test"],
        "ACME-0001",
    )
    .await;
    buy(&mut w, "acme", "p1", "100", "2026-02-10T09:00:00Z").await;
    let expiring = |events: Vec<Value>| -> Vec<(i64, i64)> {
        events
            .iter()
            .map(|e| {
                assert_eq!(e["purchase_id"], "p1");
                assert_eq!(e["remaining"], "100.00");
                assert_eq!(e["expires_at"], "2026-02-10T09:00:00Z");
                (
                    e["stage"].as_i64().expect("a stage"),
                    e["days_left"].as_i64().expect("days left"),
                )
            })
            .collect()
    };

    assert_eq!(tick(&s, "2026-01-01T09:00:00Z").await, vec![], "baseline");
    assert_eq!(
        jobs_at(&s, "2026-01-05T09:00:00Z").await,
        vec![Job::Sweep, Job::DailyReports]
    );
    assert_eq!(
        expiring(w.events_of(EXPIRING).await),
        vec![],
        "36 days left: no stage yet"
    );

    // +11 days: 29 days left, the 30-day stage.
    assert!(
        jobs_at(&s, "2026-01-12T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    assert_eq!(expiring(w.events_of(EXPIRING).await), vec![(30, 29)]);
    for later in [
        "2026-01-12T09:05:00Z",
        "2026-01-12T14:00:00Z",
        "2026-01-12T23:55:00Z",
    ] {
        assert!(
            jobs_at(&s, later).await.contains(&Job::Sweep),
            "the sweep runs at {later}"
        );
    }
    assert_eq!(
        expiring(w.events_of(EXPIRING).await),
        vec![(30, 29)],
        "once per stage"
    );

    // The sweep itself is idempotent: the same firing run again (its claim
    // given back) reminds no one twice.
    execute_sql(
        &w.url,
        "DELETE FROM job_firings WHERE job = 'sweep' AND baseline = FALSE",
    )
    .await;
    assert_eq!(
        tick(&s, "2026-01-12T23:55:00Z").await,
        vec![(Job::Sweep, ts("2026-01-12T23:55:00Z"))]
    );
    assert_eq!(expiring(w.events_of(EXPIRING).await), vec![(30, 29)]);

    // 7 days left, then 1 day left.
    assert!(
        jobs_at(&s, "2026-02-03T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    assert_eq!(
        expiring(w.events_of(EXPIRING).await),
        vec![(30, 29), (7, 7)]
    );
    assert!(
        jobs_at(&s, "2026-02-03T12:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    assert!(
        jobs_at(&s, "2026-02-08T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    assert_eq!(
        expiring(w.events_of(EXPIRING).await),
        vec![(30, 29), (7, 7)]
    );
    assert!(
        jobs_at(&s, "2026-02-09T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    assert_eq!(
        expiring(w.events_of(EXPIRING).await),
        vec![(30, 29), (7, 7), (1, 1)]
    );
    assert_eq!(
        w.events_of(EXPIRED).await,
        Vec::<Value>::new(),
        "not expired before its time"
    );

    // At the expiry instant the sweep writes the lot off, once.
    assert!(
        jobs_at(&s, "2026-02-10T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    for later in [
        "2026-02-10T09:05:00Z",
        "2026-02-11T09:00:00Z",
        "2026-03-01T00:00:00Z",
    ] {
        tick(&s, later).await;
    }
    let expired = w.events_of(EXPIRED).await;
    assert_eq!(expired.len(), 1, "lot.expired once: {expired:#?}");
    assert_eq!(expired[0]["purchase_id"], "p1");
    assert_eq!(expired[0]["expired"], "100.00");
    assert_eq!(expired[0]["available"], "0.00");
    assert_eq!(
        expiring(w.events_of(EXPIRING).await).len(),
        3,
        "no reminder after expiry"
    );
    let expire_entries = w
        .journal()
        .await
        .into_iter()
        .filter(|line| line["entry"] == "expire")
        .count();
    assert_eq!(expire_entries, 1, "one journal entry writes the lot off");
    assert_eq!(
        w.emails_to("boss@acme.test").await.len(),
        1 + 3 + 1,
        "purchase, 3 reminders, expiry"
    );
    w.now = ts("2026-03-01T00:00:00Z");
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// 3. The pending timeout (rule 6, PENDING_TIMEOUT_DAYS = 14).

async fn a_pending_request_times_out_once_after_fourteen_days_and_its_hold_is_released<S: Store>(
    mut w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    w.now = ts("2026-01-01T09:00:00Z");
    open(&mut w, "acme", "manual", &["boss@acme.test"], "ACME-0001").await;
    buy(&mut w, "acme", "p1", "100", "2099-01-01T00:00:00Z").await;
    applied(
        w.request("r1", "ACME-0001", "l1", "c1", "30").await,
        "r1 pending",
    );
    assert_eq!(
        w.lot("acme", "p1").await,
        ("100.00".to_owned(), "30.00".to_owned())
    );

    assert_eq!(tick(&s, "2026-01-01T09:00:00Z").await, vec![], "baseline");
    for before in ["2026-01-08T09:00:00Z", "2026-01-15T08:55:00Z"] {
        assert!(jobs_at(&s, before).await.contains(&Job::Sweep));
        assert_eq!(
            w.status_of("r1").await,
            "pending",
            "still pending at {before}"
        );
    }
    assert_eq!(w.events_of(TIMED_OUT).await, Vec::<Value>::new());

    // Fourteen days after the request.
    assert!(
        jobs_at(&s, "2026-01-15T09:00:00Z")
            .await
            .contains(&Job::Sweep)
    );
    for later in [
        "2026-01-15T09:05:00Z",
        "2026-01-16T09:00:00Z",
        "2026-02-20T00:00:00Z",
    ] {
        tick(&s, later).await;
    }
    let timed_out = w.events_of(TIMED_OUT).await;
    assert_eq!(
        timed_out.len(),
        1,
        "redemption.expired once: {timed_out:#?}"
    );
    assert_eq!(timed_out[0]["request_id"], "r1");
    assert_eq!(timed_out[0]["available"], "100.00");
    assert_eq!(w.status_of("r1").await, "expired");
    assert_eq!(
        w.lot("acme", "p1").await,
        ("100.00".to_owned(), "0.00".to_owned()),
        "hold released"
    );
    let releases: Vec<Value> = w
        .journal()
        .await
        .into_iter()
        .filter(|line| line["entry"] == "release")
        .collect();
    assert_eq!(releases.len(), 1, "{releases:#?}");
    assert_eq!(releases[0]["request_id"], "r1");
    assert_eq!(releases[0]["actor"], "system");
    assert_eq!(
        w.emails_to("l1@learners.test").await.len(),
        1,
        "the learner is told once"
    );
    w.now = ts("2026-02-20T00:00:00Z");
    assert_eq!(w.available("acme").await, "100.00");
    w.verify_ok().await;
}

/// Rule 4 with rule 6 through ticks: an expired lot cannot be spent before
/// the sweep has run; the sweep writes off only its unreserved part; the
/// held part waits for its request, and when the timeout releases it, it
/// expires at once.
async fn a_held_part_of_an_expired_lot_waits_for_the_timeout_then_expires_at_once<S: Store>(
    mut w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    w.now = ts("2026-01-01T09:00:00Z");
    open(&mut w, "acme", "manual", &["boss@acme.test"], "ACME-0001").await;
    buy(&mut w, "acme", "p1", "100", "2026-01-10T09:00:00Z").await;
    applied(
        w.request("r1", "ACME-0001", "l1", "c1", "30").await,
        "r1 pending",
    );
    assert_eq!(tick(&s, "2026-01-01T09:00:00Z").await, vec![], "baseline");
    tick(&s, "2026-01-09T09:00:00Z").await;

    // The worker is down when the lot expires: it is not spendable anyway.
    w.now = ts("2026-01-10T09:30:00Z");
    assert_eq!(
        w.request("r2", "ACME-0001", "l2", "c2", "10").await,
        Outcome::Rejected(Rejection::InsufficientBalance),
        "an expired lot cannot be spent before the sweep"
    );
    assert_eq!(w.events_of(EXPIRED).await, Vec::<Value>::new());

    assert!(
        jobs_at(&s, "2026-01-10T09:40:00Z")
            .await
            .contains(&Job::Sweep)
    );
    let expired = w.events_of(EXPIRED).await;
    assert_eq!(expired.len(), 1, "{expired:#?}");
    assert_eq!(expired[0]["expired"], "70.00", "only the unreserved part");
    assert_eq!(
        w.lot("acme", "p1").await,
        ("30.00".to_owned(), "30.00".to_owned()),
        "the hold stays"
    );
    assert_eq!(w.status_of("r1").await, "pending");

    tick(&s, "2026-01-15T08:55:00Z").await;
    assert_eq!(w.status_of("r1").await, "pending");
    tick(&s, "2026-01-15T09:00:00Z").await;
    tick(&s, "2026-01-16T09:00:00Z").await;
    assert_eq!(w.status_of("r1").await, "expired");
    assert_eq!(w.events_of(TIMED_OUT).await.len(), 1);
    assert_eq!(
        w.lot("acme", "p1").await,
        ("0.00".to_owned(), "0.00".to_owned()),
        "released into an expired lot, the credits expire at once"
    );
    assert_eq!(
        w.events_of(EXPIRED).await.len(),
        1,
        "the sweep writes the lot off once"
    );
    let expire_entries: Vec<Value> = w
        .journal()
        .await
        .into_iter()
        .filter(|line| line["entry"] == "expire")
        .collect();
    assert_eq!(expire_entries.len(), 2, "{expire_entries:#?}");
    assert_eq!(expire_entries[0]["amount"], "-70.00");
    assert_eq!(expire_entries[1]["amount"], "-30.00");
    assert_eq!(expire_entries[1]["request_id"], "r1");
    w.now = ts("2026-01-16T09:00:00Z");
    assert_eq!(w.available("acme").await, "0.00");
    w.verify_ok().await;
}

/// Rule 9: the lock-out after five wrong codes ends with its 15-minute
/// window, whatever the scheduler does meanwhile.
async fn a_code_lock_out_lasts_its_window_whether_or_not_the_sweep_runs<S: Store>(mut w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    w.now = ts("2026-01-01T09:00:00Z");
    open(
        &mut w,
        "acme",
        "automatic",
        &["boss@acme.test"],
        "ACME-0001",
    )
    .await;
    buy(&mut w, "acme", "p1", "100", "2099-01-01T00:00:00Z").await;
    assert_eq!(tick(&s, "2026-01-01T09:00:00Z").await, vec![], "baseline");
    for i in 0..5 {
        assert_eq!(
            w.request(
                &format!("bad-{i}"),
                "WRONG-0000",
                "l1",
                &format!("c{i}"),
                "5"
            )
            .await,
            Outcome::Rejected(Rejection::InvalidCode)
        );
    }
    for at in ["2026-01-01T09:05:00Z", "2026-01-01T09:10:00Z"] {
        assert!(jobs_at(&s, at).await.contains(&Job::Sweep));
        w.now = ts(at);
        assert_eq!(
            w.request(&format!("locked-{at}"), "ACME-0001", "l1", "c9", "5")
                .await,
            Outcome::Rejected(Rejection::TooManyAttempts),
            "still locked out at {at}"
        );
    }
    w.now = ts("2026-01-01T09:15:01Z");
    assert_eq!(
        w.request("free", "ACME-0001", "l1", "c9", "5").await,
        Outcome::Applied,
        "the window has passed"
    );
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// 4. Monthly statements.

const A1: &str = "first@acme.test";
const A2: &str = "second@acme.test";
const B1: &str = "only@beta.test";

/// Two accounts (acme with two owners) with journal entries in December,
/// January and on 1 February before the statement.
async fn statement_ledger<S: Store>(w: &mut World<S>) {
    w.now = ts("2025-12-15T10:00:00Z");
    open(w, "acme", "automatic", &[A1, A2], "ACME-0001").await;
    open(w, "beta", "automatic", &[B1], "BETA-0001").await;
    buy(w, "acme", "dec", "100", "2099-01-01T00:00:00Z").await;
    w.now = ts("2026-01-10T10:00:00Z");
    buy(w, "acme", "jan", "50", "2098-06-01T00:00:00Z").await;
    buy(w, "beta", "jan-b", "30", "2099-01-01T00:00:00Z").await;
    w.now = ts("2026-01-20T10:00:00Z");
    applied(
        w.request("r1", "ACME-0001", "l1", "c1", "20").await,
        "r1 approved",
    );
    w.now = ts("2026-02-01T03:00:00Z");
    buy(w, "beta", "feb", "10", "2099-01-01T00:00:00Z").await;
}

async fn statements_are_queued_on_the_first_at_six_for_every_owner_for_last_month<S: Store>(
    mut w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    statement_ledger(&mut w).await;

    assert_eq!(tick(&s, "2026-01-25T12:00:00Z").await, vec![], "baseline");
    assert!(
        !jobs_at(&s, "2026-02-01T05:59:59Z")
            .await
            .contains(&Job::Statements),
        "not before 06:00"
    );
    assert_eq!(report_jobs(w.store()).await.len(), 0);

    let ran = tick(&s, "2026-02-01T06:00:00Z").await;
    assert!(
        ran.contains(&(Job::Statements, ts("2026-02-01T06:00:00Z"))),
        "{ran:?}"
    );
    let jobs = report_jobs(w.store()).await;
    let mut recipients: Vec<(String, String)> = Vec::new();
    for job in jobs.values() {
        let request = &job.request;
        assert_eq!(request.report, ReportKind::Transactions);
        assert_eq!(request.format, ReportFormat::Csv);
        assert_eq!(
            request.from,
            Some(ts("2026-01-01T00:00:00Z")),
            "from the 1st of January"
        );
        assert_eq!(
            request.to,
            Some(ts("2026-02-01T00:00:00Z")),
            "to the 1st of February"
        );
        assert_eq!(request.columns, None, "every column");
        assert!(!job.announce, "a statement is not announced");
        assert_eq!(job.causation_id, "schedule:statements:2026-02-01T06:00:00Z");
        assert!(
            job.title.contains("2026-01"),
            "the title names the month: {}",
            job.title
        );
        recipients.push((
            request
                .account_id
                .as_ref()
                .expect("one account")
                .to_string(),
            request.recipient.to_string(),
        ));
    }
    recipients.sort();
    assert_eq!(
        recipients,
        vec![
            ("acme".to_owned(), A1.to_owned()),
            ("acme".to_owned(), A2.to_owned()),
            ("beta".to_owned(), B1.to_owned()),
        ],
        "one statement per owner of each account"
    );

    assert_eq!(
        tick(&s, "2026-02-01T06:00:00Z").await,
        vec![],
        "a repeated tick runs nothing"
    );
    assert!(
        !jobs_at(&s, "2026-02-15T06:00:00Z")
            .await
            .contains(&Job::Statements)
    );
    assert_eq!(report_jobs(w.store()).await, jobs, "nothing new queued");

    // Run again (its claim given back), the firing queues nothing new either.
    execute_sql(
        &w.url,
        "DELETE FROM job_firings WHERE job = 'statements' AND baseline = FALSE",
    )
    .await;
    assert_eq!(
        tick(&s, "2026-02-01T06:00:00Z").await,
        vec![(Job::Statements, ts("2026-02-01T06:00:00Z"))]
    );
    assert_eq!(
        report_jobs(w.store()).await,
        jobs,
        "a repeated firing queues nothing new"
    );
}

/// One file attached to a received email.
struct Attached {
    to: String,
    filename: String,
    content_type: String,
    text: String,
}

fn attachments(smtp: &SmtpSink) -> Vec<Attached> {
    let mut found = Vec::new();
    for raw in smtp.received() {
        let message = mail_parser::MessageParser::default()
            .parse(raw.as_bytes())
            .expect("a MIME message");
        let to = message
            .to()
            .and_then(|to| to.first())
            .and_then(|address| address.address())
            .unwrap_or_default()
            .to_owned();
        for part in message.attachments() {
            found.push(Attached {
                to: to.clone(),
                filename: part.attachment_name().unwrap_or_default().to_owned(),
                content_type: part
                    .content_type()
                    .map(|t| format!("{}/{}", t.ctype(), t.subtype().unwrap_or_default()))
                    .unwrap_or_default(),
                text: String::from_utf8_lossy(part.contents()).into_owned(),
            });
        }
    }
    found
}

async fn each_owner_receives_last_month_s_statement_as_a_csv_attachment<S: Store>(mut w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    statement_ledger(&mut w).await;
    tick(&s, "2026-01-25T12:00:00Z").await;
    tick(&s, "2026-02-01T06:00:00Z").await;
    assert_eq!(report_jobs(w.store()).await.len(), 3);

    let vhost = Vhost::new();
    let smtp = SmtpSink::start_new().await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let worker_reports = tempfile::tempdir().expect("a folder");
    let mut settings = config(&vhost, &w.url, Some(&smtp.url()), mail_dir.path());
    settings.reports_dir = worker_reports.path().to_owned();
    // The worker's own schedules fire every 29 February only, and their
    // latest occurrence is older than the firings claimed above: its
    // scheduler stays out of the way, only its dispatcher works.
    settings.sweep_cron = "0 0 0 29 2 *".to_owned();
    settings.statement_cron = "0 0 0 29 2 *".to_owned();
    settings.report_cron = "0 0 0 29 2 *".to_owned();
    let worker = TestWorker::start(w.store().clone(), settings).await;
    eventually(Duration::from_secs(30), "three statements sent", || async {
        attachments(&smtp).len() >= 3
    })
    .await;
    worker.stop().await;

    let mut sent = attachments(&smtp);
    sent.sort_by(|a, b| a.to.cmp(&b.to));
    assert_eq!(
        sent.iter().map(|a| a.to.as_str()).collect::<Vec<_>>(),
        vec![A1, B1, A2],
        "each owner gets one statement"
    );
    let columns = [
        "at",
        "account_id",
        "entry",
        "amount",
        "purchase_id",
        "request_id",
    ];
    for attached in &sent {
        let account = if attached.to == B1 { "beta" } else { "acme" };
        assert!(
            attached
                .filename
                .starts_with(&format!("transactions-{account}-"))
                && attached.filename.ends_with(".csv"),
            "{}",
            attached.filename
        );
        assert_eq!(attached.content_type, "text/csv");
        let rows = pick(&csv_rows(&attached.text), &columns);
        let expected: &[&[&str]] = if account == "acme" {
            &[
                &[
                    "2026-01-10T10:00:00Z",
                    "acme",
                    "purchase",
                    "50.00",
                    "jan",
                    "",
                ],
                &[
                    "2026-01-20T10:00:00Z",
                    "acme",
                    "redeem",
                    "-20.00",
                    "jan",
                    "r1",
                ],
            ]
        } else {
            &[&[
                "2026-01-10T10:00:00Z",
                "beta",
                "purchase",
                "30.00",
                "jan-b",
                "",
            ]]
        };
        assert_eq!(
            rows,
            strings(expected),
            "January's entries of {account} for {}",
            attached.to
        );
    }
    assert_eq!(
        report_jobs(w.store()).await.len(),
        0,
        "every statement marked sent"
    );
}

// ---------------------------------------------------------------------------
// 5. Daily reports.

async fn the_daily_reports_are_written_at_two_with_the_ledger_s_rows<S: Store>(mut w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let reports = dir.path().join("daily");
    let s = scheduler(w.store(), &reports);
    w.now = ts("2026-01-02T10:00:00Z");
    open(&mut w, "acme", "manual", &[A1, A2], "ACME-0001").await;
    open(&mut w, "beta", "automatic", &[B1], "BETA-0001").await;
    buy(&mut w, "acme", "p1", "100", "2027-01-01T00:00:00Z").await;
    buy(&mut w, "beta", "q1", "40", "2026-01-08T00:00:00Z").await;
    buy(&mut w, "beta", "q2", "60", "2026-06-01T00:00:00Z").await;
    applied(
        w.request("r1", "ACME-0001", "l1", "c1", "25").await,
        "r1 pending",
    );

    assert_eq!(tick(&s, "2026-01-09T12:00:00Z").await, vec![], "baseline");
    assert!(
        !jobs_at(&s, "2026-01-10T01:59:59Z")
            .await
            .contains(&Job::DailyReports)
    );
    assert_eq!(
        files_in(&reports),
        Vec::<String>::new(),
        "nothing before 02:00"
    );

    let ran = tick(&s, "2026-01-10T02:00:00Z").await;
    assert!(
        ran.contains(&(Job::DailyReports, ts("2026-01-10T02:00:00Z"))),
        "{ran:?}"
    );
    assert_eq!(
        files_in(&reports),
        vec!["balances-2026-01-10.csv", "credits-2026-01-10.csv"]
    );

    let credits = std::fs::read_to_string(reports.join("credits-2026-01-10.csv")).expect("credits");
    assert_eq!(
        pick(
            &csv_rows(&credits),
            &[
                "account_id",
                "owners",
                "purchase_id",
                "credits",
                "remaining",
                "held",
                "expires_at",
                "status"
            ]
        ),
        strings(&[
            &[
                "acme",
                "first@acme.test; second@acme.test",
                "p1",
                "100.00",
                "100.00",
                "25.00",
                "2027-01-01T00:00:00Z",
                "active"
            ],
            &[
                "beta",
                "only@beta.test",
                "q1",
                "40.00",
                "0.00",
                "0.00",
                "2026-01-08T00:00:00Z",
                "expired"
            ],
            &[
                "beta",
                "only@beta.test",
                "q2",
                "60.00",
                "60.00",
                "0.00",
                "2026-06-01T00:00:00Z",
                "active"
            ],
        ]),
        "one row per lot, q1 expired by the sweep of the same tick"
    );
    let balances =
        std::fs::read_to_string(reports.join("balances-2026-01-10.csv")).expect("balances");
    assert_eq!(
        pick(
            &csv_rows(&balances),
            &[
                "account_id",
                "status",
                "balance",
                "held",
                "available",
                "owners"
            ]
        ),
        strings(&[
            &[
                "acme",
                "active",
                "100.00",
                "25.00",
                "75.00",
                "first@acme.test; second@acme.test"
            ],
            &["beta", "active", "60.00", "0.00", "60.00", "only@beta.test"],
        ])
    );

    assert!(
        !jobs_at(&s, "2026-01-10T02:00:00Z")
            .await
            .contains(&Job::DailyReports)
    );
    assert!(
        !jobs_at(&s, "2026-01-10T23:55:00Z")
            .await
            .contains(&Job::DailyReports)
    );
    assert_eq!(
        jobs_at(&s, "2026-01-11T02:00:00Z").await,
        vec![Job::Sweep, Job::DailyReports]
    );
    assert_eq!(
        files_in(&reports),
        vec![
            "balances-2026-01-10.csv",
            "balances-2026-01-11.csv",
            "credits-2026-01-10.csv",
            "credits-2026-01-11.csv",
        ]
    );
}

// ---------------------------------------------------------------------------
// 6. Catch-up after downtime.

async fn after_downtime_the_next_tick_runs_each_missed_job_once<S: Store>(mut w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    w.now = ts("2026-01-30T09:00:00Z");
    open(&mut w, "acme", "automatic", &[A1, A2], "ACME-0001").await;
    buy(&mut w, "acme", "short", "40", "2026-01-31T12:00:00Z").await;
    buy(&mut w, "acme", "long", "60", "2099-01-01T00:00:00Z").await;

    assert_eq!(
        tick(&s, "2026-01-30T09:00:00Z").await,
        vec![],
        "baseline at day 0"
    );
    // The worker was down for three days, across the 1st and three 02:00s;
    // it comes back between two occurrences.
    assert_eq!(
        tick(&s, "2026-02-02T13:37:12Z").await,
        vec![
            (Job::Sweep, ts("2026-02-02T13:35:00Z")),
            (Job::Statements, ts("2026-02-01T06:00:00Z")),
            (Job::DailyReports, ts("2026-02-02T02:00:00Z")),
        ],
        "each missed job once, at its latest missed occurrence"
    );
    assert_eq!(tick(&s, "2026-02-02T13:37:30Z").await, vec![], "caught up");
    assert_eq!(
        files_in(dir.path()),
        vec!["balances-2026-02-02.csv", "credits-2026-02-02.csv"],
        "one daily report, for the latest missed day"
    );
    let expired = w.events_of(EXPIRED).await;
    assert_eq!(expired.len(), 1, "{expired:#?}");
    assert_eq!(expired[0]["purchase_id"], "short");
    assert_eq!(expired[0]["expired"], "40.00");
    let statements = report_jobs(w.store()).await;
    assert_eq!(statements.len(), 2, "one January statement per owner");
    assert!(
        statements
            .values()
            .all(|job| job.request.from == Some(ts("2026-01-01T00:00:00Z")))
    );
    assert_eq!(firings(&w.url, "sweep").await, 2);
    assert_eq!(firings(&w.url, "statements").await, 2);
    assert_eq!(firings(&w.url, "daily_reports").await, 2);
    w.verify_ok().await;
}

// ---------------------------------------------------------------------------
// 7. A failed job is given back.

async fn a_failed_job_is_given_back_and_a_later_tick_runs_it<S: Store>(w: World<S>) {
    let dir = tempfile::tempdir().expect("a folder");
    let reports = dir.path().join("reports");
    std::fs::write(&reports, "a file where the folder should be").expect("a file");
    let s = scheduler(w.store(), &reports);

    assert_eq!(tick(&s, "2026-01-01T09:00:00Z").await, vec![], "baseline");
    let error = s
        .tick(ts("2026-01-02T02:00:00Z"))
        .await
        .expect_err("the daily reports cannot be written");
    assert!(matches!(error, ScheduleError::Report(_)), "{error:?}");
    assert_eq!(
        w.store()
            .last_firing("daily_reports", ts("2026-01-02T02:00:00Z"))
            .await
            .expect("the firings"),
        Some(ts("2026-01-01T02:00:00Z")),
        "the failed firing is given back"
    );
    assert_eq!(
        w.store()
            .last_firing("sweep", ts("2026-01-02T02:00:00Z"))
            .await
            .expect("the firings"),
        Some(ts("2026-01-02T02:00:00Z")),
        "the sweep that succeeded keeps its claim"
    );
    assert_eq!(
        last_done(&w, "daily_reports").await,
        Some(ts("2026-01-01T02:00:00Z")),
        "the last success of a failing job stays where it was (/metrics)"
    );
    assert_eq!(
        last_done(&w, "sweep").await,
        Some(ts("2026-01-02T02:00:00Z"))
    );
    assert!(
        s.tick(ts("2026-01-02T02:05:00Z")).await.is_err(),
        "still failing, still given back"
    );

    std::fs::remove_file(&reports).expect("the file removed");
    assert_eq!(
        tick(&s, "2026-01-02T02:05:00Z").await,
        vec![(Job::DailyReports, ts("2026-01-02T02:00:00Z"))],
        "once fixed, the next tick runs the firing given back, and only it"
    );
    assert_eq!(
        files_in(&reports),
        vec!["balances-2026-01-02.csv", "credits-2026-01-02.csv"]
    );
    assert_eq!(tick(&s, "2026-01-02T02:06:00Z").await, vec![]);
}

async fn a_firing_whose_worker_died_mid_job_runs_again_once_its_lease_has_passed<S: Store>(
    w: World<S>,
) {
    let dir = tempfile::tempdir().expect("a folder");
    let s = scheduler(w.store(), dir.path());
    assert_eq!(
        jobs_at(&s, "2026-01-31T23:00:00Z").await,
        vec![],
        "baseline"
    );
    // Another worker claimed the statements of February and died before
    // finishing them: its claim is never marked done.
    assert!(
        w.store()
            .claim_firing(
                "statements",
                ts("2026-02-01T06:00:00Z"),
                ts("2026-02-01T06:00:00Z"),
                false
            )
            .await
            .expect("a claim")
    );
    assert!(
        !jobs_at(&s, "2026-02-01T06:30:00Z")
            .await
            .contains(&Job::Statements),
        "within the lease the firing is the other worker's"
    );
    assert_eq!(
        jobs_at(&s, "2026-02-01T07:00:01Z")
            .await
            .iter()
            .filter(|job| **job == Job::Statements)
            .count(),
        1,
        "after the lease the firing runs here"
    );
    assert!(
        !jobs_at(&s, "2026-02-01T08:30:00Z")
            .await
            .contains(&Job::Statements),
        "and, done, never again"
    );
}

on_both_backends!(
    the_first_tick_only_marks_the_baseline_and_each_later_occurrence_runs_once,
    ticks_milliseconds_apart_on_one_occurrence_run_it_once,
    expiry_reminders_go_out_once_per_stage_and_the_lot_expires_once,
    a_pending_request_times_out_once_after_fourteen_days_and_its_hold_is_released,
    a_held_part_of_an_expired_lot_waits_for_the_timeout_then_expires_at_once,
    a_code_lock_out_lasts_its_window_whether_or_not_the_sweep_runs,
    statements_are_queued_on_the_first_at_six_for_every_owner_for_last_month,
    the_daily_reports_are_written_at_two_with_the_ledger_s_rows,
    after_downtime_the_next_tick_runs_each_missed_job_once,
    a_failed_job_is_given_back_and_a_later_tick_runs_it,
    a_firing_whose_worker_died_mid_job_runs_again_once_its_lease_has_passed,
);

mod through_the_worker {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_each_owner_receives_last_month_s_statement_as_a_csv_attachment() {
        super::each_owner_receives_last_month_s_statement_as_a_csv_attachment(
            super::common::sqlite_world().await,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_each_owner_receives_last_month_s_statement_as_a_csv_attachment() {
        super::each_owner_receives_last_month_s_statement_as_a_csv_attachment(
            super::common::pg_world().await,
        )
        .await
    }
}

/// `training-credits sweep --at` an instant 40 days ahead, beside a running
/// worker: the reminders and timeouts it records are sent at once (SPEC §5),
/// not when that instant comes.
async fn sweep_at_a_future_instant_sends_its_events_and_emails_at_once<S: Store>(
    _store: S,
    url: String,
) {
    use common::events::event;
    let vhost = Vhost::new();
    let client = common::broker::Client::new(&vhost).await;
    let smtp = SmtpSink::start_new().await;
    let site = common::child::Site::new(&url, &vhost).with_env("SMTP_URL", &smtp.url());
    let mut worker = site.start_worker("the worker");
    worker.await_ready().await;
    let now = Ts::now();
    for message in [
        event(
            "open",
            "portal",
            "credits.account.opened",
            json!({
                "account_id": "acme", "approval_mode": "manual", "code": "ACME-0001",
                "owners": [{"email": "boss@acme.test", "name": "Boss"}],
            }),
        ),
        event(
            "buy",
            "shop",
            "credits.purchase.completed",
            json!({
                "account_id": "acme", "purchase_id": "p1", "credits": "100",
                "purchased_at": now, "expires_at": now.plus_days(45),
            }),
        ),
        event(
            "ask",
            "lms",
            "credits.redemption.requested",
            json!({
                "request_id": "r1", "code": "ACME-0001", "cost": "30", "requested_at": now,
                "learner": {"id": "l1", "email": "learner@acme.test", "name": "Lea"},
                "item": {"id": "c1", "kind": "course", "title": "Rust"},
            }),
        ),
    ] {
        client.publish(&message).await;
    }
    client
        .await_outbound("training-credits.redemption.pending", 1)
        .await;

    let at = now.plus_days(40).to_string();
    let swept = site
        .output(&["sweep", "--at", &at], Duration::from_secs(60))
        .await;
    assert_eq!(swept.code(), Some(0), "sweep: {}", swept.stderr);
    let swept_at = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the reminder, the timeout and their emails",
        || async {
            client.outbound_of(EXPIRING).len() == 1
                && client.outbound_of(TIMED_OUT).len() == 1
                && smtp.mails().iter().any(|m| m.to == "learner@acme.test")
                && smtp
                    .mails()
                    .iter()
                    .any(|m| m.to == "boss@acme.test" && m.subject.contains("expir"))
        },
    )
    .await;
    eprintln!("Sent within {:?} of the sweep.", swept_at.elapsed());
    let reminder = &client.outbound_of(EXPIRING)[0];
    assert_eq!(reminder["data"]["purchase_id"], "p1");
    assert_eq!(reminder["data"]["days_left"], 5);
    assert_eq!(
        reminder["data"]["causation_id"],
        format!("schedule:sweep:{at}"),
        "caused by the sweep as of its instant"
    );
    assert_eq!(client.outbound_of(TIMED_OUT)[0]["data"]["request_id"], "r1");
    worker.stop_with("TERM").await;
}

on_both_stores!(
    mod sweep_at_on_sqlite, sweep_at_on_postgres;
    sweep_at_a_future_instant_sends_its_events_and_emails_at_once
);

// ---------------------------------------------------------------------------
// 8. Two workers on one PostgreSQL database.

/// A scheduler on a pool of its own to the database at `url`.
async fn pg_scheduler(url: &str, reports_dir: &Path) -> Scheduler<PgStore> {
    let store = PgStore::connect(url).await.expect("PostgreSQL connects");
    scheduler(&store, reports_dir)
}

/// Ticks both schedulers at once (each at its own instant) and returns every
/// firing either of them ran.
async fn tick_both(
    a: &Scheduler<PgStore>,
    b: &Scheduler<PgStore>,
    at_a: Ts,
    at_b: Ts,
) -> Vec<(Job, Ts)> {
    let (ran_a, ran_b) = tokio::join!(a.tick(at_a), b.tick(at_b));
    let mut ran = ran_a.expect("worker A's tick");
    ran.extend(ran_b.expect("worker B's tick"));
    ran
}

/// Twenty accounts whose lots expire one after the other while the two
/// workers tick, every 15 minutes from 01:15 to 07:00 on 1 February.
async fn two_worker_ledger(w: &mut World<PgStore>) -> usize {
    w.now = ts("2026-01-25T10:00:00Z");
    let accounts = 20;
    for k in 1..=accounts {
        let account = format!("acct-{k:02}");
        let owner = format!("owner{k}@acct.test");
        open(w, &account, "automatic", &[&owner], &format!("CODE-{k:04}")).await;
        let expires = ts("2026-02-01T01:00:00Z").plus(chrono::Duration::minutes(15 * k as i64 + 7));
        buy(w, &account, "lot", "10", &expires.to_string()).await;
    }
    accounts
}

fn round_instant(round: i64) -> Ts {
    ts("2026-02-01T01:00:00Z").plus(chrono::Duration::minutes(15 * round))
}

async fn two_workers_run_every_firing_exactly_once(jitter: chrono::Duration) {
    let mut w = common::pg_world().await;
    let accounts = two_worker_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    let a = pg_scheduler(&w.url, &dir.path().join("a")).await;
    let b = pg_scheduler(&w.url, &dir.path().join("b")).await;

    let rounds = 24;
    let mut ran: Vec<(Job, Ts)> = Vec::new();
    for round in 0..=rounds {
        let at = round_instant(round);
        let firings = tick_both(&a, &b, at, at.plus(jitter)).await;
        if round == 0 {
            assert_eq!(firings, vec![], "the first round only marks the baseline");
        }
        ran.extend(firings);
    }

    let mut expected: Vec<(Job, Ts)> = (1..=rounds)
        .map(|r| (Job::Sweep, round_instant(r)))
        .collect();
    expected.push((Job::Statements, ts("2026-02-01T06:00:00Z")));
    expected.push((Job::DailyReports, ts("2026-02-01T02:00:00Z")));
    let unique: BTreeSet<String> = ran
        .iter()
        .map(|(job, at)| format!("{} {at}", job.name()))
        .collect();
    assert_eq!(unique.len(), ran.len(), "no firing ran twice: {ran:#?}");
    let mut ran_sorted: Vec<String> = unique.into_iter().collect();
    ran_sorted.sort();
    let mut expected_sorted: Vec<String> = expected
        .iter()
        .map(|(job, at)| format!("{} {at}", job.name()))
        .collect();
    expected_sorted.sort();
    assert_eq!(
        ran_sorted, expected_sorted,
        "every firing ran, once in total"
    );
    assert_eq!(firings(&w.url, "sweep").await, rounds as u64 + 1);

    // The ledger effects appear once.
    let expired = w.events_of(EXPIRED).await;
    let expired_accounts: BTreeSet<&str> = expired
        .iter()
        .map(|e| e["account_id"].as_str().expect("an account"))
        .collect();
    assert_eq!(
        expired.len(),
        accounts,
        "one lot.expired per lot: {expired:#?}"
    );
    assert_eq!(
        expired_accounts.len(),
        accounts,
        "every account's lot expired"
    );
    let expire_entries = w
        .journal()
        .await
        .into_iter()
        .filter(|line| line["entry"] == "expire")
        .map(|line| line["account_id"].as_str().expect("an account").to_owned())
        .collect::<Vec<_>>();
    let distinct: BTreeSet<&String> = expire_entries.iter().collect();
    assert_eq!(expire_entries.len(), accounts, "one expire entry per lot");
    assert_eq!(distinct.len(), accounts);
    let statements = report_jobs(w.store()).await;
    assert_eq!(statements.len(), accounts, "one statement per owner");
    let daily: Vec<String> = [
        files_in(&dir.path().join("a")),
        files_in(&dir.path().join("b")),
    ]
    .concat();
    assert_eq!(
        daily,
        vec!["balances-2026-02-01.csv", "credits-2026-02-01.csv"],
        "written by one worker"
    );
    w.verify_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_on_one_postgresql_database_run_every_firing_exactly_once() {
    two_workers_run_every_firing_exactly_once(chrono::Duration::zero()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_whose_clocks_differ_by_milliseconds_run_every_firing_exactly_once() {
    two_workers_run_every_firing_exactly_once(chrono::Duration::milliseconds(3)).await;
}

// ---------------------------------------------------------------------------
// 9. The configuration.

fn config_with(pairs: &[(&str, &str)]) -> Result<Config, training_credits::config::ConfigError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_vars(|name| map.get(name).cloned())
}

#[test]
fn the_schedules_default_to_the_spec_s_and_accept_six_field_expressions() {
    let defaults = config_with(&[]).expect("the defaults");
    assert_eq!(defaults.sweep_cron, SWEEP_CRON);
    assert_eq!(defaults.statement_cron, STATEMENT_CRON);
    assert_eq!(defaults.report_cron, REPORT_CRON);
    let chosen = config_with(&[
        ("SWEEP_CRON", "30 */1 * * * *"),
        ("STATEMENT_CRON", "0 30 7 1 * *"),
        ("REPORT_CRON", "0 15 3 * * MON-FRI"),
    ])
    .expect("six-field expressions");
    assert_eq!(chosen.sweep_cron, "30 */1 * * * *");
    assert_eq!(chosen.statement_cron, "0 30 7 1 * *");
    assert_eq!(chosen.report_cron, "0 15 3 * * MON-FRI");
}

#[test]
fn a_bad_cron_setting_is_refused_at_start_naming_its_variable() {
    for (variable, value) in [
        ("SWEEP_CRON", "*/5 * * * *"),
        ("SWEEP_CRON", "61 * * * * *"),
        ("SWEEP_CRON", "0 */5 * * * * * *"),
        ("SWEEP_CRON", "every five minutes"),
        ("STATEMENT_CRON", "0 0 6 32 * *"),
        ("STATEMENT_CRON", "0 0 6 1 13 *"),
        ("REPORT_CRON", "0 0 25 * * *"),
        ("REPORT_CRON", "0 60 2 * * *"),
    ] {
        let error = config_with(&[(variable, value)])
            .err()
            .unwrap_or_else(|| panic!("{variable}={value} is refused"));
        assert_eq!(error.variable, variable, "{variable}={value}");
        let message = error.to_string();
        assert!(
            message.starts_with(variable) && message.contains(value),
            "the message names the variable and the value: {message}"
        );
    }
}

#[tokio::test]
async fn a_scheduler_refuses_a_bad_schedule_naming_its_job() {
    let (store, _url, _keep) = common::sqlite_store().await;
    let applier = Arc::new(Applier::new(store, common::settings()));
    let refused = Scheduler::new(
        applier,
        [
            (Job::Sweep, SWEEP_CRON),
            (Job::Statements, "0 0 6 1 * *"),
            (Job::DailyReports, "0 0 2 * *"),
        ],
        "reports".into(),
    );
    match refused {
        Err(error @ ScheduleError::Cron(..)) => {
            assert!(error.to_string().starts_with("daily_reports"), "{error}");
        }
        Err(other) => panic!("a cron error, not {other:?}"),
        Ok(_) => panic!("a five-field schedule is refused"),
    }
}
