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
//! [`config`] reads the environment; [`cli`] holds one file per command.

pub mod apply;
pub mod cli;
pub mod config;
pub mod decode;
pub mod domain;
pub mod notify;
pub mod schedule;
pub mod store;
