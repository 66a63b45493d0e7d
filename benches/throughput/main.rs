//! The throughput benchmark (issues 5 and 22): `cargo bench --bench throughput`.
//!
//! For each backend (SQLite, then PostgreSQL), on this machine's RabbitMQ and
//! PostgreSQL, in RabbitMQ vhosts and databases of its own (deleted at the
//! end), it measures and prints in one table:
//!
//! 1. the broker ceiling: N persistent messages (the workload's own bodies)
//!    published with confirms to a durable quorum scratch queue, then consumed
//!    with prefetch 1000 and one multiple-ack per batch; messages per second
//!    of the consume phase; then the same bodies through the broker alone on
//!    the worker's path (a relay in the bench instead of the worker): about
//!    what a worker whose own work cost nothing would reach here;
//! 2. N realistic inbound events published to `training-credits.in` before
//!    the worker starts, then the real release binary (`training-credits
//!    run`) started and timed until every message is applied and acknowledged
//!    and every expected outbound event has arrived on a capture queue bound
//!    to `training-credits.out`; events per second and the ratio to (1);
//! 3. with that worker idle, publish-to-outbound-event latency (p50, p99) at
//!    a steady rate (default 1,000 events/s for 10 s), and the same with the
//!    broker alone (a relay in the bench instead of the worker, in step 1);
//! 4. the worker's peak RSS (`VmHWM`, polled);
//! 5. step 2 again on a ledger that already holds 1,000,000 journal entries
//!    (filled by SQL in the binary's own schema), and its ratio to step 2;
//! 6. the read API on such a ledger over only ten accounts: p50 and p99 of
//!    each GET (`api`), in a table of its own.
//!
//! After every worker run it runs `training-credits verify` and checks that
//! exactly the expected outbound events arrived (one per applied inbound
//! event, none for duplicates and malformed messages); a failure prints a
//! warning and makes the bench exit non-zero. Steps 1 to 5 run `--runs`
//! times (3) per backend, the backends taking turns; the table gives each
//! figure's median and every run. The targets of issue 22 are reported on the
//! medians, never asserted.
//!
//! Options (after `--`): `--runs N` (3), `--events N` (20000), `--accounts N` (1000),
//! `--history N` (1000000; 0 skips steps 5 and 6), `--backends sqlite,postgres`,
//! `--rate N` (1000) and `--latency-seconds N` (10) for step 3,
//! `--postgres URL` (admin URL; default `TEST_POSTGRES_URL` or
//! `postgres://postgres@127.0.0.1:5432/postgres`), `--amqp URL` (broker
//! without vhost; default `amqp://guest:guest@127.0.0.1:5672`),
//! `--api-samples N` (200; 0 skips step 6), `--api-accounts N` (10),
//! `--api-only` (step 6 alone). `PREFETCH`
//! and `BATCH_SIZE` in the environment are passed on to the worker,
//! `BENCH_WORKER_LOG` replaces its log filter (`warn`). `--keep`
//! keeps the databases (and prints their URLs) for inspection.

// The helpers shared with the integration tests (a vhost, the seeded RNG,
// HTTP GET, `/metrics` samples): one copy, in `tests/support`.
#[path = "../../tests/support/mod.rs"]
mod support;

// The bench's parts: its options, the workload, RabbitMQ (loading a queue,
// capturing), the broker alone (step 1, `relay`), the databases, the worker
// process and its commands, where the CPU went, one worker run (steps 2–5)
// and the table. Each sees the others through `use crate::*`.
mod api;
mod broker;
mod cpu;
mod database;
mod options;
mod relay;
mod run;
mod table;
mod worker;
mod workload;

use api::*;
use broker::*;
use cpu::*;
use database::*;
use options::*;
use relay::*;
use run::*;
use table::*;
use worker::*;
use workload::*;

use std::process::ExitCode;
use std::time::{Duration, Instant};
use support::BINARY;
use support::broker::{Vhost, try_http_get};
use support::stream::{Rng, cents};

/// Credits of the funded lot every pre-existing account starts with, in cents.
const SEED_CREDITS_CENTS: i64 = 100_000_000;
/// Learners of the workload (a subset of the history's learners).
const WORKLOAD_LEARNERS: usize = 5_000;
/// Learners of the history: each has about ten approved redemptions.
const HISTORY_LEARNERS: u64 = 100_000;
/// Spent and expired lots per account in the history.
const OLD_LOTS: u64 = 19;
/// Cost of each redemption of the history, in cents.
const HISTORY_COST_CENTS: i64 = 2_500;
/// Publisher-confirm window when loading a queue.
const CONFIRM_WINDOW: usize = 1_000;
/// A run that makes no progress for this long has failed.
const STALL_LIMIT: Duration = Duration::from_secs(90);

type BenchResult<T> = Result<T, String>;

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |error| format!("{what}: {error}")
}

// ---------------------------------------------------------------------------
// One backend: steps 1 to 5

struct Row {
    backend: Backend,
    /// Which of the `--runs` this was (from 1).
    run: usize,
    ceiling: Ceiling,
    empty: Run,
    history: Option<Run>,
    fill_seconds: f64,
}

/// A ledger of `accounts` seeded accounts and `history` journal entries
/// (none when 0), and the seconds it took to fill.
async fn prepare(
    backend: Backend,
    options: &Options,
    tag: &str,
    accounts: u64,
    history: u64,
) -> BenchResult<(Database, f64)> {
    let database = Database::create(backend, options, tag).await?;
    run_command(&["migrate"], &database.url)?;
    let started = Instant::now();
    let dialect = Dialect {
        backend,
        now_micros: chrono::Utc::now().timestamp_micros(),
    };
    database.execute(&seed_sql(&dialect, accounts)).await?;
    if history > 0 {
        database
            .execute(&history_sql(&dialect, accounts, history))
            .await?;
    }
    // A ledger in service has been vacuumed and checkpointed: the run
    // should not pay for the bulk load.
    match backend {
        Backend::Postgres => {
            database.execute("VACUUM ANALYZE").await?;
            database.execute("CHECKPOINT").await?;
        }
        Backend::Sqlite => database.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?,
    }
    Ok((database, started.elapsed().as_secs_f64()))
}

async fn bench_backend(
    backend: Backend,
    run: usize,
    options: &Options,
    workload: &Workload,
    steady: &Workload,
) -> BenchResult<Row> {
    let pid = std::process::id();
    let tag = backend.tag();
    let accounts = options.accounts as u64;
    eprintln!("{}, run {run}:", backend.label());
    let vhost = Vhost::create(format!("tc_bench_{pid}_{tag}"), &options.amqp)?;
    let steady = (options.latency_seconds > 0).then_some((steady, options.rate));
    let ceiling = broker_ceiling(&vhost, &workload.messages, steady).await?;
    eprintln!(
        "  broker ceiling: published {:.0} msg/s, consumed {:.0} msg/s; relayed {:.0} msg/s",
        ceiling.publish_per_second, ceiling.consume_per_second, ceiling.relay_per_second
    );
    let (database, _) = prepare(backend, options, &format!("{tag}_empty"), accounts, 0).await?;
    let empty = worker_run("empty ledger", &vhost, &database, workload, steady).await?;
    drop(database);
    drop(vhost);
    eprintln!(
        "  empty ledger: {:.0} events/s ({:.1} s); verify {}, outbound {}",
        empty.events_per_second,
        empty.seconds,
        ok(empty.verify_ok),
        ok(empty.outbound_ok)
    );
    let mut history = None;
    let mut fill_seconds = 0.0;
    if options.history > 0 {
        eprintln!(
            "  filling a ledger with {} journal entries…",
            thousands(options.history as f64)
        );
        let (database, seconds) = prepare(
            backend,
            options,
            &format!("{tag}_history"),
            accounts,
            options.history,
        )
        .await?;
        fill_seconds = seconds;
        let vhost = Vhost::create(format!("tc_bench_{pid}_{tag}_history"), &options.amqp)?;
        let run = worker_run("with history", &vhost, &database, workload, None).await?;
        eprintln!(
            "  with history: {:.0} events/s ({:.1} s); verify {}, outbound {}",
            run.events_per_second,
            run.seconds,
            ok(run.verify_ok),
            ok(run.outbound_ok)
        );
        history = Some(run);
    }
    Ok(Row {
        backend,
        run,
        ceiling,
        empty,
        history,
        fill_seconds,
    })
}

async fn bench(options: Options) -> BenchResult<bool> {
    let mut generator = Generator::new(options.accounts);
    let workload = generator.workload(options.events);
    let steady = generator.steady(options.rate as usize * options.latency_seconds as usize);
    eprintln!(
        "training-credits throughput bench: {} events ({} valid, {} duplicates, {} malformed), \
         {} accounts, history {}, backends {:?}; worker {BINARY}{}{}",
        workload.messages.len(),
        workload.expected.len(),
        workload.duplicates,
        workload.malformed,
        options.accounts,
        options.history,
        options.backends,
        std::env::var("PREFETCH").map_or(String::new(), |v| format!(", PREFETCH={v}")),
        std::env::var("BATCH_SIZE").map_or(String::new(), |v| format!(", BATCH_SIZE={v}")),
    );
    let mut rows = Vec::new();
    let mut api_rows = Vec::new();
    let mut failures = Vec::new();
    let mut failed = |backend: Backend, error: String| {
        eprintln!("WARNING: {}: {error}", backend.label());
        failures.push(format!("{}: {error}", backend.label()));
    };
    // The backends take turns, run after run, so that a slow spell of the
    // machine weighs on both alike.
    let runs = if options.api_only { 0 } else { options.runs };
    for run in 1..=runs {
        for backend in &options.backends {
            match bench_backend(*backend, run, &options, &workload, &steady).await {
                Ok(row) => rows.push(row),
                Err(error) => failed(*backend, error),
            }
        }
    }
    if options.api_samples > 0 && options.history > 0 {
        for backend in &options.backends {
            match api_step(*backend, &options).await {
                Ok(row) => api_rows.push(row),
                Err(error) => failed(*backend, error),
            }
        }
    }
    if !options.api_only {
        print_table(&rows, &options, &workload);
    }
    print_api_table(&api_rows, &options);
    let mut correct = failures.is_empty();
    for row in &rows {
        for run in std::iter::once(&row.empty).chain(row.history.as_ref()) {
            if !run.problems.is_empty() || !run.verify_ok || !run.outbound_ok {
                correct = false;
            }
        }
    }
    for failure in &failures {
        println!("WARNING: the run failed: {failure}");
    }
    if !correct {
        println!("WARNING: correctness problems above: the bench exits non-zero.");
    }
    Ok(correct)
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("throughput: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("throughput: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(bench(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("throughput: {error}");
            ExitCode::from(1)
        }
    }
}
