//! Operations: health, readiness and Prometheus metrics over HTTP
//! (`HTTP_ADDR`), and the one place every metric name is defined.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::domain::{DeadReason, Ts};
use crate::store::{Books, Outbox, OutboxKind};

/// What `/readyz` reports, kept up to date by the worker's tasks.
#[derive(Debug, Default)]
pub struct Health {
    pub broker_connected: AtomicBool,
    pub consumer_running: AtomicBool,
    pub database_reachable: AtomicBool,
}

impl Health {
    pub fn set(flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::Relaxed);
    }
}

/// One named metric per thing an operator watches. Each has a `# HELP`
/// line, and the series whose labels are known in advance are shown from
/// the start (see [`describe`]), so that dashboards and alerts see them
/// before their first event.
pub mod metric {
    /// Counter by `type` and `outcome` (applied, duplicate, refused, retry,
    /// dead_letter); `type` is an inbound type or `unknown`.
    pub const MESSAGES: &str = "training_credits_messages_total";
    /// Histogram: seconds to apply one batch, commit included.
    pub const APPLY_SECONDS: &str = "training_credits_apply_seconds";
    /// Histogram: messages per batch.
    pub const BATCH_SIZE: &str = "training_credits_batch_size";
    /// Counter by `reason`.
    pub const DEAD_LETTERS: &str = "training_credits_dead_letters_total";
    /// Counter: messages sent to a retry queue.
    pub const RETRIES: &str = "training_credits_retries_total";
    /// Gauge by `kind`: outbox rows not dispatched yet.
    pub const OUTBOX_BACKLOG: &str = "training_credits_outbox_backlog";
    /// Gauge by `kind`: seconds since the oldest outbox row not dispatched
    /// yet was written; 0 when none waits.
    pub const OUTBOX_OLDEST_AGE: &str = "training_credits_outbox_oldest_unsent_age_seconds";
    /// Counter by `result` (sent, failed).
    pub const EMAILS: &str = "training_credits_emails_total";
    /// Counter by `result` (ack, nack).
    pub const PUBLISH_CONFIRMS: &str = "training_credits_publish_confirms_total";
    /// Counter: times the database was out of reach and the worker waited.
    pub const DATABASE_WAITS: &str = "training_credits_database_waits_total";
    /// Gauge: 1 while `/readyz` would answer 200, else 0.
    pub const READY: &str = "training_credits_ready";
    /// Gauge by `cron_job` (not `job`, which Prometheus gives every scraped
    /// series): the Unix time of the latest firing of the job that ran to
    /// success (before its first run: where its schedule began).
    pub const CRON_LAST_SUCCESS: &str = "training_credits_cron_last_success_timestamp_seconds";
    /// Gauge by `version`, always 1.
    pub const BUILD_INFO: &str = "training_credits_build_info";
}

/// Buckets of [`metric::APPLY_SECONDS`]: a batch commits in milliseconds;
/// one that takes over a minute is as bad as one that takes ten.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of [`metric::BATCH_SIZE`], up to the largest `BATCH_SIZE`
/// allowed.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The process-wide Prometheus recorder, installed on first use, every
/// metric described.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // A histogram given no buckets here would be rendered as a summary.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(metric::APPLY_SECONDS.to_owned()),
                SECONDS_BUCKETS,
            )
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full(metric::BATCH_SIZE.to_owned()),
                    BATCH_SIZE_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests run several
        // workers in one process); the handle still renders ours.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// The `# HELP` line of every metric, and, at zero, each series whose
/// labels are known in advance: every dead-letter reason the worker gives,
/// both email and confirm results, the histograms. A series of
/// [`metric::MESSAGES`] appears with the first message of its type and
/// outcome (of the types times the outcomes, most never occur); readiness
/// and the outbox gauges (for every kind) are set at every scrape; the cron
/// gauges by the scheduler's first tick, at start (a zero would read as
/// overdue).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_counter!(
        metric::MESSAGES,
        Unit::Count,
        "Inbound messages handled, by type and outcome (applied, duplicate, refused, retry, dead_letter)."
    );
    describe_histogram!(
        metric::APPLY_SECONDS,
        Unit::Seconds,
        "Seconds to apply one batch of messages, commit included."
    );
    describe_histogram!(
        metric::BATCH_SIZE,
        Unit::Count,
        "Messages per applied batch."
    );
    describe_counter!(
        metric::DEAD_LETTERS,
        Unit::Count,
        "Messages the worker sent to the dead-letter queue, by reason."
    );
    describe_counter!(
        metric::RETRIES,
        Unit::Count,
        "Messages sent to a retry queue."
    );
    describe_gauge!(
        metric::OUTBOX_BACKLOG,
        Unit::Count,
        "Outbox rows not dispatched yet, by kind (event, email, report)."
    );
    describe_gauge!(
        metric::OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Seconds since the oldest outbox row not dispatched yet was written, by kind; 0 when none waits."
    );
    describe_counter!(
        metric::EMAILS,
        Unit::Count,
        "Emails sent (to SMTP, or written as .eml files) and attempts that failed, by result."
    );
    describe_counter!(
        metric::PUBLISH_CONFIRMS,
        Unit::Count,
        "Broker confirms of published outbound events, by result (ack, nack)."
    );
    describe_counter!(
        metric::DATABASE_WAITS,
        Unit::Count,
        "Times the database was out of reach and consumption paused."
    );
    describe_gauge!(
        metric::READY,
        "1 while the worker is ready (database reachable, broker connected, consumer running: /readyz answers 200), else 0."
    );
    describe_gauge!(
        metric::CRON_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the latest firing of each scheduled job that ran to success (before its first run: when its schedule began)."
    );
    describe_gauge!(
        metric::BUILD_INFO,
        "Always 1; the version label names the running build."
    );

    // Registered, a histogram is shown with empty buckets.
    let _ = metrics::histogram!(metric::APPLY_SECONDS);
    let _ = metrics::histogram!(metric::BATCH_SIZE);
    for reason in DeadReason::ALL {
        metrics::counter!(metric::DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
    metrics::counter!(metric::RETRIES).increment(0);
    for result in ["sent", "failed"] {
        metrics::counter!(metric::EMAILS, "result" => result).increment(0);
    }
    for result in ["ack", "nack"] {
        metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => result).increment(0);
    }
    metrics::counter!(metric::DATABASE_WAITS).increment(0);
    metrics::gauge!(metric::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[derive(Clone)]
struct Ops<S> {
    store: S,
    health: Arc<Health>,
}

async fn healthz() -> &'static str {
    "ok"
}

/// What `/readyz` answers; [`metric::READY`] follows it.
struct Readiness {
    database: bool,
    broker: bool,
    consumer: bool,
}

impl Readiness {
    async fn check<S: Books>(ops: &Ops<S>) -> Readiness {
        let database = ops.store.ping().await.is_ok();
        Health::set(&ops.health.database_reachable, database);
        let readiness = Readiness {
            database,
            broker: ops.health.broker_connected.load(Ordering::Relaxed),
            consumer: ops.health.consumer_running.load(Ordering::Relaxed),
        };
        metrics::gauge!(metric::READY).set(if readiness.ready() { 1.0 } else { 0.0 });
        readiness
    }

    fn ready(&self) -> bool {
        self.database && self.broker && self.consumer
    }
}

async fn readyz<S: Books>(State(ops): State<Ops<S>>) -> (StatusCode, Json<serde_json::Value>) {
    let readiness = Readiness::check(&ops).await;
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": readiness.ready(),
            "database_reachable": readiness.database,
            "broker_connected": readiness.broker,
            "consumer_running": readiness.consumer,
        })),
    )
}

/// Readiness and the outbox are looked at when scraped, so what
/// `/metrics` shows of them is never older than the scrape.
async fn render_metrics<S: Books + Outbox>(State(ops): State<Ops<S>>) -> String {
    Readiness::check(&ops).await;
    if let Ok(backlog) = ops.store.outbox_backlog().await {
        let now = Ts::now();
        for kind in OutboxKind::ALL {
            let waiting = backlog.iter().find(|b| b.kind == kind);
            let rows = waiting.map_or(0, |b| b.rows);
            // Workers sharing PostgreSQL may disagree on the time a little.
            let age = waiting.map_or(0.0, |b| {
                (now.unix_seconds() - b.oldest.unix_seconds()).max(0.0)
            });
            metrics::gauge!(metric::OUTBOX_BACKLOG, "kind" => kind.as_str()).set(rows as f64);
            metrics::gauge!(metric::OUTBOX_OLDEST_AGE, "kind" => kind.as_str()).set(age);
        }
    }
    prometheus().render()
}

pub fn router<S: Books + Outbox + Clone + 'static>(store: S, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(render_metrics::<S>))
        .with_state(Ops { store, health })
}

/// Serves `routes` (the ops endpoints of [`router`], and the read API) on
/// an already bound listener until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, routes)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
