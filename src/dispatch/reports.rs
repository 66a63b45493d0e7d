//! Report jobs: a requested report or a monthly statement, built into
//! `REPORTS_DIR` and emailed as an attachment; a requested one is announced
//! with `training-credits.report.generated`.

use super::{DispatchError, Dispatcher};
use crate::domain::Ts;
use crate::domain::command::ReportFormat;
use crate::domain::event::Event;
use crate::domain::ledger::Recipient;
use crate::domain::notice::Notice;
use crate::notify::Attachment;
use crate::ops::metric;
use crate::outbox::{OutboundEvent, derived_uuid};
use crate::report::{self, ReportJob, ReportQuery, choose_columns};
use crate::store::{OutboxKind, OutboxRow, Store};

impl<S: Store> Dispatcher<S> {
    /// Builds a report into `REPORTS_DIR`, emails it as an attachment and,
    /// for a requested report, announces it with
    /// `training-credits.report.generated` (written to the outbox in the same
    /// transaction that marks the report sent).
    pub(super) async fn send_report(&self, row: &OutboxRow) -> Result<(), DispatchError> {
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
                &Notice::ReportReady {
                    title: job.title.clone(),
                    filename: filename.clone(),
                    rows,
                },
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
        if let Err(error) = self.mailer.send(&self.mail_from, &email).await {
            metrics::counter!(metric::EMAILS, "result" => "failed").increment(1);
            return Err(error.to_string());
        }
        metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
        if !job.announce {
            return Ok(Vec::new());
        }
        let id = derived_uuid(&format!("{}\ngenerated", row.id));
        let event = OutboundEvent {
            id: &id,
            event: &Event::ReportGenerated {
                report: request.report,
                format: request.format,
                rows,
                recipient: request.recipient.clone(),
            },
            account_id: request.account_id.as_ref(),
            causation_id: &job.causation_id,
            trace: job.trace.as_ref(),
            time: now,
        }
        .to_cloud_event(&self.event_source);
        Ok(vec![OutboxRow::new(
            id,
            OutboxKind::Event,
            event.to_string(),
            now,
        )])
    }
}
