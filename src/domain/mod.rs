//! The ledger's vocabulary and rules, with no I/O: no broker, no database, no
//! SMTP. Everything here is deterministic given the ledger view, the command
//! and the instant, which is what lets the rules be tested by property.

/// Serialises enums of contract names (reasons, types) by their `as_str`.
macro_rules! serialize_as_str {
    ($($named:ty),*) => {$(
        impl serde::Serialize for $named {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    )*};
}

pub mod command;
pub mod event;
pub mod ids;
pub mod ledger;
pub mod model;
pub mod money;
pub mod notice;
pub mod outcome;
pub mod report;
pub mod rules;
pub mod time;

pub use command::InboundType;
pub use ids::{Code, CodeKey, Email, Id};
pub use money::Credits;
pub use outcome::{DeadReason, Outcome, Refusal, Rejection, RetryReason};
pub use time::Ts;
