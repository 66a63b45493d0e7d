//! `training-credits report KIND --format csv|xlsx --out FILE [--account ID]
//! [--from T] [--to T] [--columns a,b,…]`: a report of SPEC §8 to a file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;

use crate::domain::command::{ReportFormat, ReportKind};
use crate::domain::{Id, Ts};
use crate::report::{ReportQuery, choose_columns, write};
use crate::store::{Store, Wanted};

/// The options of `report`, as typed on the command line.
pub struct Options<'a> {
    pub kind: &'a str,
    pub format: &'a str,
    pub out: &'a Path,
    pub account: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub columns: Option<&'a str>,
}

fn word<T: DeserializeOwned>(option: &str, text: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .with_context(|| format!("{option}: `{text}` is not one of the choices"))
}

fn instant(option: &str, text: Option<&str>) -> anyhow::Result<Option<Ts>> {
    text.map(|t| Ts::parse(t).with_context(|| format!("{option}: `{t}` is not RFC 3339")))
        .transpose()
}

pub async fn run<S: Store>(store: &S, options: Options<'_>) -> anyhow::Result<ExitCode> {
    let kind: ReportKind = word("KIND", options.kind)?;
    let format: ReportFormat = word("--format", options.format)?;
    let account: Option<Id> = options
        .account
        .map(|a| a.parse().context("--account"))
        .transpose()?;
    if let Some(id) = &account {
        let ledger = store
            .snapshot(&Wanted {
                account_ids: vec![id.clone()],
                ..Wanted::default()
            })
            .await?;
        if !ledger.accounts.contains_key(id) {
            bail!("--account: account `{id}` is not known");
        }
    }
    let requested: Option<Vec<String>> = options
        .columns
        .map(|c| c.split(',').map(|s| s.trim().to_owned()).collect());
    let columns = choose_columns(kind, requested.as_deref()).context("--columns")?;
    let query = ReportQuery {
        kind,
        account,
        from: instant("--from", options.from)?,
        to: instant("--to", options.to)?,
        now: Ts::now(),
    };
    let progress = super::progress(0, "rows written");
    let rows = write(store, &query, format, &columns, options.out, |n| {
        progress.set_position(n)
    })
    .await
    .with_context(|| format!("cannot write {}", options.out.display()))?;
    progress.finish_and_clear();
    eprintln!("Wrote {rows} rows to {}.", options.out.display());
    Ok(ExitCode::SUCCESS)
}
