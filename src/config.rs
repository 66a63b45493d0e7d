//! Typed settings from the environment (SPEC §2). Every variable is read and
//! checked at start; a bad value stops the program with a message naming the
//! variable, so the worker never starts half-configured. Secrets in URLs are
//! redacted whenever a setting is shown.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::domain::rules::Policy;

#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

/// Which ledger database, from `DATABASE_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(String),
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        if url.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(url.to_owned()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_owned()))
        } else {
            Err(format!(
                "`{}` is neither sqlite://PATH nor postgres://…",
                redact(url)
            ))
        }
    }
}

/// Replaces the password of a URL with `***`: the one after the user name,
/// and any query parameter naming one (sqlx reads
/// `postgres://user@host/db?password=…` too).
pub fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(unparsable URL)".to_owned();
    };
    let secret = |key: &str| key.to_ascii_lowercase().contains("password");
    if parsed.password().is_none() && !parsed.query_pairs().any(|(key, _)| secret(&key)) {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(key, value)| {
            let value = if secret(&key) {
                "***".to_owned()
            } else {
                value.into_owned()
            };
            (key.into_owned(), value)
        })
        .collect();
    if !pairs.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: DatabaseUrl,
    pub amqp_url: String,
    pub smtp_url: Option<url::Url>,
    pub mail_dir: PathBuf,
    pub mail_from: lettre::message::Mailbox,
    pub portal_url: String,
    pub http_addr: SocketAddr,
    pub reports_dir: PathBuf,
    pub event_source: String,
    pub admin_sources: HashSet<String>,
    /// Who may claim which `source` (`PUBLISHERS`); `None` trusts everyone.
    pub publishers: Option<Publishers>,
    /// The read API's bearer tokens (`API_TOKENS`); `None` turns it off.
    pub api_tokens: Option<ApiTokens>,
    pub retry_delays: Vec<Duration>,
    pub policy: Policy,
    pub sweep_cron: String,
    pub statement_cron: String,
    pub report_cron: String,
    /// Deliveries the broker may send ahead of the acks (`PREFETCH`).
    pub prefetch: u16,
    /// Messages applied per transaction (`BATCH_SIZE`).
    pub batch_size: usize,
}

struct Vars<F>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn get(&self, variable: &'static str, default: &str) -> (String, &'static str) {
        (
            (self.0)(variable)
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_owned()),
            variable,
        )
    }

    fn parse<T>(
        &self,
        variable: &'static str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, variable) = self.get(variable, default);
        parse(value.trim()).map_err(|problem| ConfigError { variable, problem })
    }
}

fn days(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if (0..=3650).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a whole number of days from 0 to 3650"
        )),
    }
}

/// A duration as humantime reads it: `500ms`, `10s`, `5m` (minutes), `1h`,
/// and its longer forms (`1min`, `2h 30m`); a number without a unit, other
/// than `0`, is refused.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

fn list<T>(text: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(item)
        .collect()
}

/// The bearer tokens of the read API (SPEC §9), kept only as their SHA-256
/// digests. Never shown: `Debug` gives only how many there are.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiTokens(Vec<[u8; 32]>);

impl ApiTokens {
    fn parse(text: &str) -> Result<Option<ApiTokens>, String> {
        let digests: BTreeSet<[u8; 32]> = list(text, |token| Ok(Sha256::digest(token).into()))?
            .into_iter()
            .collect();
        Ok((!digests.is_empty()).then(|| ApiTokens(digests.into_iter().collect())))
    }

    /// Whether `token` is one of these, in a time that tells nothing of how
    /// close it came: the SHA-256 of what was sent is compared with every
    /// token's, each in constant time.
    pub fn accepts(&self, token: &str) -> bool {
        let sent: [u8; 32] = Sha256::digest(token).into();
        self.0
            .iter()
            .fold(Choice::from(0), |any, digest| any | digest.ct_eq(&sent))
            .into()
    }
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiTokens({} tokens)", self.0.len())
    }
}

/// SPEC §6 rule 13: the broker user bound to each inbound `source`, and the
/// users bound to `*`, who may claim any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Publishers {
    by_source: HashMap<String, HashSet<String>>,
    any_source: HashSet<String>,
}

impl Publishers {
    /// `SOURCE=USER,…`; `*=USER` binds USER to every source.
    fn parse(text: &str) -> Result<Option<Publishers>, String> {
        let pairs = list(text, |pair| match pair.split_once('=') {
            Some((source, user)) if !source.trim().is_empty() && !user.trim().is_empty() => {
                Ok((source.trim().to_owned(), user.trim().to_owned()))
            }
            _ => Err(format!("`{pair}` is not SOURCE=USER")),
        })?;
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut publishers = Publishers::default();
        for (source, user) in pairs {
            if source == "*" {
                publishers.any_source.insert(user);
            } else {
                publishers.by_source.entry(source).or_default().insert(user);
            }
        }
        Ok(Some(publishers))
    }

    /// Whether the broker user `user` (the message's verified `user_id`)
    /// may claim `source`.
    pub fn trust(&self, source: &str, user: Option<&str>) -> bool {
        user.is_some_and(|user| {
            self.any_source.contains(user)
                || self
                    .by_source
                    .get(source)
                    .is_some_and(|users| users.contains(user))
        })
    }
}

fn within<T: TryFrom<u64>>(text: &str, min: u64, max: u64) -> Result<T, String> {
    text.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("`{text}` is not a whole number from {min} to {max}"))
}

/// Parses a six-field cron expression (seconds first), as the `*_CRON`
/// settings are written.
pub fn parse_cron(expression: &str) -> Result<Cron, croner::errors::CronError> {
    // Read as tokio-cron-scheduler reads it, which fires the ticks.
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expression)
}

/// What the rules need beyond the ledger: policy, who counts as staff, and
/// how outbound events and emails are addressed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    pub admin_sources: HashSet<String>,
    pub event_source: String,
    pub portal_url: String,
}

fn cron(text: &str) -> Result<String, String> {
    parse_cron(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("`{text}` is not a cron expression of six fields, seconds first: {e}"))
}

fn http_url(text: &str) -> Result<String, String> {
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {
            Ok(text.trim_end_matches('/').to_owned())
        }
        _ => Err(format!("`{text}` is not an http(s) URL")),
    }
}

/// Every variable [`Config`] reads (SPEC §2), for those who run the binary
/// and must keep their own environment out of it (tests, the bench).
pub const VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "AMQP_URL",
    "SMTP_URL",
    "MAIL_DIR",
    "MAIL_FROM",
    "PORTAL_URL",
    "HTTP_ADDR",
    "REPORTS_DIR",
    "EVENT_SOURCE",
    "ADMIN_SOURCES",
    "PUBLISHERS",
    "API_TOKENS",
    "RETRY_DELAYS",
    "REFUND_WINDOW_DAYS",
    "PENDING_TIMEOUT_DAYS",
    "EXPIRY_REMINDER_DAYS",
    "SWEEP_CRON",
    "STATEMENT_CRON",
    "REPORT_CRON",
    "PREFETCH",
    "BATCH_SIZE",
];

impl Config {
    /// Reads the process environment (after a `.env` file, if any).
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(|name| std::env::var(name).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let vars = Vars(var);
        Ok(Config {
            database_url: vars.parse(
                "DATABASE_URL",
                "sqlite://training-credits.db",
                DatabaseUrl::parse,
            )?,
            amqp_url: vars.parse("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f", |v| {
                match url::Url::parse(v) {
                    Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => Ok(v.to_owned()),
                    _ => Err(format!("`{}` is not an amqp:// or amqps:// URL", redact(v))),
                }
            })?,
            smtp_url: vars.parse("SMTP_URL", "", |v| {
                if v.is_empty() {
                    return Ok(None);
                }
                match url::Url::parse(v) {
                    Ok(u) if matches!(u.scheme(), "smtp" | "smtps") && u.host().is_some() => {
                        Ok(Some(u))
                    }
                    _ => Err(format!(
                        "`{}` is not smtp://host:port or smtps://host:port",
                        redact(v)
                    )),
                }
            })?,
            mail_dir: vars.parse("MAIL_DIR", "./mail", |v| Ok(PathBuf::from(v)))?,
            mail_from: vars.parse("MAIL_FROM", "Training Credits <no-reply@localhost>", |v| {
                v.parse()
                    .map_err(|e| format!("`{v}` is not a mailbox: {e}"))
            })?,
            portal_url: vars.parse("PORTAL_URL", "http://localhost:8080", http_url)?,
            http_addr: vars.parse("HTTP_ADDR", "127.0.0.1:9090", |v| {
                v.parse().map_err(|_| format!("`{v}` is not HOST:PORT"))
            })?,
            reports_dir: vars.parse("REPORTS_DIR", "./reports", |v| Ok(PathBuf::from(v)))?,
            event_source: vars.parse("EVENT_SOURCE", "training-credits", |v| Ok(v.to_owned()))?,
            admin_sources: vars.parse("ADMIN_SOURCES", "admin", |v| {
                Ok(list(v, |s| Ok(s.to_owned()))?.into_iter().collect())
            })?,
            publishers: vars.parse("PUBLISHERS", "", Publishers::parse)?,
            api_tokens: vars.parse("API_TOKENS", "", ApiTokens::parse)?,
            retry_delays: vars.parse("RETRY_DELAYS", "1s,10s,60s,300s", |v| {
                let delays = list(v, duration)?;
                if delays.is_empty() || delays.len() > 20 {
                    return Err("give 1 to 20 delays, like 1s,10s,60s".to_owned());
                }
                // A delay becomes a queue's TTL, which the broker counts in
                // whole milliseconds: a finer one would silently shrink.
                if let Some(delay) = delays.iter().find(|d| d.subsec_nanos() % 1_000_000 != 0) {
                    return Err(format!("{delay:?} is not a whole number of milliseconds"));
                }
                Ok(delays)
            })?,
            policy: Policy {
                refund_window_days: vars.parse("REFUND_WINDOW_DAYS", "14", days)?,
                pending_timeout_days: vars.parse("PENDING_TIMEOUT_DAYS", "14", days)?,
                reminder_stages: vars.parse("EXPIRY_REMINDER_DAYS", "30,7,1", |v| {
                    let mut stages = list(v, |s| {
                        s.parse::<u32>()
                            .ok()
                            .filter(|d| (1..=3650).contains(d))
                            .ok_or_else(|| format!("`{s}` is not a number of days from 1 to 3650"))
                    })?;
                    stages.sort_unstable_by(|a, b| b.cmp(a));
                    stages.dedup();
                    Ok(stages)
                })?,
            },
            sweep_cron: vars.parse("SWEEP_CRON", "0 */5 * * * *", cron)?,
            statement_cron: vars.parse("STATEMENT_CRON", "0 0 6 1 * *", cron)?,
            report_cron: vars.parse("REPORT_CRON", "0 0 2 * * *", cron)?,
            prefetch: vars.parse("PREFETCH", "1000", |v| within(v, 1, 10_000))?,
            batch_size: vars.parse("BATCH_SIZE", "500", |v| within(v, 1, 5_000))?,
        })
    }

    pub fn settings(&self) -> Settings {
        Settings {
            policy: self.policy.clone(),
            admin_sources: self.admin_sources.clone(),
            event_source: self.event_source.clone(),
            portal_url: self.portal_url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_work_on_one_machine() {
        let config = config(&[]).unwrap();
        assert_eq!(
            config.database_url,
            DatabaseUrl::Sqlite("sqlite://training-credits.db".into())
        );
        assert_eq!(config.policy, Policy::default());
        assert_eq!(config.retry_delays.len(), 4);
        assert!(config.admin_sources.contains("admin"));
        assert!(config.smtp_url.is_none());
    }

    #[test]
    fn api_tokens_accept_exactly_the_configured_ones_and_never_show() {
        let tokens = config(&[("API_TOKENS", "alpha, beta-2")])
            .unwrap()
            .api_tokens
            .expect("two tokens");
        assert!(tokens.accepts("alpha") && tokens.accepts("beta-2"));
        for wrong in ["", "alph", "alphaa", "beta", "ALPHA", "alpha,beta-2"] {
            assert!(!tokens.accepts(wrong), "{wrong}");
        }
        assert_eq!(format!("{tokens:?}"), "ApiTokens(2 tokens)");
        assert!(
            config(&[("API_TOKENS", " , ")])
                .unwrap()
                .api_tokens
                .is_none()
        );
    }

    #[test]
    fn every_variable_read_is_listed() {
        let read = std::sync::Mutex::new(Vec::new());
        Config::from_vars(|name| {
            read.lock().unwrap().push(name.to_owned());
            None
        })
        .unwrap();
        let mut read = read.into_inner().unwrap();
        read.sort();
        let mut listed: Vec<&str> = VARIABLES.to_vec();
        listed.sort_unstable();
        assert_eq!(read, listed);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (variable, value) in [
            ("DATABASE_URL", "mysql://x"),
            ("REFUND_WINDOW_DAYS", "-1"),
            ("RETRY_DELAYS", "1s,ten"),
            ("EXPIRY_REMINDER_DAYS", "30,zero"),
            ("HTTP_ADDR", "nowhere"),
            ("SMTP_URL", "http://mail"),
            ("SWEEP_CRON", "*/5 * * * *"),
            ("MAIL_FROM", "not a mailbox"),
            ("PREFETCH", "0"),
            ("BATCH_SIZE", "100000"),
        ] {
            let error = config(&[(variable, value)]).unwrap_err();
            assert_eq!(error.variable, variable);
        }
    }

    #[test]
    fn retry_delays_read_units_from_milliseconds_to_hours() {
        let read = config(&[("RETRY_DELAYS", "500ms, 10s,5m,1h,1min,2h 30m,0")]).unwrap();
        let secs = Duration::from_secs;
        assert_eq!(
            read.retry_delays,
            [
                Duration::from_millis(500),
                secs(10),
                secs(300),
                secs(3600),
                secs(60),
                secs(9000),
                Duration::ZERO
            ]
        );
        for value in ["10", "ten", "5x", "1500us", "1s,-1s"] {
            let error = config(&[("RETRY_DELAYS", value)]).unwrap_err();
            assert_eq!(error.variable, "RETRY_DELAYS", "{value}");
        }
    }

    #[test]
    fn passwords_never_show() {
        let error = config(&[("DATABASE_URL", "mysql://u:hunter2@db/x")]).unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
        assert_eq!(redact("postgres://u:hunter2@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=verify-full&password=hunter2"),
            "postgres://u@h/db?sslmode=verify-full&password=***"
        );
        assert_eq!(
            redact("amqp://h/%2f?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10"
        );
    }

    #[test]
    fn reminder_stages_are_kept_largest_first() {
        let config = config(&[("EXPIRY_REMINDER_DAYS", "1, 30,7")]).unwrap();
        assert_eq!(config.policy.reminder_stages, vec![30, 7, 1]);
    }

    #[test]
    fn publishers_bind_sources_to_users_and_a_star_to_every_source() {
        assert_eq!(
            config(&[]).unwrap().publishers,
            None,
            "unset trusts everyone"
        );
        let publishers = config(&[("PUBLISHERS", "shop=shop-app, admin=ops,*=replayer")])
            .unwrap()
            .publishers
            .expect("set");
        assert!(publishers.trust("shop", Some("shop-app")));
        assert!(publishers.trust("admin", Some("ops")));
        assert!(publishers.trust("lms", Some("replayer")), "a star user");
        assert!(
            !publishers.trust("admin", Some("shop-app")),
            "another source's user"
        );
        assert!(
            !publishers.trust("lms", Some("shop-app")),
            "a source not listed"
        );
        assert!(!publishers.trust("shop", None), "no user_id");
        for value in ["shop", "shop=", "=u", "shop=a,b"] {
            let error = config(&[("PUBLISHERS", value)]).unwrap_err();
            assert_eq!(error.variable, "PUBLISHERS", "{value}");
        }
    }
}
