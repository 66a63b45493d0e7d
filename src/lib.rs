//! training-credits: a message-driven ledger of prepaid training credits.
//!
//! A message travels through the modules in this order:
//!
//! 1. [`consume`] takes a batch of deliveries from the worker queue.
//! 2. [`decode`]: bytes → CloudEvent envelope → JSON Schema → typed
//!    [`domain::command::Command`].
//! 3. [`apply`]: the batch in one database transaction: idempotency records,
//!    the ledger rules of [`domain`], journal entries and [`outbox`] rows
//!    (outbound CloudEvents, emails rendered by [`notify`]); then the batch is
//!    acknowledged, and its fresh rows are handed to the dispatcher.
//! 4. [`dispatch`] sends the outbox: outbound events with publisher
//!    confirms, emails through SMTP, report jobs.
//!
//! Beside that path: [`schedule`] runs the scheduled jobs through the same
//! [`apply`], [`report`] writes CSV and XLSX reports, [`ops`] serves health
//! and metrics, [`api`] the read API of SPEC §9. [`store`] keeps the ledger (SQLite or PostgreSQL), [`broker`]
//! holds what every AMQP user shares (connections, topology), [`config`]
//! reads the environment, [`trace`] carries an inbound trace context to what
//! a message causes and exports spans, [`worker`] ties the pieces together
//! for `run`, and [`cli`] holds one file per command.
//!
//! Dependencies run one way, each module using only those of the layers
//! below its own (`tests/it/layers.rs` reads this table and checks every use):
//!
//! | layer | modules |
//! |---|---|
//! | 7 | [`cli`] |
//! | 6 | [`worker`] |
//! | 5 | [`consume`], [`dispatch`], [`schedule`], [`api`] |
//! | 4 | [`apply`] |
//! | 3 | [`outbox`], [`report`], [`ops`] |
//! | 2 | [`store`] |
//! | 1 | [`config`], [`decode`], [`notify`], [`broker`] |
//! | 0 | [`domain`], [`trace`] |

pub mod api;
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
pub mod trace;
pub mod worker;
