//! The ledger's vocabulary and rules, with no I/O: no broker, no database, no
//! SMTP. Everything here is deterministic given the ledger view, the command
//! and the instant, which is what lets the rules be tested by property.

pub mod command;
pub mod ids;
pub mod ledger;
pub mod model;
pub mod money;
pub mod outcome;
pub mod report;
pub mod rules;
pub mod time;

pub use ids::{Code, CodeKey, Email, Id};
pub use money::Credits;
pub use outcome::{DeadReason, Outcome, Refusal, Rejection, RetryReason};
pub use time::Ts;
