//! The rows a batch writes, gathered column by column for the backend's
//! bulk insert ([`Backend::insert`](super::sql::Backend::insert)), and the
//! conversions between stored text and domain values.
//!
//! Lists of values are one bind (a JSON array on SQLite, an array on
//! PostgreSQL), so their statements have one text and stay prepared. Rows to
//! insert are gathered column by column ([`Rows`]): PostgreSQL binds each
//! column as one array (`UNNEST`), one prepared statement per set of tables;
//! SQLite binds them row by row in multi-row `VALUES`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;
use crate::domain::{Id, Ts};

/// Binds per statement stay well under SQLite's and PostgreSQL's limits.
pub const BINDS_PER_STATEMENT_MAX: usize = 30_000;

/// The type of a column, the same in both schemas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    /// An instant ([`Ts`]).
    Time,
}

/// A table and the columns an insert fills, in order.
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Kind)],
}

impl Table {
    /// `INSERT INTO name (a, b, …) `.
    pub fn head(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        format!("INSERT INTO {} ({}) ", self.name, names.join(", "))
    }
}

/// The values of one column, a row each.
pub enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Time(Vec<Option<Ts>>),
}

/// Rows to insert into a [`Table`], kept column by column. Values are given
/// row after row, each in the table's column order.
pub struct Rows {
    pub table: &'static Table,
    pub columns: Vec<Column>,
    /// What follows the rows: an `ON CONFLICT` clause, or nothing.
    pub tail: &'static str,
    next: usize,
}

impl Rows {
    pub fn new(table: &'static Table, rows: usize, tail: &'static str) -> Rows {
        let columns = table
            .columns
            .iter()
            .map(|(_, kind)| match kind {
                Kind::Text => Column::Text(Vec::with_capacity(rows)),
                Kind::Int => Column::Int(Vec::with_capacity(rows)),
                Kind::Time => Column::Time(Vec::with_capacity(rows)),
            })
            .collect();
        Rows {
            table,
            columns,
            tail,
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        match &self.columns[0] {
            Column::Text(values) => values.len(),
            Column::Int(values) => values.len(),
            Column::Time(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column the next value belongs to.
    fn slot(&mut self) -> (&'static str, &mut Column) {
        let at = self.next;
        self.next = (at + 1) % self.columns.len();
        (self.table.columns[at].0, &mut self.columns[at])
    }

    pub fn text(&mut self, value: impl Into<Option<String>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Text(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not a text column"),
        }
        self
    }

    pub fn int(&mut self, value: impl Into<Option<i64>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Int(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not an integer column"),
        }
        self
    }

    pub fn time(&mut self, value: impl Into<Option<Ts>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Time(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not an instant column"),
        }
        self
    }
}

use Kind::{Int, Text, Time};

pub const ACCOUNTS: Table = Table {
    name: "accounts",
    columns: &[
        ("account_id", Text),
        ("name", Text),
        ("status", Text),
        ("approval_mode", Text),
        ("code", Text),
        ("code_key", Text),
        ("scope", Text),
        ("low_balance_threshold", Int),
        ("learner_limit", Int),
        ("notes", Text),
        ("created_at", Time),
    ],
};

pub const OWNERS: Table = Table {
    name: "owners",
    columns: &[
        ("email", Text),
        ("account_id", Text),
        ("name", Text),
        ("position", Int),
    ],
};

pub const LOTS: Table = Table {
    name: "lots",
    columns: &[
        ("account_id", Text),
        ("purchase_id", Text),
        ("credits", Int),
        ("remaining", Int),
        ("held", Int),
        ("expired", Int),
        ("purchased_at", Time),
        ("expires_at", Time),
        ("price_amount", Int),
        ("price_currency", Text),
        ("channel", Text),
        ("refunded", Int),
        ("reminded_stage", Int),
        ("remind_at", Time),
        ("fingerprint", Text),
    ],
};

pub const REDEMPTIONS: Table = Table {
    name: "redemptions",
    columns: &[
        ("request_id", Text),
        ("account_id", Text),
        ("learner_id", Text),
        ("learner_email", Text),
        ("learner_name", Text),
        ("item_id", Text),
        ("item_kind", Text),
        ("item_title", Text),
        ("item_group_ids", Text),
        ("cost", Int),
        ("status", Text),
        ("reason", Text),
        ("requested_at", Time),
        ("created_at", Time),
        ("decided_by", Text),
        ("decided_at", Time),
        ("allocations", Text),
        ("refunded", Int),
        ("fingerprint", Text),
    ],
};

pub const JOURNAL: Table = Table {
    name: "journal",
    columns: &[
        ("at", Time),
        ("account_id", Text),
        ("entry", Text),
        ("purchase_id", Text),
        ("request_id", Text),
        ("amount", Int),
        ("held_delta", Int),
        ("balance_after", Int),
        ("actor", Text),
        ("causation_id", Text),
    ],
};

pub const AUDIT: Table = Table {
    name: "audit",
    columns: &[
        ("at", Time),
        ("account_id", Text),
        ("actor", Text),
        ("field", Text),
        ("old_value", Text),
        ("new_value", Text),
        ("causation_id", Text),
    ],
};

pub const PROCESSED: Table = Table {
    name: "processed",
    columns: &[
        ("source", Text),
        ("event_id", Text),
        ("digest", Text),
        ("outcome", Text),
        ("processed_at", Time),
    ],
};

pub const PURCHASE_REFUNDS: Table = Table {
    name: "purchase_refunds",
    columns: &[
        ("account_id", Text),
        ("refund_id", Text),
        ("purchase_id", Text),
        ("refunded", Int),
        ("shortfall", Int),
        ("reason", Text),
        ("refunded_at", Time),
        ("fingerprint", Text),
        ("causation_id", Text),
    ],
};

pub const CODE_ATTEMPTS: Table = Table {
    name: "code_attempts",
    columns: &[("learner_id", Text), ("at", Time)],
};

pub const OUTBOX: Table = Table {
    name: "outbox",
    columns: &[
        ("id", Text),
        ("kind", Text),
        ("payload", Text),
        ("created_at", Time),
        ("next_attempt_at", Time),
        ("leased_by", Int),
    ],
};

pub fn id(text: String) -> Result<Id, StoreError> {
    text.parse().map_err(StoreError::corrupt)
}

pub fn opt_id(text: Option<String>) -> Result<Option<Id>, StoreError> {
    text.map(id).transpose()
}

/// A snake_case enum from its stored text.
pub fn from_text<T: DeserializeOwned>(text: String) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text)).map_err(StoreError::corrupt)
}

/// The stored text of a snake_case enum.
pub fn to_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        other => unreachable!("a unit enum serialises to a string, not {other:?}"),
    }
}

pub fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(StoreError::corrupt)
}

pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("ledger values serialise to JSON")
}
