//! The command line (SPEC §3) as an operator runs it: the real binary, on a
//! SQLite file and on a PostgreSQL database, with its exit codes (0 success,
//! 1 failure with a one-line reason on stderr, 2 bad usage).

use crate::support as common;

use std::process::{Command, Output};

use common::{Keep, World, empty_pg_url, empty_sqlite_url, execute_sql, ts};
use serde_json::{Value, json};
use training_credits::domain::Outcome;
use training_credits::store::Store;

/// What one run of the binary gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
        }
    }

    fn assert_code(&self, code: i32, what: &str) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Exit 1 with one line on stderr that contains every word of `names`.
    fn assert_failure_naming(&self, names: &[&str], what: &str) {
        self.assert_code(1, what);
        let lines: Vec<&str> = self.stderr.trim().lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{what}: one line on stderr, got {:?}",
            self.stderr
        );
        for name in names {
            assert!(
                lines[0].contains(name),
                "{what}: stderr {:?} names {name}",
                lines[0]
            );
        }
    }

    /// Exit 2 with clap's usage message on stderr, naming `named`, and
    /// nothing on stdout.
    fn assert_bad_usage_naming(&self, named: &str, what: &str) {
        self.assert_code(2, what);
        assert!(
            self.stderr.starts_with("error: ") && self.stderr.contains("--help"),
            "{what}: a usage message on stderr, got {:?}",
            self.stderr
        );
        assert!(
            self.stderr.contains(named),
            "{what}: stderr {:?} names {named}",
            self.stderr
        );
        assert!(self.stdout.is_empty(), "{what}: stdout {:?}", self.stdout);
    }
}

/// Runs the binary with `args`, `DATABASE_URL` = `url` (if any) and `env`,
/// in a folder of its own (no `.env` file, nothing written elsewhere).
async fn run(url: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let url = url.map(str::to_owned);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let folder = tempfile::tempdir().expect("a working folder");
        let mut command = Command::new(common::BINARY);
        command.args(&args).current_dir(folder.path());
        for variable in common::contract_variables() {
            command.env_remove(variable);
        }
        if let Some(url) = url {
            command.env("DATABASE_URL", url);
        }
        command.envs(env);
        Run::from(command.output().expect("the binary runs"))
    })
    .await
    .expect("the run finishes")
}

async fn cli(url: &str, args: &[&str]) -> Run {
    run(Some(url), args, &[]).await
}

/// A fresh database without any schema yet.
struct Db {
    url: String,
    _keep: Keep,
}

impl Db {
    async fn sqlite() -> Db {
        let (url, keep) = empty_sqlite_url();
        Db { url, _keep: keep }
    }

    async fn postgres() -> Db {
        let (url, keep) = empty_pg_url().await;
        Db { url, _keep: keep }
    }
}

/// Runs each named `async fn NAME(db: Db)` once on an empty SQLite file and
/// once on an empty PostgreSQL database.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite_database {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await
                }
            )*
        }
        mod postgres_database {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------
// On an empty database.

async fn migrate_then_verify_on_an_empty_database_both_exit_zero(db: Db) {
    cli(&db.url, &["migrate"]).await.assert_code(0, "migrate");
    cli(&db.url, &["migrate"])
        .await
        .assert_code(0, "migrate again changes nothing");
    let verify = cli(&db.url, &["verify"]).await;
    verify.assert_code(0, "verify");
    assert!(verify.stdout.trim().is_empty(), "{}", verify.stdout);
}

async fn account_show_of_an_unknown_account_exits_one_with_a_one_line_reason(db: Db) {
    let run = cli(&db.url, &["account", "show", "ghost"]).await;
    run.assert_failure_naming(&["ghost"], "account show ghost");
    assert!(run.stdout.is_empty(), "nothing on stdout: {}", run.stdout);
    cli(&db.url, &["account", "show", "not an id"])
        .await
        .assert_failure_naming(&["not an id"], "account show with a bad id");
}

async fn sweep_on_an_empty_ledger_exits_zero_with_or_without_an_instant(db: Db) {
    cli(&db.url, &["sweep"]).await.assert_code(0, "sweep");
    cli(&db.url, &["sweep", "--at", "2030-01-01T00:00:00Z"])
        .await
        .assert_code(0, "sweep --at");
    cli(&db.url, &["sweep", "--at", "2030-01-01T01:00:00+01:00"])
        .await
        .assert_code(0, "sweep --at with an offset");
}

async fn sweep_at_an_instant_that_is_not_rfc_3339_exits_two_naming_it(db: Db) {
    for garbage in [
        "garbage",
        "2030-01-01",
        "2030-01-01T00:00:00",
        "tomorrow",
        "",
    ] {
        cli(&db.url, &["sweep", "--at", garbage])
            .await
            .assert_bad_usage_naming("--at", &format!("sweep --at {garbage:?}"));
    }
}

async fn report_with_an_unknown_kind_format_or_column_or_a_malformed_instant_or_account_exits_two(
    db: Db,
) {
    cli(&db.url, &["migrate"]).await.assert_code(0, "migrate");
    let folder = tempfile::tempdir().expect("a folder");
    let out = folder.path().join("refused.csv");
    let out = out.to_str().expect("a UTF-8 path");
    let report = |kind: &'static str, options: &[&'static str]| {
        let mut args = vec!["report", kind, "--format", "csv", "--out", out];
        args.extend_from_slice(options);
        args
    };
    let cases = [
        (report("nonsense", &[]), "nonsense"),
        (
            vec!["report", "transactions", "--format", "pdf", "--out", out],
            "pdf",
        ),
        (
            report("transactions", &["--columns", "amount,bogus"]),
            "bogus",
        ),
        // `amount` is a column of transactions, not of audit.
        (report("audit", &["--columns", "at,amount"]), "amount"),
        (
            report("transactions", &["--at", "2026-01-01T00:00:00Z"]),
            "--at",
        ),
        (report("transactions", &["--from", "yesterday"]), "--from"),
        (report("transactions", &["--from", "2026-01-01"]), "--from"),
        (
            report("redemptions", &["--to", "2026-13-01T00:00:00Z"]),
            "--to",
        ),
        (
            report("balances", &["--account", "not an id!"]),
            "--account",
        ),
        (report("balances", &["--account", ""]), "--account"),
        (vec!["report", "transactions", "--format", "csv"], "--out"),
    ];
    for (args, named) in cases {
        cli(&db.url, &args)
            .await
            .assert_bad_usage_naming(named, &format!("{args:?}"));
        assert!(!std::path::Path::new(out).exists(), "{args:?}: no file");
    }
}

async fn report_of_an_unknown_account_exits_one_naming_it(db: Db) {
    cli(&db.url, &["migrate"]).await.assert_code(0, "migrate");
    let folder = tempfile::tempdir().expect("a folder");
    let out = folder.path().join("ghost.csv");
    let out = out.to_str().expect("a UTF-8 path");
    let args = [
        "report",
        "balances",
        "--format",
        "csv",
        "--out",
        out,
        "--account",
        "ghost",
    ];
    cli(&db.url, &args)
        .await
        .assert_failure_naming(&["--account", "ghost"], "an unknown account");
    assert!(!std::path::Path::new(out).exists(), "no file is written");
}

async fn a_bad_configuration_value_exits_one_naming_the_variable(db: Db) {
    for (variable, value) in [
        ("REFUND_WINDOW_DAYS", "abc"),
        ("PENDING_TIMEOUT_DAYS", "-3"),
        ("EXPIRY_REMINDER_DAYS", "30,soon"),
        ("RETRY_DELAYS", "1s,forever"),
        ("SWEEP_CRON", "*/5 * * * *"),
        ("HTTP_ADDR", "everywhere"),
        ("PORTAL_URL", "ftp://portal"),
        ("MAIL_FROM", "not a mailbox"),
        ("AMQP_URL", "http://broker"),
    ] {
        for args in [&["migrate"][..], &["verify"][..], &["sweep"][..]] {
            run(Some(&db.url), args, &[(variable, value)])
                .await
                .assert_failure_naming(&[variable], &format!("{variable}={value} {args:?}"));
        }
    }
}

on_both_databases!(
    migrate_then_verify_on_an_empty_database_both_exit_zero,
    account_show_of_an_unknown_account_exits_one_with_a_one_line_reason,
    sweep_on_an_empty_ledger_exits_zero_with_or_without_an_instant,
    sweep_at_an_instant_that_is_not_rfc_3339_exits_two_naming_it,
    report_with_an_unknown_kind_format_or_column_or_a_malformed_instant_or_account_exits_two,
    report_of_an_unknown_account_exits_one_naming_it,
    a_bad_configuration_value_exits_one_naming_the_variable,
);

// ---------------------------------------------------------------------------
// Without any database.

#[tokio::test]
async fn bad_usage_exits_two() {
    let (url, _keep) = empty_sqlite_url();
    for args in [
        &["frobnicate"][..],
        &[][..],
        &["account"][..],
        &["account", "show"][..],
        &["account", "delete", "acme"][..],
        &["sweep", "--at"][..],
        &["sweep", "--when", "2030-01-01T00:00:00Z"][..],
        &["verify", "extra"][..],
        &["migrate", "--force"][..],
    ] {
        let run = cli(&url, args).await;
        run.assert_code(2, &format!("{args:?}"));
        assert!(
            !run.stderr.trim().is_empty(),
            "{args:?}: usage is explained"
        );
    }
    cli(&url, &["--help"]).await.assert_code(0, "--help");
    cli(&url, &["--version"]).await.assert_code(0, "--version");
}

#[tokio::test]
async fn a_database_url_of_an_unknown_kind_exits_one_naming_the_variable() {
    for url in ["mysql://u:hunter2@db/x", "training-credits.db", "http://db"] {
        let run = run(Some(url), &["migrate"], &[]).await;
        run.assert_failure_naming(&["DATABASE_URL"], url);
        assert!(!run.stderr.contains("hunter2"), "the password never shows");
    }
}

#[tokio::test]
async fn a_sqlite_file_that_cannot_be_created_exits_one() {
    let folder = tempfile::tempdir().expect("a folder");
    let url = format!(
        "sqlite://{}",
        folder.path().join("missing/sub/folder/ledger.db").display()
    );
    cli(&url, &["migrate"])
        .await
        .assert_failure_naming(&["cannot open"], "an impossible SQLite path");
}

// ---------------------------------------------------------------------------
// On a ledger the worker wrote (a World on the same database).

const SHOW_FIELDS: [&str; 13] = [
    "account_id",
    "name",
    "status",
    "approval_mode",
    "owners",
    "code",
    "scope",
    "low_balance_threshold",
    "notes",
    "balance",
    "held",
    "available",
    "lots",
];

const LOT_FIELDS: [&str; 6] = [
    "purchase_id",
    "credits",
    "remaining",
    "held",
    "expires_at",
    "status",
];

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("{value} is an object"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

fn sorted(fields: &[&str]) -> Vec<String> {
    let mut fields: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
    fields.sort();
    fields
}

fn assert_two_decimals(value: &Value, what: &str) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string, not {value}"));
    let (units, cents) = text
        .split_once('.')
        .unwrap_or_else(|| panic!("{what} {text:?} has decimals"));
    assert!(
        !units.is_empty()
            && units.chars().all(|c| c.is_ascii_digit())
            && cents.len() == 2
            && cents.chars().all(|c| c.is_ascii_digit()),
        "{what} {text:?} has exactly two decimals"
    );
}

/// `account show` of `account_id`: one JSON object on one line.
async fn show(url: &str, account_id: &str) -> Value {
    let run = cli(url, &["account", "show", account_id]).await;
    run.assert_code(0, "account show");
    assert_eq!(
        run.stdout.trim_end().lines().count(),
        1,
        "one line: {}",
        run.stdout
    );
    serde_json::from_str(&run.stdout).expect("account show prints JSON")
}

async fn account_show_prints_one_json_object_with_exactly_the_fields_of_the_contract<S: Store>(
    mut w: World<S>,
) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "name": "Acme Ltd",
                "owners": [
                    {"email": "Boss@Acme.test", "name": "Bo Ss"},
                    {"email": "ann@acme.test", "name": "Ann"},
                ],
                "approval_mode": "manual",
                "code": "ACME-1234",
                "scope": {"kind": "activity", "ids": ["c1", "c2"]},
                "low_balance_threshold": "10",
                "notes": "Invoice yearly",
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    // One lot already past its expiry on the wall clock, one far ahead.
    assert_eq!(
        w.purchase_expiring("acme", "p-old", "50", ts("2026-06-01T00:00:00Z"))
            .await,
        Outcome::Applied
    );
    assert_eq!(
        w.purchase_expiring("acme", "p-new", "100", ts("2099-01-01T00:00:00Z"))
            .await,
        Outcome::Applied
    );
    w.now = ts("2026-07-01T00:00:00Z");
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30.5").await,
        Outcome::Applied
    );

    let shown = show(&w.url, "acme").await;
    assert_eq!(keys(&shown), sorted(&SHOW_FIELDS), "{shown:#}");
    assert_eq!(shown["account_id"], "acme");
    assert_eq!(shown["name"], "Acme Ltd");
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["approval_mode"], "manual");
    assert_eq!(
        shown["owners"],
        json!([
            {"email": "boss@acme.test", "name": "Bo Ss"},
            {"email": "ann@acme.test", "name": "Ann"},
        ])
    );
    assert_eq!(shown["code"], "ACME-1234");
    assert_eq!(
        shown["scope"],
        json!({"kind": "activity", "ids": ["c1", "c2"]})
    );
    assert_eq!(shown["low_balance_threshold"], "10.00");
    assert_eq!(shown["notes"], "Invoice yearly");
    for amount in ["balance", "held", "available", "low_balance_threshold"] {
        assert_two_decimals(&shown[amount], amount);
    }
    assert_eq!(shown["balance"], "100.00");
    assert_eq!(shown["held"], "30.50");
    assert_eq!(shown["available"], "69.50");

    let lots = shown["lots"].as_array().expect("lots is an array");
    assert_eq!(lots.len(), 2);
    for lot in lots {
        assert_eq!(keys(lot), sorted(&LOT_FIELDS), "{lot:#}");
        for amount in ["credits", "remaining", "held"] {
            assert_two_decimals(&lot[amount], amount);
        }
        let expires_at = lot["expires_at"].as_str().expect("expires_at is text");
        assert!(
            chrono::DateTime::parse_from_rfc3339(expires_at).is_ok(),
            "{expires_at} is RFC 3339"
        );
    }
    assert_eq!(
        lots[0],
        json!({
            "purchase_id": "p-old",
            "credits": "50.00",
            "remaining": "50.00",
            "held": "0.00",
            "expires_at": "2026-06-01T00:00:00Z",
            "status": "expired",
        })
    );
    assert_eq!(
        lots[1],
        json!({
            "purchase_id": "p-new",
            "credits": "100.00",
            "remaining": "100.00",
            "held": "30.50",
            "expires_at": "2099-01-01T00:00:00Z",
            "status": "active",
        })
    );

    // An account without the optional settings shows them as null, and
    // the scope as everything.
    assert_eq!(
        w.open("bare", "automatic", "solo@bare.test", "BARE-1234")
            .await,
        Outcome::Applied
    );
    let bare = show(&w.url, "bare").await;
    assert_eq!(keys(&bare), sorted(&SHOW_FIELDS));
    assert_eq!(bare["scope"], json!({"kind": "all"}));
    assert_eq!(bare["low_balance_threshold"], Value::Null);
    assert_eq!(bare["notes"], Value::Null);
    assert_eq!(bare["lots"], json!([]));
    assert_eq!(
        (&bare["balance"], &bare["held"], &bare["available"]),
        (&json!("0.00"), &json!("0.00"), &json!("0.00"))
    );
}

async fn account_show_echoes_hostile_text_verbatim<S: Store>(mut w: World<S>) {
    let text =
        "'); DROP TABLE accounts; -- \"quoted\" \u{1}\u{1b}[31m\r\n日本語 👩🏽‍🏫 e\u{301} \u{202e}";
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "name": text,
                "owners": [{"email": "boss@acme.test", "name": text}],
                "approval_mode": "automatic",
                "notes": text,
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    let shown = show(&w.url, "acme").await;
    assert_eq!(shown["name"], text);
    assert_eq!(shown["notes"], text);
    assert_eq!(shown["owners"][0]["name"], text);
    cli(&w.url, &["verify"]).await.assert_code(0, "verify");
}

async fn sweep_at_an_instant_expires_what_is_due_by_then<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "manual", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.purchase_expiring("acme", "p2", "40", ts("2031-01-01T00:00:00Z"))
            .await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert!(w.events_of("training-credits.lot.expired").await.is_empty());

    let sweep = cli(&w.url, &["sweep", "--at", "2030-01-01T00:00:00Z"]).await;
    sweep.assert_code(0, "sweep --at 2030");

    // p1 (bought 2026-01-01, one year) is due; p2 is not; the pending
    // request timed out long before.
    let expired = w.events_of("training-credits.lot.expired").await;
    assert_eq!(expired.len(), 1, "{expired:#?}");
    assert_eq!(expired[0]["purchase_id"], "p1");
    // Its 30 held credits were released by the timeout into an expired lot
    // and so expired at once (SPEC §6 rule 4); the rest by the sweep.
    assert_eq!(expired[0]["expired"], "70.00");
    assert_eq!(
        w.events_of("training-credits.redemption.expired")
            .await
            .len(),
        1
    );
    let (remaining, held) = w.lot("acme", "p1").await;
    assert_eq!((remaining.as_str(), held.as_str()), ("0.00", "0.00"));
    let (remaining, held) = w.lot("acme", "p2").await;
    assert_eq!((remaining.as_str(), held.as_str()), ("40.00", "0.00"));
    w.now = ts("2030-01-01T00:00:00Z");
    assert_eq!(w.available("acme").await, "40.00");
    w.verify_ok().await;

    // The same sweep again changes nothing.
    let events = w.events().await.len();
    cli(&w.url, &["sweep", "--at", "2030-01-01T00:00:00Z"])
        .await
        .assert_code(0, "the same sweep again");
    assert_eq!(w.events().await.len(), events);
    cli(&w.url, &["verify"]).await.assert_code(0, "verify");

    // The edges of the calendar are instants like any other.
    for at in [
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "2030-01-01T00:00:00.999999-12:00",
    ] {
        cli(&w.url, &["sweep", "--at", at])
            .await
            .assert_code(0, &format!("sweep --at {at}"));
    }
    cli(&w.url, &["verify"]).await.assert_code(0, "verify");
}

async fn verify_names_the_problem_when_the_ledger_is_tampered_with<S: Store>(mut w: World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    cli(&w.url, &["verify"])
        .await
        .assert_code(0, "verify before tampering");

    let changed = execute_sql(&w.url, "UPDATE lots SET remaining = remaining + 1").await;
    assert_eq!(changed, 1);
    let verify = cli(&w.url, &["verify"]).await;
    assert_ne!(verify.code, Some(0), "verify finds the tampering");
    assert_eq!(verify.code, Some(1));
    let said = format!("{}{}", verify.stdout, verify.stderr);
    for name in ["p1", "acme", "remaining"] {
        assert!(said.contains(name), "verify names {name}: {said}");
    }
    assert_eq!(
        verify.stderr.trim().lines().count(),
        1,
        "one line on stderr: {}",
        verify.stderr
    );
}

on_both_backends!(
    account_show_prints_one_json_object_with_exactly_the_fields_of_the_contract,
    account_show_echoes_hostile_text_verbatim,
    sweep_at_an_instant_expires_what_is_due_by_then,
    verify_names_the_problem_when_the_ledger_is_tampered_with,
);

// ---------------------------------------------------------------------------
// On a busy PostgreSQL database.

/// A statement that waits over a second is a figure of load, not a fault:
/// the one-line reason stays one line (sqlx notes slow statements at `warn`
/// unless told otherwise).
#[tokio::test]
async fn a_statement_slowed_by_a_busy_database_adds_nothing_to_the_one_line_reason() {
    use sqlx::Connection;
    let db = Db::postgres().await;
    cli(&db.url, &["migrate"]).await.assert_code(0, "migrate");
    let mut holder = sqlx::PgConnection::connect(&db.url)
        .await
        .expect("a connection");
    let mut watcher = sqlx::PgConnection::connect(&db.url)
        .await
        .expect("a connection");
    sqlx::raw_sql("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .expect("the accounts are locked");
    let url = db.url.clone();
    let show = tokio::spawn(async move { cli(&url, &["account", "show", "ghost"]).await });
    // Once the command waits for the lock, it waits over a second more.
    let waiting = async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut watcher)
            .await
            .expect("the activity is read");
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("the command reaches the locked table");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut holder)
        .await
        .expect("the lock is released");
    show.await
        .expect("the command ran")
        .assert_failure_naming(&["ghost"], "account show ghost on a busy database");
}
