//! The integration tests, one binary with a module per area (built once,
//! linking the crate once), on the real RabbitMQ, PostgreSQL and SQLite.
//! Run them all with `cargo test`, one area with `cargo test --test it
//! hostile::`, one test with its path (`cargo test --test it
//! rules::sqlite::NAME`). The helpers they share, with the throughput bench
//! too, are in `tests/support/`.

// The macros `on_both_backends!` and `on_both_stores!` are exported from
// `support`, declared first so that every area module below sees them.
#[macro_use]
#[path = "../support/mod.rs"]
mod support;

mod api;
mod asyncapi;
mod authorization;
mod cli;
mod concurrency;
mod crash;
mod decode;
mod delivery_limit;
mod faults_broker;
mod faults_db;
mod faults_smtp;
mod hostile;
mod layers;
mod properties;
mod publishers;
mod refunds;
mod reports;
mod rules;
mod schedule;
mod secrets;
mod shutdown;
mod smoke;
mod traces;
mod worker;
mod worker_faults;
