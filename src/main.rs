//! The `training-credits` binary: parse and check the command line (bad
//! usage exits 2), set up logging and span export, run the command, send the
//! spans not sent yet, print any failure with its whole cause chain on one
//! line.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use training_credits::broker::upgrade::ProbeRefusals;
use training_credits::cli::{self, Cli};
use training_credits::trace::export::Exporting;

/// mimalloc instead of the system allocator: the worker allocates and frees
/// many small values per message (decoded JSON, SQL binds), which glibc's
/// malloc serves slowly under load (BENCHMARKS.md gives the figures). Built
/// with `no_thp`, so that it does not ask for transparent huge pages on its
/// arenas, which would raise the worker's peak RSS by about half. With
/// `override` it also serves `malloc` and `free` of the C code: SQLite's
/// statements and pages, which had spent about 5 % of the worker's CPU in
/// glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A missing .env file is normal; the environment alone configures us.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    if let Err(usage) = cli.check() {
        usage.exit();
    }
    let exporting = match Exporting::from_env() {
        Ok(exporting) => exporting,
        Err(error) => {
            eprintln!("training-credits: bad configuration: the OTLP exporter: {error}");
            return ExitCode::from(1);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = if json {
        log.json().boxed()
    } else {
        log.boxed()
    };
    tracing_subscriber::registry()
        .with(log.with_filter(filter.and(ProbeRefusals)))
        .with(exporting.as_ref().map(Exporting::layer))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("training-credits: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let ran = runtime.block_on(cli::run(cli));
    // The tasks still held end with the runtime, and so do their spans,
    // which are then among those sent.
    drop(runtime);
    if let Some(exporting) = exporting {
        exporting.shutdown();
    }
    match ran {
        Ok(code) => code,
        Err(error) => {
            eprintln!("training-credits: {error:#}");
            ExitCode::from(1)
        }
    }
}
