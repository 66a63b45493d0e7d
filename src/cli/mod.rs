//! The command line (SPEC §3), one file per command. Each returns the exit
//! code; failures come back as errors, which `main` prints on one line.

mod account;
mod dlq;
mod migrate;
pub mod publish;
mod report;
mod run;
mod sweep;
mod verify;

use std::io::IsTerminal;
use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde::de::DeserializeOwned;

use crate::config::{Config, DatabaseUrl, redact};
use crate::domain::command::{ReportFormat, ReportKind};
use crate::domain::{Id, Ts};
use crate::report::choose_columns;
use crate::store::{PgStore, SqliteStore};

#[derive(Debug, Parser)]
#[command(
    name = "training-credits",
    version,
    about = "Prepaid training credits: the ledger worker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume, apply, dispatch, serve HTTP; stop on SIGINT/SIGTERM.
    Run,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Publish the events of FILE (one CloudEvent, or JSON Lines) to the inbound exchange.
    Publish { file: PathBuf },
    /// The dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect accounts.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Run every scheduled job once (expiry sweep, reminders, pending timeout).
    Sweep {
        /// The instant to run them as of (RFC 3339); default now.
        #[arg(long, value_name = "RFC3339")]
        at: Option<Ts>,
    },
    /// Recompute every balance from the journal and check every invariant.
    Verify,
    /// Write a report (transactions, credits, redemptions, balances, audit) to a file.
    Report {
        /// transactions, credits, redemptions, balances or audit.
        #[arg(value_parser = word::<ReportKind>)]
        kind: ReportKind,
        /// csv or xlsx.
        #[arg(long, value_parser = word::<ReportFormat>)]
        format: ReportFormat,
        #[arg(long)]
        out: PathBuf,
        /// Only this account.
        #[arg(long)]
        account: Option<Id>,
        /// Rows from this instant (RFC 3339), inclusive.
        #[arg(long, value_name = "RFC3339")]
        from: Option<Ts>,
        /// Rows before this instant (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        to: Option<Ts>,
        /// The columns, in order, comma-separated.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters: id, type, reason, detail, when.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Send dead letters back for processing and remove them from the queue.
    /// Only those in the queue when it starts: one that dies again stays.
    Replay {
        /// Every dead letter (that the filters keep).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// The ids of the dead letters to replay.
        ids: Vec<String>,
        #[command(flatten)]
        filter: DlqFilter,
    },
}

/// Which dead letters `dlq list` and `dlq replay` take; by default all.
#[derive(Debug, Args)]
pub struct DlqFilter {
    /// Only those of this reason (`x-error-reason`, or the broker's own,
    /// such as `delivery_limit`).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those of this event type.
    #[arg(long = "type", value_name = "TYPE")]
    pub type_name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Print one account as a JSON object.
    Show { account_id: String },
}

impl Cli {
    /// The checks clap cannot make one argument at a time: a report's
    /// columns must be columns of its kind. The answer is clap's own error,
    /// so `main` exits 2 with the usage, as for any other bad usage.
    pub fn check(&self) -> Result<(), clap::Error> {
        if let Command::Report {
            kind,
            columns: Some(columns),
            ..
        } = &self.command
        {
            choose_columns(*kind, Some(columns)).map_err(|error| {
                let mut command = Cli::command();
                // Built, the subcommand knows its full name for the usage line.
                command.build();
                command
                    .find_subcommand_mut("report")
                    .expect("`report` is a subcommand")
                    .error(
                        ErrorKind::InvalidValue,
                        format!(
                            "--columns: {error}, whose columns are {}",
                            kind.columns().join(",")
                        ),
                    )
            })?;
        }
        Ok(())
    }
}

/// Parses an argument into one of the serde enums the messages use too
/// (`ReportKind`, `ReportFormat`), so both accept the same words; the error
/// names the choices.
fn word<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
}

/// Opens the configured ledger, migrating it if needed, and runs `$body` with
/// it bound to `$store`, whichever backend it is.
macro_rules! with_store {
    ($config:expr, |$store:ident| $body:expr) => {
        match &$config.database_url {
            DatabaseUrl::Sqlite(url) => {
                let $store = SqliteStore::connect(url)
                    .await
                    .with_context(|| format!("cannot open {}", redact(url)))?;
                $store.migrate().await?;
                $body
            }
            DatabaseUrl::Postgres(url) => {
                let $store = PgStore::connect(url)
                    .await
                    .with_context(|| format!("cannot connect to {}", redact(url)))?;
                $store.migrate().await?;
                $body
            }
        }
    };
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::from_env().context("bad configuration")?;
    match cli.command {
        Command::Run => {
            // Signals are caught from the very start: one that arrives while
            // the database is still being opened stops the worker cleanly too.
            let cancel = run::cancel_on_signals()?;
            with_store!(config, |store| run::run(store, &config, cancel).await)
        }
        Command::Publish { file } => publish::run(&config, &file).await,
        Command::Dlq {
            command: DlqCommand::List { json, filter },
        } => dlq::list(&config, json, &filter).await,
        Command::Dlq {
            command: DlqCommand::Replay { all, ids, filter },
        } => dlq::replay(&config, all, &ids, &filter).await,
        Command::Migrate => with_store!(config, |store| migrate::run(&store).await),
        Command::Account {
            command: AccountCommand::Show { account_id },
        } => with_store!(config, |store| account::show(&store, &account_id).await),
        Command::Sweep { at } => {
            with_store!(config, |store| sweep::run(store, &config, at).await)
        }
        Command::Verify => with_store!(config, |store| verify::run(&store).await),
        Command::Report {
            kind,
            format,
            out,
            account,
            from,
            to,
            columns,
        } => {
            let options = report::Options {
                kind,
                format,
                out: &out,
                account,
                from,
                to,
                columns: columns.as_deref(),
            };
            with_store!(config, |store| report::run(&store, options).await)
        }
    }
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress(total: usize, what: &'static str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(u64::try_from(total).unwrap_or(u64::MAX));
    bar.set_message(what);
    bar
}
