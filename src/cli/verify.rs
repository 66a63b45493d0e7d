//! `training-credits verify`: recompute and check; non-zero if anything is wrong.

use std::process::ExitCode;

use crate::store::Store;

pub async fn run<S: Store>(store: &S) -> anyhow::Result<ExitCode> {
    let problems = store.verify().await?;
    if problems.is_empty() {
        eprintln!("The ledger is consistent.");
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        println!("{problem}");
    }
    eprintln!("training-credits: {} problems found", problems.len());
    Ok(ExitCode::from(1))
}
