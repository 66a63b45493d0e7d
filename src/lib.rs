//! training-credits: a message-driven ledger of prepaid training credits.
//!
//! A message travels through the modules in this order:
//!
//! 1. [`decode`]: bytes → CloudEvent envelope → JSON Schema → typed [`domain::command::Command`].
//! 2. [`apply`]: a batch of commands in one database transaction: idempotency
//!    records, the ledger rules of [`domain`], journal entries and outbox rows.
//! 3. [`store`]: the storage trait and its SQLite and PostgreSQL implementations.
//! 4. [`notify`]: the emails the outbox carries, rendered from templates.
//! 5. [`schedule`]: the scheduled jobs, which go through the same [`apply`] path.
//!
//! Then, separately, [`dispatch`] sends the outbox: outbound events with
//! publisher confirms, emails through SMTP. [`consume`] is the broker side
//! (topology, batches, acks, retries, dead letters), [`ops`] the health and
//! metrics endpoints, and [`worker`] ties them together for `run`.
//!
//! [`config`] reads the environment; [`cli`] holds one file per command.

pub mod apply;
pub mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub mod decode;
pub mod dispatch;
pub mod domain;
pub mod notify;
pub mod ops;
pub mod outbox;
pub mod report;
pub mod schedule;
pub mod store;
pub mod worker;
