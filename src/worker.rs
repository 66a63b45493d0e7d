//! The worker (`training-credits run`): the consumer, the outbox dispatcher
//! and the ops HTTP server, sharing one cancellation token. On cancel the
//! consumer stops taking work and finishes its batch; then the dispatcher
//! sends what that batch produced; then the HTTP server stops.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api;
use crate::apply::Applier;
use crate::broker::broker_user;
use crate::config::Config;
use crate::consume::{Consumer, Limits, Trust};
use crate::decode::Schemas;
use crate::dispatch::Dispatcher;
use crate::dispatch::mail::{MailError, Mailer};
use crate::domain::Ts;
use crate::ops::{self, Health};
use crate::outbox::handoff::{Handoff, Lane};
use crate::schedule::{Job, Scheduler};
use crate::store::{HolderId, Outbox, Store};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("scheduler: {0}")]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error("scheduler: {0}")]
    Cron(#[from] tokio_cron_scheduler::JobSchedulerError),
    #[error(transparent)]
    Schema(#[from] crate::decode::SchemaError),
    #[error("SMTP_URL: {0}")]
    Mail(#[from] MailError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("cannot register as an outbox lease holder: {0}")]
    Holder(#[from] crate::store::StoreError),
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
    // Held until the worker returns: on PostgreSQL the other workers know
    // this one alive (and leave its leases alone) while it is.
    let holder = store.register_holder().await?;
    let (handoff, events_inbox, mail_inbox) = Handoff::new(holder.id);
    let applier = Arc::new(Applier::new(store.clone(), config.settings()).handing_off_to(handoff));
    let health = Arc::new(Health::default());
    let mailer = match &config.smtp_url {
        Some(url) => Mailer::smtp(url)?,
        None => Mailer::files(config.mail_dir.clone()),
    };
    let scheduler = Arc::new(Scheduler::new(
        applier.clone(),
        [
            (Job::Sweep, config.sweep_cron.as_str()),
            (Job::Statements, config.statement_cron.as_str()),
            (Job::DailyReports, config.report_cron.as_str()),
        ],
        config.reports_dir.clone(),
    )?);
    let cron = start_cron(scheduler, config).await?;
    let applier_for_api = applier.clone();
    let consumer = Consumer {
        applier,
        schemas,
        limits: Limits {
            prefetch: config.prefetch,
            batch_max: config.batch_size,
            retry_delays: config.retry_delays.clone(),
        },
        trust: Trust {
            publishers: config.publishers.clone(),
            own_user: broker_user(&config.amqp_url),
        },
        health: health.clone(),
    };
    let dispatcher = Dispatcher {
        store: store.clone(),
        holder: holder.id,
        amqp_url: config.amqp_url.clone(),
        mailer,
        mail_from: config.mail_from.clone(),
        retry_delays: config.retry_delays.clone(),
        renderer: crate::notify::Renderer::new(&config.portal_url),
        reports_dir: config.reports_dir.clone(),
        event_source: config.event_source.clone(),
    };
    let dispatcher_stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let store_for_release = store.clone();
    let routes =
        ops::router(store, health).merge(api::router(applier_for_api, config.api_tokens.clone()));
    let http = tokio::spawn(ops::serve(listener, routes, http_stop.clone()));
    let dispatcher = Arc::new(dispatcher);
    let mut dispatching: Vec<_> = [(Lane::Events, events_inbox), (Lane::Mail, mail_inbox)]
        .into_iter()
        .map(|(lane, inbox)| {
            let (dispatcher, stop) = (dispatcher.clone(), dispatcher_stop.clone());
            tokio::spawn(async move { dispatcher.run(lane, Some(inbox), stop).await })
        })
        .collect();
    dispatching.push(tokio::spawn(release_dead_holders(
        store_for_release,
        holder.id,
        dispatcher_stop.clone(),
    )));
    tracing::info!("The worker is running.");
    consumer.run(&config.amqp_url, cancel).await;
    tracing::info!("Consumption stopped; flushing the outbox.");
    let mut cron = cron;
    let _ = cron.shutdown().await;
    dispatcher_stop.cancel();
    for lane in dispatching {
        let _ = lane.await;
    }
    http_stop.cancel();
    let served = http.await;
    drop(holder);
    tracing::info!("The worker stopped.");
    match served {
        Ok(result) => result.map_err(WorkerError::Http),
        Err(_) => Ok(()),
    }
}

/// Catches up what was missed while no worker ran, then fires the scheduler
/// at every occurrence of the three schedules (in UTC).
async fn start_cron<S: Store>(
    scheduler: Arc<Scheduler<S>>,
    config: &Config,
) -> Result<tokio_cron_scheduler::JobScheduler, WorkerError> {
    tick(&scheduler).await;
    let cron = tokio_cron_scheduler::JobScheduler::new().await?;
    for expression in [
        &config.sweep_cron,
        &config.statement_cron,
        &config.report_cron,
    ] {
        let scheduler = scheduler.clone();
        cron.add(tokio_cron_scheduler::Job::new_async(
            expression.as_str(),
            move |_, _| {
                let scheduler = scheduler.clone();
                Box::pin(async move { tick(&scheduler).await })
            },
        )?)
        .await?;
    }
    cron.start().await?;
    Ok(cron)
}

/// How often the outbox is looked at for rows leased to workers that died.
const DEAD_HOLDERS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Gives back the rows that workers which died left leased, at start (so a
/// worker restarted after a crash sends them within seconds, not after the
/// lease) and every [`DEAD_HOLDERS_INTERVAL`] until `stop` (so a worker
/// sharing PostgreSQL with one that died sends them too).
async fn release_dead_holders<S: Outbox>(store: S, me: HolderId, stop: CancellationToken) {
    loop {
        match store.release_dead_holders(me, Ts::now()).await {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "Outbox rows leased to workers that are gone are due again."
            ),
            Err(error) => {
                tracing::warn!(%error, "Looking for the leases of workers that are gone failed.")
            }
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(DEAD_HOLDERS_INTERVAL))
            .await
            .is_none()
        {
            return;
        }
    }
}

async fn tick<S: Store>(scheduler: &Scheduler<S>) {
    if let Err(error) = scheduler.tick(Ts::now()).await {
        tracing::warn!(%error, "A scheduled job failed; the next tick runs it again.");
    }
}
