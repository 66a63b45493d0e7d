//! Scheduled jobs as plain functions of an instant: the expiry sweep, the
//! expiry reminders and the pending-request timeout go through the same
//! [`Applier`] path as messages, one input per account, so a job is
//! idempotent per instant and one account's trouble never stops another's.
//! Monthly statements and the daily all-accounts reports are built the same
//! way reports are.
//!
//! [`Scheduler::tick`] decides what is due: every job whose latest cron
//! occurrence has not been claimed yet runs once, claimed in the database so
//! that several workers sharing it never run a firing twice, and a firing
//! missed while no worker ran is caught up at the next tick. The worker calls
//! it at start and at every cron occurrence (tokio-cron-scheduler); tests call
//! it with the instants they choose. Each tick also sets, per job, the time
//! of its latest firing done in the database (`/metrics`), which alerts
//! compare with the job's schedule.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Datelike, SubsecRound, TimeZone, Utc};
use croner::Cron;
use serde_json::Value;
use tracing::Span;
use tracing::field::Empty;

use crate::apply::{Applier, Input};
use crate::config::parse_cron;
use crate::decode::EventKey;
use crate::domain::command::{Command, ReportFormat, ReportKind, ReportRequested};
use crate::domain::{Id, Outcome, Ts};
use crate::ops::metric;
use crate::outbox::derived_uuid;
use crate::report::{self, ReportError, ReportJob, ReportQuery, choose_columns};
use crate::store::{OutboxKind, OutboxRow, Store, StoreError, ToLoad};
use crate::trace::Trace;

/// Accounts per transaction: bounds how long one sweep batch holds its locks.
pub const SWEEP_ACCOUNTS_PER_BATCH: usize = 200;

/// What one run of the jobs did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobsReport {
    pub accounts_examined: usize,
    pub accounts_changed: usize,
}

/// The sweep of one account at `at`, as a ledger input of the job's `span`
/// and `trace`.
pub fn sweep_input(account_id: &Id, at: Ts, span: &Span, trace: Option<&Trace>) -> Input {
    Input {
        key: EventKey {
            source: "schedule".to_owned(),
            id: format!("sweep:{at}:{account_id}"),
        },
        digest: String::new(),
        causation_id: format!("schedule:sweep:{at}"),
        command: Command::Sweep {
            account_id: account_id.clone(),
        },
        span: span.clone(),
        trace: trace.cloned(),
    }
}

/// Runs every scheduled job once as of `at`, in one span, entered while the
/// rules run for each account: when spans are exported, the root of a trace
/// that the events of the job continue. It is not entered around the
/// database's work: SQLite's connection threads keep the span that was
/// current for a statement a moment after they answer, which could end it
/// after the spans of a command that exits were sent.
pub async fn run_jobs_at<S: Store>(applier: &Applier<S>, at: Ts) -> Result<JobsReport, StoreError> {
    // At the level of the warnings it may hold (see `consume`).
    let span =
        tracing::warn_span!(parent: None, "job", job = Job::Sweep.name(), %at, trace_id = Empty);
    let trace = Trace::start(&span, None);
    let timeout = applier.settings().policy.pending_timeout_days;
    let accounts = applier
        .store()
        .sweep_candidates(at, at.plus_days(-timeout))
        .await?;
    let mut report = JobsReport {
        accounts_examined: accounts.len(),
        ..JobsReport::default()
    };
    for chunk in accounts.chunks(SWEEP_ACCOUNTS_PER_BATCH) {
        let inputs: Vec<Input> = chunk
            .iter()
            .map(|id| sweep_input(id, at, &span, trace.as_ref()))
            .collect();
        let outcomes = applier.apply(&inputs, at).await?;
        report.accounts_changed += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Applied))
            .count();
    }
    Ok(report)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Expiry sweep, reminders, pending timeout (`SWEEP_CRON`).
    Sweep,
    /// Last month's transactions to each account's owners (`STATEMENT_CRON`).
    Statements,
    /// The all-accounts `credits` and `balances` reports into `REPORTS_DIR`
    /// (`REPORT_CRON`).
    DailyReports,
}

impl Job {
    pub fn name(self) -> &'static str {
        match self {
            Job::Sweep => "sweep",
            Job::Statements => "statements",
            Job::DailyReports => "daily_reports",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{0}: {1}")]
    Cron(&'static str, croner::errors::CronError),
}

pub struct Scheduler<S> {
    applier: Arc<Applier<S>>,
    jobs: Vec<(Job, Cron)>,
    reports_dir: PathBuf,
}

/// Accounts looked at per page when sending statements.
const STATEMENT_ACCOUNTS_PER_PAGE: i64 = 500;

/// The first instant of the month of `t`, in UTC.
fn month_start(t: Ts) -> Ts {
    let t = t.utc();
    Ts::from(
        Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .single()
            .expect("the first of a month is a valid instant"),
    )
}

impl<S: Store> Scheduler<S> {
    /// `crons` are the `SWEEP_CRON`, `STATEMENT_CRON` and `REPORT_CRON`
    /// expressions.
    pub fn new(
        applier: Arc<Applier<S>>,
        crons: [(Job, &str); 3],
        reports_dir: PathBuf,
    ) -> Result<Scheduler<S>, ScheduleError> {
        let jobs = crons
            .into_iter()
            .map(|(job, expression)| {
                parse_cron(expression)
                    .map(|cron| (job, cron))
                    .map_err(|e| ScheduleError::Cron(job.name(), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Scheduler {
            applier,
            jobs,
            reports_dir,
        })
    }

    /// Runs every job that is due at `now` and was not run yet (here or by
    /// another worker). The first tick of a job only marks where its schedule
    /// starts. Returns the firings it ran.
    pub async fn tick(&self, now: Ts) -> Result<Vec<(Job, Ts)>, ScheduleError> {
        let store = self.applier.store();
        let mut ran = Vec::new();
        // A firing is the whole second of its occurrence: croner keeps the
        // fraction of the instant it searches from, so ticks a few
        // milliseconds apart (two triggers at 02:00, two workers' clocks)
        // would otherwise name the same occurrence differently and run it
        // once each.
        let whole_second = now.utc().trunc_subsecs(0);
        for (job, cron) in &self.jobs {
            let Ok(due) = cron.find_previous_occurrence(&whole_second, true) else {
                continue;
            };
            let due = Ts::from(due);
            match store.last_firing(job.name(), now).await? {
                None => {
                    store.claim_firing(job.name(), due, now, true).await?;
                }
                Some(last) if last >= due => {}
                Some(_) => {
                    if store.claim_firing(job.name(), due, now, false).await? {
                        tracing::info!(job = job.name(), %due, "Running a scheduled job.");
                        if let Err(error) = self.run(*job, due, now).await {
                            // Every job is idempotent: giving the firing back
                            // lets the next tick finish what this one began.
                            store.release_firing(job.name(), due).await?;
                            return Err(error);
                        }
                        store.firing_done(job.name(), due).await?;
                        ran.push((*job, due));
                    }
                }
            }
            // From the database, so that every worker sharing it shows the
            // firings any of them ran, from the first tick after its start.
            if let Some(done) = store.last_done_firing(job.name()).await? {
                metrics::gauge!(metric::CRON_LAST_SUCCESS, "cron_job" => job.name())
                    .set(done.unix_seconds());
            }
        }
        Ok(ran)
    }

    async fn run(&self, job: Job, due: Ts, now: Ts) -> Result<(), ScheduleError> {
        match job {
            Job::Sweep => {
                run_jobs_at(&self.applier, now).await?;
            }
            Job::Statements => self.statements(due, now).await?,
            Job::DailyReports => self.daily_reports(due, now).await?,
        }
        Ok(())
    }

    /// Queues last month's `transactions` report for every owner of every
    /// account; the dispatcher builds and sends them. Ids derive from the
    /// account, the owner and the month, so a repeated firing queues nothing
    /// new.
    async fn statements(&self, due: Ts, now: Ts) -> Result<(), StoreError> {
        let store = self.applier.store();
        let to = month_start(due);
        let from = month_start(to.plus_days(-1));
        let month = from.utc().format("%Y-%m").to_string();
        let mut after: Option<Id> = None;
        loop {
            let ids = store
                .account_ids(after.as_ref(), STATEMENT_ACCOUNTS_PER_PAGE)
                .await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let ledger = store
                .snapshot(&ToLoad {
                    account_ids: ids,
                    ..ToLoad::default()
                })
                .await?;
            let mut rows = Vec::new();
            for account in ledger.accounts.values() {
                for owner in &account.owners {
                    let job = ReportJob {
                        request: ReportRequested {
                            report: ReportKind::Transactions,
                            format: ReportFormat::Csv,
                            recipient: owner.email.clone(),
                            account_id: Some(account.id.clone()),
                            from: Some(from),
                            to: Some(to),
                            columns: None,
                        },
                        causation_id: format!("schedule:statements:{due}"),
                        trace: None,
                        title: format!(
                            "Your training credits statement for {}, {month}",
                            account.name
                        ),
                        announce: false,
                    };
                    rows.push(OutboxRow::new(
                        derived_uuid(&format!(
                            "statement\n{}\n{}\n{month}",
                            account.id, owner.email
                        )),
                        OutboxKind::Report,
                        serde_json::to_string(&job).expect("a report job serialises"),
                        now,
                    ));
                }
            }
            store.enqueue_outbox(&rows).await?;
            after = Some(last);
        }
        Ok(())
    }

    /// Writes `credits-DATE.csv` and `balances-DATE.csv` for all accounts into
    /// `REPORTS_DIR`, as of `now`.
    async fn daily_reports(&self, due: Ts, now: Ts) -> Result<(), ReportError> {
        tokio::fs::create_dir_all(&self.reports_dir).await?;
        for kind in [ReportKind::Credits, ReportKind::Balances] {
            let name = match serde_json::to_value(kind) {
                Ok(Value::String(name)) => name,
                _ => unreachable!("a report kind serialises to its name"),
            };
            let query = ReportQuery {
                kind,
                account: None,
                from: None,
                to: None,
                now,
            };
            let columns = choose_columns(kind, None)?;
            let path = self.reports_dir.join(format!("{name}-{}.csv", due.date()));
            report::write(
                self.applier.store(),
                &query,
                ReportFormat::Csv,
                &columns,
                &path,
                |_| {},
            )
            .await?;
        }
        Ok(())
    }
}
