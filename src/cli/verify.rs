//! `training-credits verify`: recompute and check; non-zero if anything is wrong.

use std::process::ExitCode;

use crate::store::Books;

pub async fn run<S: Books>(store: &S) -> anyhow::Result<ExitCode> {
    let problems = store.verify().await?;
    if problems.is_empty() {
        eprintln!("The ledger is consistent.");
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        println!("{problem}");
    }
    let count = problems.len();
    let noun = if count == 1 { "problem" } else { "problems" };
    eprintln!("training-credits: {count} {noun} found in the ledger");
    Ok(ExitCode::from(1))
}
