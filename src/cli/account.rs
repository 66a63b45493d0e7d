//! `training-credits account show ACCOUNT_ID`: one account as JSON.

use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::domain::model::Account;
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
    println!("{}", describe(account, Ts::now()));
    Ok(ExitCode::SUCCESS)
}

/// The account as SPEC §3 `account show` prints it, as of `now`.
pub fn describe(account: &Account, now: Ts) -> Value {
    let balances = account.balances_at(now);
    json!({
        "account_id": account.id,
        "name": account.name,
        "status": account.status,
        "approval_mode": account.approval_mode,
        "owners": account.owners,
        "code": account.code,
        "scope": account.scope,
        "low_balance_threshold": account.low_balance_threshold,
        "notes": account.notes,
        "balance": balances.balance,
        "held": balances.held,
        "available": balances.available,
        "lots": account.lots.iter().map(|lot| json!({
            "purchase_id": lot.purchase_id,
            "credits": lot.credits,
            "remaining": lot.remaining,
            "held": lot.held,
            "expires_at": lot.expires_at,
            "status": if lot.is_expired_at(now) { "expired" } else { "active" },
        })).collect::<Vec<_>>(),
    })
}
