//! Notification emails (SPEC §7), rendered from the templates in
//! `templates/email` when their cause is applied, so that the outbox row holds
//! the complete message: recipient, subject, plain text and HTML.

use minijinja::{Environment, UndefinedBehavior, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::ledger::Recipient;

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        &[$(
            (concat!($name, ".txt"), include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/email/", $name, ".txt"))),
            (concat!($name, ".html"), include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/templates/email/", $name, ".html"))),
        )*]
    };
}

const TEMPLATES: &[(&str, &str)] = templates!(
    "redemption_pending",
    "redemption_approved",
    "redemption_denied",
    "redemption_expired",
    "redemption_rejected",
    "purchase_recorded",
    "lot_expiring",
    "lot_expired",
    "balance_low",
    "owner_added",
    "owner_removed",
    "code_rotated",
    "account_closed",
    "report_ready",
);

/// Subject lines, kept apart from the bodies so that no value can reach a
/// header with a line break in it.
const SUBJECTS: &[(&str, &str)] = &[
    (
        "redemption_pending",
        "Approval needed: {{ learner_name }} asks for {{ title }}",
    ),
    ("redemption_approved", "Approved: {{ title }}"),
    ("redemption_denied", "Not approved: {{ title }}"),
    ("redemption_expired", "Request expired: {{ title }}"),
    ("redemption_rejected", "Request not accepted: {{ title }}"),
    (
        "purchase_recorded",
        "{{ credits }} training credits added to {{ account_name }}",
    ),
    (
        "lot_expiring",
        "{{ remaining }} training credits expire on {{ expires_on }}",
    ),
    ("lot_expired", "{{ expired }} training credits expired"),
    (
        "balance_low",
        "Low training credit balance: {{ available }}",
    ),
    ("owner_added", "New owner of {{ account_name }}"),
    ("owner_removed", "Owner removed from {{ account_name }}"),
    ("code_rotated", "New redemption code for {{ account_name }}"),
    ("account_closed", "{{ account_name }} was closed"),
    ("report_ready", "{{ title }}"),
];

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
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .expect("every email template parses");
        }
        for (name, source) in SUBJECTS {
            env.add_template(name, source)
                .expect("every subject template parses");
        }
        Renderer {
            env,
            portal_url: portal_url.trim_end_matches('/').to_owned(),
        }
    }

    /// Renders one email of `template` for one recipient.
    pub fn render(
        &self,
        template: &str,
        vars: &Value,
        to: &Recipient,
        message_id: String,
        causation_id: &str,
    ) -> Result<Email, RenderError> {
        let failed = |source| RenderError {
            template: template.to_owned(),
            source,
        };
        let recipient_name = to.name.clone().unwrap_or_else(|| to.email.to_string());
        let vars = minijinja::Value::from(minijinja::value::Serde(vars));
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
    use serde_json::json;

    fn to() -> Recipient {
        Recipient {
            email: "ann@example.com".parse().unwrap(),
            name: Some("Ann".to_owned()),
        }
    }

    #[test]
    fn the_approval_email_says_the_contract_sentence() {
        let renderer = Renderer::new("http://portal.test/");
        let email = renderer
            .render(
                "redemption_approved",
                &json!({"title": "Rust 101", "cost": "20.00"}),
                &to(),
                "<x@y>".into(),
                "ev-1",
            )
            .unwrap();
        assert!(email.text.contains(
            "Hello Ann, Your request to redeem 20.00 training credits for Rust 101 has been approved."
        ));
        assert!(email.html.contains("Rust 101"));
    }

    #[test]
    fn line_breaks_never_reach_the_subject() {
        let renderer = Renderer::new("http://portal.test");
        let email = renderer
            .render(
                "redemption_approved",
                &json!({"title": "Evil\r\nBcc: x@y.z", "cost": "1.00"}),
                &to(),
                "<x@y>".into(),
                "ev-1",
            )
            .unwrap();
        assert!(!email.subject.contains('\n') && !email.subject.contains('\r'));
        assert!(email.html.contains("Evil"));
    }

    #[test]
    fn html_bodies_escape_what_learners_type() {
        let renderer = Renderer::new("http://portal.test");
        let email = renderer
            .render(
                "redemption_approved",
                &json!({"title": "<script>alert(1)</script>", "cost": "1.00"}),
                &to(),
                "<x@y>".into(),
                "ev-1",
            )
            .unwrap();
        assert!(!email.html.contains("<script>"));
        assert!(email.text.contains("<script>alert(1)</script>"));
    }
}
