//! Scheduled jobs as plain functions of an instant: the expiry sweep, the
//! expiry reminders and the pending-request timeout. They go through the same
//! [`Applier`] path as messages, one input per account, so a job is
//! idempotent per instant and one account's trouble never stops another's.

use crate::apply::{Applier, Input};
use crate::decode::EventKey;
use crate::domain::command::Command;
use crate::domain::{Id, Outcome, Ts};
use crate::store::{Store, StoreError};

/// Accounts per transaction: bounds how long one sweep batch holds its locks.
pub const SWEEP_ACCOUNTS_PER_BATCH: usize = 200;

/// What one run of the jobs did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobsReport {
    pub accounts_examined: usize,
    pub accounts_changed: usize,
}

/// The sweep of one account at `at`, as a ledger input.
pub fn sweep_input(account_id: &Id, at: Ts) -> Input {
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
    }
}

/// Runs every scheduled job once as of `at`.
pub async fn run_jobs_at<S: Store>(applier: &Applier<S>, at: Ts) -> Result<JobsReport, StoreError> {
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
        let inputs: Vec<Input> = chunk.iter().map(|id| sweep_input(id, at)).collect();
        let outcomes = applier.apply(&inputs, at).await?;
        report.accounts_changed += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Applied))
            .count();
    }
    Ok(report)
}
