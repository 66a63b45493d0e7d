//! `training-credits account show ACCOUNT_ID`: one account as JSON.

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::api::describe_account;
use crate::domain::{Id, Ts};
use crate::store::{Books, ToLoad};

pub async fn show<S: Books>(store: &S, account_id: &str) -> anyhow::Result<ExitCode> {
    let id: Id = account_id.parse().context("bad account id")?;
    let wanted = ToLoad {
        account_ids: vec![id.clone()],
        ..ToLoad::default()
    };
    let ledger = store.snapshot(&wanted).await?;
    let Some(account) = ledger.accounts.get(&id) else {
        bail!("account `{id}` is not known");
    };
    println!("{}", describe_account(account, Ts::now()));
    Ok(ExitCode::SUCCESS)
}
