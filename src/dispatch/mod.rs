//! Dispatch: the outbox, sent. Outbound events are published to
//! `training-credits.out` (persistent, routing key = type) and marked sent only
//! once the broker confirms them; emails are marked sent once the SMTP server
//! (or the `.eml` file) took them. A failure is tried again with backoff and
//! never dropped. Rows are claimed with a lease, so several workers on one
//! PostgreSQL database never send the same row at the same time, and a
//! worker that dies mid-send leaves its rows to be sent again: at least once,
//! always with the same event id or `Message-ID`.

pub mod mail;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Connection};
use lettre::message::Mailbox;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use std::path::PathBuf;

use serde_json::json;

use crate::apply::{OutboundEvent, derived_uuid};
use crate::config::redact;
use crate::consume::topology::OUTBOUND_EXCHANGE;
use crate::consume::{connect, persistent_cloudevent};
use crate::domain::Ts;
use crate::domain::command::ReportFormat;
use crate::domain::ledger::Recipient;
use crate::notify::Email;
use crate::notify::{Attachment, Renderer};
use crate::ops::metric;
use crate::report::{self, ReportJob, ReportQuery, choose_columns};
use crate::store::{OutboxKind, OutboxRow, Store, StoreError};
use mail::Mailer;

/// Rows claimed per round.
pub const CLAIM_ROWS_MAX: i64 = 500;
/// How long a claimed row is this worker's before others may take it.
pub const LEASE: Duration = Duration::from_secs(120);
/// How often the outbox is looked at when nothing wakes the dispatcher.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a stopping worker keeps flushing the outbox.
pub const FLUSH_TIME_MAX: Duration = Duration::from_secs(10);
/// The longest wait before a failed row is tried again.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

pub struct Dispatcher<S> {
    pub store: S,
    pub amqp_url: String,
    pub mailer: Mailer,
    pub mail_from: Mailbox,
    pub retry_delays: Vec<Duration>,
    pub wake: Arc<Notify>,
    /// Renders the email a report travels in.
    pub renderer: Renderer,
    /// Where report files are written before they are sent.
    pub reports_dir: PathBuf,
    /// `source` of the events the dispatcher itself announces.
    pub event_source: String,
}

/// When to try a row again after `attempts` failures: doubling from one
/// second up to [`RETRY_BACKOFF_MAX`].
pub fn backoff(attempts: i64) -> Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(2_u64.pow(exponent)).min(RETRY_BACKOFF_MAX)
}

/// The two lanes of the outbox, each dispatched by a task of its own, so that
/// a slow SMTP server never holds up the outbound events, nor the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Outbound events, woken after every commit: their latency counts.
    Events,
    /// Emails and reports, looked at every [`POLL_INTERVAL`].
    Mail,
}

impl Lane {
    fn kinds(self) -> &'static [OutboxKind] {
        match self {
            Lane::Events => &[OutboxKind::Event],
            Lane::Mail => &[OutboxKind::Email, OutboxKind::Report],
        }
    }
}

impl<S: Store> Dispatcher<S> {
    /// Dispatches `lane` until `cancel`, then keeps sending what is due until
    /// it is drained (or [`FLUSH_TIME_MAX`] has passed, as other workers may
    /// keep adding rows), so a clean stop leaves nothing behind that could go.
    pub async fn run(&self, lane: Lane, cancel: CancellationToken) {
        let mut channel: Option<(Connection, Channel)> = None;
        let kinds = lane.kinds();
        while !cancel.is_cancelled() {
            match self.round(kinds, &mut channel).await {
                Ok(claimed) if claimed > 0 => continue,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "Dispatching failed; trying again.");
                    channel = None;
                }
            }
            let woken = async {
                match lane {
                    Lane::Events => self.wake.notified().await,
                    Lane::Mail => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = woken => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + FLUSH_TIME_MAX;
        while tokio::time::Instant::now() < deadline {
            match self.round(kinds, &mut channel).await {
                Ok(claimed) if claimed > 0 => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "The outbox could not be flushed; the next worker sends the rest.");
                    break;
                }
            }
        }
        if let Some((connection, _)) = channel {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }

    /// Claims due rows of `kinds` and sends them. Returns how many were claimed.
    pub async fn round(
        &self,
        kinds: &[OutboxKind],
        channel: &mut Option<(Connection, Channel)>,
    ) -> Result<usize, DispatchError> {
        let now = Ts::now();
        let rows = self
            .store
            .claim_outbox(
                kinds,
                now,
                now.plus(chrono::Duration::from_std(LEASE).expect("a short lease")),
                CLAIM_ROWS_MAX,
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let claimed = rows.len();
        let (events, rest): (Vec<OutboxRow>, Vec<OutboxRow>) = rows
            .into_iter()
            .partition(|row| row.kind == OutboxKind::Event);
        let (emails, reports): (Vec<OutboxRow>, Vec<OutboxRow>) = rest
            .into_iter()
            .partition(|row| row.kind == OutboxKind::Email);
        let mut failed = None;
        if !events.is_empty() {
            let result = match channel {
                Some((_, open)) if open.status().connected() => self.publish(open, &events).await,
                _ => {
                    let opened = self.connect().await;
                    match opened {
                        Ok(pair) => {
                            let result = self.publish(&pair.1, &events).await;
                            *channel = Some(pair);
                            result
                        }
                        Err(error) => Err(error),
                    }
                }
            };
            if let Err(error) = result {
                self.reschedule(&events, &error.to_string()).await?;
                failed = Some(error);
            }
        }
        // Emails and reports do not need the broker: they go even when the
        // events could not, instead of waiting out their lease.
        for row in &emails {
            self.send_email(row).await?;
        }
        for row in &reports {
            self.send_report(row).await?;
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(claimed),
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel), DispatchError> {
        Ok(connect(&self.amqp_url, &self.retry_delays)
            .await
            .inspect_err(|error| tracing::warn!(%error, broker = %redact(&self.amqp_url), "Cannot reach the broker to publish."))?)
    }

    /// Publishes every event, then waits for every confirm: the broker works
    /// through the whole set at once instead of one round trip per event.
    async fn publish(&self, channel: &Channel, events: &[OutboxRow]) -> Result<(), DispatchError> {
        let mut confirms = Vec::with_capacity(events.len());
        for row in events {
            let routing_key = serde_json::from_str::<serde_json::Value>(&row.payload)
                .ok()
                .and_then(|event| event["type"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let confirm = channel
                .basic_publish(
                    OUTBOUND_EXCHANGE.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    row.payload.as_bytes(),
                    persistent_cloudevent(&row.id),
                )
                .await?;
            confirms.push((row, confirm));
        }
        let mut done = Vec::with_capacity(events.len());
        for (row, confirm) in confirms {
            if confirm.await?.is_ack() {
                metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "ack").increment(1);
                done.push(row.id.clone());
            } else {
                metrics::counter!(metric::PUBLISH_CONFIRMS, "result" => "nack").increment(1);
                self.reschedule(std::slice::from_ref(row), "the broker refused the event")
                    .await?;
            }
        }
        self.store.outbox_done(&done, Ts::now()).await?;
        Ok(())
    }

    async fn send_email(&self, row: &OutboxRow) -> Result<(), DispatchError> {
        let email: Email = match serde_json::from_str(&row.payload) {
            Ok(email) => email,
            Err(error) => {
                // Written by this program; unreadable means a defect, which
                // must not block the rows behind it.
                tracing::error!(%error, id = %row.id, "An outbox email cannot be read.");
                self.reschedule(std::slice::from_ref(row), &error.to_string())
                    .await?;
                return Ok(());
            }
        };
        match self.mailer.send(&self.mail_from, &email).await {
            Ok(()) => {
                metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
                self.store
                    .outbox_done(std::slice::from_ref(&row.id), Ts::now())
                    .await?;
            }
            Err(error) => {
                metrics::counter!(metric::EMAILS, "result" => "failed").increment(1);
                tracing::warn!(%error, message_id = %email.message_id, attempts = row.attempts + 1, "An email could not be sent; it waits.");
                self.reschedule(std::slice::from_ref(row), &error.to_string())
                    .await?;
            }
        }
        Ok(())
    }

    /// Builds a report into `REPORTS_DIR`, emails it as an attachment and,
    /// for a requested report, announces it with
    /// `training-credits.report.generated` (written to the outbox in the same
    /// transaction that marks the report sent).
    async fn send_report(&self, row: &OutboxRow) -> Result<(), DispatchError> {
        match self.build_and_send_report(row).await {
            Ok(follow_up) => {
                self.store
                    .outbox_complete(&row.id, &follow_up, Ts::now())
                    .await?;
            }
            Err(error) => {
                tracing::warn!(%error, id = %row.id, attempts = row.attempts + 1, "A report could not be sent; it waits.");
                self.reschedule(std::slice::from_ref(row), &error).await?;
            }
        }
        Ok(())
    }

    async fn build_and_send_report(&self, row: &OutboxRow) -> Result<Vec<OutboxRow>, String> {
        let job: ReportJob = serde_json::from_str(&row.payload).map_err(|e| e.to_string())?;
        let now = Ts::now();
        let request = &job.request;
        let query = ReportQuery {
            kind: request.report,
            account: request.account_id.clone(),
            from: request.from,
            to: request.to,
            now,
        };
        let columns = choose_columns(request.report, request.columns.as_deref())
            .map_err(|e| e.to_string())?;
        let filename = job.filename(now);
        tokio::fs::create_dir_all(&self.reports_dir)
            .await
            .map_err(|e| e.to_string())?;
        let path = self.reports_dir.join(format!("{}-{filename}", row.id));
        let rows = report::write(&self.store, &query, request.format, &columns, &path, |_| {})
            .await
            .map_err(|e| e.to_string())?;
        let recipient = Recipient {
            email: request.recipient.clone(),
            name: None,
        };
        let mut email = self
            .renderer
            .render(
                "report_ready",
                &json!({"title": job.title, "filename": filename, "rows": rows}),
                &recipient,
                format!("<{}@training-credits>", row.id),
                &job.causation_id,
            )
            .map_err(|e| e.to_string())?;
        email.attachments.push(Attachment {
            filename,
            content_type: match request.format {
                ReportFormat::Csv => "text/csv; charset=utf-8",
                ReportFormat::Xlsx => {
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
                }
            }
            .to_owned(),
            path: path.display().to_string(),
        });
        self.mailer
            .send(&self.mail_from, &email)
            .await
            .map_err(|e| e.to_string())?;
        metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
        if !job.announce {
            return Ok(Vec::new());
        }
        let id = derived_uuid(&format!("{}\ngenerated", row.id));
        let event = OutboundEvent {
            id: &id,
            kind: "training-credits.report.generated",
            account_id: request.account_id.as_ref(),
            data: &json!({
                "report": request.report,
                "format": request.format,
                "rows": rows,
                "recipient": request.recipient,
            }),
            causation_id: &job.causation_id,
            time: now,
        }
        .to_cloud_event(&self.event_source);
        Ok(vec![OutboxRow {
            id,
            kind: OutboxKind::Event,
            payload: event.to_string(),
            created_at: now,
            attempts: 0,
        }])
    }

    async fn reschedule(&self, rows: &[OutboxRow], error: &str) -> Result<(), StoreError> {
        for row in rows {
            let delay =
                chrono::Duration::from_std(backoff(row.attempts)).expect("a bounded backoff");
            self.store
                .outbox_failed(&row.id, Ts::now().plus(delay), error)
                .await?;
        }
        Ok(())
    }
}
