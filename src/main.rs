//! The `training-credits` binary: parse and check the command line (bad
//! usage exits 2), run the command, print any failure with its whole cause
//! chain on one line.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use training_credits::cli::{self, Cli};

/// mimalloc instead of the system allocator: the worker allocates and frees
/// many small values per message (decoded JSON, SQL binds), which glibc's
/// malloc serves slowly under load (BENCHMARKS.md gives the figures). Built
/// with `no_thp`, so that it does not ask for transparent huge pages on its
/// arenas, which would raise the worker's peak RSS by about half.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A missing .env file is normal; the environment alone configures us.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    if let Err(usage) = cli.check() {
        usage.exit();
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("training-credits: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("training-credits: {error:#}");
            ExitCode::from(1)
        }
    }
}
