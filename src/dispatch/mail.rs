//! Sending the emails the outbox holds: through SMTP (`SMTP_URL`, pooled,
//! with a timeout on every send) or, when no server is configured, as `.eml`
//! files in `MAIL_DIR` named after their `Message-ID`, so a repeated send
//! rewrites the same file.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::{Attachment, Mailbox, MultiPart, header};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::notify::{Email, one_line};

/// How long one SMTP conversation may take before it counts as failed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot build the message: {0}")]
    Build(String),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("writing the .eml file: {0}")]
    File(#[from] std::io::Error),
}

pub enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(PathBuf),
}

impl Mailer {
    /// `smtp://host:port` (plain), `smtp://host:port?tls=required`
    /// (STARTTLS), `smtps://host:port` (TLS), as lettre reads them.
    pub fn smtp(url: &url::Url) -> Result<Mailer, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.as_str())?
            .timeout(Some(SEND_TIMEOUT))
            .build();
        Ok(Mailer::Smtp(transport))
    }

    pub fn files(dir: PathBuf) -> Mailer {
        Mailer::Files(dir)
    }

    pub async fn send(&self, from: &Mailbox, email: &Email) -> Result<(), MailError> {
        let mut files = Vec::with_capacity(email.attachments.len());
        for attachment in &email.attachments {
            files.push(tokio::fs::read(&attachment.path).await?);
        }
        let message = build(from, email, files)?;
        match self {
            Mailer::Smtp(transport) => {
                transport.send(message).await?;
            }
            Mailer::Files(dir) => {
                tokio::fs::create_dir_all(dir).await?;
                let name = email
                    .message_id
                    .trim_matches(|c| c == '<' || c == '>')
                    .replace(
                        |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
                        "_",
                    );
                let path = dir.join(format!("{name}.eml"));
                let partial = dir.join(format!("{name}.eml.partial"));
                // Written whole or not at all: a reader never sees half a message.
                tokio::fs::write(&partial, message.formatted()).await?;
                tokio::fs::rename(&partial, &path).await?;
            }
        }
        Ok(())
    }
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
        ] {
            let url = url::Url::parse(url).unwrap();
            assert!(matches!(Mailer::smtp(&url), Ok(Mailer::Smtp(_))), "{url}");
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
