//! `training-credits report KIND --format csv|xlsx --out FILE [--account ID]
//! [--from T] [--to T] [--columns a,b,…]`: a report of SPEC §8 to a file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::domain::command::{ReportFormat, ReportKind};
use crate::domain::{Id, Ts};
use crate::report::{ReportQuery, choose_columns, write};
use crate::store::{Store, ToLoad};

/// The options of `report`, as the argument parser typed them.
pub struct Options<'a> {
    pub kind: ReportKind,
    pub format: ReportFormat,
    pub out: &'a Path,
    pub account: Option<Id>,
    pub from: Option<Ts>,
    pub to: Option<Ts>,
    pub columns: Option<&'a [String]>,
}

pub async fn run<S: Store>(store: &S, options: Options<'_>) -> anyhow::Result<ExitCode> {
    if let Some(id) = &options.account {
        let ledger = store
            .snapshot(&ToLoad {
                account_ids: vec![id.clone()],
                ..ToLoad::default()
            })
            .await?;
        if !ledger.accounts.contains_key(id) {
            bail!("--account: account `{id}` is not known");
        }
    }
    // `Cli::check` refuses unknown columns as bad usage before we get here;
    // this answers a caller of `cli::run` that did not check.
    let columns = choose_columns(options.kind, options.columns).context("--columns")?;
    let query = ReportQuery {
        kind: options.kind,
        account: options.account,
        from: options.from,
        to: options.to,
        now: Ts::now(),
    };
    let progress = super::progress(0, "rows written");
    let rows = write(store, &query, options.format, &columns, options.out, |n| {
        progress.set_position(n)
    })
    .await
    .with_context(|| format!("cannot write {}", options.out.display()))?;
    progress.finish_and_clear();
    eprintln!("Wrote {rows} rows to {}.", options.out.display());
    Ok(ExitCode::SUCCESS)
}
