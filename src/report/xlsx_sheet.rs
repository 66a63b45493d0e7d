//! XLSX through rust_xlsxwriter in constant-memory mode: every row goes to a
//! temporary file as it is written. Amounts are numbers, instants are dates,
//! text is always stored as text (never as a formula). A report longer than
//! a worksheet's 1,048,576 rows continues on another worksheet.

use std::path::{Path, PathBuf};

use rust_xlsxwriter::{Format, Workbook};

use super::{Cell, ReportError, Sheet};
use crate::domain::command::ReportKind;

/// Rows per worksheet, the header included.
const ROWS_PER_SHEET_MAX: u32 = 1_048_576;
/// Excel's limit on the text of one cell, in UTF-16 code units. Names,
/// notes and titles may be longer (up to 65,536 characters); in XLSX they
/// are cut to fit, the CSV keeps them whole.
const CELL_TEXT_MAX: usize = 32_767;

pub struct XlsxSheet {
    workbook: Workbook,
    path: PathBuf,
    kind: ReportKind,
    header: Vec<String>,
    sheets: usize,
    row: u32,
    bold: Format,
    amount: Format,
    date: Format,
}

impl XlsxSheet {
    pub fn create(path: &Path, kind: ReportKind) -> Result<XlsxSheet, ReportError> {
        Ok(XlsxSheet {
            workbook: Workbook::new(),
            path: path.to_owned(),
            kind,
            header: Vec::new(),
            sheets: 0,
            row: 0,
            bold: Format::new().set_bold(),
            amount: Format::new().set_num_format("0.00"),
            date: Format::new().set_num_format("yyyy-mm-dd hh:mm:ss"),
        })
    }

    /// Starts a worksheet and writes the header row on it.
    fn new_sheet(&mut self) -> Result<(), ReportError> {
        self.sheets += 1;
        let name = match self.sheets {
            1 => format!("{:?}", self.kind).to_lowercase(),
            n => format!("{} ({n})", format!("{:?}", self.kind).to_lowercase()),
        };
        let sheet = self.workbook.add_worksheet_with_constant_memory()?;
        sheet.set_name(name)?;
        for (col, name) in self.header.iter().enumerate() {
            sheet.write_string_with_format(0, column(col), name, &self.bold)?;
        }
        self.row = 1;
        Ok(())
    }
}

/// The longest prefix of `text` that an Excel cell holds, cut between
/// characters.
fn fit_in_cell(text: &str) -> &str {
    let mut units = 0;
    for (at, c) in text.char_indices() {
        units += c.len_utf16();
        if units > CELL_TEXT_MAX {
            return &text[..at];
        }
    }
    text
}

fn column(index: usize) -> u16 {
    u16::try_from(index).expect("a report has few columns")
}

impl Sheet for XlsxSheet {
    fn header(&mut self, names: &[&str]) -> Result<(), ReportError> {
        self.header = names.iter().map(|n| (*n).to_owned()).collect();
        self.new_sheet()
    }

    fn row(&mut self, cells: &[&Cell]) -> Result<(), ReportError> {
        if self.row >= ROWS_PER_SHEET_MAX {
            self.new_sheet()?;
        }
        let index = self.sheets - 1;
        let row = self.row;
        let (amount, date) = (self.amount.clone(), self.date.clone());
        let sheet = self.workbook.worksheet_from_index(index)?;
        for (col, cell) in cells.iter().enumerate() {
            let col = column(col);
            match cell {
                Cell::Text(text) => {
                    sheet.write_string(row, col, fit_in_cell(text))?;
                }
                Cell::Amount(value) => {
                    let number = value.to_string().parse::<f64>().unwrap_or_default();
                    sheet.write_number_with_format(row, col, number, &amount)?;
                }
                Cell::Instant(at) => {
                    sheet.write_datetime_with_format(row, col, at.utc().naive_utc(), &date)?;
                }
                Cell::Empty => {}
            }
        }
        self.row += 1;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), ReportError> {
        self.workbook.save(&self.path)?;
        Ok(())
    }
}
