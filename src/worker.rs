//! The worker (`training-credits run`): the consumer, the outbox dispatcher
//! and the ops HTTP server, sharing one cancellation token. On cancel the
//! consumer stops taking work and finishes its batch; then the dispatcher
//! sends what that batch produced; then the HTTP server stops.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::apply::Applier;
use crate::config::Config;
use crate::consume::{Consumer, Limits};
use crate::decode::Schemas;
use crate::dispatch::Dispatcher;
use crate::dispatch::mail::{MailError, Mailer};
use crate::ops::{self, Health};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Schema(#[from] crate::decode::SchemaError),
    #[error("SMTP_URL: {0}")]
    Mail(#[from] MailError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Runs the worker on `store` until `cancel`, serving ops HTTP on `listener`.
pub async fn run<S: Store>(
    store: S,
    config: &Config,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> Result<(), WorkerError> {
    ops::prometheus();
    let schemas = Arc::new(Schemas::load()?);
    let applier = Arc::new(Applier::new(store.clone(), config.settings()));
    let health = Arc::new(Health::default());
    let outbox_ready = Arc::new(Notify::new());
    let mailer = match &config.smtp_url {
        Some(url) => Mailer::smtp(url)?,
        None => Mailer::files(config.mail_dir.clone()),
    };
    let consumer = Consumer {
        applier,
        schemas,
        limits: Limits {
            prefetch: config.prefetch,
            batch_max: config.batch_size,
            retry_delays: config.retry_delays.clone(),
        },
        outbox_ready: outbox_ready.clone(),
        health: health.clone(),
    };
    let dispatcher = Dispatcher {
        store: store.clone(),
        amqp_url: config.amqp_url.clone(),
        mailer,
        mail_from: config.mail_from.clone(),
        retry_delays: config.retry_delays.clone(),
        wake: outbox_ready,
        renderer: crate::notify::Renderer::new(&config.portal_url),
        reports_dir: config.reports_dir.clone(),
        event_source: config.event_source.clone(),
    };
    let dispatcher_stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(ops::serve(listener, store, health, http_stop.clone()));
    let dispatching = {
        let stop = dispatcher_stop.clone();
        tokio::spawn(async move { dispatcher.run(stop).await })
    };
    tracing::info!("The worker is running.");
    consumer.run(&config.amqp_url, cancel).await;
    tracing::info!("Consumption stopped; flushing the outbox.");
    dispatcher_stop.cancel();
    let _ = dispatching.await;
    http_stop.cancel();
    let served = http.await;
    tracing::info!("The worker stopped.");
    match served {
        Ok(result) => result.map_err(WorkerError::Http),
        Err(_) => Ok(()),
    }
}
