//! Notification emails (SPEC §7), rendered from the templates in
//! `templates/email` when their cause is applied, so that the outbox row holds
//! the complete message: recipient, subject, plain text and HTML.

use minijinja::{Environment, UndefinedBehavior, context};
use serde::{Deserialize, Serialize};

use crate::domain::ledger::Recipient;
use crate::domain::notice::Notice;

/// Every email's subject line, plain-text body and HTML body, by template
/// name. Subjects are kept apart from the bodies so that no value can reach
/// a header with a line break in it.
struct Template {
    name: &'static str,
    subject: &'static str,
    text: &'static str,
    html: &'static str,
}

macro_rules! templates {
    ($($name:literal => $subject:literal,)*) => {
        &[$(Template {
            name: $name,
            subject: $subject,
            text: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/email/", $name, ".txt")),
            html: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/email/", $name, ".html")),
        },)*]
    };
}

const TEMPLATES: &[Template] = templates! {
    "redemption_pending" => "Approval needed: {{ learner_name }} asks for {{ title }}",
    "redemption_approved" => "Approved: {{ title }}",
    "redemption_denied" => "Not approved: {{ title }}",
    "redemption_expired" => "Request expired: {{ title }}",
    "redemption_rejected" => "Request not accepted: {{ title }}",
    "purchase_recorded" => "{{ credits }} training credits added to {{ account_name }}",
    "purchase_refunded" => "{{ refunded }} training credits taken back from {{ account_name }}",
    "lot_expiring" => "{{ remaining }} training credits expire on {{ expires_on }}",
    "lot_expired" => "{{ expired }} training credits expired",
    "balance_low" => "Low training credit balance: {{ available }}",
    "owner_added" => "New owner of {{ account_name }}",
    "owner_removed" => "Owner removed from {{ account_name }}",
    "code_rotated" => "New redemption code for {{ account_name }}",
    "account_closed" => "{{ account_name }} was closed",
    "report_ready" => "{{ title }}",
};

/// A rendered email, as the outbox keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// Stable, derived from the cause: a redelivered cause yields the same one.
    pub message_id: String,
    pub to_email: String,
    pub to_name: Option<String>,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub causation_id: String,
    /// Files sent along (reports, statements).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

/// A file attached to an email, read when the email is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
#[error("email template `{template}` failed: {source}")]
pub struct RenderError {
    template: String,
    #[source]
    source: minijinja::Error,
}

pub struct Renderer {
    env: Environment<'static>,
    portal_url: String,
}

impl Renderer {
    pub fn new(portal_url: &str) -> Renderer {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template(
            "layout.html",
            include_str!("../../templates/email/layout.html"),
        )
        .expect("the layout template parses");
        for template in TEMPLATES {
            let parts = [
                (template.name.to_owned(), template.subject),
                (format!("{}.txt", template.name), template.text),
                (format!("{}.html", template.name), template.html),
            ];
            for (name, source) in parts {
                env.add_template_owned(name, source)
                    .expect("every email template parses");
            }
        }
        Renderer {
            env,
            portal_url: portal_url.trim_end_matches('/').to_owned(),
        }
    }

    /// Renders `notice` for one recipient.
    pub fn render(
        &self,
        notice: &Notice,
        to: &Recipient,
        message_id: String,
        causation_id: &str,
    ) -> Result<Email, RenderError> {
        let template = notice.template();
        let failed = |source| RenderError {
            template: template.to_owned(),
            source,
        };
        let recipient_name = to.name.clone().unwrap_or_else(|| to.email.to_string());
        let vars = minijinja::Value::from(minijinja::value::Serde(notice));
        let subject = self
            .env
            .get_template(template)
            .and_then(|t| t.render(&vars))
            .map_err(failed)?;
        let subject = one_line(&subject);
        let ctx = context! {
            recipient_name,
            portal_url => &self.portal_url,
            subject => &subject,
            ..vars
        };
        let text = self
            .env
            .get_template(&format!("{template}.txt"))
            .and_then(|t| t.render(&ctx))
            .map_err(failed)?;
        let html = self
            .env
            .get_template(&format!("{template}.html"))
            .and_then(|t| t.render(&ctx))
            .map_err(failed)?;
        Ok(Email {
            message_id,
            to_email: to.email.to_string(),
            to_name: to.name.clone(),
            subject,
            text,
            html,
            causation_id: causation_id.to_owned(),
            attachments: Vec::new(),
        })
    }
}

/// Folds every control character (CR and LF included) into a space, so a
/// subject can never carry a header of its own; and breaks every `=?`, so
/// that text which merely looks like an RFC 2047 encoded word (lettre writes
/// ASCII words as they are) cannot be decoded by a mail reader into a line
/// break and a header either.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .replace("=?", "= ?")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Credits;
    use crate::domain::notice::one_of_each;

    fn to() -> Recipient {
        Recipient {
            email: "ann@example.com".parse().unwrap(),
            name: Some("Ann".to_owned()),
        }
    }

    fn approved(title: &str) -> Notice {
        Notice::RedemptionApproved {
            title: title.to_owned(),
            cost: Credits::from_cents(2_000),
        }
    }

    fn render(notice: &Notice) -> Email {
        Renderer::new("http://portal.test/")
            .render(notice, &to(), "<x@y>".into(), "ev-1")
            .unwrap()
    }

    #[test]
    fn every_notice_has_its_templates_and_renders() {
        let renderer = Renderer::new("http://portal.test/");
        let mut rendered: Vec<&str> = Vec::new();
        for notice in one_of_each() {
            let email = renderer
                .render(&notice, &to(), "<x@y>".into(), "ev-1")
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!email.subject.is_empty() && email.text.contains("Ann"));
            rendered.push(notice.template());
        }
        let mut templates: Vec<&str> = TEMPLATES.iter().map(|t| t.name).collect();
        templates.sort_unstable();
        rendered.sort_unstable();
        assert_eq!(
            rendered, templates,
            "one notice of each kind, one of each template"
        );
    }

    #[test]
    fn the_approval_email_says_the_contract_sentence() {
        let email = render(&approved("Rust 101"));
        assert!(email.text.contains(
            "Hello Ann, Your request to redeem 20.00 training credits for Rust 101 has been approved."
        ));
        assert!(email.html.contains("Rust 101"));
    }

    #[test]
    fn line_breaks_never_reach_the_subject() {
        let email = render(&approved("Evil\r\nBcc: x@y.z"));
        assert!(!email.subject.contains('\n') && !email.subject.contains('\r'));
        assert!(email.html.contains("Evil"));
    }

    #[test]
    fn html_bodies_escape_what_learners_type() {
        let email = render(&approved("<script>alert(1)</script>"));
        assert!(!email.html.contains("<script>"));
        assert!(email.text.contains("<script>alert(1)</script>"));
    }
}
