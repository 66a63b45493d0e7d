//! `training-credits run`: the worker, until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::worker;

pub async fn run<S: Store>(store: S, config: &Config) -> anyhow::Result<ExitCode> {
    let listener = crate::ops::bind(config.http_addr)
        .await
        .with_context(|| format!("HTTP_ADDR: cannot listen on {}", config.http_addr))?;
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    worker::run(store, config, listener, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels on the first SIGINT or SIGTERM.
async fn stop_on_signal(cancel: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("Stopping: finishing the work in hand.");
    cancel.cancel();
}
