//! Reports (SPEC §8): rows streamed from the ledger into CSV or XLSX, one row
//! in memory at a time however large the ledger is. Columns can be chosen and
//! ordered; spreadsheet formulas can never be smuggled in through a cell.

mod csv_sheet;
mod xlsx_sheet;

use std::path::Path;

use futures_util::StreamExt;

use serde::{Deserialize, Serialize};

use crate::domain::command::{ReportFormat, ReportKind, ReportRequested};
pub use crate::domain::report::{Cell, ReportQuery};
use crate::domain::{Id, Ts};
use crate::store::{Reports, StoreError};
use crate::trace::Trace;

/// A report to build and email, as an outbox row carries it: a requested
/// report (announced by `training-credits.report.generated` once sent) or a
/// monthly statement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportJob {
    pub request: ReportRequested,
    pub causation_id: String,
    /// The trace of its cause, which the event announcing it continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
    /// The email's subject and heading.
    pub title: String,
    /// Whether sending it is announced by an outbound event.
    pub announce: bool,
}

impl ReportJob {
    /// The name the file is sent under: `transactions-acme-2026-11-21.csv`.
    pub fn filename(&self, now: Ts) -> String {
        let kind = format!("{:?}", self.request.report).to_lowercase();
        let scope = self
            .request
            .account_id
            .as_ref()
            .map_or("all-accounts".to_owned(), Id::to_string);
        let extension = match self.request.format {
            ReportFormat::Csv => "csv",
            ReportFormat::Xlsx => "xlsx",
        };
        format!("{kind}-{scope}-{}.{extension}", now.date())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("`{0}` is not a column of this report")]
    UnknownColumn(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing the CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing the XLSX: {0}")]
    Xlsx(#[from] rust_xlsxwriter::XlsxError),
}

/// The positions, in the kind's full row, of the requested columns (all of
/// them, in SPEC order, when none are requested).
pub fn choose_columns(
    kind: ReportKind,
    requested: Option<&[String]>,
) -> Result<Vec<usize>, ReportError> {
    let all = kind.columns();
    match requested {
        None => Ok((0..all.len()).collect()),
        Some(names) => names
            .iter()
            .map(|name| {
                all.iter()
                    .position(|column| column == name)
                    .ok_or_else(|| ReportError::UnknownColumn(name.clone()))
            })
            .collect(),
    }
}

/// Where rows go: a CSV or an XLSX file.
trait Sheet {
    fn header(&mut self, names: &[&str]) -> Result<(), ReportError>;
    fn row(&mut self, cells: &[&Cell]) -> Result<(), ReportError>;
    fn finish(self: Box<Self>) -> Result<(), ReportError>;
}

/// Writes the report to `out`, calling `progress` after every row. Returns
/// how many rows it wrote.
pub async fn write<S: Reports>(
    store: &S,
    query: &ReportQuery,
    format: ReportFormat,
    columns: &[usize],
    out: &Path,
    progress: impl Fn(u64) + Send,
) -> Result<u64, ReportError> {
    let names: Vec<&str> = columns.iter().map(|&i| query.kind.columns()[i]).collect();
    let mut sheet: Box<dyn Sheet + Send> = match format {
        ReportFormat::Csv => Box::new(csv_sheet::CsvSheet::create(out)?),
        ReportFormat::Xlsx => Box::new(xlsx_sheet::XlsxSheet::create(out, query.kind)?),
    };
    sheet.header(&names)?;
    let mut rows = store.report_rows(query);
    let mut written = 0_u64;
    while let Some(row) = rows.next().await {
        let row = row?;
        let cells: Vec<&Cell> = columns.iter().map(|&i| &row[i]).collect();
        sheet.row(&cells)?;
        written += 1;
        progress(written);
    }
    sheet.finish()?;
    Ok(written)
}
