//! Sending the emails the outbox holds: through SMTP (`SMTP_URL`, pooled,
//! with a timeout on every send) or, when no server is configured, as `.eml`
//! files in `MAIL_DIR` named after their `Message-ID`, so a repeated send
//! rewrites the same file.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use lettre::message::{Attachment, Mailbox, MultiPart, header};
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{DispatchError, Dispatcher};
use crate::notify::{Email, one_line};
use crate::ops::metric;
use crate::store::{OutboxRow, Store};

/// How long one SMTP conversation may take before it counts as failed,
/// unless `SMTP_URL` says otherwise (`?timeout=10s`).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Emails sent to an SMTP server at once (lettre's pool holds up to 10
/// connections).
pub const EMAILS_IN_FLIGHT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot build the message: {0}")]
    Build(String),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("writing the .eml file: {0}")]
    File(#[from] std::io::Error),
    #[error("SMTP: no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the timeout of the SMTP URL: {0}")]
    Timeout(String),
}

pub enum Mailer {
    Smtp(Box<SmtpMailer>),
    Files(PathBuf),
}

/// A pool of SMTP connections, and what it takes to build another. lettre
/// bounds only the connecting with its timeout, so every send is bounded
/// here; and a send given up mid-conversation would leave its connection in
/// lettre's pool, still waiting for the reply, to be handed out again (to
/// hang again): after a timeout the whole pool is replaced instead.
pub struct SmtpMailer {
    builder: AsyncSmtpTransportBuilder,
    transport: Mutex<AsyncSmtpTransport<Tokio1Executor>>,
    timeout: Duration,
}

impl SmtpMailer {
    async fn send(&self, message: Message) -> Result<(), MailError> {
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match tokio::time::timeout(self.timeout, transport.send(message)).await {
            Ok(sent) => {
                sent?;
                Ok(())
            }
            Err(_) => {
                *self
                    .transport
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = self.builder.clone().build();
                Err(MailError::TimedOut(self.timeout))
            }
        }
    }
}

impl Mailer {
    /// `smtp://host:port` (plain), `smtp://host:port?tls=required`
    /// (STARTTLS), `smtps://host:port` (TLS), as lettre reads them; a
    /// `timeout` parameter (`?timeout=10s`, same units as `RETRY_DELAYS`)
    /// bounds each send instead of [`SEND_TIMEOUT`].
    pub fn smtp(url: &url::Url) -> Result<Mailer, MailError> {
        let timeout = match url.query_pairs().find(|(key, _)| key == "timeout") {
            Some((_, text)) => match crate::config::duration(&text) {
                Ok(timeout) if !timeout.is_zero() => timeout,
                Ok(_) => return Err(MailError::Timeout("it must be more than zero".to_owned())),
                Err(problem) => return Err(MailError::Timeout(problem)),
            },
            None => SEND_TIMEOUT,
        };
        let builder =
            AsyncSmtpTransport::<Tokio1Executor>::from_url(url.as_str())?.timeout(Some(timeout));
        Ok(Mailer::Smtp(Box::new(SmtpMailer {
            transport: Mutex::new(builder.clone().build()),
            builder,
            timeout,
        })))
    }

    pub fn files(dir: PathBuf) -> Mailer {
        Mailer::Files(dir)
    }

    pub async fn send(&self, from: &Mailbox, email: &Email) -> Result<(), MailError> {
        let mut results = self.send_round(from, std::slice::from_ref(email)).await;
        results.pop().expect("one result per email")
    }

    /// Sends `emails` and gives one result per email, in order: up to
    /// [`EMAILS_IN_FLIGHT`] at a time to an SMTP server; as files, one after
    /// the other in one blocking task (files created at once in one folder
    /// only contend for it, and a blocking task per file cost more than the
    /// file).
    pub async fn send_round(&self, from: &Mailbox, emails: &[Email]) -> Vec<Result<(), MailError>> {
        match self {
            Mailer::Smtp(smtp) => {
                let sends: Vec<_> = emails
                    .iter()
                    .map(|email| async move { smtp.send(message(from, email).await?).await })
                    .collect();
                futures_util::stream::iter(sends)
                    .buffered(EMAILS_IN_FLIGHT)
                    .collect()
                    .await
            }
            Mailer::Files(dir) => {
                let mut files = Vec::with_capacity(emails.len());
                for email in emails {
                    files.push(
                        message(from, email)
                            .await
                            .map(|message| (eml_name(&email.message_id), message.formatted())),
                    );
                }
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    let made = std::fs::create_dir_all(&dir);
                    files
                        .into_iter()
                        .map(|file| {
                            let (name, bytes) = file?;
                            if let Err(error) = &made {
                                return Err(
                                    std::io::Error::new(error.kind(), error.to_string()).into()
                                );
                            }
                            // Written whole or not at all: a reader never
                            // sees half a message.
                            let partial = dir.join(format!("{name}.eml.partial"));
                            std::fs::write(&partial, bytes)?;
                            std::fs::rename(&partial, dir.join(format!("{name}.eml")))?;
                            Ok(())
                        })
                        .collect()
                })
                .await
                .unwrap_or_else(|error| {
                    let failed = || Err(MailError::File(std::io::Error::other(error.to_string())));
                    emails.iter().map(|_| failed()).collect()
                })
            }
        }
    }
}

/// The message of `email`, with its attachments read.
async fn message(from: &Mailbox, email: &Email) -> Result<Message, MailError> {
    let mut files = Vec::with_capacity(email.attachments.len());
    for attachment in &email.attachments {
        files.push(tokio::fs::read(&attachment.path).await?);
    }
    build(from, email, files)
}

/// The file name of a `.eml` file: its `Message-ID`, without the angle
/// brackets and with anything but letters, digits, `-` and `.` replaced, so
/// a repeated send rewrites the same file.
fn eml_name(message_id: &str) -> String {
    message_id.trim_matches(|c| c == '<' || c == '>').replace(
        |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
        "_",
    )
}

/// The message: multipart text and HTML (and the attachments, whose
/// contents are `files`, in order), the stable `Message-ID`, and headers
/// lettre encodes, so no value can inject a header of its own.
pub fn build(from: &Mailbox, email: &Email, files: Vec<Vec<u8>>) -> Result<Message, MailError> {
    let to_address = email
        .to_email
        .parse()
        .map_err(|e| MailError::Build(format!("recipient: {e}")))?;
    // A display name is free text a learner typed; folded to one line it can
    // neither break the header nor add one.
    let to = Mailbox::new(email.to_name.as_deref().map(one_line), to_address);
    let body = MultiPart::alternative_plain_html(email.text.clone(), email.html.clone());
    let body = if email.attachments.is_empty() {
        body
    } else {
        let mut mixed = MultiPart::mixed().multipart(body);
        for (attachment, content) in email.attachments.iter().zip(files) {
            let content_type = header::ContentType::parse(&attachment.content_type)
                .map_err(|e| MailError::Build(format!("attachment type: {e}")))?;
            mixed = mixed.singlepart(
                Attachment::new(attachment.filename.clone()).body(content, content_type),
            );
        }
        mixed
    };
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(email.message_id.clone()))
        .header(header::MIME_VERSION_1_0)
        .multipart(body)
        .map_err(|e| MailError::Build(e.to_string()))
}

impl<S: Store> Dispatcher<S> {
    /// Sends `rows` ([`Mailer::send_round`]); the ones that went wait to be
    /// marked sent ([`SentMarks`]): a crash between a send and its mark sends
    /// that email again, with the same `Message-ID`.
    pub(super) async fn send_emails(&self, rows: &[OutboxRow]) -> Result<(), DispatchError> {
        let mut readable = Vec::with_capacity(rows.len());
        let mut emails = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str::<Email>(&row.payload) {
                Ok(email) => {
                    readable.push(row);
                    emails.push(email);
                }
                Err(error) => {
                    // Written by this program; unreadable means a defect,
                    // which must not block the rows behind it.
                    tracing::error!(%error, id = %row.id, "An outbox email cannot be read.");
                    self.reschedule(std::slice::from_ref(row), &error.to_string())
                        .await?;
                }
            }
        }
        let results = self.mailer.send_round(&self.mail_from, &emails).await;
        let mut done = Vec::with_capacity(results.len());
        for ((row, email), result) in readable.into_iter().zip(&emails).zip(results) {
            match result {
                Ok(()) => {
                    metrics::counter!(metric::EMAILS, "result" => "sent").increment(1);
                    done.push(row.id.clone());
                }
                Err(error) => {
                    metrics::counter!(metric::EMAILS, "result" => "failed").increment(1);
                    tracing::warn!(%error, message_id = %email.message_id, attempts = row.attempts + 1, "An email could not be sent; it waits.");
                    self.reschedule(std::slice::from_ref(row), &error.to_string())
                        .await?;
                }
            }
        }
        self.store.sent_marks().add(done);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(name: &str) -> Email {
        Email {
            message_id: "<id-1@training-credits>".to_owned(),
            to_email: "ann@example.com".to_owned(),
            to_name: Some(name.to_owned()),
            subject: "Approved: Rust".to_owned(),
            text: "Hello".to_owned(),
            html: "<p>Hello</p>".to_owned(),
            causation_id: "ev-1".to_owned(),
            attachments: Vec::new(),
        }
    }

    #[tokio::test]
    async fn every_smtp_url_form_of_the_contract_is_understood() {
        for url in [
            "smtp://127.0.0.1:1025",
            "smtp://mail.example.com:587?tls=required",
            "smtps://mail.example.com:465",
            "smtp://user:secret@mail.example.com:587?tls=required",
            "smtp://127.0.0.1:1025?timeout=5s",
            "smtp://mail.example.com:587?tls=required&timeout=500ms",
        ] {
            let url = url::Url::parse(url).unwrap();
            assert!(matches!(Mailer::smtp(&url), Ok(Mailer::Smtp(_))), "{url}");
        }
        for url in [
            "smtp://127.0.0.1:1025?timeout=soon",
            "smtp://127.0.0.1:1025?timeout=0s",
        ] {
            let url = url::Url::parse(url).unwrap();
            assert!(
                matches!(Mailer::smtp(&url), Err(MailError::Timeout(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn a_name_with_line_breaks_cannot_add_a_header() {
        let from: Mailbox = "Training Credits <no-reply@localhost>".parse().unwrap();
        let message = build(&from, &email("Ann\r\nBcc: thief@evil.test"), Vec::new()).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();
        assert!(!text.contains("\r\nBcc:"), "{text}");
        assert!(text.contains("Message-ID: <id-1@training-credits>"));
    }
}
