//! Reports (SPEC §8): the five kinds written as CSV and XLSX from a ledger
//! built step by step, checked row for row against what the steps did; the
//! column choice; formula neutralisation; the `report` command on the real
//! binary; and requested reports emailed by the worker (SPEC §5.1, §5.2).

use crate::support as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use calamine::{Data, Reader, Xlsx};
use mail_parser::MimeHeaders;
use serde_json::{Value, json};
use training_credits::domain::command::{ReportFormat, ReportKind};
use training_credits::domain::{Credits, Outcome, Rejection, Ts};
use training_credits::report::{ReportError, ReportQuery, choose_columns, write};
use training_credits::store::Store;

use common::broker::{Client, SmtpSink, TestWorker, Vhost, config, eventually};
use common::events::event;
use common::{World, id, ts};

// ---------------------------------------------------------------------------
// The ledger every row-for-row test reads.

const BOSS: &str = "boss@acme.test";
const CFO: &str = "cfo@acme.test";
const OPS: &str = "ops@globex.test";
const HR: &str = "hr@globex.test";
const IT: &str = "it@initech.test";
const PM: &str = "pm@initech.test";

/// Accounts opened.
const T0: &str = "2026-01-01T09:00:00Z";
/// First purchases.
const T1: &str = "2026-01-02T09:00:00Z";
/// Redemptions: manual (approved, denied) and automatic.
const T2: &str = "2026-01-03T09:00:00Z";
/// A refund, a late purchase, a rejection, account changes.
const T3: &str = "2026-01-05T09:00:00Z";
/// The sweep expires lot g1 (due 2026-02-01); a request is left pending.
/// Reports are computed as of this instant.
const T4: &str = "2026-02-02T09:00:00Z";

fn applied(outcome: Outcome, what: &str) {
    assert_eq!(outcome, Outcome::Applied, "{what}");
}

async fn buy<S: Store>(
    w: &mut World<S>,
    account_id: &str,
    purchase_id: &str,
    credits: &str,
    price: Option<&str>,
    expires_at: Option<&str>,
) {
    let mut data = json!({
        "account_id": account_id,
        "purchase_id": purchase_id,
        "credits": credits,
        "purchased_at": w.now,
    });
    if let Some(price) = price {
        data["price_paid"] = json!({"amount": price, "currency": "USD"});
    }
    if let Some(expires_at) = expires_at {
        data["expires_at"] = json!(expires_at);
    }
    let outcome = w
        .send_from("shop", "credits.purchase.completed", data)
        .await;
    applied(outcome, &format!("purchase {purchase_id}"));
}

/// Three accounts, five of whose owners act; purchases with and without a
/// price; manual and automatic redemptions, an approval, a denial, a refund,
/// a rejection, a sweep that expires a lot, a pending hold, and account
/// changes for the audit trail.
async fn build_ledger<S: Store>(w: &mut World<S>) {
    w.now = ts(T0);
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme", "name": "Acme Corp",
                "owners": [{"email": BOSS, "name": "Bo Boss"}, {"email": CFO, "name": "Cy Cfo"}],
                "approval_mode": "manual", "code": "ACME-0001", "notes": "Key account",
            }),
        )
        .await;
    applied(opened, "acme opened");
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "globex", "name": "Globex",
                "owners": [{"email": OPS, "name": "Op Ops"}, {"email": HR, "name": "Hu Res"}],
                "approval_mode": "automatic", "code": "GLOBEX-01",
            }),
        )
        .await;
    applied(opened, "globex opened");
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "initech", "name": "Initech",
                "owners": [{"email": IT, "name": "Ito Tech"}],
                "approval_mode": "automatic", "code": "INITECH-01",
            }),
        )
        .await;
    applied(opened, "initech opened");

    w.now = ts(T1);
    buy(w, "acme", "p1", "100", Some("95.00"), None).await;
    buy(w, "acme", "p2", "50", None, Some("2026-03-01T00:00:00Z")).await;
    buy(
        w,
        "globex",
        "g1",
        "200",
        Some("180"),
        Some("2026-02-01T00:00:00Z"),
    )
    .await;

    w.now = ts(T2);
    applied(w.request("r1", "ACME-0001", "l1", "c1", "20").await, "r1");
    applied(w.approve("r1", BOSS).await, "r1 approved");
    applied(w.request("r2", "acme 0001", "l2", "c2", "60").await, "r2");
    applied(w.deny("r2", CFO).await, "r2 denied");
    applied(w.request("r3", "GLOBEX-01", "l3", "c3", "50").await, "r3");
    applied(w.request("r4", "GLOBEX-01", "l4", "c4", "30").await, "r4");

    w.now = ts(T3);
    applied(w.unenroll("r3").await, "r3 unenrolled");
    buy(w, "globex", "g2", "300", None, None).await;
    assert_eq!(
        w.request("r5", "NOPE-0000", "l5", "c5", "10").await,
        Outcome::Rejected(Rejection::InvalidCode)
    );
    let updated = w
        .send(
            "credits.account.updated",
            json!({"account_id": "acme", "actor": BOSS, "name": "Acme Corporation", "low_balance_threshold": "10"}),
        )
        .await;
    applied(updated, "acme updated");
    let updated = w
        .send(
            "credits.account.updated",
            json!({"account_id": "globex", "actor": OPS, "approval_mode": "manual"}),
        )
        .await;
    applied(updated, "globex updated");
    let added = w
        .send(
            "credits.account.owner_added",
            json!({"account_id": "initech", "actor": IT, "owner": {"email": PM, "name": "Pat PM"}}),
        )
        .await;
    applied(added, "initech owner added");

    w.now = ts(T4);
    w.sweep().await;
    applied(w.request("r6", "ACME-0001", "l6", "c6", "5").await, "r6");
    w.verify_ok().await;
}

/// Every journal entry, as the transactions report must show it (texts
/// before neutralisation), oldest first: at, account_id, entry, amount,
/// balance_after, purchase_id, request_id, learner_email, item_title, actor.
#[rustfmt::skip]
fn expected_transactions() -> Vec<Vec<&'static str>> {
    const L1: &str = "l1@learners.test";
    const L2: &str = "l2@learners.test";
    const L3: &str = "l3@learners.test";
    const L4: &str = "l4@learners.test";
    const L6: &str = "l6@learners.test";
    vec![
        vec![T1, "acme",   "purchase", "100.00",  "100.00", "p1", "",   "", "",          "purchase"],
        vec![T1, "acme",   "purchase", "50.00",   "150.00", "p2", "",   "", "",          "purchase"],
        vec![T1, "globex", "purchase", "200.00",  "200.00", "g1", "",   "", "",          "purchase"],
        // r1: held on p2 (the soonest to expire), then approved.
        vec![T2, "acme",   "hold",     "0.00",    "150.00", "p2", "r1", L1, "Course c1", L1],
        vec![T2, "acme",   "redeem",   "-20.00",  "130.00", "p2", "r1", L1, "Course c1", BOSS],
        // r2: the 30 left of p2 and 30 of p1 held, then released by the denial.
        vec![T2, "acme",   "hold",     "0.00",    "130.00", "p2", "r2", L2, "Course c2", L2],
        vec![T2, "acme",   "hold",     "0.00",    "130.00", "p1", "r2", L2, "Course c2", L2],
        vec![T2, "acme",   "release",  "0.00",    "130.00", "p2", "r2", L2, "Course c2", CFO],
        vec![T2, "acme",   "release",  "0.00",    "130.00", "p1", "r2", L2, "Course c2", CFO],
        // Automatic: deducted at once.
        vec![T2, "globex", "redeem",   "-50.00",  "150.00", "g1", "r3", L3, "Course c3", L3],
        vec![T2, "globex", "redeem",   "-30.00",  "120.00", "g1", "r4", L4, "Course c4", L4],
        vec![T3, "globex", "refund",   "50.00",   "170.00", "g1", "r3", L3, "Course c3", "l3"],
        vec![T3, "globex", "purchase", "300.00",  "470.00", "g2", "",   "", "",          "purchase"],
        vec![T4, "globex", "expire",   "-170.00", "300.00", "g1", "",   "", "",          "system"],
        vec![T4, "acme",   "hold",     "0.00",    "130.00", "p2", "r6", L6, "Course c6", L6],
    ]
}

/// Every lot as of T4, in the report's order (account, then expiry):
/// account_id, account_name, owners, code, purchase_id, credits, price_paid,
/// remaining, held, expires_at, status, notes.
#[rustfmt::skip]
fn expected_credits() -> Vec<Vec<&'static str>> {
    const ACME: [&str; 4] = ["acme", "Acme Corporation", "boss@acme.test; cfo@acme.test", "ACME-0001"];
    const GLOBEX: [&str; 4] = ["globex", "Globex", "ops@globex.test; hr@globex.test", "GLOBEX-01"];
    let lot = |account: [&'static str; 4], rest: [&'static str; 8]| -> Vec<&'static str> {
        account.into_iter().chain(rest).collect()
    };
    vec![
        lot(ACME,   ["p2", "50.00",  "",           "30.00",  "5.00", "2026-03-01T00:00:00Z", "active",  "Key account"]),
        lot(ACME,   ["p1", "100.00", "95.00 USD",  "100.00", "0.00", "2027-01-02T09:00:00Z", "active",  "Key account"]),
        lot(GLOBEX, ["g1", "200.00", "180.00 USD", "0.00",   "0.00", "2026-02-01T00:00:00Z", "expired", ""]),
        lot(GLOBEX, ["g2", "300.00", "",           "300.00", "0.00", "2027-01-05T09:00:00Z", "active",  ""]),
    ]
}

/// Every redemption request, by request time then id: requested_at,
/// request_id, account_id, learner_email, item_id, item_title, cost, status,
/// decided_by, decided_at, refunded.
#[rustfmt::skip]
fn expected_redemptions() -> Vec<Vec<&'static str>> {
    vec![
        vec![T2, "r1", "acme",   "l1@learners.test", "c1", "Course c1", "20.00", "approved", BOSS,     T2, "0.00"],
        vec![T2, "r2", "acme",   "l2@learners.test", "c2", "Course c2", "60.00", "denied",   CFO,      T2, "0.00"],
        vec![T2, "r3", "globex", "l3@learners.test", "c3", "Course c3", "50.00", "refunded", "system", T2, "50.00"],
        vec![T2, "r4", "globex", "l4@learners.test", "c4", "Course c4", "30.00", "approved", "system", T2, "0.00"],
        vec![T3, "r5", "",       "l5@learners.test", "c5", "Course c5", "10.00", "rejected", "system", T3, "0.00"],
        vec![T4, "r6", "acme",   "l6@learners.test", "c6", "Course c6", "5.00",  "pending",  "",       "", "0.00"],
    ]
}

/// Every account as of T4: acme's p2 (5 held, 25 free) expires within 30
/// days; globex's g1 has expired. account_id, account_name, status, balance,
/// held, available, expiring_30d, owners.
#[rustfmt::skip]
fn expected_balances() -> Vec<Vec<&'static str>> {
    vec![
        vec!["acme",    "Acme Corporation", "active", "130.00", "5.00", "125.00", "25.00", "boss@acme.test; cfo@acme.test"],
        vec!["globex",  "Globex",           "active", "300.00", "0.00", "300.00", "0.00",  "ops@globex.test; hr@globex.test"],
        vec!["initech", "Initech",          "active", "0.00",   "0.00", "0.00",   "0.00",  "it@initech.test; pm@initech.test"],
    ]
}

/// Every account change, oldest first: at, account_id, actor, field, old,
/// new.
#[rustfmt::skip]
fn expected_audit() -> Vec<Vec<&'static str>> {
    vec![
        vec![T0, "acme",    BOSS, "status",                "",                    "active"],
        vec![T0, "globex",  OPS,  "status",                "",                    "active"],
        vec![T0, "initech", IT,   "status",                "",                    "active"],
        vec![T3, "acme",    BOSS, "name",                  "Acme Corp",           "Acme Corporation"],
        vec![T3, "acme",    BOSS, "low_balance_threshold", "",                    "10.00"],
        vec![T3, "globex",  OPS,  "approval_mode",         "automatic",           "manual"],
        vec![T3, "initech", IT,   "owners",                r#"["it@initech.test"]"#, r#"["it@initech.test","pm@initech.test"]"#],
    ]
}

fn expected(kind: ReportKind) -> Vec<Vec<&'static str>> {
    match kind {
        ReportKind::Transactions => expected_transactions(),
        ReportKind::Credits => expected_credits(),
        ReportKind::Redemptions => expected_redemptions(),
        ReportKind::Balances => expected_balances(),
        ReportKind::Audit => expected_audit(),
    }
}

const KINDS: [ReportKind; 5] = [
    ReportKind::Transactions,
    ReportKind::Credits,
    ReportKind::Redemptions,
    ReportKind::Balances,
    ReportKind::Audit,
];

/// The columns of SPEC §8, copied from the specification.
#[rustfmt::skip]
fn spec_columns(kind: ReportKind) -> &'static [&'static str] {
    match kind {
        ReportKind::Transactions => &[
            "at", "account_id", "entry", "amount", "balance_after", "purchase_id", "request_id",
            "learner_email", "item_title", "actor",
        ],
        ReportKind::Credits => &[
            "account_id", "account_name", "owners", "code", "purchase_id", "credits", "price_paid",
            "remaining", "held", "expires_at", "status", "notes",
        ],
        ReportKind::Redemptions => &[
            "requested_at", "request_id", "account_id", "learner_email", "item_id", "item_title",
            "cost", "status", "decided_by", "decided_at", "refunded",
        ],
        ReportKind::Balances => &[
            "account_id", "account_name", "status", "balance", "held", "available", "expiring_30d",
            "owners",
        ],
        ReportKind::Audit => &["at", "account_id", "actor", "field", "old", "new"],
    }
}

// ---------------------------------------------------------------------------
// What a cell must look like.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Amount,
    Instant,
    Text,
}

fn column_kind(column: &str) -> Kind {
    match column {
        "amount" | "balance_after" | "credits" | "remaining" | "held" | "cost" | "refunded"
        | "balance" | "available" | "expiring_30d" => Kind::Amount,
        "at" | "expires_at" | "requested_at" | "decided_at" => Kind::Instant,
        _ => Kind::Text,
    }
}

/// SPEC §8: a text cell starting with `= + - @`, tab or CR gets a `'`.
fn neutralised(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// How a cell of `column` holding `value` must read in CSV.
fn csv_cell(column: &str, value: &str) -> String {
    match column_kind(column) {
        Kind::Amount => {
            assert!(
                is_two_decimal_number(value),
                "the test expects {column} = {value:?} as a plain two-decimal number"
            );
            value.to_owned()
        }
        Kind::Instant => value.to_owned(),
        Kind::Text => neutralised(value),
    }
}

fn is_two_decimal_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    match digits.split_once('.') {
        Some((whole, cents)) => {
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && cents.len() == 2
                && cents.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// The expected CSV rows (header first) of full `rows` cut to `columns`.
fn csv_expected(kind: ReportKind, columns: &[&str], rows: &[Vec<&str>]) -> Vec<Vec<String>> {
    let all = spec_columns(kind);
    let positions: Vec<usize> = columns
        .iter()
        .map(|c| {
            all.iter()
                .position(|a| a == c)
                .expect("a column of the kind")
        })
        .collect();
    let mut out = vec![columns.iter().map(|c| (*c).to_owned()).collect()];
    for row in rows {
        assert_eq!(row.len(), all.len(), "a full expected row of {kind:?}");
        out.push(
            positions
                .iter()
                .map(|&i| csv_cell(all[i], row[i]))
                .collect(),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Writing and reading reports.

pub(crate) struct Filter<'a> {
    account: Option<&'a str>,
    from: Option<&'a str>,
    to: Option<&'a str>,
}

pub(crate) const EVERYTHING: Filter<'static> = Filter {
    account: None,
    from: None,
    to: None,
};

fn query(kind: ReportKind, filter: &Filter<'_>, now: Ts) -> ReportQuery {
    ReportQuery {
        kind,
        account: filter.account.map(id),
        from: filter.from.map(ts),
        to: filter.to.map(ts),
        now,
    }
}

/// Writes a report of `kind` to a file in `dir` and returns its path and how
/// many rows `write` says it wrote.
async fn write_report<S: Store>(
    w: &World<S>,
    dir: &Path,
    kind: ReportKind,
    format: ReportFormat,
    filter: &Filter<'_>,
    columns: Option<&[&str]>,
) -> (PathBuf, u64) {
    let requested: Option<Vec<String>> =
        columns.map(|c| c.iter().map(|s| (*s).to_owned()).collect());
    let chosen = choose_columns(kind, requested.as_deref()).expect("known columns");
    let extension = match format {
        ReportFormat::Csv => "csv",
        ReportFormat::Xlsx => "xlsx",
    };
    let path = dir.join(format!(
        "{kind:?}-{}.{extension}",
        uuid::Uuid::new_v4().simple()
    ));
    let rows = write(
        w.store(),
        &query(kind, filter, w.now),
        format,
        &chosen,
        &path,
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("the {kind:?} report is written: {e}"));
    (path, rows)
}

/// Every record of a CSV text, the header included, checking RFC 4180 line
/// ends.
fn csv_records(text: &str) -> Vec<Vec<String>> {
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "CSV lines end with CRLF: {text:?}"
    );
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(false)
        .from_reader(text.as_bytes());
    reader
        .records()
        .map(|r| r.expect("a CSV record").iter().map(str::to_owned).collect())
        .collect()
}

pub(crate) async fn csv_report<S: Store>(
    w: &World<S>,
    dir: &Path,
    kind: ReportKind,
    filter: &Filter<'_>,
    columns: Option<&[&str]>,
) -> (String, Vec<Vec<String>>, u64) {
    let (path, rows) = write_report(w, dir, kind, ReportFormat::Csv, filter, columns).await;
    let text = std::fs::read_to_string(&path).expect("the CSV is UTF-8");
    let records = csv_records(&text);
    (text, records, rows)
}

/// The header and rows of the only worksheet of an XLSX workbook, with the
/// formulas it holds (there must be none).
fn xlsx_sheet<R: std::io::Read + std::io::Seek>(
    mut workbook: Xlsx<R>,
    sheet: &str,
) -> Vec<Vec<Data>> {
    assert_eq!(
        workbook.sheet_names(),
        vec![sheet.to_owned()],
        "one worksheet"
    );
    let range = workbook
        .worksheet_range(sheet)
        .expect("the worksheet reads");
    let formulas = workbook
        .worksheet_formula(sheet)
        .expect("the formulas read");
    let found: Vec<String> = formulas
        .used_cells()
        .filter(|(_, _, f)| !f.is_empty())
        .map(|(r, c, f)| format!("({r},{c}) {f}"))
        .collect();
    assert!(found.is_empty(), "the workbook holds formulas: {found:?}");
    range.rows().map(<[Data]>::to_vec).collect()
}

fn xlsx_file(path: &Path, sheet: &str) -> Vec<Vec<Data>> {
    let workbook: Xlsx<_> = calamine::open_workbook(path).expect("calamine opens the workbook");
    xlsx_sheet(workbook, sheet)
}

fn xlsx_bytes(bytes: &[u8], sheet: &str) -> Vec<Vec<Data>> {
    let workbook =
        Xlsx::new(std::io::Cursor::new(bytes.to_vec())).expect("calamine opens the workbook");
    xlsx_sheet(workbook, sheet)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of an Excel date cell.
fn excel_instant(cell: &Data) -> Option<String> {
    match cell {
        Data::DateTime(dt) if dt.is_datetime() => {
            let (y, mo, d, h, mi, s, ms) = dt.to_ymd_hms_milli();
            assert_eq!(ms, 0, "whole seconds in the test ledger");
            Some(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"))
        }
        _ => None,
    }
}

/// Checks one XLSX cell against the expected (un-neutralised) value:
/// amounts are numbers, instants dates, texts strings with the exact
/// original text, missing values empty cells.
fn assert_xlsx_cell(column: &str, expected: &str, cell: &Data, at: &str) {
    if expected.is_empty() {
        assert_eq!(cell, &Data::Empty, "{at}: {column} is an empty cell");
        return;
    }
    match column_kind(column) {
        Kind::Amount => match cell {
            Data::Float(number) => {
                assert_eq!(format!("{number:.2}"), expected, "{at}: {column}");
            }
            Data::Int(number) => {
                assert_eq!(format!("{number}.00"), expected, "{at}: {column}");
            }
            other => panic!("{at}: {column} is a number, not {other:?}"),
        },
        Kind::Instant => {
            let instant = excel_instant(cell)
                .unwrap_or_else(|| panic!("{at}: {column} is a date, not {cell:?}"));
            assert_eq!(instant, expected, "{at}: {column}");
        }
        Kind::Text => {
            assert_eq!(
                cell,
                &Data::String(expected.to_owned()),
                "{at}: {column} is the exact text, as a string"
            );
        }
    }
}

/// Checks a worksheet (header first) against full expected `rows` cut to
/// `columns`.
fn assert_xlsx_rows(kind: ReportKind, columns: &[&str], sheet: &[Vec<Data>], rows: &[Vec<&str>]) {
    let all = spec_columns(kind);
    assert_eq!(
        sheet.len(),
        rows.len() + 1,
        "{kind:?}: header and one row per line"
    );
    let header: Vec<Data> = columns
        .iter()
        .map(|c| Data::String((*c).to_owned()))
        .collect();
    assert_eq!(sheet[0], header, "{kind:?}: the header");
    for (n, (row, cells)) in rows.iter().zip(&sheet[1..]).enumerate() {
        assert_eq!(cells.len(), columns.len(), "{kind:?} row {n}: width");
        for (column, cell) in columns.iter().zip(cells) {
            let i = all.iter().position(|a| a == column).expect("a column");
            assert_xlsx_cell(column, row[i], cell, &format!("{kind:?} row {n}"));
        }
    }
}

// ---------------------------------------------------------------------------
// Row for row, through the library, on both backends.

async fn every_report_kind_in_csv_matches_the_ledger_row_for_row<S: Store>(mut w: World<S>) {
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    for kind in KINDS {
        let (text, records, rows) = csv_report(&w, dir.path(), kind, &EVERYTHING, None).await;
        let header = spec_columns(kind).join(",");
        assert!(
            text.starts_with(&format!("{header}\r\n")),
            "{kind:?}: the header is exactly the SPEC list in order, got {:?}",
            text.lines().next()
        );
        assert_eq!(
            kind.columns(),
            spec_columns(kind),
            "{kind:?}: the default columns"
        );
        let wanted = csv_expected(kind, spec_columns(kind), &expected(kind));
        assert_eq!(records, wanted, "{kind:?} rows");
        assert_eq!(rows, (wanted.len() - 1) as u64, "{kind:?}: rows written");
    }
}

/// The hand-made expectations agree with the ledger itself: the journal
/// (entry, lot, request, amount, actor, with each account's balance run
/// along it) and each account's balances.
async fn the_expected_rows_agree_with_the_journal_and_the_accounts<S: Store>(mut w: World<S>) {
    build_ledger(&mut w).await;
    let journal = w.journal().await;
    let transactions = expected_transactions();
    assert_eq!(
        journal.len(),
        transactions.len(),
        "one row per journal entry"
    );
    let mut running: std::collections::HashMap<String, Credits> = Default::default();
    for (line, row) in journal.iter().zip(&transactions) {
        let account = line["account_id"].as_str().expect("an account");
        let amount: Credits = line["amount"]
            .as_str()
            .expect("an amount")
            .parse()
            .expect("cents");
        // Every lot that expired was swept before anything else happened to
        // its account, so the balance is the running sum of the amounts.
        let balance = running.entry(account.to_owned()).or_default();
        *balance += amount;
        assert_eq!(row[1], account);
        assert_eq!(row[2], line["entry"]);
        assert_eq!(row[3], line["amount"]);
        assert_eq!(row[4], balance.to_string(), "balance_after of {line}");
        assert_eq!(row[5], line["purchase_id"]);
        assert_eq!(row[6], line["request_id"].as_str().unwrap_or_default());
        assert_eq!(row[9], line["actor"]);
    }
    for row in expected_balances() {
        let balances = w.account(row[0]).await.balances_at(w.now);
        assert_eq!(row[3], balances.balance.to_string(), "{} balance", row[0]);
        assert_eq!(row[4], balances.held.to_string(), "{} held", row[0]);
        assert_eq!(
            row[5],
            balances.available.to_string(),
            "{} available",
            row[0]
        );
    }
    for row in expected_redemptions() {
        let request = w.find_request(row[1]).await.expect("the request exists");
        assert_eq!(row[7], request.status.as_str(), "{} status", row[1]);
        assert_eq!(row[10], request.refunded.to_string(), "{} refunded", row[1]);
    }
    for row in expected_credits() {
        let (remaining, held) = w.lot(row[0], row[4]).await;
        assert_eq!(
            (row[7], row[8]),
            (remaining.as_str(), held.as_str()),
            "{}",
            row[4]
        );
    }
}

fn filter<'a>(account: Option<&'a str>, from: Option<&'a str>, to: Option<&'a str>) -> Filter<'a> {
    Filter { account, from, to }
}

/// The expected rows of `kind` that `keep` keeps.
fn pick(kind: ReportKind, keep: impl Fn(&[&str]) -> bool) -> Vec<Vec<&'static str>> {
    expected(kind).into_iter().filter(|r| keep(r)).collect()
}

async fn the_account_and_period_filters_keep_only_the_matching_rows<S: Store>(mut w: World<S>) {
    use ReportKind::{Audit, Balances, Credits, Redemptions, Transactions};
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    let cases: Vec<(ReportKind, Filter<'_>, Vec<Vec<&str>>)> = vec![
        (
            Transactions,
            filter(Some("globex"), None, None),
            pick(Transactions, |r| r[1] == "globex"),
        ),
        // `from` is inclusive, `to` exclusive: T2 is in, T3 is out.
        (
            Transactions,
            filter(None, Some(T2), Some(T3)),
            pick(Transactions, |r| r[0] == T2),
        ),
        (
            Transactions,
            filter(Some("acme"), Some(T2), Some(T4)),
            pick(Transactions, |r| r[1] == "acme" && r[0] == T2),
        ),
        (
            Transactions,
            filter(None, Some(T4), None),
            pick(Transactions, |r| r[0] == T4),
        ),
        // An account without a journal entry: the header alone.
        (
            Transactions,
            filter(Some("initech"), None, None),
            Vec::new(),
        ),
        // Lots by purchase time: g2 was bought at T3, the others at T1.
        (
            Credits,
            filter(None, Some(T3), None),
            pick(Credits, |r| r[4] == "g2"),
        ),
        (
            Credits,
            filter(None, None, Some(T3)),
            pick(Credits, |r| r[4] != "g2"),
        ),
        (
            Credits,
            filter(Some("acme"), None, None),
            pick(Credits, |r| r[0] == "acme"),
        ),
        (
            Redemptions,
            filter(Some("acme"), None, None),
            pick(Redemptions, |r| r[2] == "acme"),
        ),
        (
            Redemptions,
            filter(None, Some(T3), Some(T4)),
            pick(Redemptions, |r| r[0] == T3),
        ),
        (
            Balances,
            filter(Some("globex"), None, None),
            pick(Balances, |r| r[0] == "globex"),
        ),
        (
            Audit,
            filter(Some("initech"), None, None),
            pick(Audit, |r| r[1] == "initech"),
        ),
        (
            Audit,
            filter(None, Some(T1), None),
            pick(Audit, |r| r[0] == T3),
        ),
        (
            Audit,
            filter(Some("acme"), Some(T0), Some(T1)),
            pick(Audit, |r| r[1] == "acme" && r[0] == T0),
        ),
    ];
    for (kind, filter, rows) in cases {
        let what = format!(
            "{kind:?} account={:?} from={:?} to={:?}",
            filter.account, filter.from, filter.to
        );
        assert!(
            !rows.is_empty() || filter.account == Some("initech"),
            "{what}: the case selects something"
        );
        let (_, records, written) = csv_report(&w, dir.path(), kind, &filter, None).await;
        assert_eq!(
            records,
            csv_expected(kind, spec_columns(kind), &rows),
            "{what}"
        );
        assert_eq!(written, rows.len() as u64, "{what}: rows written");
    }
}

async fn every_report_kind_in_xlsx_holds_numbers_dates_and_exact_texts<S: Store>(mut w: World<S>) {
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    for kind in KINDS {
        let (path, rows) =
            write_report(&w, dir.path(), kind, ReportFormat::Xlsx, &EVERYTHING, None).await;
        let name = format!("{kind:?}").to_lowercase();
        let sheet = xlsx_file(&path, &name);
        assert_xlsx_rows(kind, spec_columns(kind), &sheet, &expected(kind));
        assert_eq!(rows, expected(kind).len() as u64, "{kind:?}: rows written");
    }
}

// ---------------------------------------------------------------------------
// Choosing columns.

async fn chosen_columns_come_in_the_order_asked_and_an_unknown_one_is_refused<S: Store>(
    mut w: World<S>,
) {
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    let cases: [(ReportKind, &[&str]); 6] = [
        (ReportKind::Transactions, &["amount", "at"]),
        (
            ReportKind::Transactions,
            &["actor", "entry", "amount", "account_id"],
        ),
        (
            ReportKind::Credits,
            &["status", "purchase_id", "price_paid"],
        ),
        (
            ReportKind::Redemptions,
            &["cost", "request_id", "decided_at"],
        ),
        (ReportKind::Balances, &["available", "account_id"]),
        (ReportKind::Audit, &["new", "old", "field"]),
    ];
    for (kind, columns) in cases {
        let (text, records, _) = csv_report(&w, dir.path(), kind, &EVERYTHING, Some(columns)).await;
        assert!(
            text.starts_with(&format!("{}\r\n", columns.join(","))),
            "{kind:?} {columns:?}: header {:?}",
            text.lines().next()
        );
        assert_eq!(
            records,
            csv_expected(kind, columns, &expected(kind)),
            "{kind:?} {columns:?}"
        );

        let (path, _) = write_report(
            &w,
            dir.path(),
            kind,
            ReportFormat::Xlsx,
            &EVERYTHING,
            Some(columns),
        )
        .await;
        let sheet = xlsx_file(&path, &format!("{kind:?}").to_lowercase());
        assert_xlsx_rows(kind, columns, &sheet, &expected(kind));
    }

    assert_eq!(
        choose_columns(
            ReportKind::Transactions,
            Some(&["amount".to_owned(), "at".to_owned()])
        )
        .expect("known columns"),
        vec![3, 0]
    );
    assert_eq!(
        choose_columns(ReportKind::Audit, None).expect("every column"),
        (0..6).collect::<Vec<_>>()
    );
    for (kind, bad) in [
        (ReportKind::Transactions, "bogus"),
        // A column of another kind is no column of this one.
        (ReportKind::Balances, "amount"),
        (ReportKind::Credits, "Status"),
        (ReportKind::Audit, ""),
    ] {
        let requested = vec!["account_id".to_owned(), bad.to_owned()];
        match choose_columns(kind, Some(&requested)) {
            Err(ReportError::UnknownColumn(name)) => assert_eq!(name, bad),
            other => panic!("{kind:?} {bad:?} is refused, not {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Formula injection.

/// Texts a spreadsheet would run, or that start with a character it treats
/// specially.
const HOSTILE_NAME: &str = "=HYPERLINK(\"http://evil.test\",\"click\")";
const HOSTILE_NOTES: &str = "+cmd|' /C calc'!A0";
const HOSTILE_NOTES_LATER: &str = "=2*3";
const HOSTILE_TITLES: [&str; 7] = [
    "\tTabbed",
    "\rCarriage return",
    "-2+3",
    "@SUM(A1:A9)",
    "=1+1",
    "+1",
    "Plain title",
];

/// One account whose every text can be hostile: its id, name, code, notes,
/// lot, and the ids and titles its learners send.
async fn build_hostile_ledger<S: Store>(w: &mut World<S>) {
    w.now = ts(T0);
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "-evil", "name": HOSTILE_NAME,
                "owners": [{"email": "mallory@evil.test", "name": "@Mallory"}],
                "approval_mode": "automatic", "code": "-EVIL-0001", "notes": HOSTILE_NOTES,
            }),
        )
        .await;
    applied(opened, "-evil opened");
    w.now = ts(T1);
    buy(
        w,
        "-evil",
        "-p1",
        "100",
        Some("99.99"),
        Some("2027-06-01T00:00:00Z"),
    )
    .await;
    w.now = ts(T2);
    for (n, title) in HOSTILE_TITLES.iter().enumerate() {
        let outcome = w
            .request_item(
                &format!("-r{n}"),
                "EVIL0001",
                &format!("-l{n}"),
                json!({"id": format!("-c{n}"), "kind": "course", "title": title}),
                &format!("{}.50", n + 1),
            )
            .await;
        applied(outcome, &format!("request for {title:?}"));
    }
    w.now = ts(T3);
    let updated = w
        .send(
            "credits.account.updated",
            json!({"account_id": "-evil", "actor": "mallory@evil.test", "notes": HOSTILE_NOTES_LATER}),
        )
        .await;
    applied(updated, "-evil updated");
    w.verify_ok().await;
}

/// The hostile ledger's rows per kind, texts as they were sent.
fn hostile_rows(kind: ReportKind) -> Vec<Vec<String>> {
    let s = |t: &str| t.to_owned();
    let costs: Vec<Credits> = (0..HOSTILE_TITLES.len())
        .map(|n| format!("{}.50", n + 1).parse().expect("a cost"))
        .collect();
    let spent: Credits = costs.iter().copied().sum();
    let left = Credits::from_cents(10_000) - spent;
    match kind {
        ReportKind::Transactions => {
            let mut rows = vec![vec![
                s(T1),
                s("-evil"),
                s("purchase"),
                s("100.00"),
                s("100.00"),
                s("-p1"),
                s(""),
                s(""),
                s(""),
                s("purchase"),
            ]];
            let mut balance = Credits::from_cents(10_000);
            for (n, title) in HOSTILE_TITLES.iter().enumerate() {
                balance -= costs[n];
                let learner = format!("-l{n}@learners.test");
                rows.push(vec![
                    s(T2),
                    s("-evil"),
                    s("redeem"),
                    (-costs[n]).to_string(),
                    balance.to_string(),
                    s("-p1"),
                    format!("-r{n}"),
                    learner.clone(),
                    s(title),
                    learner,
                ]);
            }
            rows
        }
        ReportKind::Credits => vec![vec![
            s("-evil"),
            s(HOSTILE_NAME),
            s("mallory@evil.test"),
            s("-EVIL-0001"),
            s("-p1"),
            s("100.00"),
            s("99.99 USD"),
            left.to_string(),
            s("0.00"),
            s("2027-06-01T00:00:00Z"),
            s("active"),
            s(HOSTILE_NOTES_LATER),
        ]],
        ReportKind::Redemptions => HOSTILE_TITLES
            .iter()
            .enumerate()
            .map(|(n, title)| {
                vec![
                    s(T2),
                    format!("-r{n}"),
                    s("-evil"),
                    format!("-l{n}@learners.test"),
                    format!("-c{n}"),
                    s(title),
                    costs[n].to_string(),
                    s("approved"),
                    s("system"),
                    s(T2),
                    s("0.00"),
                ]
            })
            .collect(),
        ReportKind::Balances => vec![vec![
            s("-evil"),
            s(HOSTILE_NAME),
            s("active"),
            left.to_string(),
            s("0.00"),
            left.to_string(),
            s("0.00"),
            s("mallory@evil.test"),
        ]],
        ReportKind::Audit => vec![
            vec![
                s(T0),
                s("-evil"),
                s("mallory@evil.test"),
                s("status"),
                s(""),
                s("active"),
            ],
            vec![
                s(T3),
                s("-evil"),
                s("mallory@evil.test"),
                s("notes"),
                s(HOSTILE_NOTES),
                s(HOSTILE_NOTES_LATER),
            ],
        ],
    }
}

fn borrowed(rows: &[Vec<String>]) -> Vec<Vec<&str>> {
    rows.iter()
        .map(|r| r.iter().map(String::as_str).collect())
        .collect()
}

async fn hostile_texts_are_quoted_in_csv_and_plain_strings_in_xlsx_but_amounts_stay_numbers<
    S: Store,
>(
    mut w: World<S>,
) {
    build_hostile_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    for kind in KINDS {
        let rows = hostile_rows(kind);
        let rows = borrowed(&rows);
        let (_, records, _) = csv_report(&w, dir.path(), kind, &EVERYTHING, None).await;
        assert_eq!(
            records,
            csv_expected(kind, spec_columns(kind), &rows),
            "{kind:?} CSV"
        );

        let (path, _) =
            write_report(&w, dir.path(), kind, ReportFormat::Xlsx, &EVERYTHING, None).await;
        let sheet = xlsx_file(&path, &format!("{kind:?}").to_lowercase());
        assert_xlsx_rows(kind, spec_columns(kind), &sheet, &rows);
    }

    // Spelled out once, on the raw text: every hostile text gets its quote,
    // a negative amount does not.
    let (text, records, _) =
        csv_report(&w, dir.path(), ReportKind::Transactions, &EVERYTHING, None).await;
    for title in HOSTILE_TITLES {
        let quoted = if title.starts_with("Plain") {
            title.to_owned()
        } else {
            format!("'{title}")
        };
        assert!(
            records.iter().any(|r| r[8] == quoted),
            "{title:?} appears as {quoted:?}"
        );
    }
    assert!(
        records[1..]
            .iter()
            .all(|r| r[1] == "'-evil" && r[5] == "'-p1")
    );
    assert_eq!(
        records[2][3], "-1.50",
        "a negative amount is a plain number"
    );
    assert!(!text.contains("'-1.50"), "no amount is quoted");
}

/// How many UTF-16 code units Excel counts in a text.
fn excel_length(text: &str) -> usize {
    text.encode_utf16().count()
}

/// Excel's limit on the text of one cell, in UTF-16 code units.
const EXCEL_CELL_TEXT_MAX: usize = 32_767;

async fn a_text_longer_than_an_excel_cell_holds_is_cut_to_fit_in_xlsx_and_kept_whole_in_csv<
    S: Store,
>(
    mut w: World<S>,
) {
    // Within the contract (65,536 characters), beyond Excel's 32,767 UTF-16
    // units per cell; each emoji is two units, so the cut falls between
    // them, never inside one.
    let notes = format!("={}", "😀".repeat(20_000));
    let name = "n".repeat(40_000);
    w.now = ts(T0);
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "verbose", "name": name,
                "owners": [{"email": "talker@verbose.test", "name": "Talker"}],
                "approval_mode": "automatic", "code": "VERBOSE-1", "notes": notes,
            }),
        )
        .await;
    applied(opened, "verbose opened");
    w.now = ts(T1);
    buy(
        &mut w,
        "verbose",
        "v1",
        "10",
        None,
        Some("2099-01-01T00:00:00Z"),
    )
    .await;
    let dir = tempfile::tempdir().expect("a folder");

    let (_, records, _) = csv_report(&w, dir.path(), ReportKind::Credits, &EVERYTHING, None).await;
    assert_eq!(records.len(), 2, "header and the lot");
    assert_eq!(records[1][1], name, "CSV keeps the whole name");
    assert_eq!(
        records[1][11],
        format!("'{notes}"),
        "CSV keeps the whole notes"
    );

    let (path, rows) = write_report(
        &w,
        dir.path(),
        ReportKind::Credits,
        ReportFormat::Xlsx,
        &EVERYTHING,
        None,
    )
    .await;
    assert_eq!(rows, 1);
    let sheet = xlsx_file(&path, "credits");
    let Data::String(cut_name) = &sheet[1][1] else {
        panic!("the name is a string: {:?}", sheet[1][1]);
    };
    assert_eq!(cut_name, &name[..EXCEL_CELL_TEXT_MAX]);
    let Data::String(cut_notes) = &sheet[1][11] else {
        panic!("the notes are a string: {:?}", sheet[1][11]);
    };
    assert_eq!(excel_length(cut_notes), EXCEL_CELL_TEXT_MAX);
    assert!(
        notes.starts_with(cut_notes.as_str()),
        "a prefix of the notes"
    );
    // The other cells are whole.
    assert_eq!(sheet[1][4], Data::String("v1".to_owned()));
    assert_eq!(sheet[1][5], Data::Float(10.0));
}

on_both_backends!(
    every_report_kind_in_csv_matches_the_ledger_row_for_row,
    the_expected_rows_agree_with_the_journal_and_the_accounts,
    the_account_and_period_filters_keep_only_the_matching_rows,
    every_report_kind_in_xlsx_holds_numbers_dates_and_exact_texts,
    chosen_columns_come_in_the_order_asked_and_an_unknown_one_is_refused,
    hostile_texts_are_quoted_in_csv_and_plain_strings_in_xlsx_but_amounts_stay_numbers,
    a_text_longer_than_an_excel_cell_holds_is_cut_to_fit_in_xlsx_and_kept_whole_in_csv,
    the_report_command_writes_chosen_credit_columns_to_xlsx,
    the_report_command_writes_one_account_s_transactions_of_a_period_to_csv,
);

// ---------------------------------------------------------------------------
// The `report` command on the real binary.

struct Run {
    code: Option<i32>,
    stderr: String,
}

/// Runs `training-credits ARGS` on the ledger at `url`, in a folder of its
/// own.
async fn binary(url: &str, args: &[&str]) -> Run {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let folder = tempfile::tempdir().expect("a working folder");
        let mut command = Command::new(common::BINARY);
        command.args(&args).current_dir(folder.path());
        for variable in common::contract_variables() {
            command.env_remove(variable);
        }
        command.env("DATABASE_URL", url);
        let output = command.output().expect("the binary runs");
        Run {
            code: output.status.code(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("the run finishes")
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

async fn the_report_command_writes_chosen_credit_columns_to_xlsx<S: Store>(mut w: World<S>) {
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    let out = dir.path().join("credits.xlsx");
    let columns = [
        "purchase_id",
        "account_id",
        "remaining",
        "held",
        "expires_at",
        "status",
        "price_paid",
    ];
    let run = binary(
        &w.url,
        &[
            "report",
            "credits",
            "--format",
            "xlsx",
            "--out",
            &path_arg(&out),
            "--columns",
            &columns.join(","),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "report credits: {}", run.stderr);
    // The command reports as of the real clock: a lot's status follows it.
    let now = Ts::now();
    let rows: Vec<Vec<String>> = expected_credits()
        .into_iter()
        .map(|row| {
            let mut row: Vec<String> = row.into_iter().map(str::to_owned).collect();
            row[10] = if ts(&row[9]) <= now {
                "expired"
            } else {
                "active"
            }
            .to_owned();
            row
        })
        .collect();
    let sheet = xlsx_file(&out, "credits");
    assert_xlsx_rows(ReportKind::Credits, &columns, &sheet, &borrowed(&rows));
}

async fn the_report_command_writes_one_account_s_transactions_of_a_period_to_csv<S: Store>(
    mut w: World<S>,
) {
    build_ledger(&mut w).await;
    let dir = tempfile::tempdir().expect("a folder");
    let out = dir.path().join("acme.csv");
    let run = binary(
        &w.url,
        &[
            "report",
            "transactions",
            "--format",
            "csv",
            "--out",
            &path_arg(&out),
            "--account",
            "acme",
            "--from",
            T2,
            "--to",
            "2026-02-02T10:00:00+01:00",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "report transactions: {}", run.stderr);
    let text = std::fs::read_to_string(&out).expect("the CSV is written");
    let rows: Vec<Vec<&str>> = expected_transactions()
        .into_iter()
        .filter(|r| r[1] == "acme" && r[0] == T2)
        .collect();
    assert_eq!(rows.len(), 6, "r1 and r2 moved acme's lots at T2");
    let kind = ReportKind::Transactions;
    assert_eq!(
        csv_records(&text),
        csv_expected(kind, spec_columns(kind), &rows)
    );

    // Without filters: every entry of every account.
    let all = dir.path().join("all.csv");
    let run = binary(
        &w.url,
        &[
            "report",
            "transactions",
            "--format",
            "csv",
            "--out",
            &path_arg(&all),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "report transactions: {}", run.stderr);
    let text = std::fs::read_to_string(&all).expect("the CSV is written");
    assert_eq!(
        csv_records(&text),
        csv_expected(kind, spec_columns(kind), &expected_transactions())
    );
}

// ---------------------------------------------------------------------------
// Requested reports, through the worker.

/// One file attached to a received email.
struct Attached {
    to: String,
    filename: String,
    content_type: String,
    bytes: Vec<u8>,
}

fn attachments(smtp: &SmtpSink) -> Vec<Attached> {
    let mut found = Vec::new();
    for raw in smtp.received() {
        let message = mail_parser::MessageParser::default()
            .parse(raw.as_bytes())
            .expect("a MIME message");
        let to = message
            .to()
            .and_then(|to| to.first())
            .and_then(|address| address.address())
            .unwrap_or_default()
            .to_owned();
        for part in message.attachments() {
            let content_type = part
                .content_type()
                .map(|t| format!("{}/{}", t.ctype(), t.subtype().unwrap_or_default()))
                .unwrap_or_default();
            found.push(Attached {
                to: to.clone(),
                filename: part.attachment_name().unwrap_or_default().to_owned(),
                content_type,
                bytes: part.contents().to_vec(),
            });
        }
    }
    found
}

struct Running {
    _vhost: Vhost,
    smtp: SmtpSink,
    client: Client,
    worker: TestWorker,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start<S: Store>(store: S, url: &str) -> Running {
    let vhost = Vhost::new();
    let smtp = SmtpSink::start_new().await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let reports_dir = tempfile::tempdir().expect("a folder");
    let client = Client::new(&vhost).await;
    let mut settings = config(&vhost, url, Some(&smtp.url()), mail_dir.path());
    settings.reports_dir = reports_dir.path().to_owned();
    let worker = TestWorker::start(store, settings).await;
    Running {
        _vhost: vhost,
        smtp,
        client,
        worker,
        _dirs: (mail_dir, reports_dir),
    }
}

/// Opens `account_id` with two owners and buys two lots that expire long
/// after any run of the tests; waits until both are recorded.
async fn open_and_buy(client: &Client, account_id: &str, owners: [&str; 2], notes: &str) {
    client
        .publish(&event(
            &format!("open-{account_id}"),
            "portal",
            "credits.account.opened",
            json!({
                "account_id": account_id, "name": format!("{account_id} Ltd"),
                "owners": [{"email": owners[0], "name": "First"}, {"email": owners[1], "name": "Second"}],
                "approval_mode": "automatic", "code": format!("{account_id}-CODE"), "notes": notes,
            }),
        ))
        .await;
    for (purchase_id, credits, expires_at, price) in [
        (
            "lot-a",
            "100",
            "2099-01-01T00:00:00Z",
            json!({"amount": "95", "currency": "USD"}),
        ),
        ("lot-b", "50", "2098-06-01T00:00:00Z", Value::Null),
    ] {
        let mut data = json!({
            "account_id": account_id, "purchase_id": purchase_id, "credits": credits,
            "purchased_at": "2026-01-02T09:00:00Z", "expires_at": expires_at,
        });
        if !price.is_null() {
            data["price_paid"] = price;
        }
        client
            .publish(&event(
                &format!("buy-{account_id}-{purchase_id}"),
                "shop",
                "credits.purchase.completed",
                data,
            ))
            .await;
    }
}

async fn an_owner_s_requested_report_is_emailed_as_an_attachment_and_announced<S: Store>(
    store: S,
    url: String,
) {
    let running = start(store, &url).await;
    let client = &running.client;
    open_and_buy(client, "acme", [BOSS, CFO], "=1+1").await;
    client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;

    let request = event(
        "ask-credits",
        "portal",
        "credits.report.requested",
        json!({"report": "credits", "format": "csv", "recipient": CFO, "account_id": "acme"}),
    );
    client.publish(&request).await;
    let generated = client
        .await_outbound("training-credits.report.generated", 1)
        .await;
    assert_eq!(generated.len(), 1, "one announcement");
    let announced = &generated[0];
    assert_eq!(announced["subject"], "acme");
    assert_eq!(
        announced["data"],
        json!({
            "account_id": "acme", "causation_id": "ask-credits",
            "report": "credits", "format": "csv", "rows": 2, "recipient": CFO,
        })
    );

    eventually(Duration::from_secs(30), "the report email", || async {
        !attachments(&running.smtp).is_empty()
    })
    .await;
    let attached = attachments(&running.smtp);
    assert_eq!(attached.len(), 1, "one report sent");
    let report = &attached[0];
    assert_eq!(report.to, CFO, "sent to the recipient only");
    assert!(
        report.filename.starts_with("credits-acme-") && report.filename.ends_with(".csv"),
        "named after the report: {}",
        report.filename
    );
    assert_eq!(report.content_type, "text/csv");
    let text = String::from_utf8(report.bytes.clone()).expect("a UTF-8 CSV");
    let owners = format!("{BOSS}; {CFO}");
    let rows = vec![
        vec![
            "acme",
            "acme Ltd",
            &owners,
            "acme-CODE",
            "lot-b",
            "50.00",
            "",
            "50.00",
            "0.00",
            "2098-06-01T00:00:00Z",
            "active",
            "=1+1",
        ],
        vec![
            "acme",
            "acme Ltd",
            &owners,
            "acme-CODE",
            "lot-a",
            "100.00",
            "95.00 USD",
            "100.00",
            "0.00",
            "2099-01-01T00:00:00Z",
            "active",
            "=1+1",
        ],
    ];
    let kind = ReportKind::Credits;
    assert_eq!(
        csv_records(&text),
        csv_expected(kind, spec_columns(kind), &rows)
    );
    running.worker.stop().await;
}

async fn an_all_accounts_report_is_refused_to_a_non_staff_source_and_sent_to_staff<S: Store>(
    store: S,
    url: String,
) {
    let running = start(store, &url).await;
    let client = &running.client;
    open_and_buy(client, "acme", [BOSS, CFO], "").await;
    open_and_buy(client, "globex", [OPS, HR], "").await;
    client
        .await_outbound("training-credits.purchase.recorded", 4)
        .await;

    // From the portal, even on behalf of an owner: not staff.
    client
        .publish(&event(
            "ask-all-portal",
            "portal",
            "credits.report.requested",
            json!({"report": "balances", "format": "xlsx", "recipient": BOSS}),
        ))
        .await;
    let refused = client
        .await_outbound("training-credits.command.refused", 1)
        .await;
    assert_eq!(refused[0]["data"]["reason"], "not_staff");
    assert_eq!(refused[0]["data"]["command_id"], "ask-all-portal");
    assert_eq!(
        refused[0]["data"]["command_type"],
        "credits.report.requested"
    );

    // From staff: sent.
    client
        .publish(&event(
            "ask-all-staff",
            common::STAFF,
            "credits.report.requested",
            json!({"report": "balances", "format": "xlsx", "recipient": "auditor@staff.test"}),
        ))
        .await;
    let generated = client
        .await_outbound("training-credits.report.generated", 1)
        .await;
    assert_eq!(
        generated[0]["data"],
        json!({
            "account_id": null, "causation_id": "ask-all-staff",
            "report": "balances", "format": "xlsx", "rows": 2, "recipient": "auditor@staff.test",
        })
    );
    assert!(
        generated[0].get("subject").is_none(),
        "no subject for all accounts"
    );

    eventually(Duration::from_secs(30), "the report email", || async {
        !attachments(&running.smtp).is_empty()
    })
    .await;
    // The refused request came first: had it yielded a report, it would be
    // here by now.
    let attached = attachments(&running.smtp);
    assert_eq!(attached.len(), 1, "only the staff report is sent");
    let report = &attached[0];
    assert_eq!(report.to, "auditor@staff.test");
    assert!(
        report.filename.starts_with("balances-all-accounts-") && report.filename.ends_with(".xlsx"),
        "{}",
        report.filename
    );
    assert_eq!(
        report.content_type,
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    );
    let sheet = xlsx_bytes(&report.bytes, "balances");
    let (acme, globex) = (format!("{BOSS}; {CFO}"), format!("{OPS}; {HR}"));
    let rows = vec![
        vec![
            "acme",
            "acme Ltd",
            "active",
            "150.00",
            "0.00",
            "150.00",
            "0.00",
            acme.as_str(),
        ],
        vec![
            "globex",
            "globex Ltd",
            "active",
            "150.00",
            "0.00",
            "150.00",
            "0.00",
            globex.as_str(),
        ],
    ];
    let kind = ReportKind::Balances;
    assert_xlsx_rows(kind, spec_columns(kind), &sheet, &rows);
    assert_eq!(
        client
            .outbound_of("training-credits.report.generated")
            .len(),
        1,
        "only the staff report is announced"
    );
    running.worker.stop().await;
}

on_both_stores!(
    mod worker_on_sqlite, worker_on_postgres;
    an_owner_s_requested_report_is_emailed_as_an_attachment_and_announced,
    an_all_accounts_report_is_refused_to_a_non_staff_source_and_sent_to_staff,
);
