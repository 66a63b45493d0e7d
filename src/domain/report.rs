//! What a report is, apart from how it is stored or written: which rows it
//! asks for and the cells each row is made of. The store produces the rows,
//! [`report`](crate::report) writes them as CSV or XLSX.

use crate::domain::command::ReportKind;
use crate::domain::{Credits, Id, Ts};

/// One cell of a report row.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Text(String),
    /// Money: a plain number with two decimals in CSV, a number in XLSX.
    Amount(Credits),
    /// An instant: RFC 3339 in CSV, a date in XLSX.
    Instant(Ts),
    Empty,
}

impl Cell {
    pub fn text(value: Option<String>) -> Cell {
        value.map_or(Cell::Empty, Cell::Text)
    }

    pub fn instant(value: Option<Ts>) -> Cell {
        value.map_or(Cell::Empty, Cell::Instant)
    }
}

/// Which rows a report holds.
#[derive(Clone, Debug)]
pub struct ReportQuery {
    pub kind: ReportKind,
    pub account: Option<Id>,
    /// Inclusive lower bound of the row's instant (`at`, `requested_at`, or
    /// `purchased_at` for credits); balances are as of `now` and take none.
    pub from: Option<Ts>,
    /// Exclusive upper bound, likewise.
    pub to: Option<Ts>,
    /// The instant balances and lot status are computed at.
    pub now: Ts,
}
