//! CSV (RFC 4180). A text cell starting with `=`, `+`, `-`, `@`, a tab or a
//! carriage return is prefixed with `'`, so no spreadsheet evaluates it;
//! amounts are plain numbers and left alone.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use super::{Cell, ReportError, Sheet};

pub struct CsvSheet {
    writer: csv::Writer<BufWriter<File>>,
}

impl CsvSheet {
    pub fn create(path: &Path) -> Result<CsvSheet, ReportError> {
        let file = BufWriter::new(File::create(path)?);
        Ok(CsvSheet {
            writer: csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(file),
        })
    }
}

/// The text as it may safely stand in a spreadsheet cell.
pub fn neutralize(text: &str) -> std::borrow::Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{text}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

impl Sheet for CsvSheet {
    fn header(&mut self, names: &[&str]) -> Result<(), ReportError> {
        self.writer.write_record(names)?;
        Ok(())
    }

    fn row(&mut self, cells: &[&Cell]) -> Result<(), ReportError> {
        let fields = cells.iter().map(|cell| match cell {
            Cell::Text(text) => neutralize(text).into_owned(),
            Cell::Amount(amount) => amount.to_string(),
            Cell::Instant(at) => at.to_string(),
            Cell::Empty => String::new(),
        });
        self.writer.write_record(fields)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), ReportError> {
        self.writer.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralised_and_plain_text_is_not() {
        for risky in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(neutralize(risky), format!("'{risky}"));
        }
        assert_eq!(neutralize("Rust 101"), "Rust 101");
        assert_eq!(neutralize(""), "");
    }
}
