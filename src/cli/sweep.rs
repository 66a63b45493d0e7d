//! `training-credits sweep [--at RFC3339]`: every scheduled job once.

use std::process::ExitCode;

use anyhow::Context;

use crate::apply::Applier;
use crate::config::Config;
use crate::domain::Ts;
use crate::schedule::run_jobs_at;
use crate::store::Store;

pub async fn run<S: Store>(
    store: S,
    config: &Config,
    at: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let at = match at {
        Some(text) => Ts::parse(text).with_context(|| format!("--at `{text}` is not RFC 3339"))?,
        None => Ts::now(),
    };
    let applier = Applier::new(store, config.settings());
    let report = run_jobs_at(&applier, at).await?;
    eprintln!(
        "Swept as of {at}: {} accounts examined, {} changed.",
        report.accounts_examined, report.accounts_changed
    );
    Ok(ExitCode::SUCCESS)
}
