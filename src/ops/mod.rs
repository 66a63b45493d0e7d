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
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::store::{Books, Outbox};

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

/// One named metric per thing an operator watches.
pub mod metric {
    /// Counter by `type` and `outcome` (applied, duplicate, refused, retry, dead_letter).
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
    /// Counter by `result` (sent, failed).
    pub const EMAILS: &str = "training_credits_emails_total";
    /// Counter by `result` (ack, nack).
    pub const PUBLISH_CONFIRMS: &str = "training_credits_publish_confirms_total";
    /// Counter: times the database was out of reach and the worker waited.
    pub const DATABASE_WAITS: &str = "training_credits_database_waits_total";
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 25.0, 100.0, 250.0, 1000.0, 2500.0,
            ])
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests run several
        // workers in one process); the handle still renders ours.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[derive(Clone)]
struct Ops<S> {
    store: S,
    health: Arc<Health>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz<S: Books>(State(ops): State<Ops<S>>) -> (StatusCode, Json<serde_json::Value>) {
    let database = ops.store.ping().await.is_ok();
    Health::set(&ops.health.database_reachable, database);
    let broker = ops.health.broker_connected.load(Ordering::Relaxed);
    let consumer = ops.health.consumer_running.load(Ordering::Relaxed);
    let ready = database && broker && consumer;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "database_reachable": database,
            "broker_connected": broker,
            "consumer_running": consumer,
        })),
    )
}

async fn render_metrics<S: Outbox>(State(ops): State<Ops<S>>) -> String {
    if let Ok(backlog) = ops.store.outbox_backlog().await {
        for kind in [
            crate::store::OutboxKind::Event,
            crate::store::OutboxKind::Email,
            crate::store::OutboxKind::Report,
        ] {
            let rows = backlog
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!(metric::OUTBOX_BACKLOG, "kind" => kind.as_str()).set(rows as f64);
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
