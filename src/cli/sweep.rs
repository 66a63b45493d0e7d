//! `training-credits sweep [--at RFC3339]`: every scheduled job once.

use std::process::ExitCode;

use crate::apply::Applier;
use crate::config::Config;
use crate::domain::Ts;
use crate::schedule::run_jobs_at;
use crate::store::Store;

pub async fn run<S: Store>(store: S, config: &Config, at: Option<Ts>) -> anyhow::Result<ExitCode> {
    let at = at.unwrap_or_else(Ts::now);
    let applier = Applier::new(store, config.settings());
    let report = run_jobs_at(&applier, at).await?;
    eprintln!(
        "Swept as of {at}: {} accounts examined, {} changed.",
        report.accounts_examined, report.accounts_changed
    );
    Ok(ExitCode::SUCCESS)
}
