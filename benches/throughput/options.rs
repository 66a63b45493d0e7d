//! The bench's options: what to run, how much, and where.

use std::str::FromStr;

use crate::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// Issue 22: throughput as a share of the broker alone on the worker's
    /// path (the relay of the same run).
    pub fn target_relay_ratio(self) -> f64 {
        match self {
            Backend::Sqlite => 0.45,
            Backend::Postgres => 0.30,
        }
    }

    /// Issue 22: the worker's CPU per event, in µs (SQLite's work included,
    /// as it runs in the worker's process).
    pub fn target_worker_micros(self) -> f64 {
        match self {
            Backend::Sqlite => 100.0,
            Backend::Postgres => 80.0,
        }
    }
}

/// Issue 22: PostgreSQL's CPU per event, in µs.
pub const TARGET_SERVER_MICROS: f64 = 120.0;
/// Issue 22: p99 at the steady rate may exceed the relay's by this much.
pub const TARGET_P99_OVER_RELAY_MS: f64 = 15.0;

#[derive(Clone, Debug)]
pub struct Options {
    pub events: usize,
    pub accounts: usize,
    pub history: u64,
    pub backends: Vec<Backend>,
    pub rate: u32,
    pub latency_seconds: u32,
    pub postgres: String,
    pub amqp: String,
    /// Keep the databases (for inspection) instead of dropping them.
    pub keep: bool,
    /// Steps 1–5 are run this many times per backend (the backends taking
    /// turns); the table gives each figure's median.
    pub runs: usize,
    /// Step 6: samples of each read API GET (0 skips it), on a ledger of
    /// `history` entries over this many accounts; `api_only` skips 1–5.
    pub api_samples: usize,
    pub api_accounts: u64,
    pub api_only: bool,
}

pub const USAGE: &str = "cargo bench --bench throughput [-- [--events N] [--accounts N] [--history N] \
[--backends sqlite,postgres] [--runs N] [--rate N] [--latency-seconds N] [--api-samples N] [--api-accounts N] [--api-only] \
[--postgres URL] [--amqp URL] [--keep]]";

pub fn parse_options() -> BenchResult<Options> {
    let mut options = Options {
        events: 20_000,
        accounts: 1_000,
        history: 1_000_000,
        backends: vec![Backend::Sqlite, Backend::Postgres],
        rate: 1_000,
        latency_seconds: 10,
        postgres: std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        amqp: "amqp://guest:guest@127.0.0.1:5672".to_owned(),
        keep: false,
        runs: 3,
        api_samples: 200,
        api_accounts: 10,
        api_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        fn number<T: FromStr>(name: &str, text: String) -> BenchResult<T> {
            text.replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: `{text}` is not a number"))
        }
        match name.as_str() {
            // What cargo passes to every bench binary.
            "--bench" => {}
            "--keep" => options.keep = true,
            "--api-only" => options.api_only = true,
            "--api-samples" => options.api_samples = number(&name, value()?)?,
            "--api-accounts" => options.api_accounts = number(&name, value()?)?,
            "--runs" => options.runs = number(&name, value()?)?,
            "--events" => options.events = number(&name, value()?)?,
            "--accounts" => options.accounts = number(&name, value()?)?,
            "--history" => options.history = number(&name, value()?)?,
            "--rate" => options.rate = number(&name, value()?)?,
            "--latency-seconds" => options.latency_seconds = number(&name, value()?)?,
            "--postgres" => options.postgres = value()?,
            "--amqp" => options.amqp = value()?.trim_end_matches('/').to_owned(),
            "--backends" => {
                options.backends = value()?
                    .split(',')
                    .map(|b| match b.trim() {
                        "sqlite" => Ok(Backend::Sqlite),
                        "postgres" | "postgresql" => Ok(Backend::Postgres),
                        other => Err(format!("--backends: unknown backend `{other}`")),
                    })
                    .collect::<BenchResult<_>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`; usage: {USAGE}")),
        }
    }
    if options.events < 100 || options.accounts < 10 || options.rate == 0 || options.runs == 0 {
        return Err(
            "--events must be ≥ 100, --accounts ≥ 10, --rate ≥ 1 and --runs ≥ 1".to_owned(),
        );
    }
    if options.api_accounts == 0 {
        return Err("--api-accounts must be ≥ 1".to_owned());
    }
    Ok(options)
}
