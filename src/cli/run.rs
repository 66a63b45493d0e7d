//! `training-credits run`: the worker, until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::worker;

pub async fn run<S: Store>(
    store: S,
    config: &Config,
    cancel: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let listener = crate::ops::bind(config.http_addr)
        .await
        .with_context(|| format!("HTTP_ADDR: cannot listen on {}", config.http_addr))?;
    worker::run(store, config, listener, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled by the first SIGINT or SIGTERM. The handlers are in
/// place when this returns; a second signal stops the process at once, for
/// an operator who will not wait for the work in hand.
pub fn cancel_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("Stopping: finishing the work in hand.");
        token.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("training-credits: stopped at once by a second signal");
        std::process::exit(1);
    });
    Ok(cancel)
}
